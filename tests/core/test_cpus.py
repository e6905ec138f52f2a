"""The CPUs a process may use and the cores they are on (core/cpus.py), on fake sysfs trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.cpus import physical_cores, usable_cpus


def _topology(root: Path, cores: dict[int, tuple[int, int]]) -> Path:
    """A fake /sys/devices/system/cpu: cpu -> (package, core)."""
    for cpu, (package, core) in cores.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    return root


def test_a_one_token_step_gets_a_thread_per_physical_core(tmp_path: Path) -> None:
    """Without SMT (most small VMs) every CPU is a core: llama-cpp-python's half of them left
    one of two idle, and one session decoded 54 tokens/s instead of 85 (docs/benchmarks.md,
    "Issue 12, sixth pass"). With two threads per core it is half, as before."""
    no_smt = _topology(tmp_path / "a", {0: (0, 0), 1: (0, 1)})
    assert physical_cores({0, 1}, no_smt) == 2
    smt = _topology(tmp_path / "b", {0: (0, 0), 1: (0, 0), 2: (0, 1), 3: (0, 1)})
    assert physical_cores({0, 1, 2, 3}, smt) == 2
    assert physical_cores({0, 2}, smt) == 2  # one thread of each core allowed
    two_packages = _topology(tmp_path / "c", {0: (0, 0), 1: (1, 0)})
    assert physical_cores({0, 1}, two_packages) == 2  # the same core id on two sockets
    assert physical_cores({0, 1, 2, 3}, tmp_path / "missing") == 2  # Linux does not say: half


def test_the_usable_cpus_are_the_affinity_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5})
    assert usable_cpus() == {3, 5}
