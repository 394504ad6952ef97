"""`tokenloom serve` and `tokenloom bench serve` (L6): argument definitions and command functions,
kept here so the CLI package only wires them in."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Any

from tokenloom.cli.common import int_at_least
from tokenloom.config import DEFAULT_MODEL

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes from `512MiB`, `2GB`, `1.5GiB` or plain `1048576`."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 512MiB, 2GB or a number of bytes, got {text!r}")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a size of at least 1 byte, got {text!r}")
    return value


def parse_kv_memory(text: str) -> int | float:
    """`--kv-cache-memory`: a size (`parse_size`) or a fraction of the free memory such as 0.5."""
    if re.fullmatch(r"\s*(0?\.\d+|1\.0*)\s*", text):
        fraction = float(text)
        if fraction > 0:
            return fraction
    return parse_size(text)


_positive = int_at_least(1)
_non_negative = int_at_least(0)


def add_serve_arguments(p: argparse.ArgumentParser, model_args: bool = True) -> None:
    """The server's options; `model_args` False when the caller adds the shared model options
    (--model, --gguf-file, --device, --dtype) itself."""
    if model_args:
        p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                       help=f"path (.gguf or HF directory), pull name or hub id (default: {DEFAULT_MODEL})")
        p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model's directory or repo")
        p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
        p.add_argument("--dtype", default=None, help="auto, float32, bfloat16 or float16")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on the API routes")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model's name)")
    p.add_argument("--max-concurrent-requests", type=_positive, default=128,
                   help="requests computed at once")
    p.add_argument("--max-queue", type=_non_negative, default=256,
                   help="requests waiting for a slot past that; the rest get 429")
    p.add_argument("--max-input-tokens", type=_positive, default=None, help="longest prompt (default: the context)")
    p.add_argument("--max-total-tokens", type=_positive, default=None,
                   help="longest prompt + completion (default: the model's context length)")
    p.add_argument("--kv-cache-memory", type=parse_kv_memory, default=None, metavar="SIZE",
                   help="KV-cache budget: a size such as 512MiB or 2GB, or a fraction of the free memory "
                   "such as 0.5 (default: 1GiB on the CPU, 0.9 of the free memory on a GPU)")
    p.add_argument("--max-num-seqs", type=_positive, default=None, help="requests batched in one engine step")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="compute every prompt in full instead of reusing the KV blocks of earlier requests' "
                   "prefixes (the automatic prefix cache is on by default)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template file used instead of the model's own (base models ship none)")
    p.add_argument("--max-body-bytes", type=parse_size, default="4MiB", metavar="SIZE",
                   help="largest request body; larger ones get 413")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    from tokenloom.cli.speculative_options import add_serve_speculative_args

    add_serve_speculative_args(p)


def engine_config_from_args(args: argparse.Namespace) -> Any:
    """The EngineConfig the serve flags ask for (prefix cache, KV budget, batch size, speculative
    decoding for every request); a UsageError for speculative flags that do not go together."""
    from tokenloom.cli.speculative_options import serve_speculative_config
    from tokenloom.config import EngineConfig

    engine_fields: dict[str, Any] = {"enable_prefix_caching": not args.no_prefix_cache,
                                     "speculative": serve_speculative_config(args)}
    if args.kv_cache_memory is not None:
        engine_fields["kv_cache_memory"] = args.kv_cache_memory
    if args.max_num_seqs is not None:
        engine_fields["max_num_seqs"] = args.max_num_seqs
    return EngineConfig(**engine_fields)


def cmd_serve(args: argparse.Namespace) -> int:
    import time

    import uvicorn

    from tokenloom.serving import ServerConfig, create_app

    template = None
    if args.chat_template is not None:
        path = Path(args.chat_template)
        if not path.is_file():
            raise FileNotFoundError(f"--chat-template {args.chat_template!r}: no such file")
        template = path.read_text(encoding="utf-8")
    name = args.served_model_name or Path(str(args.model)).stem
    config = ServerConfig(
        served_model_name=name, api_key=args.api_key, max_concurrent_requests=args.max_concurrent_requests,
        max_queue=args.max_queue, max_input_tokens=args.max_input_tokens, max_total_tokens=args.max_total_tokens,
        max_body_bytes=args.max_body_bytes, chat_template=template, model_id=str(args.model),
    )
    engine_config = engine_config_from_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)

    draft_source = getattr(args, "draft_source", None)  # the CLI finds (and pulls) --draft-model first
    if draft_source is None and args.draft_model is not None:
        from tokenloom.cli.speculative_options import prepare_draft

        draft_source = prepare_draft(args)

    def load():
        from tokenloom.cli.speculative_options import attach_draft
        from tokenloom.llm import LLM

        start = time.perf_counter()
        # the CLI resolves (and pulls) the model first and passes its path as `model_path`
        model_path = getattr(args, "model_path", None)
        llm = LLM(model_path or args.model, gguf_file=None if model_path else args.gguf_file,
                  device_map=args.device, dtype=args.dtype, engine_config=engine_config)
        log = logging.getLogger("tokenloom.serving")
        log.info(
            "loaded %s in %.2fs on %s; KV cache %d blocks of %d tokens", llm.loaded.checkpoint.source.path.name,
            time.perf_counter() - start, llm.loaded.device, llm.engine.block_manager.num_blocks,
            llm.engine.block_manager.block_size)
        spec = engine_config.speculative
        if draft_source is not None:
            seconds = attach_draft(llm, draft_source, args)
            log.info("loaded draft model %s in %.2fs", draft_source.path.name, seconds)
        if spec is not None:
            log.info("speculative decoding for every request: %s, up to %d tokens per step", spec.method,
                     spec.num_speculative_tokens)
        return llm

    app = create_app(config, load=load)
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                    access_log=False, timeout_graceful_shutdown=10), app)
    print(f"tokenloom: serving {name} on http://{args.host}:{args.port} (web chat at /, OpenAI API at /v1)",
          file=sys.stderr)
    # uvicorn shuts down on SIGINT/SIGTERM, then raises the signal again for the previous handler:
    # after a clean shutdown that is an exit with status 0, not a traceback.
    import signal

    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("tokenloom: server stopped", file=sys.stderr)
    return 0


class _Server:
    """uvicorn's server, aborting every in-flight request on SIGINT/SIGTERM so streams end at once."""

    def __new__(cls, config: Any, app: Any) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                context = app.state.holder["context"]
                if context is not None:
                    context.engine.abort_all()
                super().handle_exit(sig, frame)

        return Server(config)


def add_bench_serve_arguments(p: argparse.ArgumentParser) -> None:
    from tokenloom.serving.load_test import add_arguments

    add_arguments(p)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from tokenloom.serving.load_test import run

    return run(args)
