"""The hostile-client and hostile-environment suite's figures, one row per run.

Each test in tests/system/test_hostile_*.py drives real processes against a real Redis with one
kind of abuse or environmental fault, then calls `record()` with what it measured; the rows
are printed as a table at the end of the pytest run (tests/system/conftest.py) and written to
`.reports/hostile.json`, next to the fault table (tests/support/ledger.py).

A row says what was done, how much of it, what was lost (the suite asserts 0 before it
records), what the client saw, and any measured figure (RSS, latency) in `figures`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from tests.support.ledger import aligned


@dataclass
class HostileRun:
    case: str  # what the hostile client or environment did, in a few words
    load: str  # how much of it ("50 sockets x 1 MiB frames", "3 s of OOM under 8 sessions")
    lost: int  # messages a well-behaved client sent that were never answered (asserted 0)
    client_saw: str  # what the offending (or affected) client was told: codes, close codes
    figures: dict[str, str] = field(default_factory=dict)  # measured numbers, with units
    seconds: float = 0.0


RUNS: list[HostileRun] = []

COLUMNS = ("case", "load", "lost", "client_saw", "figures", "seconds")


def record(run: HostileRun) -> HostileRun:
    """Add a run to the table printed at the end of the pytest run."""
    run.seconds = round(run.seconds, 1)
    RUNS.append(run)
    return run


def table(runs: Sequence[HostileRun]) -> list[str]:
    rows = [list(COLUMNS)]
    for run in runs:
        values = asdict(run)
        values["figures"] = ", ".join(f"{k}={v}" for k, v in run.figures.items()) or "-"
        rows.append([str(values[c]) for c in COLUMNS])
    return aligned(rows)
