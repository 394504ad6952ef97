"""`tokenloom bench serve`: a load generator for any OpenAI-compatible server (L6).

For each client count, that many clients stream /v1/completions at once (`--max-tokens` new tokens,
ignore_eos, greedy) and we report output tokens/s, requests/s, time to first token and inter-token
latency (p50/p99). While the widest level runs, /health is polled to show whether the server's event
loop stays responsive. The same command measures llama.cpp's llama-server or vLLM (`--url`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_PROMPT = "Write a long story about a lighthouse keeper who finds a map in a bottle."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="an OpenAI-compatible server, e.g. http://127.0.0.1:8080")
    p.add_argument("--model", "-m", default=None, help="start `tokenloom serve --model M` and measure it")
    p.add_argument("--served-model", default=None, help="the `model` field to send (default: the server's first)")
    p.add_argument("--clients", default="1,8,32,64", help="comma-separated concurrency levels")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per request")
    p.add_argument("--rounds", type=int, default=1, help="requests each client sends in turn")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--api-key", default=None)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers to PATH")
    p.add_argument("--label", default=None, help="name of the server in the table (default: the URL)")


@dataclass
class Level:
    clients: int
    requests: int = 0
    failed: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    health: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "clients": self.clients, "requests": self.requests, "failed": self.failed,
            "output_tokens": self.output_tokens, "seconds": round(self.seconds, 3),
            "output_tok_s": round(self.output_tokens / self.seconds, 2) if self.seconds else 0.0,
            "req_s": round(self.requests / self.seconds, 3) if self.seconds else 0.0,
            "ttft_p50_ms": _ms(_pct(self.ttft, 50)), "ttft_p99_ms": _ms(_pct(self.ttft, 99)),
            "itl_p50_ms": _ms(_pct(self.itl, 50)), "itl_p99_ms": _ms(_pct(self.itl, 99)),
            "health_p50_ms": _ms(_pct(self.health, 50)), "health_max_ms": _ms(max(self.health, default=None)),
        }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


async def _one(client: Any, model: str, args: argparse.Namespace, level: Level) -> None:
    body = {"model": model, "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    last = None
    tokens = 0
    usage = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            level.failed += 1
            return
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    now = time.perf_counter()
                    if last is None:
                        level.ttft.append(now - start)
                    else:
                        level.itl.append(now - last)
                    last = now
                    tokens += 1
    level.requests += 1
    level.output_tokens += usage["completion_tokens"] if usage and usage.get("completion_tokens") else tokens


async def _health(client: Any, stop: asyncio.Event, level: Level) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        try:
            await client.get("/health")
            level.health.append(time.perf_counter() - start)
        except Exception:
            pass
        await asyncio.sleep(0.05)


async def _measure(url: str, args: argparse.Namespace, levels: list[int]) -> tuple[str, list[Level]]:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(levels) + 8, max_keepalive_connections=max(levels) + 8)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(600.0), limits=limits) as client:
        model = args.served_model
        if model is None:
            listed = (await client.get("/v1/models")).json()
            model = listed["data"][0]["id"]
        await _one(client, model, argparse.Namespace(**{**vars(args), "max_tokens": 4}), Level(1))  # warm-up
        results = []
        for clients in levels:
            level = Level(clients)
            stop = asyncio.Event()
            prober = asyncio.ensure_future(_health(client, stop, level)) if clients == max(levels) else None
            start = time.perf_counter()

            async def worker(level: Level = level) -> None:
                for _ in range(args.rounds):
                    await _one(client, model, args, level)

            await asyncio.gather(*(worker() for _ in range(clients)))
            level.seconds = time.perf_counter() - start
            stop.set()
            if prober is not None:
                await prober
            results.append(level)
            print(f"  {clients:>3} clients: {level.summary()['output_tok_s']} tok/s", file=sys.stderr)
        return model, results


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(model: str) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "tokenloom", "serve", "--model", model, "--port", str(port),
                                "--log-level", "warning"], env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tokenloom serve exited with status {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError("tokenloom serve did not become healthy within 600 s")


def run(args: argparse.Namespace) -> int:
    if (args.url is None) == (args.model is None):
        raise ValueError("bench serve needs exactly one of --url URL (a running server) or --model M (start one)")
    try:
        levels = [int(x) for x in args.clients.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--clients must be comma-separated integers, got {args.clients!r}") from None
    if not levels or min(levels) < 1 or args.max_tokens < 1 or args.rounds < 1:
        raise ValueError("--clients, --max-tokens and --rounds must be >= 1")
    process = None
    url = args.url
    if url is None:
        process, url = _start_server(args.model)
    try:
        print(f"bench serve {url}: load average {open('/proc/loadavg').read().split()[:3] if os.path.exists('/proc/loadavg') else '?'}",
              file=sys.stderr)
        model, results = asyncio.run(_measure(url.rstrip("/"), args, levels))
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)
    label = args.label or url
    rows = [r.summary() for r in results]
    print(f"{label} ({model}), {args.max_tokens} new tokens per request, ignore_eos")
    print(f"{'clients':>7} {'tok/s':>9} {'req/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'failed':>6}")
    for row in rows:
        print(f"{row['clients']:>7} {row['output_tok_s']:>9.1f} {row['req_s']:>7.2f} {_fmt(row['ttft_p50_ms']):>9} "
              f"{_fmt(row['ttft_p99_ms']):>9} {_fmt(row['itl_p50_ms']):>8} {_fmt(row['itl_p99_ms']):>8} {row['failed']:>6}")
    widest = rows[-1]
    if widest["health_p50_ms"] is not None:
        print(f"/health while {widest['clients']} clients stream: p50 {widest['health_p50_ms']} ms, "
              f"max {widest['health_max_ms']} ms")
    if args.json:
        loadavg = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"url": url, "label": label, "model": model, "max_tokens": args.max_tokens,
                       "loadavg": loadavg, "levels": rows, "raw": [asdict(r) | {"ttft": [], "itl": [], "health": []}
                                                                  for r in results]}, f, indent=2)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}ms"
