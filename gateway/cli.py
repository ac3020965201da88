"""Command line: ``gateway serve|check-config|account|block ...``."""
from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from . import __version__, dev
from .config import DEV_DATABASE, Config, ConfigError, ListenError, config_warnings, dev_config, is_dev_dir, load

DEFAULT_CONFIG_ENV = "GATEWAY_CONFIG"


def _load_config(args) -> Config:
    """--dev, else --config / $GATEWAY_CONFIG; the management commands (not
    serve) also find a dev setup in the working directory, so they work on
    the storage of a `gateway serve --dev` running there."""
    ports = {"smtp_port": getattr(args, "smtp_port", None), "http_port": getattr(args, "http_port", None)}
    if getattr(args, "dev", False):
        return dev_config(Path.cwd(), **{k: v for k, v in ports.items() if v is not None})
    for key, value in ports.items():
        if value is not None:
            opt = "--" + key.replace("_", "-")
            raise ConfigError("<command line>", opt, "only with --dev (with a config file: the port keys "
                              "of [[listeners]] and [http])")
    path = args.config or os.environ.get(DEFAULT_CONFIG_ENV)
    if not path and args.command != "serve" and is_dev_dir(Path.cwd()):
        print(f"gateway: using the dev setup in {Path.cwd()} ({DEV_DATABASE} of `gateway serve --dev`)",
              file=sys.stderr)
        return dev_config(Path.cwd())
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
        print(dev.banner(config, gw.dev_certificate_made), file=sys.stderr)
    await stop.wait()
    print(f"gateway stopping: draining for up to {config.smtp.grace_period:g} s", file=sys.stderr)
    await gw.stop()
    return 0


def _print_warnings(config: Config) -> None:
    for warning in config_warnings(config):
        print(f"WARNING: {warning}", file=sys.stderr)


def cmd_serve(args) -> int:
    config = _load_config(args)
    _print_warnings(config)
    logging.basicConfig(level=config.log.level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("mail.log", "alembic"):  # aiosmtpd's per-command chatter, migration banners
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return _run(_serve(config))


def cmd_check_config(args) -> int:
    cfg = load(args.file)
    from .app import build_tls_context
    build_tls_context(cfg)
    _print_warnings(cfg)
    print(f"{args.file}: OK ({len(cfg.listeners)} listener(s), {len(cfg.relay.upstreams)} upstream(s))")
    return 0


# ---------------------------------------------------------------- storage
async def _with_engine(config: Config, fn):
    """``await fn(engine)`` on a migrated database; the engine is disposed after."""
    from .storage.db import create_engine, migrate

    engine = create_engine(config.storage.url, connect_timeout=config.storage.connect_timeout,
                           command_timeout=config.storage.command_timeout,
                           pool_timeout=config.storage.pool_timeout)
    try:
        await migrate(engine)
        return await fn(engine)
    finally:
        await engine.dispose()


# ---------------------------------------------------------------- accounts
async def _with_accounts(config: Config, fn):
    from .accounts.store import AccountStore

    async def run(engine):
        store = AccountStore(engine, scrypt_n=config.auth.scrypt_n)
        await store.refresh()
        return await fn(store)

    return await _with_engine(config, run)


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
    if acc.forwarding:
        listed = f"; listed identities: {', '.join(acc.forward_identities)}" if acc.forward_identities else ""
        lines.append(f"  forwarding: allowed for every mailbox of its sender domains (SRS){listed}")
    elif acc.forward_identities:
        lines.append("  forwarding: allowed for " + ", ".join(acc.forward_identities) + " (SRS)")
    else:
        lines.append("  forwarding: -")
    return "\n".join(lines)


def cmd_account(args) -> int:
    from .accounts.model import AccountStatus
    from .accounts.proof import proof_record

    config = _load_config(args)
    action = args.action
    # Asked before the event loop runs: Ctrl-C at the prompt is then a plain
    # KeyboardInterrupt ("aborted", exit 130), not a cancelled coroutine.
    password = _password(args) if action in ("add", "passwd") else None

    async def run(store) -> int:
        if action == "add":
            await store.add(args.name, password, contact=args.contact or "",
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
            await store.set_password(args.name, password)
            print(f"password of {args.name} changed")
        elif action == "suspend":
            await store.set_status(args.name, AccountStatus.SUSPENDED)
            print(f"account {args.name} suspended")
        elif action == "reinstate":
            await store.set_status(args.name, AccountStatus.ACTIVE)
            print(f"account {args.name} reinstated")
        elif action == "forwarding":
            if args.op == "allow":
                identity = await store.allow_forwarding(args.name, args.identity)
                print(f"{args.name} may forward mail " + (f"from {identity}" if identity else
                                                          "from every mailbox of its sender domains"))
                if not config.forwarding.enabled:
                    print(f"warning: {config.source} has no [forwarding] srs_domain: forwarded mail with a "
                          f"foreign envelope sender is refused until it is set", file=sys.stderr)
            else:
                await store.deny_forwarding(args.name, args.identity)
                print(f"{args.name} may no longer forward mail" + (f" from {args.identity}" if args.identity else ""))
                acc = store.cached(args.name)
                if args.identity and acc is not None and acc.forwarding:
                    print(f"note: {args.name} still may forward from every mailbox of its sender domains "
                          f"('gateway account forwarding deny {args.name}' ends that)", file=sys.stderr)
        elif action == "events":
            from .strikes.violations import list_violations
            await store.get(args.name)          # an unknown account is an error, as for show
            rows = await list_violations(store.engine, args.name, identity=args.identity, limit=args.limit)
            for r in rows:
                if args.json:
                    print(json.dumps(r, ensure_ascii=False, sort_keys=True))
                else:
                    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["at"]))
                    print(f"{when}\t{r['rule']}\t{r['kind']}\t{r['class']}\t{r['identity'] or '-'}\t"
                          f"{r['trace_id'] or '-'}\t{r['detail']}")
            if not rows and not args.json:
                print(f"no violations recorded for {args.name}" + (f" / {args.identity}" if args.identity else ""))
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
                          f"  {proof_record(dom.domain, dom.token)}")
                    if config.dev.enabled:
                        dev.publish_proof(config, dom)
            elif args.op == "verify":
                return await _verify_domain(config, store, args.name, args.domain)
            else:
                token = _domain_token(await store.get(args.name), args.domain)
                await store.remove_domain(args.name, args.domain)
                print(f"domain {args.domain} removed from {args.name}")
                if config.dev.enabled and token:
                    dev.unpublish_proof(config, args.domain, token)
        return 0

    return _run(_with_accounts(config, run))


# ---------------------------------------------------------------- mailing lists (registry)
async def _with_registry(config: Config, fn):
    from .registry.service import RegistryService, registry_secret

    async def run(engine):
        # No relay here: confirmation mails of an import are queued and sent by the running gateway.
        svc = RegistryService(engine, config.registry, secret=registry_secret(config),
                              hostname=config.smtp.hostname)
        try:
            await svc.start(listen=False, outbox=False)
            return await fn(svc)
        finally:
            await svc.stop()

    return await _with_engine(config, run)


def _show_list(lst, stats: dict | None = None) -> str:
    lines = [f"list {lst.id} ({lst.account})", f"  name: {lst.name}", f"  List-Id: {lst.list_id_header}",
             f"  senders: {', '.join(lst.senders)}", f"  confirmation From: {lst.confirm_from}"]
    if stats:
        lines.append(f"  subscribers: {stats['confirmed']} confirmed, {stats['pending']} pending, "
                     f"{stats['unsubscribed']} opted out")
    return "\n".join(lines)


def cmd_list(args) -> int:
    config = _load_config(args)
    action = args.action

    async def run(svc) -> int:
        if action == "add":
            lst = await svc.create_list(args.account, name=args.name, list_id=args.list_id, senders=args.sender,
                                        confirm_from=args.confirm_from)
            print(_show_list(lst))
        elif action == "list":
            for lst in await svc.lists(args.account):
                print(f"{lst.id}\t{lst.list_id}\t{lst.name}\t{','.join(lst.senders)}")
        elif action == "show":
            print(_show_list(await svc.get_list(args.account, args.list), await svc.list_stats(args.account, args.list)))
        elif action == "delete":
            await svc.delete_list(args.account, args.list)
            print(f"list {args.list} deleted with its subscribers and opt-outs")
        elif action == "import":
            return await _import_csv(svc, args)
        return 0

    return _run(_with_registry(config, run))


IMPORT_BAD_ROWS = 3   # `list import`: some rows were bad (reported with their line), the others imported


async def _import_csv(svc, args) -> int:
    from .registry import csvimport

    try:
        parsed = csvimport.parse(csvimport.decode(Path(args.file).read_bytes()))
    except OSError as exc:
        print(f"error: {args.file}: {exc.strerror}", file=sys.stderr)
        return 1
    except csvimport.CsvFileError as exc:
        print(f"error: {args.file}: {exc} (nothing imported)", file=sys.stderr)
        return 1
    results = await svc.import_subscribers(args.account, args.list, parsed.rows, reoptin=args.reoptin,
                                           source=args.source or f"import from {Path(args.file).name}")
    results = sorted(results + parsed.errors, key=lambda r: r["line"])
    counts: dict[str, int] = {}
    for r in results:
        counts[r["result"]] = counts.get(r["result"], 0) + 1
        if r["result"] == "invalid":
            what = f"{r['field']}: " if r["field"] not in ("", "line") else ""
            print(f"{args.file}:{r['line']}: invalid: {what}{r['reason']}"
                  + (f" ({r['address']!r})" if r["address"] else ""), file=sys.stderr)
        elif r["result"] != "queued":
            print(f"{args.file}:{r['line']}: {r['address']}: {r['result']} ({r['reason']})", file=sys.stderr)
    print(f"{counts.get('queued', 0)} subscriber(s) added as pending; the running gateway sends their "
          f"confirmation mails. " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()) if k != "queued"))
    if counts.get("invalid"):
        print(f"{counts['invalid']} bad row(s) not imported (listed above with their line numbers); "
              f"fix them and import the file again: rows already imported are reported as existing",
              file=sys.stderr)
        return IMPORT_BAD_ROWS
    return 0


def cmd_apikey(args) -> int:
    config = _load_config(args)

    async def run(svc) -> int:
        key = await svc.issue_api_key(args.name, args.label or "")
        print(key)
        print(f"API key for account {args.name} (shown once; only its hash is stored)", file=sys.stderr)
        return 0

    return _run(_with_registry(config, run))


# ---------------------------------------------------------------- block lists (P-BLOCK)
def _operator() -> str:
    try:
        return f"cli {getpass.getuser()}"
    except Exception:  # no user name in this environment
        return "cli"


def cmd_block(args) -> int:
    """``gateway block add|remove|list``: the running gateways pick a change up within 1 s."""
    from .blocklist.store import BlockStore

    config = _load_config(args)

    async def run(engine) -> int:
        store = BlockStore(engine)
        if args.action == "add":
            entry = await store.add(args.kind, args.value, reason=args.reason or "", created_by=_operator())
            print(f"blocked {entry.kind} {entry.value}")
        elif args.action == "remove":
            entry = await store.remove(args.kind, args.value)
            print(f"unblocked {entry.kind} {entry.value}")
        else:
            for e in await store.list(args.kind):
                print(f"{e.kind}\t{e.value}\t{e.created_by or '-'}\t{e.reason or '-'}")
        return 0

    return _run(_with_engine(config, run))


def _domain_token(account, domain: str) -> str | None:
    from .accounts.store import AccountError, normalize_domain

    try:
        dom = normalize_domain(domain)
    except AccountError:
        return None             # remove_domain names the problem
    return next((d.token for d in account.domains if d.domain == dom), None)


async def _verify_domain(config: Config, store, name: str, domain: str) -> int:
    """Look the DNS proof up now: 0 when the domain may send, 1 otherwise."""
    from .accounts.proof import verify_account_domain
    from .dns.resolver import Resolver

    resolver = Resolver(config.dns, zone_file=config.dev.zone_file if config.dev.enabled else None)
    try:
        res = await verify_account_domain(store, resolver, name, domain, config.accounts.proof_lookup_timeout)
    finally:
        await resolver.close()
    dom = res.domain.domain
    if res.status == "verified":
        print(f"domain {dom} of {name} verified ({res.detail})")
        return 0
    if res.status == "approved":
        print(f"domain {dom} of {name} is pre-approved by the operator; no DNS proof needed")
        return 0
    if res.status == "unknown":
        print(f"domain {dom} of {name} could not be checked now: {res.detail}\n"
              f"it stays {res.domain.status}; try again later")
        return 1
    was = " (it was verified: now back to pending)" if res.domain.status == "verified" else ""
    print(f"domain {dom} of {name} not verified: proof not yet published ({res.detail}){was}\n"
          f"publish this DNS TXT record, then run 'gateway account domain verify' again:\n"
          f"  {res.record}")
    return 1


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .blocklist.model import KINDS

    p = argparse.ArgumentParser(prog="gateway", description="Outbound SMTP relay gateway that enforces "
                                "the provider's anti-spam policy (see docs/policy.md).")
    p.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def config_args(sp, serve=False):
        sp.add_argument("--config", "-c", metavar="FILE",
                        help=f"TOML config file (or ${DEFAULT_CONFIG_ENV})" + ("" if serve else
                             f"; without either, a dev setup ({DEV_DATABASE}) in the working directory"))
        sp.add_argument("--dev", action="store_true",
                        help="embedded defaults: SMTP 127.0.0.1:2525 (STARTTLS with a self-signed certificate; "
                             "AUTH also without TLS), HTTP 127.0.0.1:8025, SQLite, maildir outbox and DNS zone "
                             "file in the working directory, demo account demo/demo" if serve else
                             "the dev setup of the working directory (as `gateway serve --dev` there)")

    def port(text: str) -> int:
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
        return int(text)

    s = sub.add_parser("serve", help="run the gateway")
    config_args(s, serve=True)
    s.add_argument("--smtp-port", type=port, metavar="PORT", help="with --dev: the SMTP port (default 2525)")
    s.add_argument("--http-port", type=port, metavar="PORT", help="with --dev: the HTTP port (default 8025)")
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
    ev = acc("events", "the violations recorded against an account (P-STRIKE), newest first: time, rule, "
             "kind, class, identity, trace id, detail")
    ev.add_argument("--identity", help="only this identity inside the account")
    ev.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    ev.add_argument("--json", action="store_true", help="one JSON object per line, with the evidence")
    net = acc("network", "add/remove a client network (CIDR): network add|remove NAME CIDR", ops=["add", "remove"])
    net.add_argument("cidr")
    dom = acc("domain", "add/remove/verify an authorized sender domain: domain add|remove|verify NAME DOMAIN "
              "(verify looks the DNS TXT proof up now; in dev mode add publishes it into ./dev-zone.txt)",
              ops=["add", "remove", "verify"])
    dom.add_argument("domain")
    dom.add_argument("--approve", action="store_true", help="operator pre-approval (no DNS proof)")
    fwd = acc("forwarding", "allow/deny forwarding of inbound mail (SRS, docs/forwarding.md): forwarding "
              "allow|deny NAME [--identity ADDRESS]; deny without --identity ends all of it", ops=["allow", "deny"])
    fwd.add_argument("--identity", metavar="ADDRESS",
                     help="only this mailbox of the account's sender domains (e.g. info@shop.example)")

    b = sub.add_parser("block", help="operator block lists (P-BLOCK): client IPs/CIDRs, sender domains, "
                       "HELO/reverse-DNS host names; running gateways apply changes within 1 s")
    b.set_defaults(func=cmd_block)
    bsub = b.add_subparsers(dest="action", required=True)
    badd = bsub.add_parser("add", help="block: ip ADDR|CIDR, domain DOMAIN (and subdomains), "
                           "hostname NAME (exact) or .SUFFIX")
    config_args(badd)
    badd.add_argument("kind", choices=KINDS)
    badd.add_argument("value")
    badd.add_argument("--reason", help="operator's note (logged, never sent to clients)")
    brm = bsub.add_parser("remove", help="remove an entry")
    config_args(brm)
    brm.add_argument("kind", choices=KINDS)
    brm.add_argument("value")
    bls = bsub.add_parser("list", help="list entries (kind, value, created by, reason)")
    config_args(bls)
    bls.add_argument("--kind", choices=KINDS)
    key = acc("apikey", "issue an API key for the registry HTTP API (printed once)")
    key.add_argument("--label", help="a note to tell keys apart")
    key.set_defaults(func=cmd_apikey)

    lp = sub.add_parser("list", help="manage mailing lists (registry)")
    lsub = lp.add_subparsers(dest="action", required=True)

    def lcmd(name, help_, with_list=True):
        sp = lsub.add_parser(name, help=help_)
        config_args(sp)
        sp.add_argument("account")
        if with_list:
            sp.add_argument("list", help="the list's id (16 hex digits)")
        sp.set_defaults(func=cmd_list)
        return sp

    ladd = lcmd("add", "register a mailing list", with_list=False)
    ladd.add_argument("--name", required=True)
    ladd.add_argument("--list-id", required=True, help="RFC 2919 List-Id, e.g. news.example.com")
    ladd.add_argument("--sender", action="append", required=True, metavar="ADDRESS",
                      help="envelope sender of the list's mail ('*' in the local part for VERP); repeatable")
    ladd.add_argument("--confirm-from", required=True, metavar="ADDRESS", help="From: of the confirmation mail")
    lcmd("list", "the account's lists", with_list=False)
    lcmd("show", "one list with its statistics")
    lcmd("delete", "delete a list with its subscribers and opt-outs")
    limp = lcmd("import", "import subscribers from a CSV file (each becomes pending; the gateway mails them)")
    limp.epilog = (f"Bad rows are reported as FILE:LINE (the line of the file the row starts on; the header "
                   f"is line 1) with the reason; the other rows are imported. Exit status: 0 every row was imported or "
                   f"skipped (exists, suppressed, rate_limited, duplicate), {IMPORT_BAD_ROWS} some rows were bad (the rest imported), 1 nothing imported (unreadable "
                   f"file or header, unknown account or list, more than registry.max_bulk rows), 2 config error.")
    limp.add_argument("file", help="CSV: header address[,source,ip,user_agent,requested_at], or one address a line")
    limp.add_argument("--source", help="where these people subscribed (consent evidence)")
    limp.add_argument("--reoptin", action="store_true",
                      help="addresses that opted out get a new confirmation mail instead of being skipped")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:      # Ctrl-C at a prompt or during a command (serve handles SIGINT itself)
        print("\naborted", file=sys.stderr)
        return 130
    except ListenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # The commands' refusals: each names the field (if any) in its str().
        from .accounts.store import AccountError
        from .blocklist.model import BlockError
        from .registry.model import RegistryError
        if isinstance(exc, (AccountError, BlockError, RegistryError)):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
