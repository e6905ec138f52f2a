"""The fault suite's figures: printed as a table at the end of the run and written to
`.reports/faults.json` (see tests/support/ledger.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.ledger import RUNS, table, write_report

REPORT = Path(__file__).resolve().parents[2] / ".reports" / "faults.json"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RUNS:
        return
    terminalreporter.section("fault runs (tests/support/ledger.py)")
    for line in table(RUNS):
        terminalreporter.write_line(line)
    write_report(REPORT, RUNS)
    terminalreporter.write_line(f"written to {REPORT}")
