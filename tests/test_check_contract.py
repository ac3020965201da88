"""The check contract (gateway/checks/contract.py): the table of checks read from the
modules, mandatory checks and requirements refused by the config check, per-check
modes and deadlines, over real SMTP where the client's reply is what matters."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import importlib
import inspect
import pkgutil
import re
import socket
from pathlib import Path

import pytest

import gateway
import gateway.checks
from gateway.checks import CHECKS, PHASES, SPECS, default_order
from gateway.config import DEFAULT_CHECKS, ConfigError, from_mapping
from gateway.core import replies
from gateway.core.transaction import Outcome, Phase, Result, Transaction
from gateway.dns.domain import DomainStatus, DomainVerdict, reply_for
from gateway.message.findings import RULES
from gateway.services import Services
from gateway.pipeline import build_pipeline

from conftest import MESSAGE, minimal_toml, run_cli
from smtp_client import send

BASE = minimal_toml("{db}", """
[http]
enabled = false

[registry]
secret = "0123456789abcdef0123456789abcdef"
""")

MINIMAL = {"relay": {"upstreams": [{"host": "127.0.0.1", "port": 25}]},
           "listeners": [{"name": "smtp", "address": "127.0.0.1", "port": 2525, "tls": "none"}]}


def refused(checks: dict) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        from_mapping({**MINIMAL, "checks": checks}, "gw.toml")
    return err.value


# ------------------------------------------------------------------ the table, from the modules
def test_every_check_module_declares_its_contract(check_kit):
    modules = sorted(m.name for m in pkgutil.iter_modules(gateway.checks.__path__)
                     if m.name.startswith(tuple(f"{p.value}_" for p in PHASES)))
    assert sorted(CHECKS) == modules == sorted(SPECS)
    assert DEFAULT_CHECKS == default_order() and "auth" not in DEFAULT_CHECKS
    # all run by default but those whose SPEC leaves them out (a cost not yet within budget)
    assert [n for names in DEFAULT_CHECKS.values() for n in names] == [n for n, s in SPECS.items() if s.in_default_order]
    assert [n for n, s in SPECS.items() if not s.in_default_order] == ["data_bulk"]
    svc = check_kit.services()
    for name, spec in SPECS.items():
        check = check_kit.build(name, svc)
        assert (check.name, check.phase) == (name, spec.phase), name
        for dep in spec.requires:  # a requirement runs earlier: its phase, or its place in the same phase
            assert (PHASES.index(SPECS[dep].phase), SPECS[dep].position) < (PHASES.index(spec.phase), spec.position)
    assert [n for n, s in SPECS.items() if s.mandatory] == ["rcpt_relay"]
    service_fields = {f.name for f in dataclasses.fields(Services)}
    tx_fields = {f.name for f in dataclasses.fields(Transaction)} | {"session.account"}
    for name, spec in SPECS.items():
        assert set(spec.services) <= service_fields, name
        assert set(spec.provides) | set(spec.reads) <= tx_fields, name


# ------------------------------------------------------------------ the replies each check declares
_NAMED = re.compile(r"\breplies\.([A-Z][A-Z0-9_]*)\b")
CATALOGUE = replies.catalogue()
_NAME_OF = {id(reply): name for name, reply in CATALOGUE.items()}
# The findings a data check records refuse with their rule's reply (message/findings.py RULES).
FINDING_CHECKS = {"wire": "data_wire", "hdr": "data_headers", "trace": "data_trace", "subj": "data_subject"}
# The DNS domain verdict's replies (dns/domain.py reply_for): the MAIL FROM and the header From check.
DOMAIN_CHECKS = {"mail_domain_exists": False, "data_from_domain": True}
# Replies sent by no check, and who sends them.
OWNERS = {"smtp server": "smtp/server.py", "pipeline": "pipeline.py", "delivery": "delivery/handover.py",
          "local delivery": "delivery/local.py", "relay pool": "relay/pool.py"}  # under gateway/


def _named_in(*sources: str) -> set[str]:
    return {n for src in sources for n in _NAMED.findall(src)}


def test_every_check_declares_the_replies_it_can_send():
    """A SPEC names exactly the catalogue replies its module (and the module its build
    comes from, and those of its class's bases) names, plus those of the rules it runs: the findings of its prefix,
    the DNS domain verdict."""
    for name, spec in SPECS.items():
        assert set(spec.replies) <= set(CATALOGUE) and len(set(spec.replies)) == len(spec.replies), name
        modules = {importlib.import_module(f"gateway.checks.{name}"), inspect.getmodule(spec.build)}
        # and the modules of the classes a check's class is built on (data_rate on rcpt_rate's)
        modules |= {inspect.getmodule(base) for m in list(modules)
                    for _, cls in inspect.getmembers(m, inspect.isclass) if cls.__module__ == m.__name__
                    for base in cls.__mro__[1:] if base.__module__.startswith("gateway.checks.")}
        expected = _named_in(*(inspect.getsource(m) for m in modules))
        expected |= {_NAME_OF[id(r.reply)] for rid, r in RULES.items() if FINDING_CHECKS[rid.split(".")[0]] == name}
        if name in DOMAIN_CHECKS:
            expected |= {_NAME_OF[id(reply_for(DomainVerdict("example.com", st), header=DOMAIN_CHECKS[name]))]
                         for st in DomainStatus if st is not DomainStatus.EXISTS}
        assert set(spec.replies) == expected, name
    assert SPECS["rcpt_relay"].replies[:2] == ("RELAY_DENIED", "RELAY_TRICK")


def test_every_catalogue_reply_has_an_owner():
    """Each catalogue entry is sent by a check (its SPEC) or by one of the named
    non-check owners (a static scan of their source); each name they use exists."""
    by_checks = {r for spec in SPECS.values() for r in spec.replies}
    root = Path(gateway.__file__).parent
    by_owner = {owner: _named_in((root / path).read_text()) for owner, path in OWNERS.items()}
    for owner, names in by_owner.items():
        assert names and names <= set(CATALOGUE), (owner, names - set(CATALOGUE))
    orphans = set(CATALOGUE) - by_checks - set().union(*by_owner.values())
    assert orphans == set(), f"catalogue replies nobody sends: {sorted(orphans)}"
    assert "INTERNAL_ERROR" in by_owner["pipeline"] and "INTERNAL_ERROR" not in by_checks


def test_the_replies_table_in_the_docs_is_the_specs():
    text = (Path(gateway.__file__).parent.parent / "docs" / "checks.md").read_text()
    section = text.split("## The replies of each check", 1)[1].split("\n## ", 1)[0]
    rows = {m[1]: tuple(re.findall(r"`(\w+)`", m[2]))
            for m in re.finditer(r"^\| `(\w+)` \| (.*) \|$", section, re.M)}
    assert rows == {name: spec.replies for name, spec in SPECS.items()}


def test_a_spec_naming_an_unknown_reply_is_refused():
    spec = SPECS["rcpt_limit"]
    with pytest.raises(ValueError, match="'rcpt_limit': replies not in the catalogue .*TOO_MANY_RCPTS"):
        dataclasses.replace(spec, replies=("TOO_MANY_RCPTS",))
    assert dataclasses.replace(spec, replies=("TOO_MANY_RECIPIENTS",)) == spec


# ------------------------------------------------------------------ mandatory checks, requirements
def test_config_without_relay_authorization_is_refused(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text(BASE.replace("{db}", str(tmp_path / "gw.db")) + '[checks]\nrcpt = ["rcpt_limit"]\n')
    for args in (("check-config", str(path)), ("serve", "--config", str(path))):
        r = run_cli(*args, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        line, = r.stderr.strip().splitlines()
        assert str(path) in line and "checks.rcpt" in line and "'rcpt_relay' cannot be left out" in line, line
        assert "open relay" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gateway.toml"]  # serve bound and wrote nothing


@pytest.mark.parametrize("mode", ["warn", "off"])
def test_relay_authorization_runs_in_enforce_mode_only(mode):
    err = refused({"modes": {"rcpt_relay": mode}})
    assert err.source == "gw.toml" and err.key == "checks.modes.rcpt_relay"
    assert "mandatory" in err.problem and repr(mode) in err.problem


@pytest.mark.parametrize("checks, key, problem", [
    # rcpt_optin needs mail_list's tx.mailing_list: list mail would go unchecked
    ({"mail": ["mail_account_status", "mail_sender_auth"]}, "checks.rcpt",
     "'rcpt_optin' needs the result of 'mail_list', which is not in checks.mail"),
    # data_sender_auth needs mail_sender_auth (null sender, forwarding candidate)
    ({"modes": {"mail_sender_auth": "off"}}, "checks.data",
     "'data_sender_auth' needs the result of 'mail_sender_auth', which is off in [checks.modes]"),
    # ... and data_headers, which refuses a From that does not parse, before it
    ({"data": ["data_size", "data_sender_auth", "data_headers"]}, "checks.data",
     "'data_sender_auth' needs the result of 'data_headers', which runs after it"),
    ({"data": ["data_from_domain"]}, "checks.data", "'data_from_domain' needs the result of 'data_headers'"),
    ({"rcpt": ["rcpt_relay", "rcpt_relay"]}, "checks.rcpt", "'rcpt_relay' is listed twice"),
    ({"mail": ["rcpt_relay"]}, "checks.mail", "'rcpt_relay' acts in phase rcpt, not mail"),
    ({"modes": {"data_nonsense": "warn"}}, "checks.modes.data_nonsense", "unknown check"),
    ({"modes": {"data_subject": "loud"}}, "checks.modes.data_subject", "must be one of"),
    ({"deadlines": {"data_subject": 0}}, "checks.deadlines", "must be in (0, 3600] seconds"),
    ({"auth": []}, "checks.auth", "no check acts in the AUTH phase"),
])
def test_an_order_that_breaks_a_contract_is_refused(checks, key, problem):
    err = refused(checks)
    assert (err.source, err.key) == ("gw.toml", key) and problem in err.problem, err


def test_leaving_out_a_check_with_its_dependents_is_accepted():
    cfg = from_mapping({**MINIMAL, "checks": {
        "mail": ["mail_account_status", "mail_size"], "rcpt": ["rcpt_relay", "rcpt_limit"],
        "data": ["data_size", "data_wire", "data_trace", "data_subject"],
        "modes": {"data_subject": "warn", "connect_dnsbl": "off"}, "deadlines": {"mail_size": 1.5}}}, "gw.toml")
    assert cfg.checks.order()[Phase.CONNECT] == ["connect_limits", "connect_blocklist", "connect_rate"]
    assert cfg.checks.mode("data_subject") == "warn" and cfg.checks.mode("data_size") == "enforce"
    assert cfg.checks.deadline("mail_size") == 1.5
    assert cfg.checks.deadline("mail_domain_exists") == SPECS["mail_domain_exists"].deadline > \
        cfg.checks.deadline("data_wire") == SPECS["data_wire"].deadline


# ------------------------------------------------------------------ the pipeline: warn, deadline
class _Refuses:
    name, phase = "data_listmail", Phase.DATA

    async def run(self, tx, item=None):
        from gateway.core import replies
        return Outcome.refuse(self.name, replies.OPTIN_UNREGISTERED_LIST, "Precedence: bulk")


class _Hangs:
    name, phase = "data_subject", Phase.DATA

    async def run(self, tx, item=None):
        await asyncio.Event().wait()  # never set: only the deadline ends it


async def test_pipeline_warn_mode_records_and_goes_on_and_a_hung_check_overruns(check_kit):
    cfg = from_mapping({**MINIMAL, "checks": {"modes": {"data_listmail": "warn"},
                                              "deadlines": {"data_subject": 0.05}}}, "gw.toml")
    seen: list[Outcome] = []
    pipeline = build_pipeline({Phase.DATA: ["data_listmail", "data_subject"]},
                              {"data_listmail": _Refuses, "data_subject": _Hangs}, seen.append, settings=cfg.checks)
    tx = check_kit.transaction(MESSAGE)
    verdict = await pipeline.run(Phase.DATA, tx, tx.ledger)
    warned, overran = tx.ledger
    assert warned.result is Result.WARN and warned.detail == "warn mode, would refuse: Precedence: bulk"
    assert warned.as_log()["would_reply"] == "550 5.7.1" and "reply" not in warned.as_log()
    assert overran.result is Result.ERROR and overran.detail == "overran its deadline of 0.05 s"
    assert verdict.refusal is overran and overran.reply.render().startswith("451 4.3.0")
    assert seen == [warned, overran]  # on_outcome sees every outcome, the warn one too


# ------------------------------------------------------------------ over real SMTP
BULK = MESSAGE.replace(b"Subject: test message\r\n", b"Subject: test message\r\nPrecedence: bulk\r\n")


async def _relayed(h, sink, message: bytes, shows: bytes) -> dict:
    """Send ``message``: it is taken (250) and reaches the upstream showing ``shows``;
    the transaction's log line says relayed and is returned."""
    reply = await send(h.port(), message)
    assert reply.startswith(b"250 "), reply
    await sink.wait_for(1)
    assert shows in sink.messages[0].data
    record = h.log_records()[-1]
    assert record["decision"] == "relayed"
    return record


async def test_warn_mode_relays_and_records(sink, gateway_factory, caplog):
    """data_listmail refuses bulk mail of an unregistered list (550 5.7.1 P-OPTIN); in warn
    mode the message reaches the upstream and the ledger, the log and the metrics say
    what would have been refused."""
    h = await gateway_factory(sink)
    await h.add_account()
    assert (await send(h.port(), BULK)).startswith(b"550 5.7.1 P-OPTIN")
    assert sink.messages == []
    await h.gw.stop(grace=0.5)

    h = await gateway_factory(sink, checks={"modes": {"data_listmail": "warn"}})  # the same database
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        record = await _relayed(h, sink, BULK, b"Precedence: bulk")
    warned = [c for c in record["ledger"] if c["check"] == "data_listmail"]
    assert warned == [{"check": "data_listmail", "result": "warn", "phase": "data",
                       "detail": "warn mode, would refuse: Precedence: bulk", "would_reply": "550 5.7.1"}]
    assert any("data_listmail in warn mode would refuse" in r.getMessage() for r in caplog.records)
    metrics = h.gw.metrics.render().decode()
    assert 'gateway_check_outcomes_total{check="data_listmail",result="warn"} 1.0' in metrics


# A From display name showing another domain's address (subj.display_name: reject) and a
# "Re:" subject without a thread (subj.fake_reply: flag only, for ordinary mail).
MISLEADING = MESSAGE.replace(b"From: Alice <alice@example.com>", b'From: "support@example.net" <alice@example.com>') \
    .replace(b"Subject: test message", b"Subject: Re: hello")


async def test_warn_mode_findings_in_the_log_line_say_warn(sink, gateway_factory):
    """A finding that would refuse in enforce mode is logged as action reject; in warn
    mode the mail is relayed and the same finding says warn, as the ledger does; a
    flag-only finding says flag in both."""
    h = await gateway_factory(sink)
    await h.add_account()
    reply = await send(h.port(), MISLEADING)
    assert reply.startswith(b"550 5.7.1 P-FORGE"), reply
    assert sink.messages == []
    record = h.log_records()[-1]
    assert record["decision"] == "refused"
    assert [(f["id"], f["action"], f["check"]) for f in record["findings"]] == [
        ("subj.fake_reply", "flag", "data_subject"), ("subj.display_name", "reject", "data_subject")]
    await h.gw.stop(grace=0.5)

    h = await gateway_factory(sink, checks={"modes": {"data_subject": "warn"}})  # the same database
    record = await _relayed(h, sink, MISLEADING, b"support@example.net")
    assert [(f["id"], f["action"], f["check"]) for f in record["findings"]] == [
        ("subj.fake_reply", "flag", "data_subject"), ("subj.display_name", "warn", "data_subject")]
    ledger, = [c for c in record["ledger"] if c["check"] == "data_subject"]
    assert ledger["result"] == "warn" and ledger["would_reply"] == "550 5.7.1"
    metrics = h.gw.metrics.render().decode()
    assert 'gateway_check_outcomes_total{check="data_subject",result="warn"} 1.0' in metrics


def _blackhole() -> socket.socket:
    """A name server that never answers."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


async def test_a_check_that_overruns_its_deadline_defers(sink, gateway_factory):
    """mail_domain_exists waits for a name server that never answers (its own timeout:
    60 s); past its 0.2 s deadline the client gets 451 4.3.0 and the ledger says why."""
    with _blackhole() as ns:
        h = await gateway_factory(sink, dns={"static_only": False, "static": [], "timeout": 60.0, "tries": 1,
                                             "nameservers": [f"127.0.0.1:{ns.getsockname()[1]}"]},
                                  checks={"deadlines": {"mail_domain_exists": 0.2}})
        await h.add_account(domains=("silent.example",))
        reply = await send(h.port(), MESSAGE, mail_from="alice@silent.example")
        assert reply.startswith(b"451 4.3.0"), reply
        assert sink.messages == []
        record = h.log_records()[-1]
        assert record["decision"] == "deferred"
        last = record["ledger"][-1]
        assert last == {"check": "mail_domain_exists", "result": "error", "phase": "mail",
                        "detail": "overran its deadline of 0.2 s", "reply": "451 4.3.0"}
        await h.gw.stop(grace=0.5)
