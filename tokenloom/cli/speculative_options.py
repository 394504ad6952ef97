"""Speculative decoding flags (L6): `generate` / `chat` (--prompt-lookup K, --draft-model M with
--num-speculative-tokens K) and `serve` (--speculative-method, --num-speculative-tokens, --draft-model).

The flags are checked and turned into a SpeculativeConfig before anything is pulled or loaded; the
draft model is found (and pulled) like --model and loaded with the same --device and --dtype."""

from __future__ import annotations

import argparse
import time
from typing import Any

from tokenloom.cli.common import CliError, UsageError, note, show_progress
from tokenloom.speculative_config import MAX_SPECULATIVE_TOKENS, METHODS, SpeculativeConfig

DEFAULT_NUM_SPECULATIVE_TOKENS = 5


def speculative_tokens(text: str) -> int:
    """An argparse `type`: a count of speculative tokens, 1..MAX_SPECULATIVE_TOKENS."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [1, {MAX_SPECULATIVE_TOKENS}], got {text!r}") from None
    if not 1 <= value <= MAX_SPECULATIVE_TOKENS:
        raise argparse.ArgumentTypeError(f"expected an integer in [1, {MAX_SPECULATIVE_TOKENS}], got {value}")
    return value


def add_generate_speculative_args(p: argparse.ArgumentParser) -> None:
    """`generate` and `chat`: prompt lookup or a draft model (greedy output is unchanged)."""
    p.add_argument("--prompt-lookup", type=speculative_tokens, default=None, metavar="K",
                   help="speculative decoding by prompt lookup: propose up to K tokens that followed the latest "
                   "n-gram's earlier occurrence in the prompt or output (transformers' prompt_lookup_num_tokens; "
                   "fastest when the answer copies its input)")
    p.add_argument("--draft-model", default=None, metavar="MODEL",
                   help="speculative decoding with a smaller model of the same vocabulary proposing tokens "
                   "(path or pull name; loaded with the same --device and --dtype)")
    p.add_argument("--num-speculative-tokens", type=speculative_tokens, default=None, metavar="K",
                   help=f"with --draft-model: most tokens it proposes per step "
                   f"(default: {DEFAULT_NUM_SPECULATIVE_TOKENS})")


def add_serve_speculative_args(p: argparse.ArgumentParser) -> None:
    """`serve`: one speculative setting for every request."""
    p.add_argument("--speculative-method", default=None, choices=list(METHODS),
                   help="speculative decoding for every request: prompt_lookup (vLLM's ngram) or draft_model "
                   "(vLLM's draft; needs --draft-model); default: none")
    p.add_argument("--num-speculative-tokens", type=speculative_tokens, default=None, metavar="K",
                   help=f"with --speculative-method: most tokens proposed per step "
                   f"(default: {DEFAULT_NUM_SPECULATIVE_TOKENS})")
    p.add_argument("--draft-model", default=None, metavar="MODEL",
                   help="with --speculative-method draft_model: the proposing model (path or pull name, same "
                   "vocabulary; loaded with the same --device and --dtype)")


def generate_speculative_config(args: argparse.Namespace) -> SpeculativeConfig | None:
    """The SpeculativeConfig `generate` / `chat`'s flags ask for (None: no speculation); UsageError for a
    combination that makes no sense."""
    command = getattr(args, "command", None) or "generate"
    if args.prompt_lookup is not None and args.draft_model is not None:
        raise UsageError("--prompt-lookup and --draft-model are two ways to speculate: give one",
                         hint=f"tokenloom {command} --prompt-lookup 5 ...  or  "
                         f"tokenloom {command} --draft-model MODEL ...")
    if args.num_speculative_tokens is not None and args.draft_model is None:
        hint = (f"--prompt-lookup {args.num_speculative_tokens} takes the count itself"
                if args.prompt_lookup is not None else "add --draft-model MODEL, or use --prompt-lookup K")
        raise UsageError("--num-speculative-tokens needs --draft-model", hint=hint)
    if args.prompt_lookup is not None:
        return SpeculativeConfig("prompt_lookup", args.prompt_lookup)
    if args.draft_model is not None:
        return SpeculativeConfig("draft_model", args.num_speculative_tokens or DEFAULT_NUM_SPECULATIVE_TOKENS)
    return None


def serve_speculative_config(args: argparse.Namespace) -> SpeculativeConfig | None:
    """The SpeculativeConfig `serve`'s flags ask for (None: no speculation); UsageError for a
    combination that makes no sense."""
    method = args.speculative_method
    if method is None:
        if args.num_speculative_tokens is not None:
            raise UsageError("--num-speculative-tokens needs --speculative-method",
                             hint="add --speculative-method prompt_lookup (or draft_model with --draft-model)")
        if args.draft_model is not None:
            raise UsageError("--draft-model needs --speculative-method draft_model",
                             hint=f"tokenloom serve --speculative-method draft_model --draft-model {args.draft_model}")
        return None
    config = SpeculativeConfig(method, args.num_speculative_tokens or DEFAULT_NUM_SPECULATIVE_TOKENS)
    if config.uses_draft_model and args.draft_model is None:
        raise UsageError(f"--speculative-method {method} needs --draft-model MODEL",
                         hint="name the smaller model that proposes tokens (same vocabulary): --draft-model PATH")
    if not config.uses_draft_model and args.draft_model is not None:
        raise UsageError(f"--draft-model is used only with --speculative-method draft_model, not {method}",
                         hint="drop --draft-model, or pass --speculative-method draft_model")
    return config


def prepare_draft(args: argparse.Namespace) -> Any:
    """Where --draft-model is (a ModelSource), found and pulled as --model is; None without one."""
    if args.draft_model is None:
        return None
    from tokenloom.cli.model_options import find_model

    try:
        return find_model(args.draft_model, None, args)
    except CliError as exc:
        hint = exc.hint.replace("--model ", "--draft-model ") if exc.hint else None
        raise CliError(f"--draft-model: {exc}", hint=hint) from None


def attach_draft(llm: Any, source: Any, args: argparse.Namespace) -> float:
    """Load the draft model at `source` (None: nothing to do) with --device and --dtype and hand it to
    the engine; the seconds it took. A draft of another vocabulary is a CliError."""
    if source is None:
        return 0.0
    from tokenloom.loading import load_model

    start = time.perf_counter()
    draft = load_model(str(source.path), device_map=args.device, dtype=args.dtype, progress=show_progress(args))
    try:
        llm.engine.set_draft_model(draft.model)
    except ValueError as exc:
        raise CliError(f"--draft-model {args.draft_model}: {exc}",
                       hint="a draft model must share the model's tokenizer (e.g. a smaller model of its family)") from None
    return time.perf_counter() - start


def load_draft(llm: Any, source: Any, args: argparse.Namespace) -> None:
    """`attach_draft`, with a note on stderr (unless --quiet)."""
    if source is not None:
        seconds = attach_draft(llm, source, args)
        note(f"loaded draft model {source.path.name} in {seconds:.2f}s", args)
