"""Turn what the user typed (a path, a pull name, a hub id) into a local ModelSource.

Rules, in order:
  1. an existing file: a GGUF file (detected by its magic bytes, never by its name);
  2. an existing directory: `gguf_file` inside it when given; else an HF checkpoint when it holds
     config.json; else its only .gguf file;
  3. a `tokenloom pull` name, in any case: the pulled file (pulled now when allow_pull, else from the
     cache);
  4. a string shaped `org/name`: a Hugging Face Hub id, downloaded, then rule 2 on the snapshot;
  5. anything else: ModelNotFoundError.
Pull names and hub ids are only considered for `str` inputs; a Path always means a local path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tokenloom.errors import GGUFFormatError, ModelLoadError, ModelNotFoundError
from tokenloom.loading.checkpoint import ModelSource
from tokenloom.loading.gguf_reader import GGUF_MAGIC
from tokenloom.loading.paths import contained_path
from tokenloom.loading.pull import cached_model_path, list_pullable, pull
from tokenloom.loading.pull_registry import canonical_name, close_names

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9_.\-]+$")


def is_gguf_file(path: Path) -> bool:
    """True when the file starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def _pull_hint() -> str:
    return (
        "pass a .gguf file, an HF checkpoint directory (with config.json) or a hub id `org/name`, "
        f"or run `tokenloom pull NAME` with NAME one of: {', '.join(list_pullable())}"
    )


def _gguf_source(path: Path) -> ModelSource:
    if not is_gguf_file(path):
        raise GGUFFormatError(
            f"{path} is not a GGUF file (it does not start with the bytes {GGUF_MAGIC!r})",
            hint="for an HF checkpoint pass its directory (the one holding config.json)",
        )
    return ModelSource(kind="gguf", path=path)


def _from_directory(directory: Path, gguf_file: str | None, label: str) -> ModelSource:
    if gguf_file is not None:
        candidate = contained_path(directory, gguf_file, "gguf_file")
        if not candidate.is_file():
            ggufs = sorted(p.name for p in directory.glob("*.gguf") if p.is_file())
            found = f"; .gguf files there: {', '.join(ggufs)}" if ggufs else ""
            raise ModelNotFoundError(f"gguf_file {gguf_file!r} not found in {label}{found}")
        return _gguf_source(candidate)
    if (directory / "config.json").is_file():
        return ModelSource(kind="hf", path=directory)
    ggufs = sorted(p for p in directory.glob("*.gguf") if p.is_file())
    if len(ggufs) == 1:
        return _gguf_source(ggufs[0])
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise ModelNotFoundError(
            f"{label} holds several .gguf files ({names}) and no config.json; choose one with gguf_file=NAME",
            hint="or pass the .gguf file's own path",
        )
    raise ModelNotFoundError(f"{label} holds neither config.json nor a .gguf file", hint=_pull_hint())


def _from_pull_name(name: str, gguf_file: str | None, allow_pull: bool, progress: bool) -> ModelSource:
    if allow_pull:
        path = pull(name, progress=progress)
    else:
        cached = cached_model_path(name)
        if cached is None:
            raise ModelNotFoundError(
                f"model {name!r} has not been pulled yet",
                hint=f"run `tokenloom pull {name}` first",
            )
        path = cached
    if gguf_file is not None and gguf_file != path.name:
        return _from_directory(path.parent, gguf_file, f"pulled model {name!r} ({path.parent})")
    return ModelSource(kind="gguf", path=path)


def resolve_model(
    name_or_path: str | os.PathLike[str],
    gguf_file: str | None = None,
    *,
    revision: str | None = None,
    allow_pull: bool = True,
    progress: bool = True,
) -> ModelSource:
    """Resolve a local path, a `tokenloom pull` name or a hub id `org/name` to a local ModelSource.

    Raises ModelNotFoundError (nothing there), GGUFFormatError (a file that is not GGUF),
    HubUnavailableError (a hub id that cannot be fetched) or PullError (a failed pull).
    """
    if isinstance(name_or_path, str) and not name_or_path.strip():
        raise ModelNotFoundError("model name or path is empty", hint=_pull_hint())
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ModelNotFoundError(
            f"a model is named by a path, a pull name or a hub id (a string), got {type(name_or_path).__name__}"
        )
    if isinstance(name_or_path, str) and "\0" in name_or_path:
        raise ModelNotFoundError(f"model name or path {name_or_path!r} contains a NUL character")
    if gguf_file is not None:
        contained_path(Path("<the model directory>"), gguf_file, "gguf_file")  # before anything is fetched
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_file():
        if gguf_file is not None:
            raise ModelLoadError(
                f"gguf_file={gguf_file!r} was given, but {path} is a file",
                hint="gguf_file names a file inside a directory or hub repository",
            )
        return _gguf_source(path.absolute())
    if path.is_dir():
        return _from_directory(path.absolute(), gguf_file, str(path))
    hint = _pull_hint()
    if isinstance(name_or_path, str):
        pull_name = canonical_name(name_or_path, hub_ids=False)  # SmolLM2-135M-Instruct works too
        if pull_name is not None:
            return _from_pull_name(pull_name, gguf_file, allow_pull, progress)
        if _HUB_ID.match(name_or_path):
            from tokenloom.loading.hub import resolve_hub_id

            snapshot = resolve_hub_id(name_or_path, revision=revision, gguf_file=gguf_file)
            return _from_directory(snapshot, gguf_file, f"hub model {name_or_path!r} ({snapshot})")
        near = close_names(name_or_path) if "/" not in name_or_path else []
        if near:
            hint = f"did you mean {' or '.join(repr(n) for n in near)}? " + hint
    raise ModelNotFoundError(f"no model at {str(name_or_path)!r}: no such file or directory", hint=hint)
