"""A named background task owned by a component: started once, cancelled and
awaited on stop (the refreshers and re-checkers all follow this life)."""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine


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

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
