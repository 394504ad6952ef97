"""The hostile-input fuzz corpus (issue 10): the cases written by hand, HF directories with each config key
missing / of the wrong type / out of range, and random variants of the real SmolLM2 GGUF and of tiny models
of every architecture (truncations, single-field metadata mutations, byte flips in the header and tensor
table). Each case runs in a worker subprocess capped at 4 GB of address space, under a wall-clock limit:
it either loads and gives finite logits, or raises a typed tokenloom error. No hang, crash, untyped
exception, non-finite load or silently accepted hostile file.

CI runs a fixed-seed sample; `pytest tests/test_fuzz_loading.py --fuzz-all` runs every case (minutes).
`python -m tests.fuzz_runner` runs the corpus outside pytest (and against other code, --tokenloom-src).
"""

from __future__ import annotations

import os
import time
from collections import Counter

import pytest

from tests.fuzz_runner import FAILURES, build_corpus, describe_failure, run_corpus, summary

pytestmark = pytest.mark.slow  # loads the real SmolLM2 (in the workers)


def test_no_hostile_file_hangs_crashes_or_escapes_typing(request, smollm2_gguf, tmp_path_factory):
    full = request.config.getoption("--fuzz-all")
    corpus = build_corpus(tmp_path_factory.mktemp("fuzz_corpus"), smollm2_gguf, full=full)
    assert len({case.name for case in corpus}) == len(corpus)
    load_before = os.getloadavg()
    start = time.monotonic()
    outcomes = run_corpus(corpus, workers=2, case_timeout=20.0, memory_bytes=4 << 30)
    wall = time.monotonic() - start
    print(f"\n{summary(outcomes)}\nwall {wall:.1f}s on 2 workers, load average {load_before} -> {os.getloadavg()}")
    slowest = sorted(outcomes, key=lambda o: -o.seconds)[:5]
    print("slowest: " + ", ".join(f"{o.name} {o.seconds}s" for o in slowest))
    counts = Counter(o.kind for o in outcomes)
    assert counts["typed"] > len(corpus) // 2 and counts["loaded"] > 20, "the corpus exercises both outcomes"
    failures = [o for o in outcomes if o.kind in FAILURES]
    assert not failures, "\n".join(describe_failure(o) for o in failures)
