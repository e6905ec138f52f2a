"""The fault and hostile suites' figures: printed as tables at the end of the run and written
to `.reports/faults.json` and `.reports/hostile.json` (tests/support/ledger.py,
tests/support/hostile.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import hostile, ledger

REPORTS = Path(__file__).resolve().parents[2] / ".reports"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if ledger.RUNS:
        terminalreporter.section("fault runs (tests/support/ledger.py)")
        for line in ledger.table(ledger.RUNS):
            terminalreporter.write_line(line)
        ledger.write_report(REPORTS / "faults.json", ledger.RUNS)
        terminalreporter.write_line(f"written to {REPORTS / 'faults.json'}")
    if hostile.RUNS:
        terminalreporter.section("hostile clients and environments (tests/support/hostile.py)")
        for line in hostile.table(hostile.RUNS):
            terminalreporter.write_line(line)
        ledger.write_report(REPORTS / "hostile.json", hostile.RUNS)
        terminalreporter.write_line(f"written to {REPORTS / 'hostile.json'}")
