"""The baseline relay: aiosmtpd in front, aiosmtplib to the upstream, no checks.

The smallest fair relay built from the same libraries as the gateway: an
aiosmtpd server whose ``handle_DATA`` sends the message upstream with
aiosmtplib over a pool of reused upstream connections (LIFO, like the
gateway's pool) and answers the client with the upstream's reply. No AUTH,
no checks, no trace header, no log. Runs under uvloop in its own process and
prints ``READY <port>``; stops on SIGTERM or when stdin closes.

    python3 bench/minimal_relay.py --upstream-port PORT [--port 0]
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import aiosmtplib
import uvloop
from aiosmtpd.smtp import SMTP as AioSMTP


class RelayHandler:
    def __init__(self, host: str, port: int, pool_size: int = 64):
        self.host = host
        self.port = port
        self.pool_size = pool_size
        self.idle: list[aiosmtplib.SMTP] = []

    async def _take(self) -> aiosmtplib.SMTP:
        while self.idle:
            smtp = self.idle.pop()
            if smtp.is_connected:
                return smtp
        smtp = aiosmtplib.SMTP(hostname=self.host, port=self.port, local_hostname="relay.bench", timeout=10)
        await smtp.connect()
        return smtp

    def _give_back(self, smtp: aiosmtplib.SMTP) -> None:
        if smtp.is_connected and len(self.idle) < self.pool_size:
            self.idle.append(smtp)
        else:
            smtp.close()

    async def handle_DATA(self, server, session, envelope):
        smtp = await self._take()
        try:
            errors, message = await smtp.sendmail(envelope.mail_from, envelope.rcpt_tos,
                                                  envelope.original_content, timeout=30)
        except aiosmtplib.SMTPResponseException as exc:
            self._give_back(smtp)
            return f"{exc.code} {exc.message}"
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
            smtp.close()
            return "451 4.4.1 upstream failure"
        self._give_back(smtp)
        return f"250 2.0.0 OK relayed ({message})"


async def _watch_stdin(stop: asyncio.Event) -> None:
    """Stop when stdin closes (the driver went away)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.readline():
        pass
    stop.set()


async def main(port: int, upstream_host: str, upstream_port: int) -> None:
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    loop = asyncio.get_running_loop()
    handler = RelayHandler(upstream_host, upstream_port)
    server = await loop.create_server(
        lambda: AioSMTP(handler, hostname="relay.bench", enable_SMTPUTF8=True, data_size_limit=None, loop=loop),
        "127.0.0.1", port, backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = loop.create_task(_watch_stdin(stop))
    sys.stdout.write(f"READY {server.sockets[0].getsockname()[1]}\n")
    sys.stdout.flush()
    await stop.wait()
    watcher.cancel()
    server.close()
    for smtp in handler.idle:
        smtp.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--upstream-host", default="127.0.0.1")
    p.add_argument("--upstream-port", type=int, required=True)
    a = p.parse_args()
    uvloop.run(main(a.port, a.upstream_host, a.upstream_port))
