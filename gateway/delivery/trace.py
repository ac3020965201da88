"""The trace the gateway adds to every message it relays (P-PATH, P-REPORT):
a Received header (RFC 5321 4.4) and a trace header carrying the same opaque
id, so an abuse report can be traced to the account and the message log."""
from __future__ import annotations

import time
from email.utils import formatdate

from ..accounts.identity import opaque
from ..core.transaction import Transaction


def _protocol(tx: Transaction) -> str:
    # RFC 3848 / RFC 6531 "with" keywords.
    sess = tx.session
    proto = "ESMTP" if sess.esmtp else "SMTP"
    if tx.smtputf8:
        proto = "UTF8SMTP"
    if sess.tls is not None:
        proto += "S"
    if sess.auth_method == "smtp-auth":
        proto += "A"
    return proto


_date_cache: tuple[int, str] = (-1, "")


def _rfc5322_date(now: float | None) -> str:
    """formatdate() costs microseconds; one string per second serves every message."""
    global _date_cache
    second = int(time.time() if now is None else now)
    if _date_cache[0] != second:
        _date_cache = (second, formatdate(second, localtime=False))
    return _date_cache[1]


def _clean(text: str) -> str:
    # Nothing a client sent may break the header's structure.
    return "".join(c if c.isprintable() and c not in "()\\;" else "?" for c in text)[:255]


def received_header(tx: Transaction, hostname: str, now: float | None = None, rcpt: str | None = None, *,
                    identity_key: bytes | None = None) -> bytes:
    sess = tx.session
    helo = _clean(sess.helo or "unknown")
    ip = f"IPv6:{sess.peer_ip}" if ":" in sess.peer_ip else sess.peer_ip
    parts = [f"Received: from {helo} ([{ip}])"]
    if sess.tls is not None:
        parts.append(f"\t(using {sess.tls.version} with cipher {sess.tls.cipher})")
    if sess.account is not None:
        how = "authenticated" if sess.auth_method == "smtp-auth" else "client network of"
        parts.append(f"\t({how} account {_clean(sess.account.name)})")
        account, identity = tx.charged_to
        if identity is not None and identity_key is not None and account is not None:
            # opaque to the recipient, traceable by the operator (accounts/identity.py)
            parts.append(f"\t(identity {opaque(identity_key, account, identity)})")
    parts.append(f"\tby {hostname} with {_protocol(tx)} id {tx.trace_id}")
    tail = f"; {_rfc5322_date(now)}"
    if rcpt is None and len(tx.recipients) == 1:
        rcpt = tx.recipients[0].address.addr
    if rcpt is not None:
        parts.append(f"\tfor <{rcpt}>{tail}")
    else:
        parts[-1] += tail
    return ("\r\n".join(parts) + "\r\n").encode("utf-8", "surrogateescape")


def trace_headers(tx: Transaction, hostname: str, trace_header: str, now: float | None = None,
                  extra: list[tuple[str, str]] | None = None, rcpt: str | None = None, *,
                  identity_key: bytes | None = None) -> bytes:
    """What the relay writes in front of the message as sent: the Received,
    the trace header, then ``extra`` (headers the gateway adds, e.g. a missing
    Date / Message-ID from ``tx.add_headers``), in that order."""
    out = received_header(tx, hostname, now, rcpt, identity_key=identity_key)
    out += f"{trace_header}: {tx.trace_id}\r\n".encode("ascii")
    for name, value in extra or ():
        out += f"{name}: {value}\r\n".encode("utf-8", "surrogateescape")
    return out
