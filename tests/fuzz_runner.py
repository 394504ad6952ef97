"""Runs a corpus of hostile cases in worker subprocesses (tests/fuzz_worker.py), each under a memory cap
(RLIMIT_AS) and each case under a wall-clock limit, and sorts the outcomes:

  typed         some stage raised a typed tokenloom error and none raised anything else
  loaded        both stages succeeded and the logits were finite
  untyped       a stage raised an exception that is not a TokenloomError
  nonfinite     the model loaded but its logits were not finite
  accepted      a case that must be refused (expect_typed) loaded
  inconsistent  the tokenizer refused the file as malformed but AutoModelForCausalLM accepted it
  crash / hang  the worker died (signal, memory) / did not answer within the limit

The last six are failures. `python -m tests.fuzz_runner` runs the corpus by hand (--all for every case).
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.hostile_files import Case

REPO = Path(__file__).resolve().parent.parent
FAILURES = ("untyped", "nonfinite", "accepted", "inconsistent", "crash", "hang", "harness")


@dataclass
class Outcome:
    name: str
    kind: str
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)


def classify(case: Case, result: dict[str, Any]) -> str:
    if "harness_error" in result:
        return "harness"
    stages = (result["tokenizer"], result["model"])
    if any(s["outcome"] == "untyped" for s in stages):
        return "untyped"
    model = result["model"]
    if model["outcome"] == "ok" and not model["detail"]["finite"]:
        return "nonfinite"
    tokenizer = result["tokenizer"]
    if tokenizer["outcome"] == "typed" and tokenizer["error"] == "TokenizerError" and model["outcome"] == "ok":
        return "inconsistent"
    if all(s["outcome"] == "ok" for s in stages):
        return "accepted" if case.recipe.get("expect_typed") else "loaded"
    return "typed"


class _Worker:
    def __init__(self, memory_bytes: int, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.fuzz_worker", str(memory_bytes)],
            cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1,
        )
        self.case: Case | None = None
        self.started = 0.0
        self.ready = False
        self.stderr_tail = ""

    def send(self, case: Case) -> None:
        self.case, self.started = case, time.monotonic()
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(asdict(case)) + "\n")
        self.process.stdin.flush()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        try:
            self.stderr_tail = (self.process.stderr.read() or "")[-2000:] if self.process.stderr else ""
        except (OSError, ValueError):
            self.stderr_tail = ""


def run_corpus(
    cases: list[Case], *, workers: int = 2, case_timeout: float = 20.0, memory_bytes: int = 4 << 30,
    startup_timeout: float = 180.0, env: dict[str, str] | None = None, log: Any = None,
) -> list[Outcome]:
    """Every case's outcome, in the order of `cases`."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(
        p for p in ((env or {}).get("PYTHONPATH"), str(REPO)) if p)}
    pending = list(cases)
    order = {case.name: i for i, case in enumerate(cases)}
    outcomes: dict[str, Outcome] = {}
    selector = selectors.DefaultSelector()
    pool: list[_Worker] = []

    def start() -> None:
        worker = _Worker(memory_bytes, env)
        worker.started = time.monotonic()
        pool.append(worker)
        assert worker.process.stdout is not None
        selector.register(worker.process.stdout, selectors.EVENT_READ, worker)

    def retire(worker: _Worker, kind: str) -> None:
        selector.unregister(worker.process.stdout)
        worker.kill()
        pool.remove(worker)
        if worker.case is not None:
            outcomes[worker.case.name] = Outcome(
                worker.case.name, kind, round(time.monotonic() - worker.started, 2),
                {"returncode": worker.process.returncode, "stderr": worker.stderr_tail[-800:]},
            )
            if log:
                log(f"{kind:12s} {worker.case.name}")
        if pending or any(w.case for w in pool):
            start()

    for _ in range(min(workers, len(cases))):
        start()
    try:
        while len(outcomes) < len(cases):
            for worker in list(pool):
                if worker.ready and worker.case is None and pending:
                    worker.send(pending.pop(0))
            events = selector.select(timeout=0.5)
            for key, _ in events:
                worker = key.data
                line = worker.process.stdout.readline()
                if not line:
                    if worker.case is None and not worker.ready:
                        raise RuntimeError(f"a fuzz worker failed to start: {worker.process.stderr.read()[-2000:]}")
                    retire(worker, "crash")
                    continue
                message = json.loads(line)
                if message.get("ready"):
                    worker.ready = True
                    if log:
                        log(f"worker ready, tokenloom at {message.get('tokenloom')}")
                    continue
                case, worker.case = worker.case, None
                assert case is not None
                outcome = Outcome(case.name, classify(case, message), round(time.monotonic() - worker.started, 2),
                                  message)
                outcomes[case.name] = outcome
                if log:
                    log(f"{outcome.kind:12s} {outcome.seconds:6.2f}s {case.name}")
            now = time.monotonic()
            for worker in list(pool):
                limit = (worker.case.recipe.get("timeout") or case_timeout) if worker.case is not None else 0
                if worker.case is not None and now - worker.started > limit:
                    retire(worker, "hang")
                elif not worker.ready and now - worker.started > startup_timeout:
                    raise RuntimeError("a fuzz worker did not start in time")
    finally:
        for worker in pool:
            worker.kill()
        selector.close()
    return sorted(outcomes.values(), key=lambda o: order[o.name])


def summary(outcomes: list[Outcome]) -> str:
    counts = Counter(o.kind for o in outcomes)
    failed = sum(counts[k] for k in FAILURES)
    return (f"{len(outcomes)} cases: {counts['typed']} typed error, {counts['loaded']} loaded fine, {failed} failed "
            f"({', '.join(f'{k} {counts[k]}' for k in FAILURES if counts[k])})")


def describe_failure(outcome: Outcome) -> str:
    detail = outcome.detail
    parts = [f"{outcome.kind}: {outcome.name} ({outcome.seconds}s)"]
    if detail.get("description"):
        parts.append(f"  case: {detail['description']}")
    for stage in ("tokenizer", "model"):
        info = detail.get(stage)
        if info and info.get("outcome") != "ok":
            parts.append(f"  {stage}: {info.get('outcome')} {info.get('error')}: {info.get('message')}")
            if info.get("traceback"):
                parts.append("    " + info["traceback"].strip().splitlines()[-3].strip())
        elif info:
            parts.append(f"  {stage}: ok {info.get('detail')}")
    if detail.get("stderr"):
        parts.append(f"  stderr: {detail['stderr'][-300:]}")
    if detail.get("harness_error"):
        parts.append(f"  harness: {detail['harness_error']}")
    return "\n".join(parts)


def build_corpus(root: Path, smollm2: Path | None, *, full: bool) -> list[Case]:
    from tests.fuzz_corpus import config_key_cases, gguf_cases, hf_cases
    from tests.fuzz_random import random_gguf_cases

    cases = gguf_cases(root / "gguf")
    cases += hf_cases(root / "hf")
    cases += config_key_cases(root / "hf")
    cases += random_gguf_cases(root / "random", smollm2, full=full)
    return cases


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="every random case (the --fuzz-all corpus)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    parser.add_argument("--json", default=None, help="write every outcome to this file")
    parser.add_argument("--tokenloom-src", default=None,
                        help="a directory holding another tokenloom package for the workers (to count before a fix)")
    parser.add_argument("--smollm2", default=str(Path.home() / ".cache/tokenloom/models/smollm2-135m-instruct/"
                                                 "SmolLM2-135M-Instruct.Q4_1.gguf"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tl-corpus-") as tmp:
        smollm2 = Path(args.smollm2) if Path(args.smollm2).is_file() else None
        corpus = build_corpus(Path(tmp), smollm2, full=args.all)
        if args.only:
            corpus = [c for c in corpus if args.only in c.name]
        print(f"{len(corpus)} cases, load {os.getloadavg()}, tokenloom from {args.tokenloom_src or REPO}", flush=True)
        start = time.monotonic()
        results = run_corpus(corpus, workers=args.workers, case_timeout=args.timeout,
                             env={"TOKENLOOM_FUZZ_SRC": args.tokenloom_src} if args.tokenloom_src else None,
                             log=lambda m: print(m, flush=True))
        print(f"wall {time.monotonic() - start:.1f}s, load {os.getloadavg()}")
        print(summary(results))
        for result in results:
            if result.kind in FAILURES:
                print(describe_failure(result))
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1, default=str))
