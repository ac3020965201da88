"""A small authoritative DNS server for tests (dnslib, UDP, loopback only).

It runs in its own thread so a busy or blocked event loop in the test does not
change what the server does. Zone data can be changed while it runs:

    srv = TestDnsServer().start()               # 127.0.0.1, ephemeral port
    srv.add_zone("example.test", minimum=60)    # SOA for negative answers
    srv.set("example.test", "MX", ["10 mx.example.test"], ttl=300)
    srv.set("mx.example.test", "A", ["198.51.100.25"])
    srv.mode("slow.example.test", "drop")       # never answer
    srv.mode("bad.example.test", "servfail")
    srv.count("example.test", "MX")             # queries seen
    srv.load_rbldnsd("test-bl.example", "ip4set", path)
    srv.stop()

Names not set and not under a dataset answer NXDOMAIN (with the enclosing
zone's SOA in the authority section); a name with records of another type
answers NODATA. ``*.name`` entries are wildcards.
"""
from __future__ import annotations

import ipaddress
import select
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from dnslib import AAAA, CNAME, MX, NS, PTR, QTYPE, RCODE, RR, SOA, TXT, A, DNSRecord

_RDATA = {
    "A": lambda v: A(v),
    "AAAA": lambda v: AAAA(v),
    "MX": lambda v: MX(v.split()[1] if v.split()[1] != "." else ".", int(v.split()[0])),
    "TXT": lambda v: TXT([v[i:i + 255].encode() for i in range(0, max(len(v), 1), 255)]),
    "CNAME": lambda v: CNAME(v),
    "NS": lambda v: NS(v),
    "PTR": lambda v: PTR(v),
}


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


@dataclass
class _Zone:
    apex: str
    minimum: int = 60
    soa_ttl: int = 3600


# A dataset answers the names under one zone: fn(relative_name, qtype) ->
# None (not listed: NXDOMAIN) or {"A": [...], "TXT": [...]}.
Dataset = Callable[[str, str], "dict[str, list[str]] | None"]


@dataclass
class TestDnsServer:
    __test__ = False  # not a test class (pytest collects Test* names)

    host: str = "127.0.0.1"
    port: int = 0
    default_ttl: int = 300
    records: dict[tuple[str, str], tuple[list[str], int]] = field(default_factory=dict)
    zones: dict[str, _Zone] = field(default_factory=dict)
    datasets: dict[str, list[tuple[Dataset, int]]] = field(default_factory=dict)
    modes: dict[str, str] = field(default_factory=dict)
    global_mode: str = "normal"  # normal | drop | servfail
    queries: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> "TestDnsServer":
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name=f"test-dns-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._sock is not None:
            self._sock.close()

    @property
    def address(self) -> str:
        """The nameserver spec for ResolverSettings (``ip:port`` / ``[ip6]:port``)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __enter__(self) -> "TestDnsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- zone data -----------------------------------------------------------------------
    def add_zone(self, apex: str, minimum: int = 60, soa_ttl: int = 3600) -> None:
        with self._lock:
            self.zones[_norm(apex)] = _Zone(_norm(apex), minimum, soa_ttl)

    def set(self, name: str, rtype: str, values: list[str], ttl: int | None = None) -> None:
        with self._lock:
            self.records[(_norm(name), rtype.upper())] = (list(values), self.default_ttl if ttl is None else ttl)

    def remove(self, name: str, rtype: str | None = None) -> None:
        with self._lock:
            for key in [k for k in self.records if k[0] == _norm(name) and (rtype is None or k[1] == rtype)]:
                del self.records[key]

    def add_dataset(self, zone: str, dataset: Dataset, ttl: int | None = None) -> None:
        with self._lock:
            self.datasets.setdefault(_norm(zone), []).append((dataset, self.default_ttl if ttl is None else ttl))

    def load_rbldnsd(self, zone: str, kind: str, path: str, ttl: int | None = None) -> None:
        self.add_dataset(zone, load_rbldnsd_dataset(kind, path), ttl)

    def mode(self, name: str, mode: str) -> None:
        """``normal`` | ``drop`` (never answer) | ``servfail`` for one name."""
        with self._lock:
            if mode == "normal":
                self.modes.pop(_norm(name), None)
            else:
                self.modes[_norm(name)] = mode

    def count(self, name: str, rtype: str | None = None) -> int:
        with self._lock:
            if rtype is not None:
                return self.queries[(_norm(name), rtype.upper())]
            return sum(v for (n, _), v in self.queries.items() if n == _norm(name))

    def total(self) -> int:
        with self._lock:
            return sum(self.queries.values())

    # -- serving ---------------------------------------------------------------------------
    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            r, _, _ = select.select([self._sock], [], [], 0.05)
            if not r:
                continue
            try:
                data, peer = self._sock.recvfrom(4096)
            except OSError:
                return
            try:
                reply = self._answer(data)
            except Exception:  # a malformed query must not stop the server
                continue
            if reply is not None:
                try:
                    self._sock.sendto(reply, peer)
                except OSError:
                    pass

    def _zone_of(self, name: str) -> _Zone | None:
        labels = name.split(".")
        for i in range(len(labels)):
            z = self.zones.get(".".join(labels[i:]))
            if z is not None:
                return z
        return None

    def _answer(self, data: bytes) -> bytes | None:
        request = DNSRecord.parse(data)
        q = request.q
        qname = _norm(str(q.qname))
        qtype = QTYPE[q.qtype]
        with self._lock:
            self.queries[(qname, qtype)] += 1
            mode = self.modes.get(qname, self.global_mode)
            reply = request.reply()
            if mode == "drop":
                return None
            if mode == "servfail":
                reply.header.rcode = RCODE.SERVFAIL
                return reply.pack()
            found, rrs = self._lookup(qname, qtype)
            zone = self._zone_of(qname)
            if zone is not None and qtype == "SOA" and qname == zone.apex:
                rrs = [RR(qname, QTYPE.SOA, ttl=zone.soa_ttl, rdata=self._soa(zone))]
                found = True
            for rr in rrs:
                reply.add_answer(rr)
            if not rrs:
                if not found:
                    reply.header.rcode = RCODE.NXDOMAIN
                if zone is not None:
                    reply.add_auth(RR(zone.apex, QTYPE.SOA, ttl=min(zone.soa_ttl, zone.minimum),
                                      rdata=self._soa(zone)))
            return reply.pack()

    @staticmethod
    def _soa(zone: _Zone) -> SOA:
        return SOA(f"ns.{zone.apex}", f"hostmaster.{zone.apex}", (1, 3600, 600, 86400, zone.minimum))

    def _lookup(self, qname: str, qtype: str) -> tuple[bool, list[RR]]:
        """(name exists, answer records)."""
        for candidate in self._candidates(qname):
            types = {t: v for (n, t), v in self.records.items() if n == candidate}
            if types:
                if qtype in types:
                    values, ttl = types[qtype]
                    return True, [RR(qname, getattr(QTYPE, qtype), ttl=ttl, rdata=_RDATA[qtype](v)) for v in values]
                if "CNAME" in types and qtype != "CNAME":
                    values, ttl = types["CNAME"]
                    target = _norm(values[0])
                    _, rest = self._lookup(target, qtype)
                    return True, [RR(qname, QTYPE.CNAME, ttl=ttl, rdata=CNAME(target))] + rest
                return True, []
        for zone, sets in self.datasets.items():
            if qname == zone or qname.endswith("." + zone):
                rel = qname[: -len(zone) - 1] if qname != zone else ""
                for dataset, ttl in sets:
                    hit = dataset(rel, qtype)
                    if hit is not None:
                        values = hit.get(qtype, [])
                        return True, [RR(qname, getattr(QTYPE, qtype), ttl=ttl, rdata=_RDATA[qtype](v))
                                      for v in values]
        exists = qname in self.zones or any(n.endswith("." + qname) for (n, _) in self.records)
        return exists, []

    @staticmethod
    def _candidates(qname: str):
        yield qname
        labels = qname.split(".")
        for i in range(1, len(labels)):
            yield "*." + ".".join(labels[i:])


def reverse_name(ip: str) -> str:
    """RFC 5782 query label: reversed octets / nibbles, without the zone."""
    return ipaddress.ip_address(ip).reverse_pointer.rsplit(".", 2)[0]


# -- rbldnsd datasets (ip4set, ip6trie, dnset; see rbldnsd(8)) -------------------------------

def _split_value(rest: str, default: tuple[str, str]) -> tuple[str, str]:
    """Entry value after the address: ":A:TXT", "TXT" or nothing (scope default)."""
    rest = rest.strip()
    if not rest or rest[0] in "#;":
        return default
    if rest.startswith(":"):
        a, _, txt = rest[1:].partition(":")
        return (a.strip() or default[0]), txt.strip()
    return default[0], rest


def _lines(path: str):
    """(is_exclusion, key, rest) per data line; yields ("default", a, txt) for ':' lines."""
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            line = raw.strip()
            if not line or line[0] in "#;$":
                continue
            if line.startswith(":") and not line.startswith("::"):  # "::1" is an address
                a, _, txt = line[1:].partition(":")
                yield "default", a.strip(), txt.strip()
                continue
            parts = line.split(None, 1)
            key, rest = parts[0], (parts[1] if len(parts) > 1 else "")
            excl = key.startswith("!")
            yield ("exclude" if excl else "list"), key.lstrip("!"), rest


def _ip4_prefix(text: str, fill: int) -> tuple[int, int]:
    """Octets given -> (value completed with ``fill`` octets, number of octets given)."""
    octets = [int(o) for o in text.split(".")]
    if not 1 <= len(octets) <= 4 or any(not 0 <= o <= 255 for o in octets):
        raise ValueError(f"bad ip4 prefix {text!r}")
    n = len(octets)
    octets += [fill] * (4 - n)
    return int.from_bytes(bytes(octets), "big"), n


def parse_ip4set_range(text: str) -> tuple[int, int]:
    if "/" in text:
        base, bits = text.split("/")
        value, _ = _ip4_prefix(base, 0)
        net = ipaddress.IPv4Network((value, int(bits)), strict=False)
        return int(net.network_address), int(net.broadcast_address)
    if "-" in text:
        a, b = text.split("-")
        lo, n = _ip4_prefix(a, 0)
        if "." not in b and n > 1:  # suffix form: replaces the last octet given in a
            parts = a.split(".")
            parts[-1] = b
            hi, _ = _ip4_prefix(".".join(parts), 255)
        else:
            hi, _ = _ip4_prefix(b, 255)
        return lo, hi
    lo, n = _ip4_prefix(text, 0)
    hi, _ = _ip4_prefix(text, 255)
    return lo, hi


def load_rbldnsd_dataset(kind: str, path: str) -> Dataset:
    if kind == "ip4set":
        return _ip4set(path)
    if kind == "ip6trie":
        return _ip6trie(path)
    if kind == "dnset":
        return _dnset(path)
    raise ValueError(f"unsupported rbldnsd dataset {kind!r}")


def _answer(values: list[tuple[str, str]], subject: str) -> dict[str, list[str]]:
    a = sorted({v[0] for v in values}, key=lambda x: ipaddress.ip_address(x))
    txt = sorted({v[1].replace("$", subject) for v in values if v[1]})
    return {"A": a, "TXT": txt}


def _ip4set(path: str) -> Dataset:
    default = ("127.0.0.2", "")
    listed: list[tuple[int, int, tuple[str, str]]] = []
    excluded: list[tuple[int, int]] = []
    for kind, key, rest in _lines(path):
        if kind == "default":
            default = (key or "127.0.0.2", rest)
            continue
        lo, hi = parse_ip4set_range(key)
        if kind == "exclude":
            excluded.append((lo, hi))
        else:
            listed.append((lo, hi, _split_value(rest, default)))

    def lookup(rel: str, qtype: str):
        parts = rel.split(".")
        if len(parts) != 4 or not all(p.isdigit() for p in parts):
            return None
        ip = ".".join(reversed(parts))
        value = int(ipaddress.IPv4Address(ip))
        if any(lo <= value <= hi for lo, hi in excluded):
            return None
        hits = [v for lo, hi, v in listed if lo <= value <= hi]
        return _answer(hits, ip) if hits else None

    return lookup


def _ip6_net(text: str) -> ipaddress.IPv6Network:
    addr, _, bits = text.partition("/")
    if "::" not in addr:
        groups = addr.split(":")
        if len(groups) < 8:  # trailing :0 groups may be omitted
            addr = ":".join(groups + ["0"] * (8 - len(groups)))
            bits = bits or str(16 * len(groups))
    return ipaddress.IPv6Network(f"{addr}/{bits or 128}", strict=False)


def _ip6trie(path: str) -> Dataset:
    default = ("127.0.0.2", "")
    entries: list[tuple[ipaddress.IPv6Network, tuple[str, str] | None]] = []
    for kind, key, rest in _lines(path):
        if kind == "default":
            default = (key or "127.0.0.2", rest)
            continue
        entries.append((_ip6_net(key), None if kind == "exclude" else _split_value(rest, default)))

    def lookup(rel: str, qtype: str):
        nibbles = rel.split(".")
        if len(nibbles) != 32:
            return None
        try:
            ip = ipaddress.IPv6Address(int("".join(reversed(nibbles)), 16))
        except ValueError:
            return None
        best = None
        for net, value in entries:  # longest prefix wins, exclusions included
            if ip in net and (best is None or net.prefixlen > best[0].prefixlen):
                best = (net, value)
        if best is None or best[1] is None:
            return None
        return _answer([best[1]], str(ip))

    return lookup


def _dnset(path: str) -> Dataset:
    default = ("127.0.0.2", "")
    exact: dict[str, tuple[str, str] | None] = {}
    wild: dict[str, tuple[str, str] | None] = {}
    for kind, key, rest in _lines(path):
        if kind == "default":
            default = (key or "127.0.0.2", rest)
            continue
        value = None if kind == "exclude" else _split_value(rest, default)
        name = key.lower()
        if name.startswith("*."):
            wild[name[2:]] = value
        elif name.startswith("."):
            wild[name[1:]] = value
            exact[name[1:]] = value
        else:
            exact[name] = value

    def lookup(rel: str, qtype: str):
        if rel in exact:
            v = exact[rel]
            return None if v is None else _answer([v], rel)
        labels = rel.split(".")
        for i in range(1, len(labels)):
            parent = ".".join(labels[i:])
            if parent in wild:
                v = wild[parent]
                return None if v is None else _answer([v], rel)
        return None

    return lookup
