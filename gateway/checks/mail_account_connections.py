"""P-LOAD: concurrent sessions per account (``[smtp]
max_connections_per_account``), checked at MAIL, where every session has its
account (SMTP AUTH or a client network). A session is counted from its first
accepted check here until it ends; a session over the cap is answered 421
4.7.0 and closed (RFC 3463 4.7.0: a policy limit, try later).

Counted in memory per gateway process: behind a balancer over N gateways an
account may hold up to N times the cap; the global and per-IP caps
(connect_limits) are per process too."""
from __future__ import annotations

from typing import Any

from ..core import replies
from ..core.events import EventBus, SessionEnded
from ..core.transaction import Outcome, Phase
from .contract import CheckSpec


class AccountSessions:
    """account name -> the ids of its open sessions that passed MAIL."""

    def __init__(self, events: EventBus | None):
        self.by_account: dict[str, set[str]] = {}
        self._account_of: dict[str, str] = {}
        if events is not None:
            events.subscribe(SessionEnded, self._ended)

    def count(self, account: str) -> int:
        return len(self.by_account.get(account, ()))

    def holds(self, account: str, sid: str) -> bool:
        return sid in self.by_account.get(account, ())

    def add(self, account: str, sid: str) -> None:
        old = self._account_of.get(sid)
        if old is not None and old != account:
            self._drop(sid)
        self.by_account.setdefault(account, set()).add(sid)
        self._account_of[sid] = account

    def _drop(self, sid: str) -> None:
        account = self._account_of.pop(sid, None)
        if account is None:
            return
        sessions = self.by_account.get(account)
        if sessions is not None:
            sessions.discard(sid)
            if not sessions:
                del self.by_account[account]

    def _ended(self, event: SessionEnded) -> None:
        self._drop(event.session.id)


class MailAccountConnections:
    name = "mail_account_connections"
    phase = Phase.MAIL

    def __init__(self, sessions: AccountSessions, limit: int):
        self.sessions = sessions
        self.limit = limit

    async def run(self, tx: Any, item: Any = None) -> Outcome:
        account = tx.session.account
        if account is None or not self.limit:
            return Outcome.skip(self.name, "no account" if account is None else "off")
        sid = tx.session.id
        if not self.sessions.holds(account.name, sid):
            n = self.sessions.count(account.name)
            if n >= self.limit:
                return Outcome.refuse(self.name, replies.TOO_MANY_CONNECTIONS_ACCOUNT,
                                      f"account {account.name}: {n} sessions open >= {self.limit}")
            self.sessions.add(account.name, sid)
        return Outcome.ok(self.name, f"{self.sessions.count(account.name)} of {self.limit} sessions")


def build(services: Any) -> MailAccountConnections:
    return MailAccountConnections(AccountSessions(services.events),
                                  services.config.smtp.max_connections_per_account)


SPEC = CheckSpec(
    name='mail_account_connections', phase=Phase.MAIL, build=build,
    summary='P-LOAD: concurrent sessions per account (per gateway process)',
    position=12,
    replies=('TOO_MANY_CONNECTIONS_ACCOUNT',),
    settings=('smtp.max_connections_per_account',),
    services=('events',),
    reads=('session.account',))
