"""Two gateway processes (bench/launch_gateway.py: the real gateway under
uvloop, each its own process, its own SQLite and its own Redis clients)
sharing one Redis: a per-account limit holds for the sum over both, exactly,
while both send at once (issue 12, "the same limits enforced across two
gateway processes sharing Redis"). Skipped visibly without Redis, except
under CI=true."""
from __future__ import annotations

import asyncio
import base64
import secrets
import sys

from conftest import REPO, need, tcp_reachable

sys.path.insert(0, str(REPO / "bench"))

import bench_gateway as bg  # noqa: E402

LIMIT = 23


async def _client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def expect(line: bytes | None, code: bytes) -> bytes:
        if line is not None:
            writer.write(line + b"\r\n")
        while True:
            got = await reader.readline()
            if got[3:4] != b"-":
                assert got.startswith(code), (line, got)
                return got
    await expect(None, b"220")
    await expect(b"EHLO two.test", b"250")
    blob = base64.b64encode(f"\0{bg.ACCOUNT}\0{bg.PASSWORD}".encode())
    await expect(b"AUTH PLAIN " + blob, b"235")
    await expect(f"MAIL FROM:<{bg.MAIL_FROM}>".encode(), b"250")
    return reader, writer


async def _rcpt(reader, writer, address: str) -> int:
    writer.write(f"RCPT TO:<{address}>\r\n".encode())
    return int((await reader.readline())[:3])


async def test_two_gateway_processes_share_a_limit_exactly(tmp_path, sink):
    need(tcp_reachable("127.0.0.1", 6379), "Redis is not reachable at 127.0.0.1:6379")
    prefix = f"gwtest:two:{secrets.token_hex(4)}:"
    extra = {"counters": {"backend": "redis", "redis_url": "redis://127.0.0.1:6379/0", "key_prefix": prefix,
                          "timeout": 5.0},
             "checks": {"rcpt": ["rcpt_relay", "rcpt_limit", "rcpt_rate"]},
             "limits": {"classes": {"standard": {"recipients_per_day": LIMIT}}, "storm_refusals": 0}}
    children = []
    try:
        async with asyncio.timeout(90):
            for tag in ("one", "two"):
                children.append(await bg.start_gateway(tag, tmp_path, sink.port, extra, cprofile=False))
            sessions = [await _client(ch.port) for ch in children for _ in range(2)]   # 2 sessions each

            # each session's first recipient one after the other (so every session has one to
            # send DATA for), then the other 14 of each session all at once
            first = [[await _rcpt(*s, f"p{i}r0@example.org")] for i, s in enumerate(sessions)]

            async def send(i: int, session) -> list[int]:
                return [await _rcpt(*session, f"p{i}r{j}@example.org") for j in range(1, 15)]
            rest = await asyncio.gather(*(send(i, s) for i, s in enumerate(sessions)))
            codes = [a + b for a, b in zip(first, rest)]
            assert all(cs[0] == 250 for cs in codes)
            accepted = sum(c == 250 for cs in codes for c in cs)
            assert accepted == LIMIT, codes
            assert {c for cs in codes for c in cs} == {250, 451}
            for reader, writer in sessions:
                writer.write(b"DATA\r\n")
                assert (await reader.readline()).startswith(b"354")
                writer.write(bg.make_message(1024) + b".\r\n")
                assert (await reader.readline()).startswith(b"250")
            for _, writer in sessions:
                writer.write(b"QUIT\r\n")
                writer.close()
            await sink.wait_for(len(sessions))
        assert sum(len(m.rcpt_tos) for m in sink.messages) == LIMIT
    finally:
        for ch in children:
            await ch.stop()
        await bg.drop_redis_keys("redis://127.0.0.1:6379/0", prefix)
