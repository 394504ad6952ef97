"""`tokenloom serve`: the OpenAI- and TGI-compatible HTTP server. Its options and its run live with
the server (`tokenloom.serving.cli`); this module registers them with the shared model options."""

from __future__ import annotations

import argparse
from typing import Any

from tokenloom.cli.common import UsageError, add_command
from tokenloom.cli.model_options import THREADS_ENV_VAR, add_model_args, prepare_model

EXAMPLES = (
    "tokenloom serve",
    "tokenloom serve --model gemma3-270m --chat-template gemma.jinja --port 8080",
    "tokenloom serve --host 0.0.0.0 --api-key SECRET --max-concurrent-requests 32 --kv-cache-memory 2GiB",
    "tokenloom serve --speculative-method ngram --num-speculative-tokens 4",
)


def register(subparsers: Any) -> None:
    from tokenloom.serving.cli import add_serve_arguments

    p = add_command(
        subparsers, "serve", help="OpenAI- and TGI-compatible HTTP server with a web chat page",
        description="Serve the model over HTTP: OpenAI /v1/chat/completions, /v1/completions and /v1/models, "
        "TGI /generate, /generate_stream, /info and /tokenize, /health, /metrics, and a web chat page at /.",
        examples=EXAMPLES,
    )  # fmt: skip
    add_model_args(p)
    add_serve_arguments(p, model_args=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenloom.cli.speculative_options import prepare_draft, serve_speculative_config
    from tokenloom.serving.cli import cmd_serve
    from tokenloom.threads import resolve_num_threads, set_num_threads

    try:
        threads = resolve_num_threads(args.threads)
    except ValueError as exc:
        raise UsageError(str(exc), hint=f"unset {THREADS_ENV_VAR} or pass --threads N") from None
    serve_speculative_config(args)  # speculative flags that do not go together: refused before any pull
    args.model_path = str(prepare_model(args).path)  # found (and pulled) before the server starts
    args.draft_source = prepare_draft(args)
    set_num_threads(threads)
    return cmd_serve(args)
