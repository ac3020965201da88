"""checks/data_bulk.py through its contract (tests/checkkit.py): the
ladder defer -> refuse with a Violation, registered list mail never counted,
weak fingerprints only flagged, repeats under another Message-ID refused and
a resend under the same one not, per identity inside an account, and the
default mode (warn) that publishes no violation. The counter is the memory
one with a clock the test controls."""
from __future__ import annotations

from gateway.config import BulkSettings, CheckSettings
from gateway.core.address import parse_mailbox
from gateway.core.events import EventBus, Violation
from gateway.core.transaction import Recipient, Result
from gateway.state.distinct import MemoryDistinct

BODY = ("We are happy to announce the new release of our project, with faster builds, a cleaner\n"
        "configuration format and many fixes that our users asked for over the last months.\n\n"
        "Read the release notes on our site, and tell us what you think of the new features;\n"
        "the upgrade guide explains every change that needs a step on your side.\n")


def message(i: int, *, msgid: str | None = None, body: str = BODY) -> bytes:
    mid = msgid or f"m{i}@example.com"
    return (f"From: News <news@example.com>\r\nTo: r{i}@example.org\r\nSubject: Release 2.0\r\n"
            f"Message-ID: <{mid}>\r\n\r\nDear Reader {i},\r\n\r\n" + body.replace("\n", "\r\n")).encode()


class Clock:
    now = 7200.0

    def __call__(self) -> float:
        return self.now


def setup(check_kit, *, threshold: int = 3, mode: str | None = "enforce"):
    clock = Clock()
    svc = check_kit.services(clock=clock, bulk=BulkSettings(window=3600, recipients_threshold=threshold),
                             checks=CheckSettings(modes={"data_bulk": mode} if mode else {}))
    svc.distinct = MemoryDistinct(clock)
    svc.events = EventBus()
    seen: list[Violation] = []
    svc.events.subscribe(Violation, seen.append)
    return check_kit.build("data_bulk", svc), clock, seen


def tx_for(check_kit, msg: bytes, *rcpts: str, identity: str | None = None, mailing_list=None):
    tx = check_kit.transaction(msg, account=check_kit.account("alice", ("example.com", True)),
                               mailing_list=mailing_list)
    tx.recipients = [Recipient(parse_mailbox(r, False), {}) for r in rcpts]
    tx.identity = identity
    return tx


async def test_defers_past_the_threshold_then_refuses_with_a_violation(check_kit):
    check, _, seen = setup(check_kit)
    results = []
    for i in range(8):
        out = await check.run(tx_for(check_kit, message(i), f"r{i}@example.org"))
        results.append(out.reply.code if out.reply is not None else out.result.value)
    assert results == ["pass", "pass", "pass", 451, 451, 451, 550, 550]
    assert [(v.rule, v.kind, v.account) for v in seen] == [("P-UCE", "bulk", "alice")] * 2


async def test_registered_list_mail_is_never_counted(check_kit):
    check, _, seen = setup(check_kit, threshold=1)
    lst = check_kit.mailing_list()
    for i in range(6):
        out = await check.run(tx_for(check_kit, message(i), f"r{i}@example.org", mailing_list=lst))
        assert out.result is Result.SKIP and "list" in out.detail
    out = await check.run(tx_for(check_kit, message(9), "r9@example.org"))
    assert out.result is Result.PASS and seen == []      # the list copies left no count behind


async def test_weak_fingerprints_are_flagged_not_refused(check_kit):
    check, _, seen = setup(check_kit, threshold=2)
    outs = [await check.run(tx_for(check_kit, message(i, body="ok, thanks!\n"), f"r{i}@example.org"))
            for i in range(6)]
    assert [o.result for o in outs[:2]] == [Result.PASS] * 2
    assert all(o.result is Result.FLAG and o.reply is None for o in outs[2:]) and seen == []
    # and two short notes to one person are no repeat
    again = await check.run(tx_for(check_kit, message(77, body="ok, thanks!\n"), "r0@example.org"))
    assert again.reply is None


async def test_repeat_under_another_message_id_refused_resend_under_the_same_not(check_kit):
    check, clock, seen = setup(check_kit, threshold=50)
    first = await check.run(tx_for(check_kit, message(1, msgid="one@example.com"), "bob@example.org"))
    assert first.result is Result.PASS
    resend = await check.run(tx_for(check_kit, message(1, msgid="one@example.com"), "bob@example.org"))
    assert resend.result is Result.PASS                   # a retry after a 4xx: the same message
    other = await check.run(tx_for(check_kit, message(2, msgid="two@example.com"), "bob@example.org"))
    assert other.reply is not None and (other.reply.code, other.reply.enhanced) == (550, "5.7.1")
    assert other.reply.rule == "P-UCE"
    assert [v.kind for v in seen] == ["repeat"]
    clock.now += 3600                                      # the window is over: no repeat any more
    later = await check.run(tx_for(check_kit, message(3, msgid="three@example.com"), "bob@example.org"))
    assert later.result is Result.PASS


async def test_identity_is_recorded_on_the_violation(check_kit):
    check, _, seen = setup(check_kit, threshold=1)
    for i in range(4):
        await check.run(tx_for(check_kit, message(i), f"r{i}@example.org", identity="site1"))
    assert seen and all((v.account, v.identity) == ("alice", "site1") for v in seen)


async def test_default_mode_is_warn_and_publishes_no_violation(check_kit):
    check, _, seen = setup(check_kit, threshold=1, mode=None)
    outs = [await check.run(tx_for(check_kit, message(i), f"r{i}@example.org")) for i in range(5)]
    assert outs[-1].reply is not None and outs[-1].reply.code == 550   # the check says it, the pipeline warns
    assert seen == []
    svc = check_kit.services()
    assert svc.config.checks.mode("data_bulk") == "warn"


async def test_a_compromised_identity_is_stopped_another_keeps_sending(check_kit):
    check, _, seen = setup(check_kit, threshold=2)
    for i in range(6):
        await check.run(tx_for(check_kit, message(i), f"r{i}@example.org", identity="site1"))
    assert seen and seen[-1].identity == "site1" and "identity site1: 6" in seen[-1].detail
    other = ("Your invoice for the hosting of the shop is attached; it covers the months of spring\n"
             "and the extra storage you booked, and is due at the end of the month as usual.\n")
    out = await check.run(tx_for(check_kit, message(50, body=other), "r50@example.org", identity="site2"))
    assert out.result is Result.PASS


def test_bulk_config_errors_name_file_key_and_problem():
    import pytest

    from gateway.config import ConfigError, from_mapping
    for section, key, problem in (({"window": 10}, "bulk.window", "must be in [60, 604800] seconds"),
                                  ({"recipients_threshold": 0}, "bulk.recipients_threshold", "must be an integer"),
                                  ({"refuse_factor": 0.5}, "bulk.refuse_factor", "must be in [1, 100]")):
        with pytest.raises(ConfigError) as err:
            from_mapping({"dev": {"enabled": True}, "bulk": section}, "gw.toml")
        assert str(err.value).startswith(f"gw.toml: {key}: {problem}"), str(err.value)
    cfg = from_mapping({"dev": {"enabled": True}, "bulk": {"recipients_threshold": 10, "refuse_factor": 3}}, "gw.toml")
    assert cfg.bulk.refuse_at == 30
