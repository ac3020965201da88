"""The embedded upstream of ``gateway serve --dev``: an SMTP server on a
loopback port that stores every relayed message as a maildir under
``./dev-outbox/`` so a newcomer can see what the gateway relayed."""
from __future__ import annotations

import asyncio
import logging

from aiosmtpd.smtp import SMTP

from .maildir import MaildirWriter

log = logging.getLogger("gateway.devsink")


class _Handler:
    def __init__(self, writer: MaildirWriter):
        self.writer = writer

    async def handle_DATA(self, server, session, envelope):
        rcpts = ", ".join(envelope.rcpt_tos)
        header = (f"X-Dev-Envelope-From: <{envelope.mail_from}>\r\n"
                  f"X-Dev-Envelope-To: {rcpts}\r\n").encode("utf-8", "surrogateescape")
        key = await self.writer.store(header + envelope.original_content)
        log.info("dev outbox: stored %s for %s", key, rcpts)
        return f"250 2.0.0 Stored in dev outbox as {key}"


class DevSink:
    def __init__(self, outbox: str):
        self.writer = MaildirWriter(outbox)
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        handler = _Handler(self.writer)
        self.server = await loop.create_server(
            lambda: SMTP(handler, hostname="dev-outbox.localhost", enable_SMTPUTF8=True,
                         data_size_limit=None, loop=loop),
            "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
