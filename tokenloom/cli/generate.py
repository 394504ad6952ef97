"""`tokenloom generate`: one prompt in, its continuation streamed to stdout (or one JSON object)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

from tokenloom.cli.common import CliError, UsageError, add_command
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
from tokenloom.sampling_params import ParameterError

EXAMPLES = (
    'tokenloom generate "A list of colors: red, blue" -n 40',
    'tokenloom generate --chat --system "You are terse." "Name three rivers."',
    "echo 'Once upon a time' | tokenloom generate - -n 60 --temperature 0.8 --seed 1",
    "tokenloom generate --file prompt.txt --json --logprobs 3 > out.json",
    'tokenloom generate --chat "A person as JSON" --json-schema person.schema.json --temperature 1',
    'tokenloom generate --chat "Repeat this sentence: the cat sat on the mat." --prompt-lookup 5',
)


def register(subparsers: Any) -> None:
    p = add_command(
        subparsers, "generate", help="generate a continuation of PROMPT, streamed to stdout",
        description="Generate a continuation of PROMPT and stream it to stdout (only the text goes there; "
        "notes and progress go to stderr).", examples=EXAMPLES,
    )  # fmt: skip
    p.add_argument("prompt", nargs="?", help='the prompt (quote it); "-" reads it from stdin')
    p.add_argument("--file", "-f", default=None, metavar="FILE", help="read the prompt from FILE")
    add_model_args(p)
    add_sampling_args(p, 128)
    p.add_argument("--chat", action="store_true", help="send PROMPT as a user message through the chat template")
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message before PROMPT (with --chat)")
    add_chat_template_arg(p)
    p.add_argument("--no-echo", action="store_true", help="do not print the prompt before the continuation")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object instead: text, token ids, finish reason, timings (and logprobs)")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="with --json: each token's log-probability and the N (0-20) most likely alternatives")
    structured = p.add_mutually_exclusive_group()
    structured.add_argument("--json-schema", default=None, metavar="FILE",
                            help="constrain the output to JSON that FILE's JSON schema accepts")
    structured.add_argument("--regex", default=None, metavar="PATTERN",
                            help="constrain the output to a match of the regular expression PATTERN")
    structured.add_argument("--choice", action="append", default=None, metavar="TEXT",
                            help="constrain the output to one of these strings (repeat the flag for each)")
    add_generate_speculative_args(p)
    p.set_defaults(func=run)


def read_structured(args: argparse.Namespace) -> dict[str, Any]:
    """The SamplingParams structured-output field the flags ask for ({} for none)."""
    if args.json_schema is not None:
        try:
            with open(args.json_schema, encoding="utf-8") as f:
                schema = json.load(f)
        except OSError as exc:
            raise CliError(f"--json-schema {args.json_schema!r}: {exc.strerror or exc}",
                           hint="pass a readable JSON schema file") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise CliError(f"--json-schema {args.json_schema!r} is not valid JSON: {exc}",
                           hint="the file must hold one JSON schema object") from None
        if not isinstance(schema, dict):
            raise CliError(f"--json-schema {args.json_schema!r} must hold a JSON object, got {type(schema).__name__}")
        return {"json_schema": schema}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.choice is not None:
        return {"choice": list(args.choice)}
    return {}


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt from the argument, stdin (`-`) or --file; one trailing newline of a file is dropped."""
    if args.file is not None and args.prompt is not None:
        raise UsageError("give the prompt either as an argument or with --file, not both",
                         hint='tokenloom generate "PROMPT"  or  tokenloom generate --file FILE')
    if args.file is not None:
        try:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise CliError(f"--file {args.file!r}: {exc.strerror or exc}", hint="pass a readable text file") from None
        except UnicodeDecodeError:
            raise CliError(f"--file {args.file!r} is not UTF-8 text", hint="save the prompt as UTF-8") from None
        source = f"--file {args.file!r}"
    elif args.prompt == "-":
        text = sys.stdin.read()
        source = "stdin"
    elif args.prompt is not None:
        return _non_empty(args.prompt, "the prompt")
    else:
        raise UsageError("no prompt given",
                         hint='tokenloom generate "PROMPT" (quoted), "-" to read stdin, or --file FILE')
    return _non_empty(text.removesuffix("\n").removesuffix("\r"), f"the prompt from {source}")


def _non_empty(text: str, what: str) -> str:
    if not text.strip():
        raise UsageError(f"{what} is empty", hint='give some text: tokenloom generate "Once upon a time"')
    return text


def _check_flags(args: argparse.Namespace) -> None:
    if args.system is not None and not args.chat:
        raise UsageError("--system needs --chat (a system message is part of a chat)",
                         hint='tokenloom generate --chat --system "TEXT" "PROMPT"')
    if args.chat_template is not None and not args.chat:
        raise UsageError("--chat-template needs --chat", hint="add --chat to send the prompt through the template")
    if args.logprobs is not None and not args.json:
        raise UsageError("--logprobs needs --json (log-probabilities are part of the JSON output)",
                         hint=f"add --json: tokenloom generate --json --logprobs {args.logprobs} ...")


def run(args: argparse.Namespace) -> int:
    _check_flags(args)
    speculative = generate_speculative_config(args)
    prompt_text = read_prompt(args)
    check_sampling_args(args)
    structured = read_structured(args)
    template = read_chat_template(args)
    started = time.perf_counter()
    source = prepare_model(args)
    draft_source = prepare_draft(args)
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    if args.chat:
        check_chat_template(args, source, template, system)  # before the slow load
    llm = load_llm(args, source, speculative)
    load_draft(llm, draft_source, args)
    load_s = time.perf_counter() - started
    params = sampling_params(llm, args)
    if structured:
        try:
            params = dataclasses.replace(params, **structured)
            llm.engine.prepare_request([0], params)  # an invalid grammar fails here, before any output
        except ParameterError as exc:
            raise CliError(str(exc).replace("json_schema", "--json-schema"), hint="fix the constraint") from None
    if args.chat:
        prompt: Any = llm.chat_prompt([*system, {"role": "user", "content": prompt_text}], chat_template=template)
    else:
        prompt = prompt_text
    if args.json:
        _print_json(llm, args, prompt_text, prompt, params, load_s)
        return 0
    if not args.chat and not args.no_echo:
        sys.stdout.write(prompt_text)
    for out in llm.stream(prompt, params):
        sys.stdout.write(out.text_delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def _print_json(llm: Any, args: argparse.Namespace, prompt_text: str, prompt: Any, params: Any, load_s: float) -> None:
    start = time.perf_counter()
    first: float | None = None
    final: Any = None
    logprobs: list[Any] = []
    for out in llm.stream(prompt, params):
        if first is None and out.new_token_ids:
            first = time.perf_counter()
        logprobs.extend(out.logprobs or [])
        final = out
    end = time.perf_counter()
    token_ids = list(final.token_ids) if final is not None else []
    decode_s = end - first if first is not None else 0.0
    result: dict[str, Any] = {
        "model": args.model,
        "prompt": prompt_text,
        "text": final.text if final is not None else "",
        "token_ids": token_ids,
        "finish_reason": final.finish_reason if final is not None else None,
        "stop_reason": final.stop_reason if final is not None else None,
        "usage": {"prompt_tokens": len(final.prompt_token_ids) if final is not None else 0,
                  "completion_tokens": len(token_ids)},
        "timings": {
            "load_s": round(load_s, 4),
            "time_to_first_token_s": round((first or end) - start, 4),
            "total_s": round(end - start, 4),
            "decode_tokens_per_s": round((len(token_ids) - 1) / decode_s, 2) if len(token_ids) > 1 and decode_s > 0
            else None,
        },
    }
    if llm.engine.config.speculative is not None:
        result["speculative"] = llm.engine.speculative_stats.as_dict()
    if args.logprobs is not None:
        decode = llm.tokenizer.decode
        result["logprobs"] = [
            {"token_id": lp.token_id, "token": decode([lp.token_id]), "logprob": lp.logprob,
             "top_logprobs": [{"token_id": t, "token": decode([t]), "logprob": v} for t, v in lp.top]}
            for lp in logprobs
        ]
    json.dump(result, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")
    sys.stdout.flush()
