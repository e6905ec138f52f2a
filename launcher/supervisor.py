"""Keeping the launcher's children alive: restart with backoff, report a crash loop once.

A worker that dies (a SIGILL from a model library built for another CPU, a SIGSEGV, an OOM
kill) used to take the whole service down with it, Redis included. Now each child is restarted
after a delay that doubles from 0.5 s up to 30 s and goes back to 0.5 s once it has run for a
minute; while no worker runs, messages wait in the stream with the `queued` notice. Five deaths
within a minute are a crash loop: logged once, with the exit status or signal and a hint, and
the restarts go on quietly at the capped delay.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger("launcher")

FIRST_DELAY = 0.5
MAX_DELAY = 30.0
HEALTHY_AFTER = 60.0  # seconds of running that reset the delay and the crash-loop state
LOOP_DEATHS = 5  # this many deaths within LOOP_WINDOW is a crash loop
LOOP_WINDOW = 60.0


def describe_exit(status: int) -> str:
    """`status 1` or `signal SIGILL` (subprocess reports a signal as a negative code)."""
    if status < 0:
        try:
            return f"signal {signal.Signals(-status).name}"
        except ValueError:
            return f"signal {-status}"
    return f"status {status}"


def exit_hint(status: int) -> str:
    """What the user should look at, for this way of dying."""
    if status == -signal.SIGILL:
        return (
            "the model library uses CPU instructions this machine lacks: see README 'CPU "
            "requirements', rebuild it with `LLAMA_CMAKE_ARGS=<this CPU's flags> make install`"
        )
    if status == -signal.SIGKILL:
        return "it was killed from outside (the kernel's OOM killer? see `dmesg`)"
    if status < 0:
        return "it crashed in native code: see its log above"
    return "see its log above"


@dataclass
class Supervised:
    """One child the supervisor keeps alive: how to (re)start it and how to see it died."""

    name: str
    launch: Callable[[], None]
    exit_status: Callable[[], int | None]  # None while it runs
    delay: float = FIRST_DELAY
    started_at: float = 0.0
    restart_at: float | None = None
    deaths: deque[float] = field(default_factory=deque)
    loop_reported: bool = False
    restarts: int = 0


class Supervisor:
    """Polls its children; restarts the dead ones with backoff until asked to stop."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.units: list[Supervised] = []
        self.stopping = False
        self._clock = clock

    def add(self, unit: Supervised) -> Supervised:
        unit.launch()
        unit.started_at = self._clock()
        self.units.append(unit)
        return unit

    def request_stop(self) -> None:
        self.stopping = True

    def watch(self, interval: float = 0.2) -> None:
        """Until request_stop(): restart whoever died, when their delay is over."""
        while not self.stopping:
            self.check()
            time.sleep(interval)

    def check(self) -> None:
        now = self._clock()
        for unit in self.units:
            if unit.restart_at is not None:
                if now >= unit.restart_at:
                    self._restart(unit, now)
                continue
            status = unit.exit_status()
            if status is None:
                if now - unit.started_at >= HEALTHY_AFTER:
                    self._healthy(unit)
            else:
                self._died(unit, status, now)

    def _healthy(self, unit: Supervised) -> None:
        if unit.loop_reported:
            logger.info("%s has run for %.0f s: no longer crash-looping", unit.name, HEALTHY_AFTER)
        unit.delay = FIRST_DELAY
        unit.deaths.clear()
        unit.loop_reported = False

    def _died(self, unit: Supervised, status: int, now: float) -> None:
        if now - unit.started_at >= HEALTHY_AFTER:
            self._healthy(unit)
        unit.deaths.append(now)
        while unit.deaths and now - unit.deaths[0] > LOOP_WINDOW:
            unit.deaths.popleft()
        delay, unit.delay = unit.delay, min(MAX_DELAY, unit.delay * 2)
        unit.restart_at = now + delay
        how = describe_exit(status)
        if len(unit.deaths) >= LOOP_DEATHS and not unit.loop_reported:
            unit.loop_reported = True
            logger.error(
                "%s is crash-looping: %d exits within %.0f s, the last with %s; %s. "
                "Still restarting it, at most every %.0f s (further exits are logged at DEBUG)",
                unit.name, len(unit.deaths), LOOP_WINDOW, how, exit_hint(status), MAX_DELAY,
            )  # fmt: skip
        elif unit.loop_reported:
            logger.debug("%s exited with %s; restarting in %.1f s", unit.name, how, delay)
        else:
            logger.warning(
                "%s exited with %s (%s); restarting it in %.1f s",
                unit.name, how, exit_hint(status), delay,
            )  # fmt: skip

    def _restart(self, unit: Supervised, now: float) -> None:
        unit.restart_at = None
        unit.started_at = now
        unit.restarts += 1
        try:
            unit.launch()
        except Exception as exc:  # e.g. the port is still busy: try again after the delay
            logger.warning("could not restart %s: %s", unit.name, exc)
            self._died(unit, 1, now)
            return
        log = logger.debug if unit.loop_reported else logger.info
        log("restarted %s (restart %d)", unit.name, unit.restarts)
