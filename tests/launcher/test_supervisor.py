"""The launcher's restart policy, on a fake clock: backoff, its reset, the crash loop logged
once. (The same policy on real processes: tests/system/test_hostile_launcher.py.)"""

from __future__ import annotations

import logging
import signal

import pytest

from launcher.supervisor import Supervised, Supervisor, describe_exit, exit_hint


class FakeChild:
    def __init__(self) -> None:
        self.status: int | None = None
        self.launches = 0

    def launch(self) -> None:
        self.launches += 1
        self.status = None

    def exit_status(self) -> int | None:
        return self.status


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def supervised(clock: Clock) -> tuple[Supervisor, FakeChild, Supervised]:
    supervisor = Supervisor(clock=clock)
    child = FakeChild()
    unit = supervisor.add(Supervised("worker 1", child.launch, child.exit_status))
    return supervisor, child, unit


def die_and_restart(supervisor: Supervisor, child: FakeChild, clock: Clock, status: int) -> float:
    """The child dies now; returns the delay before the supervisor started it again."""
    child.status = status
    supervisor.check()
    died_at, launches = clock.now, child.launches
    while child.launches == launches:
        clock.now += 0.25
        supervisor.check()
    return clock.now - died_at


def test_the_delay_doubles_up_to_30_s_and_resets_after_a_good_minute() -> None:
    clock = Clock()
    supervisor, child, _ = supervised(clock)
    delays = [die_and_restart(supervisor, child, clock, 1) for _ in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    clock.now += 61  # a minute of running
    supervisor.check()
    assert die_and_restart(supervisor, child, clock, 1) == 0.5


def test_a_crash_loop_is_logged_once_with_the_signal_and_a_hint(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    supervisor, child, unit = supervised(clock)
    with caplog.at_level(logging.INFO, logger="launcher"):
        for _ in range(12):
            die_and_restart(supervisor, child, clock, -signal.SIGILL)
    loops = [r for r in caplog.records if "crash-looping" in r.getMessage()]
    assert len(loops) == 1
    assert loops[0].levelno == logging.ERROR
    assert "signal SIGILL" in loops[0].getMessage()
    assert "CPU requirements" in loops[0].getMessage()
    assert unit.restarts == 12  # and it kept restarting
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4  # the deaths before the loop was recognised


def test_exit_descriptions() -> None:
    assert describe_exit(-signal.SIGSEGV) == "signal SIGSEGV"
    assert describe_exit(3) == "status 3"
    assert "CPU instructions this machine lacks" in exit_hint(-signal.SIGILL)
    assert exit_hint(1) == "see its log above"
    assert "OOM" in exit_hint(-signal.SIGKILL)
