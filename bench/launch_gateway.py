"""Runs the real gateway (``gateway.app.Gateway`` under uvloop) for the benchmark.

The config is a JSON file holding the mapping ``gateway.config.from_mapping``
takes (the driver writes it); logging is set up like ``gateway serve`` does.
Before the listeners take traffic an account is created (password from an
environment variable, scrypt cost from the config) with its sender domain
approved. Prints ``READY <port>`` of the first listener on stdout, stops on
SIGTERM/SIGINT (or when stdin closes: the driver went away).

With ``--cprofile FILE`` the cProfile profiler is switched on by SIGUSR1 and
off by SIGUSR2 (so only the measured runs are profiled) and the stats are
written to FILE at exit.

    python3 bench/launch_gateway.py --config-json cfg.json --account bench \
        --password-env BENCH_GW_PASSWORD --domain example.com
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

import uvloop

# BENCH_GATEWAY_SRC: import the gateway package from another tree (A/B runs of
# a prototype copy, see bench_gateway.py --compare-src); default: this repo.
sys.path.insert(0, os.environ.get("BENCH_GATEWAY_SRC") or str(Path(__file__).resolve().parent.parent))

from gateway.app import Gateway  # noqa: E402
from gateway.config import from_mapping  # noqa: E402


async def _watch_stdin(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.readline():
        pass
    stop.set()


async def main(args) -> int:
    mapping = json.loads(Path(args.config_json).read_text())
    config = from_mapping(mapping, args.config_json)
    logging.basicConfig(level=config.log.level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("mail.log", "alembic"):  # as `gateway serve` does
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import gateway
    print(f"gateway package: {Path(gateway.__file__).parent}", file=sys.stderr)
    profiler = None
    if args.cprofile:
        import cProfile
        profiler = cProfile.Profile()
    gw = Gateway(config)
    await gw.start()
    try:
        if args.account:
            password = os.environ[args.password_env]
            if gw.accounts.cached(args.account) is None:
                await gw.accounts.add(args.account, password, contact=f"ops@{args.domain}")
                await gw.accounts.add_domain(args.account, args.domain, approved_by="bench")
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if profiler is not None:
            loop.add_signal_handler(signal.SIGUSR1, profiler.enable)
            loop.add_signal_handler(signal.SIGUSR2, profiler.disable)
        watcher = loop.create_task(_watch_stdin(stop))
        port = gw.ports[config.listeners[0].name]
        sys.stdout.write(f"READY {port}\n")
        sys.stdout.flush()
        await stop.wait()
        watcher.cancel()
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.cprofile)
        await gw.stop(grace=2.0)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-json", required=True)
    p.add_argument("--account", default="")
    p.add_argument("--password-env", default="BENCH_GW_PASSWORD")
    p.add_argument("--domain", default="example.com")
    p.add_argument("--cprofile", default="", metavar="FILE")
    sys.exit(uvloop.run(main(p.parse_args())))
