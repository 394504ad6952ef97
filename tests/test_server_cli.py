"""`python -m tokenloom serve`: healthy once loaded, one log line per request, a clean SIGINT/SIGTERM
that aborts the request in flight."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tokenloom.serving.cli import parse_kv_memory, parse_size


def test_sizes_parse_with_units():
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1048576") == 2**20
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    for bad in ("12XB", "-1", "lots", "0"):
        with pytest.raises(argparse.ArgumentTypeError, match="size"):
            parse_size(bad)


def test_kv_cache_memory_takes_a_size_or_a_fraction_of_free_memory():
    from tokenloom.config import EngineConfig

    assert parse_kv_memory("0.5") == 0.5 and parse_kv_memory("1.0") == 1.0
    assert parse_kv_memory("1") == 1 and parse_kv_memory("2GiB") == 2 * 2**30  # bytes, not a fraction
    assert EngineConfig(kv_cache_memory=parse_kv_memory("0.25")).kv_cache_memory == 0.25
    for bad in ("0.0", "-0.5", "half"):
        with pytest.raises(argparse.ArgumentTypeError, match="size"):
            parse_kv_memory(bad)


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_from_the_command_line_and_stop_it_with_a_signal(stop_signal):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenloom", "serve", "--port", str(port), "--served-model-name", "smol",
         "--kv-cache-memory", "64MiB", "--max-num-seqs", "8"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    statuses = set()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                status = httpx.get(url + "/health", timeout=5).status_code
                statuses.add(status)
                if status == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        assert 200 in statuses
        reply = httpx.post(url + "/v1/completions", json={"model": "smol", "prompt": "Hello", "max_tokens": 3,
                                                          "temperature": 0}, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1

        def stream() -> None:  # in flight when the server is told to stop
            try:
                with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                        "model": "smol", "prompt": "Once", "max_tokens": 2000, "ignore_eos": True, "stream": True}) as r:
                    for _ in r.iter_lines():
                        pass
            except httpx.HTTPError:
                pass

        streamer = threading.Thread(target=stream)
        streamer.start()
        time.sleep(1.0)
        process.send_signal(stop_signal)
        assert process.wait(60) == 0
        streamer.join(30)
        assert not streamer.is_alive()  # the stream ended: its request was aborted
    finally:
        if process.poll() is None:
            process.kill()
        reader.join(10)
    log = "".join(lines)
    assert "Traceback" not in log
    assert "serving smol on http://127.0.0.1" in log
    assert "in=" in log and "out=3" in log and "ttft=" in log and "finish=" in log  # the request's log line
    assert "finish=abort" in log
