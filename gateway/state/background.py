"""A named background task owned by a component: started once, cancelled and
awaited on stop (the refreshers and re-checkers all follow this life).

``stop()`` has a deadline. A task that swallows a cancellation (third-party
code that catches ``CancelledError``, or the ``asyncio.wait_for`` race of
Python 3.11, see state/deadline.py) is cancelled again every
``RECANCEL_EVERY`` seconds; one that is still running after ``timeout`` is
logged and left behind, so a component's stop, and the gateway's shutdown,
never hang on it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Coroutine, Iterable

log = logging.getLogger("gateway")

RECANCEL_EVERY = 0.5


class BackgroundTask:
    def __init__(self, name: str):
        self.name = name
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(run(), name=self.name)

    async def stop(self, timeout: float = 5.0) -> bool:
        """Cancel the task and wait for it, at most ``timeout`` seconds; True if it ended."""
        task, self._task = self._task, None
        return await stop_tasks([task] if task is not None else [], self.name, timeout)


async def stop_tasks(tasks: Iterable[asyncio.Future | None], name: str, timeout: float = 5.0) -> bool:
    """Cancel ``tasks`` and wait until they have ended, at most ``timeout``
    seconds, cancelling again every ``RECANCEL_EVERY`` seconds those that
    swallowed it. True if all ended; those still running are logged and left."""
    pending = {t for t in tasks if t is not None}
    deadline = time.monotonic() + timeout
    ended: set[asyncio.Future] = set()
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            log.warning("%s: %d background task(s) did not stop within %g s after cancellation; left behind",
                        name, len(pending), timeout)
            return False
        for task in pending:
            task.cancel()
        # asyncio.wait never raises for the awaited tasks and never cancels them on its own timeout
        done, pending = await asyncio.wait(pending, timeout=min(RECANCEL_EVERY, left))
        ended |= done
    for task in ended:
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s: a background task ended with an error: %r", name, task.exception())
    return True
