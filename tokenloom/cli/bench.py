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


def run(args: argparse.Namespace) -> int:
    from tokenloom.bench import run as run_bench

    return run_bench(args)
