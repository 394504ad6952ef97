"""`tokenloom` command line (L6): generate, chat, pull, list, rm, bench, serve.

Each subcommand lives in a module with `register(subparsers)`, which adds its parser (through
`tokenloom.cli.common.add_command`, for the shared conventions) and sets `func` to the function that
runs it and returns the exit status. Adding a subcommand is one line in COMMANDS. Building the parser
imports no torch, so `tokenloom --help` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys

from tokenloom import __version__
from tokenloom.cli.common import ArgumentParser, CliError, print_error

COMMANDS = (
    "tokenloom.cli.generate",
    "tokenloom.cli.chat",
    "tokenloom.cli.models",
    "tokenloom.cli.bench",
    "tokenloom.cli.serve",
)

EXAMPLES = (
    'tokenloom generate "A list of colors: red, blue" -n 40',
    "tokenloom chat",
    "tokenloom pull",
    "tokenloom generate --help",
)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="tokenloom",
        description="Fast, faithful LLM text generation.",
        epilog="examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES),
    )
    parser.add_argument("--version", action="version", version=f"tokenloom {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub._tokenloom_root = parser  # type: ignore[attr-defined]  # add_command records each parser here
    for module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tokenloom.errors import TokenloomError

    args = None
    try:
        parser = build_parser()
        argv = sys.argv[1:] if argv is None else argv
        if not argv:
            parser.print_help()
            return 0
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        return int(args.func(args) or 0)
    except CliError as exc:
        print_error(str(exc), exc.hint)
        return exc.exit_code
    except TokenloomError as exc:
        print_error(str(exc), exc.hint, getattr(exc, "details", None))
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        command = getattr(args, "command", None)
        print_error(str(exc), f"run `tokenloom {command} --help` for the accepted options"
                    if command else "run `tokenloom --help`")
    except BrokenPipeError:  # the reader went away (`| head`): not an error of ours
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as exc:
        if os.environ.get("TOKENLOOM_DEBUG"):
            raise
        if _is_out_of_memory(exc):  # torch's allocators raise RuntimeError (CUDA: OutOfMemoryError)
            print_error("out of memory", "use a smaller model or a smaller --max-new-tokens; TOKENLOOM_DEBUG=1 "
                        "shows where")
        else:
            print_error(f"{type(exc).__name__}: {exc}", "set TOKENLOOM_DEBUG=1 to see the full traceback")
    except MemoryError:
        if os.environ.get("TOKENLOOM_DEBUG"):
            raise
        print_error("out of memory", "use a smaller model or a smaller --max-new-tokens; TOKENLOOM_DEBUG=1 shows where")
    return 1


def _is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text or "can't allocate memory" in text


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so that the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


__all__ = ["COMMANDS", "build_parser", "main"]
