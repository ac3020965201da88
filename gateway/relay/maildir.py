"""Maildir storage for messages the gateway keeps itself: the dev outbox and
mail to the gateway's own service mailboxes."""
from __future__ import annotations

import asyncio
import mailbox
from pathlib import Path


class MaildirWriter:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._box = mailbox.Maildir(str(self.path), create=True)

    def _store(self, data: bytes) -> str:
        # Maildir writes to tmp/ then renames into new/: a reader never sees half a message.
        return self._box.add(data)

    async def store(self, data: bytes) -> str:
        return await asyncio.get_running_loop().run_in_executor(None, self._store, data)

    def keys(self) -> list[str]:
        return list(self._box.keys())

    def get_bytes(self, key: str) -> bytes:
        return self._box.get_bytes(key)
