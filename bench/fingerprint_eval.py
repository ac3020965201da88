"""Precision and recall of the bulk fingerprint (gateway/message/fingerprint.py) on real messages.

Positives: FAMILIES real messages of the shared corpora, each sent to
PER_FAMILY recipients as a bulk sender would (200 messages in all): a
personalized greeting and name, per-recipient tracking links (query tokens,
path tokens, an unsubscribe link with the address), "sent to <address>",
different order numbers and dates, paragraphs reordered, and each copy in one
of several forms (text/plain 8bit, quoted-printable or base64, text/html only,
multipart/alternative, UTF-8 or ISO-8859-1). Negatives: GENUINE different
real messages of the corpora (ham, spam, ARF/DSN reports, malformed mail),
each its own family.

A pair of messages is "caught" when their fingerprints share a band key (what
a per-key recipient counter sees). Recall = caught pairs of one family / all
pairs of one family; a caught pair of two families is a false positive,
unless the two messages really are near-identical (Jaccard similarity of
their normalized shingle sets >= NEAR): the corpus holds copies of one
message (the same DKIM test body, the same SPF test mail, the same GTUBE
spam), which every bulk detector must call similar. Those are listed as
"legitimate collisions" and not counted as errors; strict precision counts
them too.

    python3 bench/fingerprint_eval.py [--corpora DIR] [--seed N] [--sweep] [--json]

--sweep repeats the evaluation for other shingle sizes and bands x rows
(docs/bulk.md's trade-off table). tests/test_fingerprint.py runs evaluate()
and asserts its thresholds.
"""
from __future__ import annotations

import argparse
import base64
import json
import quopri
import random
import re
import sys
from itertools import combinations
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ham_refusals import default_corpora, ham_messages, to_wire  # noqa: E402
from gateway.message import fingerprint as fp  # noqa: E402
from gateway.message.parse import decode_lenient, parse_headers  # noqa: E402

SEEDS = (  # real messages, each the content of one bulk family
    "spamassassin-t-data/t/data/nice/001",   # a software release announcement (text, long)
    "spamassassin-t-data/t/data/nice/002",   # a mailing-list reply (text, quoted)
    "spamassassin-t-data/t/data/spam/001",   # a spam offer (text)
    "spamassassin-t-data/t/data/spam/005",   # a spam offer with a price list (text)
)
PER_FAMILY = 50
GENUINE = 200
NEAR = 0.5

OTHER = (  # besides the ham of bench/ham_refusals.py: spam and malformed mail, also genuine and different
    "spamassassin-t-data/t/data/spam/**/*",
    "spamscope-mail-parser-mails/*.eml",
)

FIRST = ("Anna", "Ben", "Carla", "Dmitri", "Eva", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kemal", "Lena",
         "Marco", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tomoko", "Ugo", "Vera", "Wei", "Yusuf")
LAST = ("Schmidt", "Rossi", "Garcia", "Novak", "Okafor", "Larsen", "Dubois", "Tanaka", "Silva", "Kowalski")


def genuine_messages(corpora: Path, exclude: set[str]) -> list[tuple[str, bytes]]:
    """(name, wire bytes) of every distinct real message but the seeds, in name order."""
    out: dict[bytes, str] = {}
    for _, name, data in ham_messages(corpora):
        out.setdefault(data, name)
    for pattern in OTHER:
        for p in sorted(corpora.glob(pattern)):
            if p.is_file():
                out.setdefault(to_wire(p.read_bytes()), str(p.relative_to(corpora)))
    return sorted(((n, d) for d, n in out.items() if n not in exclude), key=lambda x: x[0])


# --------------------------------------------------------------------------------------
# A bulk sender's copies of one real message
# --------------------------------------------------------------------------------------

_URL = re.compile(r"\b(https?://[^\s<>\"']+)")
_DIGITS = re.compile(r"\d+")


def _seed_content(data: bytes) -> tuple[str, list[str]]:
    """The Subject and the body paragraphs of a real message (decoded as the fingerprint decodes it)."""
    parsed = parse_headers(data)
    subject = decode_lenient(parsed.get("subject") or "")
    body = fp.message_text(data)
    if subject and body.startswith(subject):  # message_text puts the Subject first
        body = body[len(subject):]
    paras = [p.strip("\r\n") for p in re.split(r"\n[ \t]*\n", body.replace("\r", "")) if p.strip()]
    return subject, paras


def _token(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(n))


def _personal(rng: random.Random, paras: list[str], first: str, last: str, email: str, domain: str) -> list[str]:
    def link(m: re.Match[str]) -> str:
        u = m.group(1).split("?")[0]
        return f"{u}?utm_source=mail&uid={rng.getrandbits(64):016x}&r={_token(rng, 22)}"

    def number(m: re.Match[str]) -> str:
        return str(rng.randrange(10 ** (len(m.group(0)) - 1), 10 ** len(m.group(0)))) if rng.random() < 0.3 else m.group(0)

    body = [_DIGITS.sub(number, _URL.sub(link, p)) for p in paras]
    if body:  # the name in the middle of a sentence, at a different place in each copy
        k = rng.randrange(len(body))
        words = body[k].split(" ")
        at = rng.randrange(len(words) + 1)
        body[k] = " ".join(words[:at] + [f"{first},"] + words[at:])
    if rng.random() < 0.6:  # reordered paragraphs
        rng.shuffle(body)
    greeting = rng.choice((f"Dear {first} {last},", f"Hi {first},", f"Hello {first}!", f"Dear Mr. {last}:",
                           f"Good morning {first},", f"{first},"))
    mention = f"{first}, we picked this for you personally and hope you like it."
    order = (f"Your reference is {rng.randrange(10**5, 10**6)}, issued on {rng.randrange(2020, 2027)}-"
             f"{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d} at {rng.randrange(24):02d}:{rng.randrange(60):02d}.")
    track = (f"Read it online: https://click.{domain}/c/{_token(rng, 32)}/{rng.getrandbits(48):012x}?u={email}\n"
             f"Unsubscribe: https://{domain}/unsubscribe?e={email}&t={_token(rng, 40)}")
    footer = f"This message was sent to {email} by {domain}."
    signoff = rng.choice(("Best regards,", "Kind regards,", "Cheers,", "Sincerely yours,")) + f"\n{rng.choice(FIRST)}"
    return [greeting, mention] + body + [order, track, signoff, footer]


def _html(paras: list[str]) -> str:
    import html
    out = []
    for p in paras:
        lines = [_URL.sub(lambda m: f'<a href="{html.escape(m.group(1))}">{html.escape(m.group(1))}</a>', html.escape(x))
                 if "http" in x else html.escape(x) for x in p.split("\n")]
        out.append("<p>" + "<br>\n".join(lines) + "</p>")
    return ("<html><head><style>p{margin:0}</style><title>news</title></head><body>\n"
            + "\n".join(out) + "\n<img src=\"https://t.example/o.gif?id=" + "x" * 8 + "\"></body></html>\n")


def _encode(text: str, ctype: str, charset: str, cte: str) -> tuple[str, bytes]:
    raw = text.encode(charset, "replace")
    if cte == "base64":
        body = base64.encodebytes(raw)
    elif cte == "quoted-printable":
        body = quopri.encodestring(raw)
    else:
        body = raw
    return f"Content-Type: {ctype}; charset={charset}\r\nContent-Transfer-Encoding: {cte}\r\n", body


def bulk_copy(rng: random.Random, subject: str, paras: list[str], i: int, domain: str) -> bytes:
    first, last = FIRST[i % len(FIRST)], LAST[(i * 7) % len(LAST)]
    email = f"{first.lower()}.{last.lower()}{i}@example{i % 9}.org"
    text_paras = _personal(rng, paras, first, last, email, domain)
    text = "\n\n".join(text_paras) + "\n"
    charset = rng.choice(("utf-8", "iso-8859-1"))
    form = rng.choice(("plain", "plain", "html", "alternative"))
    cte = rng.choice(("8bit", "quoted-printable", "base64"))
    subj = subject if rng.random() < 0.5 else f"{first}, {subject}"
    head = (f"From: News <news@{domain}>\r\nTo: {first} {last} <{email}>\r\nSubject: {subj}\r\n"
            f"Date: Mon, {rng.randrange(1, 29)} Jan 2024 10:{rng.randrange(60):02d}:00 +0000\r\n"
            f"Message-ID: <{rng.getrandbits(64):x}@{domain}>\r\nMIME-Version: 1.0\r\n")
    if form == "plain":
        ph, body = _encode(text, "text/plain", charset, cte)
        msg = (head + ph + "\r\n").encode() + body
    elif form == "html":
        ph, body = _encode(_html(text_paras), "text/html", charset, cte)
        msg = (head + ph + "\r\n").encode() + body
    else:
        b = f"b{rng.getrandbits(40):x}"
        h1, b1 = _encode(text, "text/plain", charset, cte)
        h2, b2 = _encode(_html(text_paras), "text/html", charset, rng.choice(("quoted-printable", "base64")))
        msg = ((head + f'Content-Type: multipart/alternative; boundary="{b}"\r\n\r\n--{b}\r\n' + h1 + "\r\n").encode()
               + b1 + f"\r\n--{b}\r\n{h2}\r\n".encode() + b2 + f"\r\n--{b}--\r\n".encode())
    return re.sub(rb"\r?\n", b"\r\n", msg)


def families(corpora: Path, seed: int) -> list[tuple[str, list[bytes]]]:
    rng = random.Random(seed)
    out = []
    for k, name in enumerate(SEEDS):
        subject, paras = _seed_content(to_wire((corpora / name).read_bytes()))
        domain = f"news{k}.example.com"
        out.append((name, [bulk_copy(rng, subject, paras, i, domain) for i in range(PER_FAMILY)]))
    return out


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------

def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def evaluate(corpora: Path, seed: int = 1, shingle: int = fp.SHINGLE, bands: int = fp.BANDS,
             rows: int = fp.ROWS) -> dict:
    fams = families(corpora, seed)
    genuine = genuine_messages(corpora, set(SEEDS))
    rng = random.Random(seed)
    available = len(genuine)
    if len(genuine) > GENUINE:
        genuine = sorted(rng.sample(genuine, GENUINE))
    # items: (family label, name, shingle set, keys)
    items: list[tuple[str, str, set[str], set[str]]] = []

    def add(label: str, name: str, data: bytes) -> None:
        sh = fp.shingles(fp.normalize(fp.message_text(data)), shingle)
        keys = set(fp.band_keys(fp.signature(sh), bands, rows)) if sh else set()
        items.append((label, name, sh, keys))

    for fam, copies in fams:
        for i, data in enumerate(copies):
            add(fam, f"{fam}~copy{i}", data)
    for name, data in genuine:
        add(name, name, data)
    by_key: dict[str, list[int]] = {}
    for idx, it in enumerate(items):
        for k in it[3]:
            by_key.setdefault(k, []).append(idx)
    caught: set[tuple[int, int]] = set()
    for members in by_key.values():
        caught.update(combinations(members, 2))
    fam_pairs = sum(len(c) * (len(c) - 1) // 2 for _, c in fams)
    tp = sum(1 for a, b in caught if items[a][0] == items[b][0])
    legit, false = [], []
    for a, b in sorted(caught):
        if items[a][0] == items[b][0]:
            continue
        j = _jaccard(items[a][2], items[b][2])
        (legit if j >= NEAR else false).append((items[a][1], items[b][1], round(j, 3)))
    family_caught = {}
    for fam, _ in fams:
        idx = [i for i, it in enumerate(items) if it[0] == fam]
        best = max((sum(1 for i in idx if k in items[i][3]) for k in set().union(*(items[i][3] for i in idx))),
                   default=0)
        family_caught[fam] = best
    jac = [_jaccard(items[a][2], items[b][2]) for fam, copies in fams
           for a, b in combinations([i for i, it in enumerate(items) if it[0] == fam], 2)]
    return {
        "params": {"shingle": shingle, "bands": bands, "rows": rows, "permutations": fp.PERMUTATIONS,
                   "seed": seed, "max_text": fp.MAX_TEXT},
        "families": len(fams), "copies": sum(len(c) for _, c in fams), "genuine": len(genuine),
        "genuine_available": available,
        "family_pairs": fam_pairs, "caught_family_pairs": tp,
        "recall": tp / fam_pairs if fam_pairs else 1.0,
        "largest_group_per_family": family_caught,
        "family_jaccard_min": round(min(jac), 3) if jac else None,
        "family_jaccard_median": round(sorted(jac)[len(jac) // 2], 3) if jac else None,
        "false_pairs": false, "legitimate_collisions": legit,
        "precision": tp / (tp + len(false)) if tp + len(false) else 1.0,
        "precision_strict": tp / (tp + len(false) + len(legit)) if tp + len(false) + len(legit) else 1.0,
        "weak_genuine": sum(1 for it in items if it[0] == it[1] and len(it[2]) < fp.MIN_SHINGLES),
    }


SWEEP = ((3, 16, 8), (5, 16, 8), (4, 32, 4), (4, 25, 5), (4, 21, 6), (4, 18, 7), (4, 16, 8), (4, 12, 10))


def _short(name: str) -> str:
    return name.replace("spamassassin-t-data/t/data/", "sa/")


def legitimate_clusters(pairs: list[tuple[str, str, float]]) -> list[tuple[list[str], float]]:
    """Connected groups of the legitimate collisions: (members, lowest pair Jaccard), largest first."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for a, b, _ in pairs:
        parent[root(a)] = root(b)
    groups: dict[str, list[str]] = {}
    for x in parent:
        groups.setdefault(root(x), []).append(x)
    out = []
    for members in groups.values():
        ms = set(members)
        jmin = min(j for a, b, j in pairs if a in ms)
        out.append((sorted(members), jmin))
    return sorted(out, key=lambda g: (-len(g[0]), g[0]))


def _print(r: dict, verbose: bool = True) -> None:
    p = r["params"]
    print(f"shingle {p['shingle']}, {p['permutations']} permutations, {p['bands']} bands x {p['rows']} rows, "
          f"seed {p['seed']}: {r['copies']} bulk copies of {r['families']} real messages, {r['genuine']} genuine "
          f"(of {r['genuine_available']} distinct in the corpora)")
    print(f"  recall    {r['recall']:.4f}  ({r['caught_family_pairs']} of {r['family_pairs']} same-family pairs share "
          f"a key; Jaccard within a family: min {r['family_jaccard_min']}, median {r['family_jaccard_median']})")
    print(f"  largest group sharing one key, per family of {r['copies'] // r['families']}: "
          + ", ".join(f"{_short(k)}={v}" for k, v in r["largest_group_per_family"].items()))
    print(f"  precision {r['precision']:.4f}  ({len(r['false_pairs'])} false pairs; strict, counting the "
          f"{len(r['legitimate_collisions'])} legitimate collisions too: {r['precision_strict']:.4f})")
    for a, b, j in r["false_pairs"]:
        print(f"    false: {a} ~ {b} (Jaccard {j})")
    clusters = legitimate_clusters(r["legitimate_collisions"])
    print(f"  legitimate collisions: {len(r['legitimate_collisions'])} pairs in {len(clusters)} groups of "
          f"near-identical corpus messages (Jaccard >= {NEAR}); {r['weak_genuine']} genuine messages are weak "
          f"(< {fp.MIN_SHINGLES} shingles)")
    if verbose:
        for members, jmin in clusters:
            copies = [m for m in members if "~copy" in m]
            names = [_short(m) for m in members if "~copy" not in m]
            if copies:
                names.insert(0, f"the {len(copies)} bulk copies of {_short(copies[0].split('~')[0])}")
            print(f"    {len(members):3d} messages, Jaccard >= {jmin}: {', '.join(names)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpora", type=Path, default=default_corpora(), help="the shared corpora directory")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sweep", action="store_true", help="also other shingle sizes and bands x rows")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not args.corpora.is_dir():
        print(f"fingerprint_eval: corpora directory {args.corpora} not found (use --corpora)", file=sys.stderr)
        return 2
    configs = SWEEP if args.sweep else ((fp.SHINGLE, fp.BANDS, fp.ROWS),)
    results = [evaluate(args.corpora, args.seed, s, b, r) for s, b, r in configs]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        _print(r, verbose=not args.sweep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
