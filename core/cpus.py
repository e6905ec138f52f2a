"""The CPUs a process may use, and the physical cores they are on.

The local model's thread counts come from these (worker/backends/batching.py), and so does the
share of them `make run` gives each of several local-model workers (launcher/__main__.py):
the machine's CPU count, which llama-cpp-python's defaults use, is wrong on a pinned process
(taskset, a container's cpuset) and on a machine without SMT.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Where Linux describes each CPU's core (`topology/core_id`, `topology/physical_package_id`).
SYSFS_CPUS = Path("/sys/devices/system/cpu")


def usable_cpus() -> set[int]:
    """The CPUs this process may run on: its affinity mask (taskset, a container's cpuset),
    not the machine's count, which llama-cpp-python's defaults use. Threads beyond the mask
    only take turns on its CPUs, and llama.cpp's OpenMP barriers then sleep instead of spin
    (worker/backends/batching.py, `context_params`): with one CPU allowed of two, 8 sequences
    decoded 117 tokens/s on two threads and 125 on one (docs/benchmarks.md, "Issue 12, sixth
    pass")."""
    try:
        return os.sched_getaffinity(0) or {0}
    except (AttributeError, OSError):  # no affinity call here (not Linux)
        return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int], sysfs: Path = SYSFS_CPUS) -> int:
    """How many physical cores `cpus` are on (SMT siblings count once); half of them when
    Linux does not say, llama-cpp-python's guess that every core runs two threads."""
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            cores.add((package, (topology / "core_id").read_text().strip()))
        except OSError:
            return max(len(cpus) // 2, 1)
    return len(cores) or 1
