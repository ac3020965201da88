"""The benchmark's upstream: a bare aiosmtpd sink under uvloop, in its own process.

It accepts every message, keeps nothing but a count, and answers
``COUNT`` lines on stdin with ``COUNT <n>`` on stdout so the driver can check
that every message arrived. Started by ``bench_gateway.py``; on start it
prints one line ``READY <port>`` (it binds port 0, so there is no port race).

    python3 bench/sink.py [--port 0]
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import uvloop
from aiosmtpd.smtp import SMTP as AioSMTP


class CountingHandler:
    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        return "250 2.0.0 OK queued"


async def _stdin_commands(handler: CountingHandler, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:  # the driver went away: stop too
            stop.set()
            return
        if line.strip() == b"COUNT":
            sys.stdout.write(f"COUNT {handler.count}\n")
            sys.stdout.flush()


async def main(port: int) -> None:
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    loop = asyncio.get_running_loop()
    handler = CountingHandler()
    server = await loop.create_server(
        lambda: AioSMTP(handler, hostname="sink.bench", enable_SMTPUTF8=True, data_size_limit=None, loop=loop),
        "127.0.0.1", port, backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    cmd = loop.create_task(_stdin_commands(handler, stop))
    sys.stdout.write(f"READY {server.sockets[0].getsockname()[1]}\n")
    sys.stdout.flush()
    await stop.wait()
    cmd.cancel()
    server.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    uvloop.run(main(p.parse_args().port))
