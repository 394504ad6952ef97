"""`tokenloom bench`, registered from `tokenloom.bench` (which owns its options and its run)."""

from __future__ import annotations

import argparse
from typing import Any

from tokenloom.cli.common import add_command


def register(subparsers: Any) -> None:
    from tokenloom.bench import add_arguments

    p = add_command(
        subparsers, "bench", help="measure load time, decode and prefill speed against transformers",
        examples=("tokenloom bench --quick", "tokenloom bench --no-transformers --threads 1 --json bench.json"),
    )  # fmt: skip
    add_arguments(p)
    p.set_defaults(func=run)
    sub = p.add_subparsers(dest="bench_command", metavar="serve", title="load-test a server instead")
    serve = add_command(
        sub, "serve", help="load-test an OpenAI-compatible server (tokenloom serve, llama-server, vLLM)",
        examples=("tokenloom bench serve --model smollm2-135m-instruct",
                  "tokenloom bench serve --url http://127.0.0.1:8080 --clients 1,8,32,64"),
    )  # fmt: skip
    from tokenloom.serving.cli import add_bench_serve_arguments

    add_bench_serve_arguments(serve)
    serve.set_defaults(func=run_serve)


def run(args: argparse.Namespace) -> int:
    from tokenloom.bench import run as run_bench

    return run_bench(args)


def run_serve(args: argparse.Namespace) -> int:
    from tokenloom.serving.cli import cmd_bench_serve

    return cmd_bench_serve(args)
