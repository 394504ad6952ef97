"""What every `tokenloom` subcommand shares: the argument parser with one-line errors and hints,
help that shows defaults and examples, the CLI's names for library parameters, and stderr output.

Only the result of a command goes to stdout; notes, progress and errors go to stderr. Progress bars
are drawn only when stderr is a terminal, so a file or pipe never receives `\\r` sequences.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from tokenloom.errors import TokenloomError


class CliError(TokenloomError):
    """A command cannot run as asked; printed as one line and a hint, exit status 1."""

    exit_code = 1


class UsageError(CliError):
    """The command line itself is wrong (argparse's errors among them); exit status 2."""

    exit_code = 2


# ---------------------------------------------------------------- names


# Library parameter -> the flag a CLI user typed, so errors speak the user's language.
PARAM_FLAGS: dict[str, str] = {
    "max_tokens": "--max-new-tokens",
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "min_p": "--min-p",
    "repetition_penalty": "--repetition-penalty",
    "presence_penalty": "--presence-penalty",
    "frequency_penalty": "--frequency-penalty",
    "no_repeat_ngram_size": "--no-repeat-ngram-size",
    "stop": "--stop",
    "stop_strings": "--stop",
    "seed": "--seed",
    "logprobs": "--logprobs",
    "device_map": "--device",
    "dtype": "--dtype",
}
_PARAM_NAME = re.compile(
    r"(?<![\w-])(" + "|".join(sorted(map(re.escape, PARAM_FLAGS), key=len, reverse=True)) + r")(?!\w)(=?)"
)


def name_flags(message: str) -> str:
    """`message` with library parameter names replaced by the CLI flags: top_p -> --top-p,
    device_map='cuda' -> --device 'cuda'."""
    return _PARAM_NAME.sub(lambda m: PARAM_FLAGS[m.group(1)] + (" " if m.group(2) else ""), message)


def flag_message(exc: Exception) -> str:
    """The message of a rejected parameter, naming the CLI flag: the one parameter table renames its
    own errors (sampling_params.ParameterError); other messages have their names replaced."""
    from tokenloom.sampling_params import ParameterError

    if isinstance(exc, ParameterError):
        return str(exc.renamed(PARAM_FLAGS))
    return name_flags(str(exc))


def close_matches(word: str, choices: Sequence[str], limit: int = 1) -> list[str]:
    """The choices that look like a misspelling of `word` (underscores read as dashes; an unambiguous
    prefix counts), closest first."""
    typed = word.replace("_", "-")
    exact = [c for c in choices if c == typed]
    prefixed = [c for c in choices if c.startswith(typed)] if len(typed) > 3 else []
    if exact or len(prefixed) == 1:
        return (exact or prefixed)[:limit]
    return difflib.get_close_matches(typed, list(choices), n=limit, cutoff=0.6)


# ---------------------------------------------------------------- output


def note(message: str, args: argparse.Namespace | None = None) -> None:
    """A line for the human on stderr; silent with -q/--quiet."""
    if args is not None and getattr(args, "quiet", False):
        return
    print(message, file=sys.stderr, flush=True)


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars only on a terminal, and never with -q/--quiet."""
    return not getattr(args, "quiet", False) and isatty(sys.stderr)


def isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def print_error(message: str, hint: str | None = None, details: str | None = None) -> None:
    """`tokenloom: error: ...` (its first line) and `hint: ...` on stderr, after any details."""
    if details:
        for line in details.rstrip().splitlines():
            print(f"  | {line}", file=sys.stderr)
    lines = message.strip().splitlines()
    print(f"tokenloom: error: {lines[0] if lines else 'failed'}", file=sys.stderr)
    if hint:
        print(f"hint: {' '.join(hint.split())}", file=sys.stderr, flush=True)


def human_size(num_bytes: int) -> str:
    """1234567 -> '1.2 MB' (powers of 1000, as file managers and pip show sizes)."""
    size = float(num_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' layout and shows each option's default when it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text and "default:" not in text and action.option_strings
            and default not in (None, False, argparse.SUPPRESS) and not isinstance(default, list)
        ):  # fmt: skip
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with errors as one line plus a hint (raised as UsageError, printed by `main`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # a new option must never change what an old abbreviation meant
        super().__init__(*args, **kwargs)
        self.commands: dict[str, ArgumentParser] = {}

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, hint=self._hint(message))

    def _hint(self, message: str) -> str:
        choice = re.match(r"argument (\w+): invalid choice: '([^']*)'", message)
        if choice and self.commands:
            close = close_matches(choice.group(2), list(self.commands))
            if close:
                return f"did you mean `{self.prog} {close[0]}`? (`{self.prog} --help` lists the commands)"
            return f"`{self.prog} --help` lists the commands"
        return f"run `{self.prog} --help` for the options"

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self.commands.get(getattr(parsed, "command", None) or "", self)
            raise UsageError(f"unrecognized arguments: {' '.join(extras)}", hint=_extras_hint(command, parsed, extras))
        return parsed


def _extras_hint(parser: argparse.ArgumentParser, args: argparse.Namespace, extras: list[str]) -> str:
    flags = [a for a in extras if a.startswith("-") and len(a) > 1]
    if flags:
        known = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
        name = flags[0].split("=", 1)[0]
        close = close_matches(name, known)
        if close:
            return f"did you mean {close[0]}? (`{parser.prog} --help` lists the options)"
        return f"`{parser.prog} --help` lists the options"
    if getattr(args, "prompt", None) is not None:
        words = " ".join([args.prompt, *extras]).replace('"', '\\"')
        return f'quote the prompt so that it is one argument: {parser.prog} "{words}"'
    return f"`{parser.prog}` takes no such arguments; run `{parser.prog} --help`"


def add_command(
    subparsers: Any, name: str, *, help: str, description: str | None = None, examples: Sequence[str] = ()
) -> ArgumentParser:
    """A subcommand parser with the shared conventions: our errors, defaults in --help, examples."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples) if examples else None
    text = description or help[:1].upper() + help[1:] + "."
    parser = subparsers.add_parser(
        name, help=help, description=textwrap.fill(text, 88), epilog=epilog,
        formatter_class=HelpFormatter, allow_abbrev=False,
    )  # fmt: skip
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars and no notes on stderr (errors still print)")
    root = getattr(subparsers, "_tokenloom_root", None)
    if root is not None:
        root.commands[name] = parser
    return parser


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse `type`: an integer >= `minimum`, else an ArgumentTypeError saying so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse
