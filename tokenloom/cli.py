"""`tokenloom` command line (L6): generate, chat, pull, bench."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from tokenloom.config import DEFAULT_MODEL


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"path (.gguf or HF directory), pull name or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model's directory or repo")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    p.add_argument("--dtype", default=None, help="auto, float32, bfloat16 or float16")


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", "-n", type=_positive_int, default=max_new_tokens)
    p.add_argument("--temperature", "-t", type=float, default=None,
                   help="0 for greedy; default: the model's generation_config (greedy when it says nothing)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="transformers' repetition_penalty (> 1 discourages repeating prompt or output tokens)")
    p.add_argument("--presence-penalty", type=float, default=None)
    p.add_argument("--frequency-penalty", type=float, default=None)
    p.add_argument("--no-repeat-ngram-size", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when TEXT appears in the output (repeatable); the text is not printed")
    p.add_argument("--seed", type=int, default=None)


def _add_chat_template_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template file to use instead of the model's own (base models ship none)")


def _chat_template(args: argparse.Namespace) -> str | None:
    """The --chat-template file's text, read before the slow model load."""
    if args.chat_template is None:
        return None
    from pathlib import Path

    path = Path(args.chat_template)
    if not path.is_file():
        raise FileNotFoundError(f"--chat-template {args.chat_template!r}: no such file")
    return path.read_text(encoding="utf-8")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenloom", description="Fast, faithful LLM text generation.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a continuation of PROMPT, streamed to stdout")
    gen.add_argument("prompt")
    _add_model_args(gen)
    _add_sampling_args(gen, 128)
    gen.add_argument("--chat", action="store_true", help="send PROMPT as a user message through the chat template")
    _add_chat_template_arg(gen)
    gen.add_argument("--no-echo", action="store_true", help="do not print the prompt before the continuation")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat that keeps the conversation")
    _add_model_args(chat)
    _add_sampling_args(chat, 512)
    chat.add_argument("--system", default=None, help="system message")
    _add_chat_template_arg(chat)
    chat.set_defaults(func=cmd_chat)

    pull = sub.add_parser("pull", help="download a named model into the cache; prints its path last")
    pull.add_argument("name", nargs="?", help="model name (omit to list the names)")
    pull.set_defaults(func=cmd_pull)

    bench = sub.add_parser("bench", help="measure load time, decode and prefill speed against transformers")
    from tokenloom.bench import add_arguments

    add_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def _load(args: argparse.Namespace):
    import time

    from tokenloom.llm import LLM

    start = time.perf_counter()
    llm = LLM(args.model, gguf_file=args.gguf_file, device_map=args.device, dtype=args.dtype, progress=True)
    loaded = llm.loaded
    print(f"loaded {loaded.checkpoint.source.path.name} in {time.perf_counter() - start:.2f}s "
          f"on {loaded.device} ({str(loaded.dtype).replace('torch.', '')})", file=sys.stderr)
    return llm


def _check_sampling_args(args: argparse.Namespace) -> None:
    """Reject bad sampling flags (SamplingParams' own messages) before the slow model load."""
    from tokenloom.sampling_params import SamplingParams

    SamplingParams(**{k: v for k, v in _sampling_flags(args).items() if v is not None})


def _sampling_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
        "top_p": args.top_p, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
        "presence_penalty": args.presence_penalty, "frequency_penalty": args.frequency_penalty,
        "no_repeat_ngram_size": args.no_repeat_ngram_size, "stop": args.stop, "seed": args.seed,
    }


def _params(llm: Any, args: argparse.Namespace):
    return llm.sampling_params(**_sampling_flags(args))


def _stream(llm: Any, prompt: Any, params: Any) -> str:
    text = []
    for out in llm.stream(prompt, params):
        sys.stdout.write(out.text_delta)
        sys.stdout.flush()
        text.append(out.text_delta)
    return "".join(text)


def cmd_generate(args: argparse.Namespace) -> int:
    _check_sampling_args(args)
    template = _chat_template(args)
    llm = _load(args)
    params = _params(llm, args)
    if args.chat:
        prompt: Any = llm.chat_prompt([{"role": "user", "content": args.prompt}], chat_template=template)
    else:
        prompt = args.prompt
        if not args.no_echo:
            sys.stdout.write(args.prompt)
    _stream(llm, prompt, params)
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    _check_sampling_args(args)
    template = _chat_template(args)
    llm = _load(args)
    params = _params(llm, args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("chat with the model; /reset clears the conversation, /exit (or Ctrl-D) quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = _stream(llm, llm.chat_prompt(history, chat_template=template), params)
        except ValueError as exc:  # e.g. the conversation outgrew the context: keep the session
            history.pop()
            _error(str(exc), "/reset starts a new conversation")
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply})


def cmd_pull(args: argparse.Namespace) -> int:
    from tokenloom.loading.pull import list_pullable, pull

    if not args.name:
        print("\n".join(list_pullable()))
        return 0
    path = pull(args.name, progress=True)
    print(path)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tokenloom.bench import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    from tokenloom.errors import TokenloomError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TokenloomError as exc:
        _error(str(exc), exc.hint)
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        _error(str(exc), "run `tokenloom " + args.command + " --help` for the accepted options")
    except (RuntimeError, OSError) as exc:
        if os.environ.get("TOKENLOOM_DEBUG"):
            raise
        _error(f"{type(exc).__name__}: {exc}", "set TOKENLOOM_DEBUG=1 to see the full traceback")
    except MemoryError:
        if os.environ.get("TOKENLOOM_DEBUG"):
            raise
        _error("out of memory", "use a smaller model or a smaller --max-new-tokens; TOKENLOOM_DEBUG=1 shows where")
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 1


def _error(message: str, hint: str | None) -> None:
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"tokenloom: error: {first_line}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
