"""Peers found under `--peers DIR` (built by `make bench-peers`): llama.cpp's llama-bench and
llama-server on the same GGUF, and OpenVINO GenAI in its own virtualenv on the same weights. Each
runs in processes of its own; a peer that is missing is skipped with a line saying why."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from tokenloom.bench.common import (
    CHAT_FIRST,
    CHAT_SECOND,
    Settings,
    batch_prompts,
    long_prompt_text,
    progress,
)


def find_llama_cpp(peers: Path) -> Path | None:
    """The directory holding llama-bench (and llama-server) under `peers`."""
    for candidate in (peers / "bin", *sorted(peers.glob("*/vendor/llama.cpp/build/bin")), peers / "llama.cpp/build/bin"):
        if (candidate / "llama-bench").is_file():
            return candidate
    return None


def find_openvino(peers: Path) -> tuple[Path, Path] | None:
    """(the virtualenv's python, the exported model directory) under `peers`."""
    python = peers / "openvino-venv" / "bin" / "python"
    models = sorted(p.parent for p in peers.glob("*-ov-int4/openvino_model.xml"))
    return (python, models[0]) if python.is_file() and models else None


class LlamaBench:
    """llama-bench: tg (decode, one stream), pp (prefill) and tg at a depth (long context)."""

    def __init__(self, bin_dir: Path, gguf: Path, threads: int) -> None:
        self.name = "llama.cpp (llama-bench)"
        self.exe, self.gguf, self.threads = bin_dir / "llama-bench", gguf, threads

    def _run(self, *options: str) -> list[dict[str, Any]]:
        cmd = [str(self.exe), "-m", str(self.gguf), "-t", str(self.threads), "-r", "2", "-o", "json", *options]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(done.stdout)

    def measure(self, s: Settings) -> dict[str, float]:
        values: dict[str, float] = {}
        for test in self._run("-p", str(s.prompt_tokens), "-n", str(s.new_tokens)):
            key = "prefill_tok_s" if test.get("n_prompt") else "decode_1_tok_s"
            values[key] = float(test["avg_ts"])
        for test in self._run("-p", "0", "-n", str(s.new_tokens), "-d", str(s.long_context)):
            values["decode_long_tok_s"] = float(test["avg_ts"])
        return values


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """llama-server with one slot per concurrent request (-np), its own continuous batching; the
    concurrent row is `concurrency` clients at once, each asking for `new_tokens` tokens."""

    def __init__(self, bin_dir: Path, gguf: Path, threads: int, s: Settings) -> None:
        self.name = f"llama.cpp (llama-server -np {s.concurrency})"
        self.port = _free_port()
        per_slot = 1024 + s.new_tokens
        cmd = [str(bin_dir / "llama-server"), "-m", str(gguf), "-t", str(threads), "-np", str(s.concurrency),
               "-c", str(per_slot * s.concurrency), "--host", "127.0.0.1", "--port", str(self.port)]
        start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - start > 120:
                self.close()
                raise RuntimeError("llama-server did not become ready in 120 s")
            time.sleep(0.1)
        self.load_s = time.perf_counter() - start

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as reply:
            return json.loads(reply.read())

    def batch(self, prompts: list[str], n: int) -> int:
        counts = [0] * len(prompts)

        def one(i: int) -> None:
            out = self._post("/completion", {"prompt": prompts[i], "n_predict": n, "ignore_eos": True,
                                             "temperature": 0, "cache_prompt": False})
            counts[i] = int(out.get("tokens_predicted", 0))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts)

    def turn2_ttft(self, n: int) -> float:
        messages = [{"role": "user", "content": CHAT_FIRST}]
        first = self._post("/v1/chat/completions", {"messages": messages, "max_tokens": n, "temperature": 0})
        messages += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                     {"role": "user", "content": CHAT_SECOND}]
        start = time.perf_counter()
        self._post("/v1/chat/completions", {"messages": messages, "max_tokens": 1, "temperature": 0})
        return time.perf_counter() - start

    def peak_rss_mib(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except (OSError, ValueError):
            pass
        return None

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class OpenVinoGenAI:
    """OpenVINO GenAI's LLMPipeline on the int4 export, driven by `openvino_worker.py` in the
    OpenVINO virtualenv (one process for the whole run, so the load is paid once)."""

    def __init__(self, python: Path, model_dir: Path, threads: int) -> None:
        self.name = "OpenVINO GenAI (int4 g32)"
        worker = Path(__file__).with_name("openvino_worker.py")
        self.proc = subprocess.Popen([str(python), str(worker), str(model_dir), str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.load_s = float(self._read()["load_s"])

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            raise RuntimeError(f"the OpenVINO worker exited ({self.proc.poll()})")
        return json.loads(line)

    def measure(self, s: Settings, round_: int) -> dict[str, float]:
        job = {
            "new_tokens": s.new_tokens,
            "decode_prompt": batch_prompts(1)[0],
            "batch_prompts": batch_prompts(s.concurrency),
            "prefill_prompts": [long_prompt_text(s.prompt_tokens, salt=100 * round_ + i) for i in range(3)],
            "long_prompt": long_prompt_text(s.long_context, salt=1000 + round_),
            "chat": [CHAT_FIRST, CHAT_SECOND],
        }
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_peers(peers: Path, gguf: Path | None, threads: int, s: Settings) -> tuple[list[Any], list[str]]:
    """The peers found under `peers`, loaded; and a line for each that is missing or failed."""
    found: list[Any] = []
    notes: list[str] = []
    bin_dir = find_llama_cpp(peers)
    if gguf is None:
        notes.append("llama.cpp skipped: the model is not a GGUF file")
    elif bin_dir is None:
        notes.append(f"llama.cpp skipped: no llama-bench under {peers} (make bench-peers)")
    else:
        found.append(LlamaBench(bin_dir, gguf, threads))
        if (bin_dir / "llama-server").is_file():
            progress("llama-server: starting")
            try:
                found.append(LlamaServer(bin_dir, gguf, threads, s))
            except (OSError, RuntimeError) as exc:
                notes.append(f"llama-server skipped: {exc}")
        else:
            notes.append(f"llama-server skipped: not built in {bin_dir}")
    openvino = find_openvino(peers)
    if openvino is None:
        notes.append(f"OpenVINO GenAI skipped: no openvino-venv with an *-ov-int4 export under {peers} "
                     "(make bench-peers)")
    else:
        progress("OpenVINO GenAI: loading")
        try:
            found.append(OpenVinoGenAI(*openvino, threads))
        except (OSError, RuntimeError, ValueError) as exc:
            notes.append(f"OpenVINO GenAI skipped: {exc}")
    return found, notes

