"""The typed test harness for checks: real settings, real Services, a real Transaction.

``services(...)`` builds :class:`gateway.services.Services` around a real
:class:`gateway.config.Config` (dev mode, so no upstream is needed) with the
sections a test gives; ``build(name, services)`` makes a check through its
module's contract (``SPEC.build``), as the app does; ``transaction(...)``
makes the transaction it runs on. The ``check_kit`` fixture (conftest.py)
hands these to a test.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

from gateway.accounts.model import Account, AccountStatus, SenderDomain
from gateway.checks import SPECS
from gateway.config import Config, DevSettings, SmtpSettings
from gateway.core.transaction import SessionInfo, Transaction
from gateway.dns.settings import DnsblSettings, DomainSettings
from gateway.message.settings import HeaderSettings
from gateway.registry.model import MailingList
from gateway.services import Services

HOSTNAME = "gw.example.net"


def config(*, headers: HeaderSettings | None = None, hostname: str = HOSTNAME,
           dnsbl: DnsblSettings | None = None, domains: DomainSettings | None = None, **sections: Any) -> Config:
    cfg = Config(dev=DevSettings(enabled=True), smtp=SmtpSettings(hostname=hostname), **sections)
    if headers is not None:
        cfg = replace(cfg, headers=headers)
    if dnsbl is not None:
        cfg = replace(cfg, dnsbl=dnsbl)
    if domains is not None:
        cfg = replace(cfg, domains=domains)
    return cfg


def services(*, clock: Callable[[], float] | None = None, resolver: Any = None, dnsbl: Any = None,
             accounts: Any = None, registry: Any = None, blocklist: Any = None, **settings: Any) -> Services:
    """Services for checks: ``settings`` go to :func:`config`; the stores are the test's own."""
    if "dnsbl_settings" in settings:  # [dnsbl], not the Dnsbl service
        settings["dnsbl"] = settings.pop("dnsbl_settings")
    s = Services(config=config(**settings), accounts=accounts, counters=None, connections=None,
                 resolver=resolver, dnsbl=dnsbl, registry=registry, blocklist=blocklist)
    if clock is not None:
        s.clock = clock
    return s


def build(name: str, svc: Services) -> Any:
    """The check ``name`` built through its contract, as the app builds it."""
    return SPECS[name].build(svc)


def transaction(message: bytes | None = None, *, account: Any = None, peer_ip: str = "192.0.2.1",
                mailing_list: Any = None) -> Transaction:
    """A transaction of a submission session; with ``account`` an SMTP-AUTH one."""
    tx = Transaction(SessionInfo("s1", "submission", peer_ip, 40000, account=account,
                                 auth_method="smtp-auth" if account is not None else None))
    tx.message = message
    tx.mailing_list = mailing_list
    return tx


def mailing_list(list_id: str = "news.example.com", *, account: str = "alice") -> MailingList:
    """A registered list of ``account`` (what ``mail_list`` puts into ``tx.mailing_list``)."""
    return MailingList("0123456789abcdef", 1, account, "News", list_id, (f"news@{list_id}",),
                       f"news@{list_id}", 0.0)


def account(name: str = "alice", *domains: tuple[str, bool]) -> Account:
    """An active account with sender domains: (domain, authorized) pairs."""
    return Account(1, name, AccountStatus.ACTIVE,
                   domains=tuple(SenderDomain(d, "verified" if ok else "pending") for d, ok in domains))


@dataclass(frozen=True)
class CheckKit:
    """What the ``check_kit`` fixture gives: the three builders above."""

    services: Callable[..., Services] = services
    build: Callable[[str, Services], Any] = build
    transaction: Callable[..., Transaction] = transaction
    mailing_list: Callable[..., MailingList] = mailing_list
    account: Callable[..., Account] = account
