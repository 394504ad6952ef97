"""`tokenloom chat`: an interactive conversation that keeps its history.

On a terminal: line editing and a history of what was typed (readline; kept in the cache
directory across sessions), a speaker marker on each turn and a blank line between turns. Ctrl-C
during a reply stops it (what was shown stays in the conversation) and returns to the prompt; Ctrl-C
at the prompt right after that, or twice there, or Ctrl-D, ends the chat. Lines starting with `/`
are commands (/help lists them); `//text` sends `/text` as a message.

Without a terminal on stdin (a pipe, a file) each line is a message and only the replies are
printed, one after the other.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenloom.cli.common import add_command, close_matches, isatty, note, print_error
from tokenloom.cli.model_options import (
    add_chat_template_arg,
    add_model_args,
    add_sampling_args,
    check_chat_template,
    check_sampling_args,
    load_llm,
    prepare_model,
    read_chat_template,
    sampling_params,
)
from tokenloom.cli.speculative_options import (
    add_generate_speculative_args,
    generate_speculative_config,
    load_draft,
    prepare_draft,
)

EXAMPLES = (
    "tokenloom chat",
    'tokenloom chat --system "You are terse." --stats',
    "tokenloom chat -m gemma3-270m --chat-template my_template.jinja",
)
COMMANDS = {
    "/help": "show this help",
    "/reset": "start a new conversation (the system message stays)",
    "/system": "/system TEXT sets the system message; /system alone shows it",
    "/save": "/save FILE writes the conversation to FILE as JSON (a list of messages)",
    "/exit": "end the chat (also /quit, /bye, Ctrl-D)",
}
_EXIT = {"/exit", "/quit", "/bye"}
HISTORY_FILE = "chat_history"
_HISTORY_LENGTH = 1000


def register(subparsers: Any) -> None:
    p = add_command(
        subparsers, "chat", help="interactive chat that keeps the conversation",
        description="Chat with the model. Commands: " + ", ".join(COMMANDS) + ". Ctrl-C stops a reply; "
        "Ctrl-D ends the chat.", examples=EXAMPLES,
    )  # fmt: skip
    add_model_args(p)
    add_sampling_args(p, 512)
    p.add_argument("--system", default=None, metavar="TEXT", help="system message")
    add_chat_template_arg(p)
    p.add_argument("--stats", action="store_true", help="after each reply: tokens, tokens/s and time to first token")
    add_generate_speculative_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    speculative = generate_speculative_config(args)
    check_sampling_args(args)
    template = read_chat_template(args)
    source = prepare_model(args)
    draft_source = prepare_draft(args)
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    check_chat_template(args, source, template, system)  # before the slow load
    llm = load_llm(args, source, speculative)
    load_draft(llm, draft_source, args)
    params = sampling_params(llm, args)
    return ChatSession(llm, params, args, template).loop()


class _Style:
    """ANSI styling on a terminal (not with NO_COLOR or TERM=dumb); readline-safe prompt escapes."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def wrap(self, text: str, code: str, for_readline: bool = False) -> str:
        if not self.enabled:
            return text
        start, end = f"\x1b[{code}m", "\x1b[0m"
        if for_readline:  # \001 \002 tell readline these bytes take no room on the line
            start, end = f"\001{start}\002", f"\001{end}\002"
        return f"{start}{text}{end}"


class ChatSession:
    """The conversation, its commands and the REPL loop."""

    def __init__(self, llm: Any, params: Any, args: argparse.Namespace, template: str | None) -> None:
        self.llm = llm
        self.params = params
        self.args = args
        self.template = template
        self.system: str | None = args.system
        self.turns: list[dict[str, str]] = []
        self.interactive = isatty(sys.stdin)
        self.style = _Style(self.interactive and isatty(sys.stdout) and not os.environ.get("NO_COLOR")
                            and os.environ.get("TERM") != "dumb")
        self._last_was_interrupt = False

    @property
    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        return system + self.turns

    # ---- the loop ------------------------------------------------------------------------
    def loop(self) -> int:
        with _line_history(self.interactive):
            if self.interactive:
                note(f"chatting with {self.args.model}; /help for commands, Ctrl-C stops a reply, "
                     "Ctrl-D quits", self.args)
            prompt = self.style.wrap("you>", "1;32", for_readline=True) + " " if self.interactive else ""
            while True:
                try:
                    line = input(prompt)
                except EOFError:
                    if self.interactive:
                        print(file=sys.stderr)
                    return 0
                except KeyboardInterrupt:
                    print(file=sys.stderr)
                    if self._last_was_interrupt:
                        return 0
                    self._last_was_interrupt = True
                    note("(Ctrl-C again or Ctrl-D to quit)")
                    continue
                self._last_was_interrupt = False
                if not line.strip():
                    continue
                if line.startswith("/") and not line.startswith("//"):
                    if self.command(line.strip()) == "exit":
                        return 0
                    continue
                try:
                    self.reply(line[1:] if line.startswith("//") else line)
                except KeyboardInterrupt:  # outside the streaming loop (rendering the template, say)
                    if self.turns and self.turns[-1]["role"] == "user":
                        self.turns.pop()
                    print(file=sys.stderr)
                    note("(interrupted)")
                    self._last_was_interrupt = True

    def command(self, line: str) -> str | None:
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in _EXIT:
            return "exit"
        if name == "/help":
            width = max(map(len, COMMANDS))
            for command, text in COMMANDS.items():
                print(f"  {command:<{width}}  {text}", file=sys.stderr)
            print("  //text sends a message that starts with /; Ctrl-C stops a reply; Ctrl-D quits",
                  file=sys.stderr, flush=True)
        elif name == "/reset":
            self.turns = []
            print("(conversation cleared" + (", system message kept)" if self.system else ")"),
                  file=sys.stderr, flush=True)
        elif name == "/system":
            self._system(rest)
        elif name == "/save":
            self._save(rest)
        else:
            close = close_matches(name, list(COMMANDS) + sorted(_EXIT))
            hint = f"did you mean {close[0]}? " if close else ""
            print_error(f"unknown command {name}", f"{hint}/help lists the commands; //text sends a message "
                        "that starts with /")
        return None

    def _system(self, text: str) -> None:
        if not text:
            print(f"(system message: {self.system!r})" if self.system is not None else "(no system message)",
                  file=sys.stderr, flush=True)
            return
        previous, self.system = self.system, text
        try:
            self.llm.chat_prompt([*self.messages, {"role": "user", "content": "hello"}], chat_template=self.template)
        except ValueError as exc:
            self.system = previous
            print_error(f"the chat template does not take this system message: {exc}", "/system is unchanged")
            return
        print("(system message set)", file=sys.stderr, flush=True)

    def _save(self, target: str) -> None:
        if not target:
            print_error("/save needs a file name", "/save conversation.json")
            return
        path = Path(target).expanduser()
        try:
            path.write_text(json.dumps(self.messages, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            print_error(f"could not write {path}: {exc.strerror or exc}", "check that the directory exists")
            return
        print(f"(saved {len(self.messages)} messages to {path})", file=sys.stderr, flush=True)

    # ---- one reply -----------------------------------------------------------------------
    def reply(self, text: str) -> None:
        self.turns.append({"role": "user", "content": text})
        try:
            prompt_ids = self.llm.chat_prompt(self.messages, chat_template=self.template)
        except ValueError as exc:
            self.turns.pop()
            print_error(str(exc), "/reset starts a new conversation")
            return
        if self.interactive:
            sys.stdout.write(self.style.wrap("assistant>", "1;34") + " ")
            sys.stdout.flush()
        pieces: list[str] = []
        finish_reason, num_tokens, first, start = None, 0, None, time.perf_counter()
        with _sigint_flag() as interrupted:
            stream = self.llm.stream(prompt_ids, self.params)
            try:
                for out in stream:
                    if first is None and out.new_token_ids:
                        first = time.perf_counter()
                    num_tokens += len(out.new_token_ids)
                    sys.stdout.write(out.text_delta)
                    sys.stdout.flush()
                    pieces.append(out.text_delta)
                    finish_reason = out.finish_reason
                    if interrupted():
                        break
            except ValueError as exc:  # e.g. the conversation outgrew the context: keep the session
                self.turns.pop()
                sys.stdout.write("\n")
                print_error(str(exc), "/reset starts a new conversation")
                return
            finally:
                stream.close()  # aborts the request when the reply was stopped
            stopped = interrupted()
        sys.stdout.write("\n\n" if self.interactive else "\n")
        sys.stdout.flush()
        self._last_was_interrupt = stopped
        self.turns.append({"role": "assistant", "content": "".join(pieces)})
        if stopped:
            note("(reply stopped; Ctrl-C again or Ctrl-D quits)")
        elif finish_reason == "length":
            note(f"(the reply stopped at the token limit, --max-new-tokens {self.params.max_tokens})", self.args)
        if self.args.stats:
            elapsed = time.perf_counter() - (first or start)
            rate = f"{(num_tokens - 1) / elapsed:.1f} tok/s" if num_tokens > 1 and elapsed > 0 else "- tok/s"
            first_s = f"{(first or time.perf_counter()) - start:.2f}s"
            note(f"({num_tokens} tokens, {rate}, first token after {first_s})")


@contextlib.contextmanager
def _sigint_flag() -> Iterator[Any]:
    """While inside, Ctrl-C sets a flag (read by calling the yielded function) instead of raising, so a
    reply stops between two engine steps and never in the middle of one."""
    hits: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: hits.append(signum))
    except ValueError:  # not the main thread: Ctrl-C keeps its default behaviour
        yield lambda: False
        return
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _line_history(interactive: bool) -> Iterator[None]:
    """readline editing, with what was typed kept in `<cache>/chat_history` across sessions."""
    if not interactive:
        yield
        return
    try:
        import readline
    except ImportError:  # pragma: no cover - no readline on this platform
        yield
        return
    from tokenloom.loading.pull import tokenloom_home

    path = tokenloom_home() / HISTORY_FILE
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(_HISTORY_LENGTH)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)

