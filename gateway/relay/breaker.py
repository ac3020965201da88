"""The health state of one upstream: a circuit breaker.

closed     the upstream is used as configured (failover in order).
open       after ``failures`` consecutive failures to open a connection and
           start a transaction (refused/dropped connection, no greeting, a
           failed EHLO, STARTTLS or login, 421), or at once after a timeout
           (``open_on_timeout``: a hung upstream costs its timeout once, not
           every message): the pool skips it without trying, for a back-off
           that starts at ``backoff`` and doubles on every failed probe up to
           ``backoff_max``.
half_open  the back-off has ended: the pool's prober (a background task, no
           message waits for it) opens one connection (connect, greeting,
           EHLO, STARTTLS and login as configured). Success closes the breaker
           (the connection goes to the pool); failure opens it again with the
           doubled back-off. Messages still skip it while the probe runs.

The breaker never makes the gateway refuse on its own: when every upstream is
skipped, or every one tried has failed, the pool still tries the skipped one
whose back-off ends first (relay/pool.py).
"""
from __future__ import annotations

import time
from typing import Callable

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}     # the gauge in /metrics


class Breaker:
    def __init__(self, failures: int, backoff: float, backoff_max: float, open_on_timeout: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.threshold = failures
        self.base = backoff
        self.max = backoff_max
        self.open_on_timeout = open_on_timeout
        self._clock = clock
        self.state = CLOSED
        self.consecutive_failures = 0
        self.opens = 0                  # transitions to open (first opening and every failed probe)
        self.skipped = 0                # attempts not made because the breaker was open
        self.backoff = 0.0              # the current back-off (0 while closed)
        self.open_until = 0.0           # monotonic time the current back-off ends

    @property
    def available(self) -> bool:
        """May a message try this upstream now (closed)?"""
        return self.state == CLOSED

    def probe_due(self) -> bool:
        return self.state == OPEN and self._clock() >= self.open_until

    def start_probe(self) -> None:
        self.state = HALF_OPEN

    def postpone(self) -> None:
        """The probe could not run (no free connection slot): open again for
        the current back-off, neither a failure nor a success."""
        self.state = OPEN
        self.open_until = self._clock() + self.backoff

    def success(self) -> None:
        self.state = CLOSED
        self.consecutive_failures = 0
        self.backoff = 0.0
        self.open_until = 0.0

    def failure(self, timeout: bool = False, probe: bool = False) -> bool:
        """Count one failure; True when it opened the breaker, or re-opened it
        after a failed probe with the doubled back-off. A failed last-resort
        attempt at an upstream that is open already only counts."""
        self.consecutive_failures += 1
        if probe:
            self.backoff = min(max(self.backoff, self.base) * 2, self.max)
        elif self.state != CLOSED:
            return False
        elif self.consecutive_failures < self.threshold and not (timeout and self.open_on_timeout):
            return False
        else:
            self.backoff = self.base
        self.state = OPEN
        self.open_until = self._clock() + self.backoff
        self.opens += 1
        return True

    def as_dict(self) -> dict:
        d: dict = {"state": self.state, "consecutive_failures": self.consecutive_failures, "opens": self.opens}
        if self.state != CLOSED:
            d["retry_in"] = round(max(0.0, self.open_until - self._clock()), 3)
        return d
