"""One awaitable under a deadline, without the cancellation race of
``asyncio.wait_for`` on Python 3.11.

On 3.11, ``asyncio.wait_for`` returns the inner result when the waiting task
is cancelled in the same loop turn as the inner awaitable completes: the
cancellation is lost. A background loop (a refresher, a poller) that is
stopped at that moment keeps running, and the ``stop()`` that awaits it
waits forever. ``asyncio.timeout`` counts cancellations (``Task.cancelling``)
and never loses one, so every deadline in gateway/ goes through it; ruff
refuses ``asyncio.wait_for`` (TID251, pyproject.toml).
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[T], seconds: float | None) -> T:
    """Await ``aw``; raise ``TimeoutError`` (cancelling it) after ``seconds``."""
    async with asyncio.timeout(seconds):
        return await aw
