"""The default thread count: physical cores of the CPUs this process may use, never more."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tokenloom import threads


def _topology(root: Path, cpu: int, package: int, core: int) -> None:
    topology = root / f"cpu{cpu}" / "topology"
    topology.mkdir(parents=True)
    (topology / "physical_package_id").write_text(f"{package}\n")
    (topology / "core_id").write_text(f"{core}\n")


def test_hyperthreaded_siblings_count_once(tmp_path: Path) -> None:
    # 2 packages x 2 cores x 2 threads: cpu n is core n % 4 (siblings n and n + 4), as Linux numbers them
    for cpu in range(8):
        _topology(tmp_path, cpu, package=(cpu % 4) // 2, core=cpu % 2)
    assert threads.physical_cores(list(range(8)), tmp_path) == 4
    assert threads.physical_cores([0, 4], tmp_path) == 1  # one core's two threads
    assert threads.physical_cores([0, 1, 2], tmp_path) == 3
    assert threads.physical_cores([0, 9], tmp_path) == 2  # no topology for cpu9: every CPU counts


def test_cgroup_quota(tmp_path: Path) -> None:
    assert threads.cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) == 2  # 1.5 CPUs: round up
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_cpu_limit(tmp_path) is None


def test_default_never_exceeds_the_cpus_this_process_may_use() -> None:
    default = threads.default_num_threads()
    assert 1 <= default <= len(os.sched_getaffinity(0))
    assert default == min(threads.physical_cores(), threads.cgroup_cpu_limit() or default)


def test_flag_then_environment_then_default() -> None:
    default = threads.default_num_threads()
    assert threads.resolve_num_threads(None, {}) == default
    assert threads.resolve_num_threads(None, {"TOKENLOOM_NUM_THREADS": " 3 "}) == 3
    assert threads.resolve_num_threads(1, {"TOKENLOOM_NUM_THREADS": "3"}) == 1
    assert threads.resolve_num_threads(None, {"TOKENLOOM_NUM_THREADS": ""}) == default


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_bad_environment_value_names_the_variable(value: str) -> None:
    with pytest.raises(ValueError, match="TOKENLOOM_NUM_THREADS must be a positive integer") as info:
        threads.resolve_num_threads(None, {"TOKENLOOM_NUM_THREADS": value})
    assert value.strip("-") in str(info.value)
