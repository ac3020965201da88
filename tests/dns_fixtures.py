"""Pytest fixtures for the DNS layer; tests/conftest.py imports them:

    from dns_fixtures import dns_server, make_resolver  # noqa: F401

and ``live_dns``, the gateway's [dns] section resolving through that server.
"""
from __future__ import annotations

import pytest

from dns_server import TestDnsServer
from gateway.dns.resolver import Resolver
from gateway.dns.settings import ResolverSettings


def live_dns(server, static=()) -> dict:
    """The gateway's ``dns`` section: resolve through the test DNS server
    ``server`` instead of conftest's static-only table (``static`` entries are
    still answered first)."""
    return {"nameservers": [server.address], "timeout": 1.0, "min_ttl": 0, "static_only": False,
            "static": list(static)}


@pytest.fixture
def dns_server():
    """A fresh authoritative test server on 127.0.0.1 (ephemeral UDP port)."""
    srv = TestDnsServer().start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
async def make_resolver(dns_server):
    """``make_resolver(**ResolverSettings fields, redis=None)`` -> Resolver bound to dns_server."""
    made: list[Resolver] = []

    def factory(redis=None, **kw) -> Resolver:
        kw.setdefault("nameservers", [dns_server.address])
        kw.setdefault("timeout", 1.0)
        kw.setdefault("min_ttl", 0)
        r = Resolver(ResolverSettings(**kw), redis=redis)
        made.append(r)
        return r

    yield factory
    for r in made:
        await r.close()
