"""How many CPU threads torch computes with (L0: torch is imported only to apply the count).

The default is the number of physical cores this process may run on: the CPUs in its affinity mask
(`os.sched_getaffinity`, which containers and `taskset` restrict), counted once per core when the
kernel reports hyper-threaded siblings, and capped by a cgroup CPU quota. Never more: a thread per
logical CPU, or more threads than the process may use, makes the threads wait for each other. On a
machine busy with other jobs even that many can be several times slower than one thread.

`--threads N` on the command line, else `TOKENLOOM_NUM_THREADS`, else the default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

ENV_VAR = "TOKENLOOM_NUM_THREADS"
_SYS_CPU = Path("/sys/devices/system/cpu")
_CGROUP = Path("/sys/fs/cgroup")


def available_cpus() -> list[int]:
    """The logical CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int] | None = None, sys_cpu: Path = _SYS_CPU) -> int:
    """Distinct physical cores among `cpus` (default: the available ones). Without the kernel's
    topology files every logical CPU counts as a core."""
    cpus = available_cpus() if cpus is None else cpus
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return max(len(cpus), 1)
        cores.add((package, core))
    return max(len(cores), 1)


def cgroup_cpu_limit(cgroup: Path = _CGROUP) -> int | None:
    """The CPU quota of this process's cgroup, rounded up to whole CPUs; None without a quota."""
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(math.ceil(int(quota) / int(period)), 1)
        return None
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return max(math.ceil(quota_us / period_us), 1) if quota_us > 0 and period_us > 0 else None


def default_num_threads() -> int:
    """Physical cores available to this process, never more than its CPU quota."""
    cores = physical_cores()
    limit = cgroup_cpu_limit()
    return min(cores, limit) if limit is not None else cores


def parse_num_threads(value: object, name: str) -> int:
    """A thread count from the command line or the environment; `name` is what the message calls it."""
    try:
        count = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if count < 1:
        raise ValueError(f"{name} must be a positive integer, got {count}")
    return count


def resolve_num_threads(requested: int | None = None, environ: Mapping[str, str] | None = None) -> int:
    """`requested` (the --threads flag) if given, else TOKENLOOM_NUM_THREADS, else the default."""
    if requested is not None:
        return parse_num_threads(requested, "--threads")
    env = os.environ if environ is None else environ
    value = env.get(ENV_VAR, "").strip()
    if value:
        return parse_num_threads(value, ENV_VAR)
    return default_num_threads()


def set_num_threads(count: int) -> None:
    """Make torch compute with `count` intra-op threads."""
    import torch

    torch.set_num_threads(count)
