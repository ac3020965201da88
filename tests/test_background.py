"""Stopping background loops: a cancellation is never lost and a stop never
hangs.

CI once hung for the whole test timeout in BlockList.stop(): the refresher's
``asyncio.wait_for`` (Python 3.11) returned the inner result when the stop's
cancellation arrived in the same loop turn as the database answer, the loop
ran on, and stop() awaited it forever. These tests make that turn happen on
purpose.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time

import pytest

from gateway.blocklist.service import BlockList
from gateway.state.background import BackgroundTask, stop_tasks
from gateway.state.deadline import within
from gateway.storage.db import create_engine, migrate


async def _cancel_as_inner_completes(wait) -> tuple[asyncio.Task, bool]:
    """Run ``wait(event.wait(), 10)`` in a task, then set the event and cancel
    the task in the same loop turn; return the task and whether it saw the
    cancellation."""
    event = asyncio.Event()
    seen = []

    async def body():
        try:
            await wait(event.wait(), 10)
        except asyncio.CancelledError:
            seen.append(True)
            raise
        await asyncio.sleep(0)          # the loop body goes on: the cancellation was lost

    task = asyncio.get_running_loop().create_task(body())
    await asyncio.sleep(0.01)           # the task is inside the wait
    event.set()                         # the inner waiter is woken first ...
    task.cancel()                       # ... and the task cancelled in the same turn
    await asyncio.wait({task}, timeout=5)
    return task, bool(seen)


async def test_within_keeps_a_cancellation_that_arrives_as_the_inner_awaitable_completes():
    task, seen = await _cancel_as_inner_completes(within)
    assert seen and task.cancelled()


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="asyncio.wait_for was rewritten on asyncio.timeout in 3.12")
async def test_the_race_is_real_on_311_wait_for():
    # The premise of the ban on asyncio.wait_for (pyproject.toml, TID251): on 3.11 it loses this cancellation.
    task, seen = await _cancel_as_inner_completes(asyncio.wait_for)  # noqa: TID251
    assert not seen and not task.cancelled() and task.done()


async def test_stop_cancels_again_a_task_that_swallowed_the_cancellation():
    swallowed = []

    async def stubborn():
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if not swallowed:          # the first cancellation is lost, as in the race above
                    swallowed.append(True)
                    continue
                raise

    bg = BackgroundTask("stubborn")
    bg.start(stubborn)
    await asyncio.sleep(0)
    t0 = time.monotonic()
    assert await bg.stop(timeout=5) is True
    assert swallowed and time.monotonic() - t0 < 5
    assert not bg.running


async def test_stop_gives_up_on_a_task_that_never_ends_and_says_so(caplog):
    release = asyncio.Event()

    async def immortal():
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    bg = BackgroundTask("immortal")
    bg.start(immortal)
    task = bg._task
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="gateway"):
        t0 = time.monotonic()
        assert await bg.stop(timeout=0.3) is False
        took = time.monotonic() - t0
    assert 0.3 <= took < 3
    assert any("immortal" in r.getMessage() and "did not stop within 0.3 s" in r.getMessage()
               for r in caplog.records)
    release.set()
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    assert task.done()


async def test_stop_tasks_logs_a_task_that_failed_and_accepts_none(caplog):
    async def fails():
        raise RuntimeError("boom")

    task = asyncio.get_running_loop().create_task(fails())
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="gateway"):
        assert await stop_tasks([task, None], "failing work") is True
    assert any("failing work" in r.getMessage() and "boom" in r.getMessage() for r in caplog.records)
    assert await stop_tasks([], "nothing") is True


async def test_blocklist_stop_while_a_poll_completes_in_the_same_turn(tmp_path):
    # The CI hang itself: the poll's database read finishes in the turn stop() cancels the refresher.
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'bl.db'}")
    await migrate(engine)
    reader = BlockList(engine, poll_interval=0.001)
    await reader.start()
    answered = asyncio.Event()
    polls = []
    version = reader.snapshot.version

    async def gated_version() -> int:
        polls.append(True)
        await answered.wait()
        return version

    reader.store.version = gated_version
    try:
        for _ in range(200):          # bounded: the refresher is inside a poll within a few ms
            if polls:
                break
            await asyncio.sleep(0.005)
        assert polls
        refresher = reader._task._task
        answered.set()                # the read answers ...
        stopped = await within(reader.stop(), 10)   # ... and stop() cancels in the same turn
        assert stopped is None and refresher is not None and refresher.done()
        # The first cancellation ended the loop: no poll after it (a lost one polls on until the
        # stop's re-cancel, state/background.py, catches the loop in its sleep).
        assert len(polls) == 1, f"the refresher polled {len(polls)} times after it was cancelled"
    finally:
        await engine.dispose()
