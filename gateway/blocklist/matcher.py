"""The immutable block-list snapshot the SMTP checks read (pure, no I/O).

Lookups are cheap enough for every connection and every MAIL FROM:

- IP: networks grouped per family and prefix length; a lookup masks the
  address once per distinct prefix length in use (at most 33 or 129, in
  practice a handful) and probes a set. The most specific entry wins.
- domain: the domain and each parent (``a.b.bad.example``, ``b.bad.example``,
  ``bad.example``, ``example``) probed in one set.
- hostname: the name probed in the exact set, then each suffix starting at a
  label boundary (``.b.bad.example``, ``.bad.example``, ...) in the suffix set.
"""
from __future__ import annotations

import ipaddress
from typing import Iterable

import idna

from .model import BlockEntry, plain_address

_MASKS = {4: 32, 6: 128}


def _host_key(name: str) -> str | None:
    """A client-supplied host name in the stored form (lower-case A-label, no trailing dot)."""
    name = name.strip().rstrip(".")
    if not name:
        return None
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            return name.lower()
    return name.lower()


class Snapshot:
    """One consistent view of all entries, built once per change."""

    __slots__ = ("version", "entries", "_nets", "_domains", "_exact", "_suffix")

    def __init__(self, entries: Iterable[BlockEntry] = (), version: int = 0):
        self.version = version
        self.entries: tuple[BlockEntry, ...] = tuple(entries)
        # family -> [(prefixlen, {network int: entry})], longest prefix first
        nets: dict[int, dict[int, dict[int, BlockEntry]]] = {4: {}, 6: {}}
        self._domains: dict[str, BlockEntry] = {}
        self._exact: dict[str, BlockEntry] = {}
        self._suffix: dict[str, BlockEntry] = {}
        for e in self.entries:
            if e.kind == "ip":
                net = ipaddress.ip_network(e.value, strict=False)
                nets[net.version].setdefault(net.prefixlen, {})[int(net.network_address)] = e
            elif e.kind == "domain":
                self._domains[e.value] = e
            elif e.kind == "hostname":
                (self._suffix if e.value.startswith(".") else self._exact)[e.value] = e
        self._nets = {
            fam: [(_MASKS[fam] - plen, table) for plen, table in sorted(by_len.items(), reverse=True)]
            for fam, by_len in nets.items()
        }

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def has_hostnames(self) -> bool:
        return bool(self._exact or self._suffix)

    def counts(self) -> dict[str, int]:
        out = {"ip": 0, "domain": 0, "hostname": 0}
        for e in self.entries:
            out[e.kind] += 1
        return out

    # ---------------------------------------------------------------- lookups
    def match_ip(self, ip: str) -> BlockEntry | None:
        try:
            addr = plain_address(ip)
        except ValueError:
            return None
        return self.match_address(addr)

    def match_address(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> BlockEntry | None:
        """``addr`` as :func:`.model.plain_address` returns it (IPv4-mapped IPv6 already IPv4)."""
        value = int(addr)
        for shift, table in self._nets[addr.version]:
            hit = table.get((value >> shift) << shift)
            if hit is not None:
                return hit
        return None

    def match_domain(self, domain: str) -> BlockEntry | None:
        if not self._domains:
            return None
        d = _host_key(domain)
        while d:
            hit = self._domains.get(d)
            if hit is not None:
                return hit
            dot = d.find(".")
            if dot < 0:
                return None
            d = d[dot + 1:]
        return None

    def match_hostname(self, name: str) -> BlockEntry | None:
        if not (self._exact or self._suffix):
            return None
        n = _host_key(name)
        if not n:
            return None
        hit = self._exact.get(n)
        if hit is not None or not self._suffix:
            return hit
        dot = n.find(".")
        while dot >= 0:
            hit = self._suffix.get(n[dot:])
            if hit is not None:
                return hit
            dot = n.find(".", dot + 1)
        return None


EMPTY = Snapshot()
