"""The HTTP side of the gateway without its SMTP side, for the web tests:
the stores behind the app (SQLite in a temp folder) and the app served by
uvicorn on an ephemeral loopback port, as the gateway serves it."""
from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from gateway.accounts.store import AccountStore
from gateway.blocklist.service import BlockList
from gateway.storage.db import create_engine, migrate
from gateway.web.app import create_app
from gateway.web.context import WebContext


@dataclass
class Stores:
    engine: Any
    accounts: AccountStore
    blocklist: BlockList


@asynccontextmanager
async def web_stores(folder: Path) -> AsyncIterator[Stores]:
    """A migrated SQLite database with its account store and block lists started (and stopped after)."""
    engine = create_engine(f"sqlite+aiosqlite:///{folder / 'web.db'}")
    await migrate(engine)
    accounts = AccountStore(engine, scrypt_n=2 ** 4)
    await accounts.start()
    blocklist = BlockList(engine)
    await blocklist.start()
    try:
        yield Stores(engine, accounts, blocklist)
    finally:
        await blocklist.stop()
        await accounts.stop()
        await engine.dispose()


async def serve(ctx: WebContext) -> tuple[uvicorn.Server, asyncio.Task, int]:
    """The app of ``ctx`` served by uvicorn; returns the server, its task and the port."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(ctx), loop="none", log_level="warning",
                                           lifespan="off", access_log=False))
    server.install_signal_handlers = lambda: None   # type: ignore[method-assign]
    # The socket listens already: a request sent before uvicorn accepts waits in
    # the backlog, within the client's timeout.
    return server, asyncio.get_running_loop().create_task(server.serve(sockets=[sock])), sock.getsockname()[1]


async def shut(server: uvicorn.Server, task: asyncio.Task) -> None:
    server.should_exit = True
    await asyncio.wait_for(task, 10)
