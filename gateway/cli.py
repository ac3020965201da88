"""Command line: ``gateway serve|check-config|account ...``."""
from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import signal
import sys
from pathlib import Path

from .config import Config, ConfigError, dev_config, load

DEFAULT_CONFIG_ENV = "GATEWAY_CONFIG"


def _load_config(args) -> Config:
    if getattr(args, "dev", False):
        return dev_config(Path.cwd())
    path = args.config or os.environ.get(DEFAULT_CONFIG_ENV)
    if not path:
        raise ConfigError("<command line>", "--config", f"no config file given (use --config FILE, "
                          f"set {DEFAULT_CONFIG_ENV}, or --dev)")
    return load(path)


def _run(coro):
    try:
        import uvloop
        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(coro)


# ---------------------------------------------------------------- serve
async def _serve(config: Config) -> int:
    from .app import Gateway

    gw = Gateway(config)
    await gw.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    listeners = ", ".join(f"{lst.name} {lst.address}:{gw.ports[lst.name]} ({lst.tls})" for lst in config.listeners)
    print(f"gateway ready: SMTP {listeners}", file=sys.stderr)
    if config.http.enabled:
        print(f"gateway ready: HTTP http://{config.http.address}:{gw.http_port}/ (healthz, readyz, metrics)",
              file=sys.stderr)
    if config.dev.enabled:
        print("DEV MODE (loopback only): AUTH is allowed without TLS on this listener.\n"
              "  demo account: user 'demo', password 'demo', may send as @example.com\n"
              f"  relayed mail is stored as a maildir under {config.dev.outbox}/new/\n"
              f"  storage: {config.storage.url}", file=sys.stderr)
    await stop.wait()
    print(f"gateway stopping: draining for up to {config.smtp.grace_period:g} s", file=sys.stderr)
    await gw.stop()
    return 0


def cmd_serve(args) -> int:
    config = _load_config(args)
    logging.basicConfig(level=config.log.level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("mail.log", "alembic"):  # aiosmtpd's per-command chatter, migration banners
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return _run(_serve(config))


def cmd_check_config(args) -> int:
    cfg = load(args.file)
    from .app import build_tls_context
    build_tls_context(cfg)
    print(f"{args.file}: OK ({len(cfg.listeners)} listener(s), {len(cfg.relay.upstreams)} upstream(s))")
    return 0


# ---------------------------------------------------------------- accounts
async def _with_accounts(config: Config, fn):
    from .accounts.store import AccountStore
    from .storage.db import create_engine, migrate

    engine = create_engine(config.storage.url)
    try:
        await migrate(engine)
        store = AccountStore(engine, scrypt_n=config.auth.scrypt_n)
        await store.refresh()
        return await fn(store)
    finally:
        await engine.dispose()


def _password(args) -> str:
    if getattr(args, "password_env", None):
        value = os.environ.get(args.password_env)
        if value is None:
            raise SystemExit(f"error: environment variable {args.password_env} is not set")
        return value
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        raise SystemExit("error: passwords differ")
    return first


def _show(acc) -> str:
    lines = [f"account {acc.name}", f"  status: {acc.status.value}", f"  contact: {acc.contact or '-'}",
             f"  subdomains allowed: {'yes' if acc.allow_subdomains else 'no'}",
             "  client networks: " + (", ".join(str(n) for n in acc.networks) or "-")]
    if acc.domains:
        lines.append("  sender domains:")
        for d in acc.domains:
            extra = f" ({d.note})" if d.note else ""
            lines.append(f"    {d.domain}: {d.status}{extra}")
    else:
        lines.append("  sender domains: -")
    return "\n".join(lines)


def cmd_account(args) -> int:
    from .accounts.model import AccountStatus

    config = _load_config(args)
    action = args.action

    async def run(store) -> int:
        if action == "add":
            await store.add(args.name, _password(args), contact=args.contact or "",
                            allow_subdomains=args.allow_subdomains)
            for cidr in args.network or []:
                await store.add_network(args.name, cidr)
            print(f"account {args.name} added")
        elif action == "list":
            for acc in await store.list():
                print(f"{acc.name}\t{acc.status.value}\t{acc.contact or '-'}\t"
                      f"{','.join(d.domain for d in acc.domains) or '-'}")
        elif action == "show":
            print(_show(await store.get(args.name)))
        elif action == "passwd":
            await store.set_password(args.name, _password(args))
            print(f"password of {args.name} changed")
        elif action == "suspend":
            await store.set_status(args.name, AccountStatus.SUSPENDED)
            print(f"account {args.name} suspended")
        elif action == "reinstate":
            await store.set_status(args.name, AccountStatus.ACTIVE)
            print(f"account {args.name} reinstated")
        elif action == "network":
            if args.op == "add":
                print(f"network {await store.add_network(args.name, args.cidr)} added to {args.name}")
            else:
                await store.remove_network(args.name, args.cidr)
                print(f"network {args.cidr} removed from {args.name}")
        elif action == "domain":
            if args.op == "add":
                dom = await store.add_domain(args.name, args.domain,
                                             approved_by=("operator" if args.approve else None))
                if dom.status == "approved":
                    print(f"domain {dom.domain} added to {args.name}, pre-approved by the operator")
                else:
                    print(f"domain {dom.domain} added to {args.name} (pending proof)\n"
                          f"publish this DNS TXT record, then run 'gateway account domain verify':\n"
                          f"  _gateway-proof.{dom.domain}. TXT \"gateway-proof={dom.token}\"")
            else:
                await store.remove_domain(args.name, args.domain)
                print(f"domain {args.domain} removed from {args.name}")
        return 0

    return _run(_with_accounts(config, run))


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="Outbound SMTP relay gateway that enforces "
                                "the provider's anti-spam policy (see POLICY.md).")
    sub = p.add_subparsers(dest="command", required=True)

    def config_args(sp):
        sp.add_argument("--config", "-c", metavar="FILE", help=f"TOML config file (or ${DEFAULT_CONFIG_ENV})")
        sp.add_argument("--dev", action="store_true",
                        help="embedded defaults: SMTP 127.0.0.1:2525, HTTP 127.0.0.1:8025, SQLite and "
                             "maildir outbox in the working directory, demo account demo/demo")

    s = sub.add_parser("serve", help="run the gateway")
    config_args(s)
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check-config", help="validate a config file without starting")
    c.add_argument("file")
    c.set_defaults(func=cmd_check_config)

    a = sub.add_parser("account", help="manage customer accounts")
    a.set_defaults(func=cmd_account)
    asub = a.add_subparsers(dest="action", required=True)

    def acc(name, help_, with_name=True, ops=None):
        sp = asub.add_parser(name, help=help_)
        config_args(sp)
        if ops:
            sp.add_argument("op", choices=ops)
        if with_name:
            sp.add_argument("name")
        return sp

    add = acc("add", "create an account (password from stdin, a prompt, or --password-env)")
    add.add_argument("--contact", help="contact address for warnings")
    add.add_argument("--network", action="append", metavar="CIDR", help="client network that may relay without AUTH")
    add.add_argument("--allow-subdomains", action="store_true", help="subdomains of verified domains may send")
    add.add_argument("--password-env", metavar="VAR", help="read the password from this environment variable")
    acc("list", "list accounts", with_name=False)
    acc("show", "show one account")
    pw = acc("passwd", "set a new password")
    pw.add_argument("--password-env", metavar="VAR")
    acc("suspend", "suspend an account (AUTH and MAIL are refused)")
    acc("reinstate", "make a suspended account active again")
    net = acc("network", "add/remove a client network (CIDR): network add|remove NAME CIDR", ops=["add", "remove"])
    net.add_argument("cidr")
    dom = acc("domain", "add/remove an authorized sender domain: domain add|remove NAME DOMAIN",
              ops=["add", "remove"])
    dom.add_argument("domain")
    dom.add_argument("--approve", action="store_true", help="operator pre-approval (no DNS proof)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from .accounts.store import AccountError
        if isinstance(exc, AccountError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
