"""What the checks of issues 3 and 5 cost through the gateway.

Runs bench_gateway.py with ``--compare-checks``: c = the gateway with the
issue-2 checks, c+ = the same plus a group of checks, and prints c+/c.

    python3 bench/bench_checks.py dns       # DNSBL + sender/header-From domain checks, warm cache (issue 3)
    python3 bench/bench_checks.py headers   # wire, header, trace and subject checks (issue 5)

For ``dns`` the variant resolves through a real DNS server on UDP loopback
(the tests' authoritative test server, in a thread of this process) with one
DNSBL zone (RFC 5782 test points) and the benchmark's domains; the warm-up
messages fill the resolver cache, so the measured runs are the warm-cache
case. Extra arguments go to bench_gateway.py (e.g. ``-n 5000 --reps 3``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def dns_variant(server_address: str) -> dict:
    return {
        "dns": {"nameservers": [server_address], "static_only": False, "static": [], "min_ttl": 300},
        "dnsbl": {"zones": [{"name": "bl.bench", "display": "Bench BL", "weight": 1,
                             "codes": ["127.0.0.2-127.0.0.11"]}],
                  "threshold": 1, "budget": 2.0, "exempt_authenticated": False},
        "checks": {"connect": ["connect_limits", "connect_dnsbl"],
                   "mail": ["mail_account_status", "mail_size", "mail_domain_exists"],
                   "data": ["data_size", "data_from_domain"]},
    }


HEADERS_VARIANT = {
    "checks": {"data": ["data_size", "data_wire", "data_headers", "data_trace", "data_subject"]},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("group", choices=["dns", "headers"])
    args, rest = ap.parse_known_args()
    server = None
    if args.group == "dns":
        from dns_server import TestDnsServer

        server = TestDnsServer(default_ttl=3600).start()
        server.add_zone("bl.bench", minimum=3600)
        server.set("2.0.0.127.bl.bench", "A", ["127.0.0.2"])         # RFC 5782 test point
        for domain, ip in (("example.com", "93.184.215.14"), ("example.org", "93.184.215.15")):
            server.add_zone(domain, minimum=3600)
            server.set(domain, "MX", [f"10 mx.{domain}"])
            server.set(f"mx.{domain}", "A", [ip])
        variant = dns_variant(server.address)
    else:
        variant = HEADERS_VARIANT
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as fh:
            fh.write(_toml(variant))
            extra = fh.name
        cmd = [sys.executable, str(HERE / "bench_gateway.py"), "--targets", "c,c+", "--concurrency", "50",
               "--compare-checks", "--gateway-config-extra", extra, *rest]
        code = subprocess.call(cmd)
        if server is not None:
            print(f"DNS server: {server.total()} queries answered during the whole run "
                  f"(the rest came from the gateway's cache)")
        return code
    finally:
        if server is not None:
            server.stop()


def _toml(data: dict) -> str:
    """The small TOML subset these variants need (tables, arrays of tables, lists, scalars)."""
    lines: list[str] = []

    def scalar(v) -> str:
        return json.dumps(v)

    def table(prefix: str, d: dict) -> None:
        simple = {k: v for k, v in d.items() if not isinstance(v, dict)
                  and not (isinstance(v, list) and v and isinstance(v[0], dict))}
        if simple:
            lines.append(f"[{prefix}]")
            lines.extend(f"{k} = {scalar(v)}" for k, v in simple.items())
        for k, v in d.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}", v)
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    lines.append(f"[[{prefix}.{k}]]")
                    lines.extend(f"{ik} = {scalar(iv)}" for ik, iv in item.items())

    for section, body in data.items():
        table(section, body)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
