"""How much real ham does each default-reject message rule refuse?

Runs the data checks ``data_wire``, ``data_headers``, ``data_trace`` and
``data_subject`` with the default settings over every ham message of the
shared corpora (list in ``HAM`` below), each as an SMTP client would send it
(no mbox line, CRLF line endings, BODY=8BITMIME / SMTPUTF8 declared when the
message needs them) and with the gateway clock injected 60 seconds after the
message's own Date, so the Date window stays active on old mail, as
authenticated submission (an account: a missing Date or Message-ID is added,
RFC 6409 8, as for every customer's mail). All four
checks run on every message, so a message counts for every default-reject
finding it trips, not only for the first one (that is each rule's own
false-refusal figure).

Prints, per finding id whose default action is ``reject``, "n of N ham
messages refused" and the files; ``--json`` prints the same as JSON.
docs/headers.md's column "real ham refused" holds these figures and
tests/test_ham_refusals.py fails when the two differ.

    python3 bench/ham_refusals.py [--corpora DIR] [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.accounts.model import Account, AccountStatus  # noqa: E402
from gateway.checks import data_headers, data_subject, data_trace, data_wire  # noqa: E402
from gateway.message.findings import REJECT, RULES  # noqa: E402
from gateway.message.parse import parse_date, parse_headers  # noqa: E402
from gateway.message.wire import header_end  # noqa: E402
from gateway.message.settings import HeaderSettings  # noqa: E402
from gateway.config import Config, DevSettings, SmtpSettings  # noqa: E402
from gateway.core.transaction import SessionInfo, Transaction  # noqa: E402
from gateway.services import Services  # noqa: E402

# (group, glob under the corpora directory, why it is ham). The paths are what
# the corpora README and each folder's SOURCE.txt label as good mail.
HAM: tuple[tuple[str, str, str], ...] = (
    ("spamassassin nice", "spamassassin-t-data/t/data/nice/**/*",
     "SpamAssassin's own ham (t/data/nice: mailman, CJK charsets, CRLF, DMARC/SPF pass, mime1..9)"),
    ("spamassassin nice.mbox", "spamassassin-t-data/t/data/nice.mbox",
     "three ham messages in one mbox (Evolution announcement, a 1991 reply, a Wine release mail); split"),
    ("spamassassin mime-subject", "spamassassin-t-data/t/data/mime-subject.txt",
     "a real mailing-list reply SpamAssassin uses for subject decoding"),
    ("dkim test-pass/test-fail", "spamassassin-t-data/t/data/dkim/test-[pf][a][si]*.msg",
     "DKIM verify inputs; pass/fail is about signatures, the messages are ordinary mail (header-syntax inputs)"),
    ("dkim arc ok", "spamassassin-t-data/t/data/dkim/arc/ok*.eml", "an ARC-signed message SpamAssassin expects to pass"),
    ("sisimai ordinary mail", "arf-sisimai/negatives-not-bounce/*.eml", "ordinary mail (sisimai's 'is not a bounce' set)"),
    ("sisimai DSNs", "arf-sisimai/negatives-dsn/*.eml", "real RFC 3464 delivery status notifications"),
    ("sisimai ARF", "arf-sisimai/arf/*.eml", "real feedback reports (RFC 5965 and Hotmail-style)"),
    ("stalwart ARF", "arf-stalwart-mail-auth/*.eml", "RFC 5965 / RFC 6591 example reports and a real OpenDMARC report"),
    ("Email-ARF", "arf-perl-Email-ARF/example*.msg", "valid feedback reports of Email::ARF's tests"),
)
# dkim test-adsp-* (ADSP policy inputs, all with one fixed test header set) and
# the CRLF/CR copies of sisimai's arf-01 are left out: they add no new shape.


def default_corpora() -> Path:
    """shared/corpora beside the repository or beside a directory above it (worktrees)."""
    here = Path(__file__).resolve()
    for p in here.parents[1:]:
        if (p / "shared" / "corpora").is_dir():
            return p / "shared" / "corpora"
    return here.parents[2] / "shared" / "corpora"


def to_wire(raw: bytes) -> bytes:
    """As an SMTP client would send the file: no mbox line, CRLF line endings."""
    if raw.startswith(b"From "):
        raw = raw[raw.find(b"\n") + 1:]
    raw = re.sub(rb"\r?\n", b"\r\n", raw)
    return re.sub(rb"\r(?!\n)", b"\r\n", raw)


def split_mbox(raw: bytes) -> list[bytes]:
    """The messages of an mboxo file (a "From " line after an empty line starts one)."""
    starts = [m.start() for m in re.finditer(rb"(?:\A|(?<=\n\n))From ", raw)]
    return [raw[a:b].rstrip(b"\n") + b"\n" for a, b in zip(starts, starts[1:] + [len(raw)])]


def ham_messages(corpora: Path) -> list[tuple[str, str, bytes]]:
    """(group, name relative to the corpora directory, wire bytes) of every ham message."""
    out: list[tuple[str, str, bytes]] = []
    for group, pattern, _ in HAM:
        for p in sorted(corpora.glob(pattern)):
            if not p.is_file():
                continue
            name = str(p.relative_to(corpora))
            raw = p.read_bytes()
            if p.suffix == ".mbox":
                for i, m in enumerate(split_mbox(raw), 1):
                    out.append((group, f"{name}#{i}", to_wire(m)))
            else:
                out.append((group, name, to_wire(raw)))
    return out


def clock_for(data: bytes) -> float:
    """60 seconds after the message's own Date (0 when it has none that parses)."""
    date = parse_headers(data).get("date")
    try:
        return parse_date(date).timestamp() + 60 if date else 0.0
    except ValueError:
        return 0.0


def make_checks(now: float, settings: HeaderSettings | None = None) -> list:
    cfg = Config(dev=DevSettings(enabled=True), smtp=SmtpSettings(hostname="gw.example.net"),
                 headers=settings or HeaderSettings())
    services = Services(config=cfg, accounts=None, counters=None, connections=None, clock=lambda: now)
    return [m.build(services) for m in (data_wire, data_headers, data_trace, data_subject)]


# Customers' mail reaches the data checks as authenticated submission: an account.
ACCOUNT = Account(1, "alice", AccountStatus.ACTIVE)


async def run_all(data: bytes, params: dict | None = None, settings: HeaderSettings | None = None,
                  account: Account | None = ACCOUNT):
    """(transaction, outcomes, ids of the findings whose action is reject) for
    ``data``, sent by ``account`` (None: a session without one, which can
    only reach the service mailboxes and gets no missing header added)."""
    tx = Transaction(SessionInfo("s", "submission", "192.0.2.1", 1, account=account,
                                 auth_method="smtp-auth" if account is not None else None))
    tx.message = data
    if params is None:  # a well-behaved client declares what it sends
        params = {"BODY": "8BITMIME"} if not data.isascii() else {}
        if not data[:header_end(data)].isascii():
            params["SMTPUTF8"] = True
    tx.mail_params = params
    outcomes = [await c.run(tx) for c in make_checks(clock_for(data), settings)]
    refused = {f["id"] for f in (tx.findings or []) if f["action"] == REJECT}
    return tx, outcomes, refused


def reject_rules() -> list[str]:
    return [rid for rid, r in RULES.items() if r.default == REJECT]


async def measure(corpora: Path) -> dict:
    """{"corpora", "total", "groups": {group: count}, "rules": {id: {"refused", "files"}}}."""
    msgs = ham_messages(corpora)
    rules: dict[str, dict] = {rid: {"refused": 0, "files": []} for rid in reject_rules()}
    groups: dict[str, int] = {}
    for group, name, data in msgs:
        groups[group] = groups.get(group, 0) + 1
        _, _, refused = await run_all(data)
        for rid in sorted(refused):
            rules[rid]["refused"] += 1
            rules[rid]["files"].append(name)
    return {"corpora": str(corpora), "total": len(msgs), "groups": groups, "rules": rules}


def figure(result: dict, rid: str) -> str:
    """The text of the docs/headers.md column "real ham refused" for ``rid``."""
    return f"{result['rules'][rid]['refused']} of {result['total']}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpora", type=Path, default=default_corpora(), help="the shared corpora directory")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    if not args.corpora.is_dir():
        print(f"ham_refusals: corpora directory {args.corpora} not found (use --corpora)", file=sys.stderr)
        return 2
    result = asyncio.run(measure(args.corpora))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['total']} ham messages from {result['corpora']}:")
    for group, n in result["groups"].items():
        print(f"  {n:4d}  {group}")
    print("default-reject rules:")
    width = max(len(r) for r in result["rules"])
    for rid, r in result["rules"].items():
        files = f"  ({', '.join(r['files'])})" if r["files"] else ""
        print(f"  {rid:<{width}}  {figure(result, rid)} ham messages refused{files}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
