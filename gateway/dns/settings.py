"""Settings of the DNS layer: resolver, DNSBL zones and sender-domain checks.

Plain frozen dataclasses with a default for every field; ``__post_init__``
checks meaning (ranges, address syntax) and raises ``ValueError`` with a
message the config loader turns into "file: key: message".
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

RECORD_TYPES = ("A", "AAAA", "MX", "TXT", "CNAME", "NS", "PTR", "SOA")

# Addresses no real mail exchanger has (RFC 6890 special-purpose registries):
# an MX or implicit-MX host that resolves only into these cannot take mail.
DEFAULT_BOGUS_NETWORKS = [
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "::ffff:0:0/96", "100::/64", "2001:db8::/32", "fc00::/7",
    "fe80::/10", "ff00::/8",
]


def split_nameserver(spec: str) -> tuple[str, int]:
    """``"192.0.2.1"``, ``"192.0.2.1:5353"``, ``"::1"`` or ``"[::1]:5353"`` -> (ip, port)."""
    s = spec.strip()
    host, port = s, 53
    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"nameserver {spec!r}: expected [ipv6]:port")
        if rest:
            port = _port(spec, rest[1:])
    elif s.count(":") == 1:
        host, _, p = s.partition(":")
        port = _port(spec, p)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"nameserver {spec!r}: must be an IP address (optionally with :port)") from None
    return host, port


def _port(spec: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"nameserver {spec!r}: bad port")
    return int(text)


def parse_static_record(line: str) -> tuple[str, str, str]:
    """``"name TYPE data..."`` or ``"name NXDOMAIN"`` -> (name, type, data)."""
    parts = line.split(None, 2)
    if len(parts) < 2:
        raise ValueError(f"static record {line!r}: expected 'name TYPE data'")
    name = parts[0].rstrip(".").lower()
    rtype = parts[1].upper()
    data = parts[2].strip() if len(parts) > 2 else ""
    if not name:
        raise ValueError(f"static record {line!r}: empty name")
    if rtype == "NXDOMAIN":
        if data:
            raise ValueError(f"static record {line!r}: NXDOMAIN takes no data")
        return name, rtype, ""
    if rtype not in RECORD_TYPES:
        raise ValueError(f"static record {line!r}: unsupported type {rtype}")
    if not data:
        raise ValueError(f"static record {line!r}: missing data")
    if rtype in ("A", "AAAA"):
        try:
            ip = ipaddress.ip_address(data)
        except ValueError:
            raise ValueError(f"static record {line!r}: bad address") from None
        if (ip.version == 4) != (rtype == "A"):
            raise ValueError(f"static record {line!r}: address family does not match {rtype}")
    elif rtype == "MX":
        pref, _, host = data.partition(" ")
        if not pref.isdigit() or not host.strip():
            raise ValueError(f"static record {line!r}: MX data is 'preference host' (null MX: '0 .')")
    return name, rtype, data


@dataclass(frozen=True)
class ResolverSettings:
    # "ip" or "ip:port" / "[ipv6]:port"; empty = the system's resolv.conf
    nameservers: list[str] = field(default_factory=list)
    timeout: float = 2.0           # per-lookup deadline, seconds (all tries included)
    tries: int = 2                 # c-ares attempts per server within the deadline
    cache_size: int = 50_000       # entries (positive + negative), LRU beyond that
    min_ttl: int = 5               # floor for positive answers, seconds
    max_ttl: int = 3600            # ceiling for positive answers, seconds
    negative_ttl: int = 60         # NXDOMAIN/NODATA when no SOA minimum is known
    negative_ttl_max: int = 900    # ceiling for the SOA-derived negative TTL (RFC 2308)
    # Override table, one record a line: "example.com MX 10 mx.example.com",
    # "nullmx.example MX 0 .", "h.example A 192.0.2.1", "h.example AAAA 2001:db8::1",
    # "2.0.0.127.bl.example TXT listed", "gone.example NXDOMAIN".
    # A name in the table is answered from it alone (other types: NODATA).
    static: list[str] = field(default_factory=list)
    static_only: bool = False      # names not in the table are NXDOMAIN (--dev, no DNS at all)
    redis_prefix: str = "gw:dns:"  # key prefix of the shared cache (DNSBL answers)

    def __post_init__(self) -> None:
        for ns in self.nameservers:
            split_nameserver(ns)
        if not 0 < self.timeout <= 60:
            raise ValueError("timeout must be in (0, 60] seconds")
        if not 1 <= self.tries <= 10:
            raise ValueError("tries must be 1..10")
        if self.cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        if self.min_ttl < 0 or self.max_ttl < self.min_ttl:
            raise ValueError("need 0 <= min_ttl <= max_ttl")
        if self.negative_ttl < 0 or self.negative_ttl_max < 0:
            raise ValueError("negative TTLs must be >= 0")
        for line in self.static:
            parse_static_record(line)


def parse_code_range(spec: str) -> tuple[int, int]:
    """``"127.0.0.2"``, ``"127.0.0.2-127.0.0.11"`` or ``"127.0.1.0/24"`` -> (lo, hi) as ints."""
    s = spec.strip()
    try:
        if "/" in s:
            net = ipaddress.IPv4Network(s, strict=False)
            lo, hi = int(net.network_address), int(net.broadcast_address)
        elif "-" in s:
            a, _, b = s.partition("-")
            lo, hi = int(ipaddress.IPv4Address(a.strip())), int(ipaddress.IPv4Address(b.strip()))
        else:
            lo = hi = int(ipaddress.IPv4Address(s))
    except ValueError:
        raise ValueError(f"return code {spec!r}: expected an IPv4 address, range a-b or CIDR") from None
    if lo > hi:
        raise ValueError(f"return code {spec!r}: range is reversed")
    if lo >> 24 != 127 or hi >> 24 != 127:
        raise ValueError(f"return code {spec!r}: DNSBL return codes lie in 127.0.0.0/8")
    return lo, hi


@dataclass(frozen=True)
class DnsblZone:
    name: str = ""         # query zone; may carry an access key (e.g. "KEY.zen.dq.spamhaus.net")
    display: str = ""      # the name shown in replies and logs (never the key)
    weight: int = 1        # negative for an allow list (DNSWL)
    # return codes that count; empty = any 127.0.0.0/8 answer outside 127.255.255.0/24
    codes: list[str] = field(default_factory=list)
    txt: bool = False      # fetch the TXT reason when listed
    probe: bool = True     # RFC 5782 s.5 health probe (127.0.0.2 listed, 127.0.0.1 not)

    def __post_init__(self) -> None:
        if not self.name.strip(".") or " " in self.name:
            raise ValueError("dnsbl zone needs a name")
        if not self.display.strip():
            raise ValueError("dnsbl zone needs a display name (the zone name may carry a key)")
        if self.weight == 0:
            raise ValueError("dnsbl zone weight must not be 0")
        for c in self.codes:
            parse_code_range(c)


@dataclass(frozen=True)
class DnsblSettings:
    zones: list[DnsblZone] = field(default_factory=list)
    threshold: int = 1               # score at or above which the client is refused
    budget: float = 2.0              # seconds for the whole check (all zones, TXT included)
    listed_cache_ttl: int = 60       # seconds a "listed" answer is cached (not-listed: record TTL)
    on_error: str = "open"           # "open": a failing zone counts as not listed; "closed": defer
    decide_at: str = "connect"       # "connect" | "mail"
    exempt_authenticated: bool = True
    exempt_networks: list[str] = field(default_factory=list)  # client networks not checked
    health_interval: float = 300.0   # seconds between background probes; 0 = no probes
    shared_cache: bool = True        # use the resolver's Redis cache for DNSBL answers if it has one

    def __post_init__(self) -> None:
        if self.on_error not in ("open", "closed"):
            raise ValueError("on_error must be 'open' or 'closed'")
        if self.decide_at not in ("connect", "mail"):
            raise ValueError("decide_at must be 'connect' or 'mail'")
        if self.threshold < 1:
            raise ValueError("threshold must be >= 1")
        if not 0 < self.budget <= 30:
            raise ValueError("budget must be in (0, 30] seconds")
        if self.listed_cache_ttl < 0:
            raise ValueError("listed_cache_ttl must be >= 0")
        if self.health_interval < 0:
            raise ValueError("health_interval must be >= 0")
        seen = set()
        for z in self.zones:
            key = z.name.lower().strip(".")
            if key in seen:
                raise ValueError(f"dnsbl zone {z.display!r} configured twice")
            seen.add(key)
        for n in self.exempt_networks:
            try:
                ipaddress.ip_network(n, strict=False)
            except ValueError:
                raise ValueError(f"exempt_networks: {n!r} is not a network") from None


@dataclass(frozen=True)
class DomainSettings:
    enabled: bool = True             # MAIL FROM domain must exist (P-DOM)
    check_header_from: bool = True   # header From domain too (used by the header checks)
    check_mx_hosts: bool = True      # resolve MX hosts; only-bogus hosts count as no MX
    max_mx_hosts: int = 5            # MX hosts examined, lowest preference first
    bogus_networks: list[str] = field(default_factory=lambda: list(DEFAULT_BOGUS_NETWORKS))

    def __post_init__(self) -> None:
        if not 1 <= self.max_mx_hosts <= 20:
            raise ValueError("max_mx_hosts must be 1..20")
        for n in self.bogus_networks:
            try:
                ipaddress.ip_network(n, strict=False)
            except ValueError:
                raise ValueError(f"bogus_networks: {n!r} is not a network") from None
