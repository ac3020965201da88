"""The bulk fingerprint (issue 12, point 4): gateway/message/fingerprint.py.

What is shown here:

- on real messages of the shared corpora (bench/fingerprint_eval.py): 200
  bulk copies of 4 real messages (names, tracking links, numbers and dates,
  reordered paragraphs, text / HTML / alternative, 8bit / QP / base64) share
  band keys within their family, and 200 different genuine corpus messages
  share none with another family except the corpus's own near-identical
  copies (Jaccard >= 0.5, listed by the script);
- each normalization step on its own, with hand-made copies;
- the work is bounded: only MAX_TEXT characters of text, no part decoded
  beyond what that needs, MAX_PARTS parts, MAX_DEPTH levels;
- the keys are the same in another process (no per-process hash seed);
- no input makes it raise (corpus seeds mutated with hostile fragments);
- fingerprint_async gives fingerprint()'s result inline, in an executor and
  in slices.

No timing is asserted (speed is bench/bench_fingerprint.py's).
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import quopri
import random
import re
import subprocess
import sys

import pytest

from bench.fingerprint_eval import NEAR, PER_FAMILY, SEEDS, evaluate
from bench.fuzz_parsers import load_seeds, mutate
from bench.ham_refusals import to_wire
from gateway.message import fingerprint as fp
from gateway.message.parse import parse_headers

from conftest import CORPORA, REPO, need

HEAD = "From: News <news@shop.example>\r\nTo: {to}\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"

PARAS = [
    "Our spring collection has arrived and we think you will love the new colours and the lighter fabrics.",
    "Every order placed this week ships free of charge, and returns are free for thirty days after delivery.",
    "Visit the shop at https://shop.example/spring?utm_source=mail&uid=8f3a9c2d1e4b5a6f to see all the pieces.",
    "If you have any questions our team answers every message within one working day, in four languages.",
]


def message(paras: list[str], *, to: str = "Anna <anna@example.org>", subject: str = "Spring is here",
            ctype: str = "text/plain", charset: str = "utf-8", cte: str = "8bit") -> bytes:
    text = "\r\n\r\n".join(paras) + "\r\n"
    if ctype == "text/html":
        text = "<html><head><style>p {color: red}</style></head><body>" + "".join(
            f"<p>{p}</p>\n" for p in paras) + "</body></html>\r\n"
    raw = text.encode(charset)
    if cte == "base64":
        body = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    elif cte == "quoted-printable":
        body = quopri.encodestring(raw).replace(b"\n", b"\r\n")
    else:
        body = raw
    head = HEAD.format(to=to, subject=subject) + (
        f"Content-Type: {ctype}; charset={charset}\r\nContent-Transfer-Encoding: {cte}\r\n\r\n")
    return head.encode() + body


def corpus(name: str) -> bytes:
    return to_wire((CORPORA / name).read_bytes())


# --------------------------------------------------------------------------------------
# Precision and recall on real messages
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2])
def test_bulk_copies_share_keys_and_different_genuine_messages_do_not(seed):
    need(CORPORA.is_dir(), f"shared corpora at {CORPORA}")
    r = evaluate(CORPORA, seed)
    print(f"\nseed {seed}: recall {r['recall']:.4f} ({r['caught_family_pairs']}/{r['family_pairs']}), "
          f"precision {r['precision']:.4f} ({len(r['false_pairs'])} false pairs), strict precision "
          f"{r['precision_strict']:.4f} ({len(r['legitimate_collisions'])} legitimate collisions), "
          f"largest group per family {r['largest_group_per_family']}")
    assert r["copies"] == 200 and r["families"] == len(SEEDS)
    assert r["genuine"] == 200
    # recall: nearly every pair of copies of one message shares a key ...
    assert r["recall"] >= 0.99, r["recall"]
    # ... and for the counter, one key alone sees most copies of each family
    for fam, n in r["largest_group_per_family"].items():
        assert n >= 0.8 * PER_FAMILY, (fam, n)
    # precision: messages that are not copies of one another do not share keys
    assert len(r["false_pairs"]) <= 2, r["false_pairs"]
    # what is let through as "legitimate" really is near-identical text
    assert all(j >= NEAR for _, _, j in r["legitimate_collisions"])


def test_the_corpus_copies_are_what_the_legitimate_collisions_are():
    """Two known groups of copies in the corpora are near-identical by the estimate
    too, and two messages of different kinds are not."""
    need(CORPORA.is_dir(), f"shared corpora at {CORPORA}")
    d = "spamassassin-t-data/t/data/"
    a, b = fp.fingerprint(corpus(d + "nice/spf1")), fp.fingerprint(corpus(d + "nice/spf2"))
    assert fp.similar(a, b) and set(a.keys) & set(b.keys)
    c, e = fp.fingerprint(corpus(d + "spam/015")), fp.fingerprint(corpus(d + "spam/016"))
    assert fp.similar(c, e)
    n1, s1 = fp.fingerprint(corpus(d + "nice/001")), fp.fingerprint(corpus(d + "spam/001"))
    assert not fp.similar(n1, s1) and not set(n1.keys) & set(s1.keys)
    assert 0.0 <= fp.similarity(n1, s1) < 0.2


# --------------------------------------------------------------------------------------
# Normalization, step by step
# --------------------------------------------------------------------------------------

def test_personalization_is_removed():
    a = message(["Dear Anna Schmidt,", "Anna, we picked these for you."] + PARAS
                + ["Your order 48213 of 2024-05-06 ships at 13:45.",
                   "Track it: https://t.shop.example/c/Xk29aLq0ZzP8mN3b/7f3e2a?r=anna@example.org",
                   "This message was sent to anna@example.org. Token 9f8e7d6c5b4a3f2e1d0c.", "Best,\r\nTom"])
    b = message(["Hi Ben,", "Ben, we picked these for you."] + PARAS
                + ["Your order 99120 of 2025-11-30 ships at 08:05.",
                   "Track it: https://t.shop.example/c/Pq81bNw7YtR2kL5x/11aa9c?r=ben@example.net",
                   "This message was sent to ben@example.net. Token 0a1b2c3d4e5f6a7b8c9d.", "Best,\r\nTom"],
                to="Ben <ben@example.net>")
    sa, sb = fp.shingles(fp.normalize(fp.message_text(a))), fp.shingles(fp.normalize(fp.message_text(b)))
    # only the name in the middle of the second paragraph differs
    assert sa - sb == {"anna we picked these"} and sb - sa == {"ben we picked these"}
    words = " ".join(" ".join(p) for p in fp.normalize(fp.message_text(a)))
    for gone in ("schmidt", "48213", "2024", "xk29alq0zzp8mn3b", "utm", "8f3a9c2d1e4b5a6f", "anna example org",
                 "9f8e7d6c5b4a3f2e1d0c", "tom"):
        assert gone not in words, gone
    assert "t shop example" in words and "shop example" in words   # a link's host stays


@pytest.mark.parametrize("form", [
    {"cte": "quoted-printable"}, {"cte": "base64"}, {"charset": "iso-8859-1"}, {"charset": "utf-16", "cte": "base64"},
    {"ctype": "text/html"}, {"ctype": "text/html", "cte": "base64"},
])
def test_encodings_charsets_and_html_give_the_same_fingerprint(form):
    paras = PARAS + ["Ça coûte moins cher que prévu, à bientôt dans la boutique."]
    plain = fp.fingerprint(message(paras))
    other = fp.fingerprint(message(paras, **form))
    assert other.signature == plain.signature and other.keys == plain.keys
    assert not plain.weak and len(plain.keys) == fp.BANDS


def test_multipart_alternative_and_reordered_paragraphs_give_the_same_fingerprint():
    plain = fp.fingerprint(message(PARAS))
    text = "\r\n\r\n".join(PARAS[::-1])
    html = "<p>" + "</p><p>".join(PARAS) + "</p>"
    alt = (HEAD.format(to="x@example.org", subject="Spring is here")
           + 'Content-Type: multipart/alternative; boundary="zz"\r\n\r\n--zz\r\n'
           'Content-Type: text/plain; charset=utf-8\r\n\r\n' + text + "\r\n--zz\r\n"
           'Content-Type: text/html; charset=utf-8\r\n\r\n' + html + "\r\n--zz--\r\n").encode()
    got = fp.fingerprint(alt)
    assert got.signature == plain.signature
    # the header block parsed once per message (parse.parsed_for) can be handed in: the same result
    assert fp.fingerprint(alt, parsed=parse_headers(alt)) == got
    # a Re:/Fwd: prefix or a name in front of the Subject is not part of it
    assert fp.fingerprint(message(PARAS, subject="Anna, Fwd: Spring is here")).keys == plain.keys


def test_keys_are_short_strings_the_same_in_another_process():
    msg = message(PARAS)
    keys = fp.fingerprint(msg).keys
    assert len(keys) == fp.BANDS and len(set(keys)) == fp.BANDS
    assert all(len(k) == 14 and int(k, 16) >= 0 for k in keys)
    code = ("import sys, json; from gateway.message import fingerprint as fp; "
            "print(json.dumps(fp.fingerprint(sys.stdin.buffer.read()).keys))")
    out = subprocess.run([sys.executable, "-c", code], input=msg, capture_output=True, timeout=60, cwd=REPO,
                         env={"PYTHONHASHSEED": "4711", "PATH": "/usr/bin:/bin"}, check=True)
    assert tuple(json.loads(out.stdout)) == keys


def test_weak_and_empty_fingerprints():
    short = fp.fingerprint(message(["Thanks, see you tomorrow at the station then."]))
    assert short.weak and short.keys   # keys still given; Fingerprint.weak tells the counter to scope them
    assert fp.fingerprint(b"") == fp.EMPTY
    assert fp.fingerprint(b"From: a@b.example\r\n\r\n") == fp.EMPTY
    pdf_only = (HEAD.format(to="x@example.org", subject="") + "Content-Type: application/pdf\r\n"
                "Content-Transfer-Encoding: base64\r\n\r\n").encode() + base64.encodebytes(bytes(range(256)) * 40)
    assert fp.fingerprint(pdf_only) == fp.EMPTY and fp.EMPTY.keys == ()
    assert fp.similarity(fp.EMPTY, fp.EMPTY) == 0.0 and not fp.similar(fp.EMPTY, short)


# --------------------------------------------------------------------------------------
# Bounded work
# --------------------------------------------------------------------------------------

def test_only_the_first_max_text_characters_count():
    words = [f"w{i:05d}x".replace("0", "o").replace("1", "l") for i in range(fp.MAX_TEXT)]
    head_text = " ".join(words)[:fp.MAX_TEXT]
    a = message([head_text, "tail one: " + "alpha beta gamma " * 3000])
    b = message([head_text, "tail two: " + "delta epsilon zeta " * 3000])
    assert len(fp.message_text(a)) <= fp.MAX_TEXT + 100   # the Subject comes on top
    assert fp.fingerprint(a).signature == fp.fingerprint(b).signature


def test_a_big_part_is_decoded_only_as_far_as_needed(monkeypatch):
    seen: list[tuple[str, int]] = []
    real_b64, real_html = fp.base64.b64decode, fp.html_to_text
    monkeypatch.setattr(fp.base64, "b64decode", lambda b, *a, **k: seen.append(("b64", len(b))) or real_b64(b))
    monkeypatch.setattr(fp, "html_to_text", lambda s: seen.append(("html", len(s))) or real_html(s))
    big = " ".join(PARAS) * 8000   # ~3 MiB of text
    fp.fingerprint(message([big], cte="base64"))
    fp.fingerprint(message([big], ctype="text/html", cte="base64"))
    assert seen and all(n <= 4 * fp.MAX_TEXT + 8 for _, n in seen), seen
    assert max(n for k, n in seen if k == "html") <= fp.MAX_TEXT * fp.HTML_RAW_FACTOR


def test_many_parts_and_deep_nesting_are_bounded(monkeypatch):
    leaves: list[int] = []
    real = fp._leaf
    monkeypatch.setattr(fp, "_leaf", lambda *a: leaves.append(1) or real(*a))
    parts = "".join(f"--b\r\nContent-Type: text/plain\r\n\r\npart {i} {PARAS[i % 4]}\r\n" for i in range(5000))
    many = (HEAD.format(to="x@example.org", subject="s") + 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
            + parts + "--b--\r\n").encode()
    assert fp.fingerprint(many).shingles > 0
    assert len(leaves) <= fp.MAX_PARTS
    # a body full of delimiter look-alikes (mid-line, or a longer boundary) is searched past a bounded number of times
    finds = []
    real_parts = fp._parts
    monkeypatch.setattr(fp, "_parts", lambda *a: finds.append(len(r := real_parts(*a))) or r)
    lookalikes = (HEAD.format(to="x@example.org", subject="s") + 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
                  + "x--b --bb\r\n" * 200000 + "--b\r\nContent-Type: text/plain\r\n\r\nlate\r\n--b--\r\n").encode()
    fp.fingerprint(lookalikes)
    assert finds == [0]   # gave up after MAX_CANDIDATES look-alikes: the late part is not reached
    nested = "".join(f'Content-Type: multipart/mixed; boundary="n{i}"\r\n\r\n--n{i}\r\n' for i in range(3000))
    deep = (HEAD.format(to="x@example.org", subject="deep") + nested + "Content-Type: text/plain\r\n\r\nhi\r\n").encode()
    assert fp.fingerprint(deep).shingles <= 1   # no RecursionError; the text below MAX_DEPTH is not read


def test_hostile_input_never_raises():
    need(CORPORA.is_dir(), f"shared corpora at {CORPORA}")
    seeds = load_seeds(CORPORA)["message"]
    fixed = [b"", b"\r\n", b"\x00" * 100, b"\xff" * 5000, b"Content-Type: multipart/mixed; boundary=\r\n\r\n--\r\n",
             b"Content-Type: text/plain; charset=\xff\x00\r\n\r\n\xe9\xe9", b"Content-Type: text/plain; charset=utf-7\r\n"
             b"Content-Transfer-Encoding: base64\r\n\r\n====AAA=", b"Subject: =?zlib?B?eJw=?=\r\n\r\nx",
             b"Content-Type: text/html\r\n\r\n<script>" + b"<" * 20000, b"Content-Type: message/rfc822\r\n\r\n" * 500,
             b"a@" * 20000, b"@" * 20000 + b"b.c", "\ud800x".encode("utf-8", "surrogatepass") * 100]
    rng = random.Random(7)
    inputs = fixed + [mutate(rng, rng.choice(seeds), seeds) for _ in range(1500)]
    for data in inputs:   # bounded: a fixed count, each call bounded by MAX_TEXT / MAX_PARTS / MAX_DEPTH
        got = fp.fingerprint(data)
        assert isinstance(got, fp.Fingerprint) and len(got.keys) in (0, fp.BANDS)


# --------------------------------------------------------------------------------------
# fingerprint_async
# --------------------------------------------------------------------------------------

class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(1)
        self.submitted = 0

    def submit(self, *a, **k):
        self.submitted += 1
        return super().submit(*a, **k)


async def test_fingerprint_async_inline_in_an_executor_and_in_slices():
    small = message(PARAS[:2])
    assert len(small) <= fp.INLINE_LIMIT
    big = message(PARAS * 400)
    assert len(big) > fp.INLINE_LIMIT
    with CountingExecutor() as ex:
        async with asyncio.timeout(30):
            assert await fp.fingerprint_async(small, ex) == fp.fingerprint(small)
            assert ex.submitted == 0
            assert await fp.fingerprint_async(big, ex) == fp.fingerprint(big)
            assert ex.submitted == 1
            # no executor: slices on the loop, the same result
            assert await fp.fingerprint_async(big) == fp.fingerprint(big)
            html = message(PARAS * 400 + ["Dear Anna,"], ctype="text/html", cte="quoted-printable")
            assert await fp.fingerprint_async(html) == fp.fingerprint(html)


# --------------------------------------------------------------------------------------
# The fast normalization against its definition
# --------------------------------------------------------------------------------------

_R_URL = re.compile(r"(?:(?:https?|ftp)://|www\.)(?:[^\s/<>\"'@]*@)?([^\s/<>\"'?#:]+)[^\s<>\"']*", re.I)
_R_TOKEN = re.compile(r"(?<![\w/+=\-])[A-Za-z0-9_+/=\-]{12,}")
_R_GREETING = re.compile(r"^" + fp._GREETING.pattern[2:], re.I | re.M)


def reference_paragraphs(text: str) -> list[list[str]]:
    """The normalization as its docs define it, one regular expression per step
    (case-insensitive patterns on the text as it is, casefolded at the end), as
    the first version ran it: slower, and the one the fast path must equal."""
    text = text.replace("\r", "")
    text = _R_GREETING.sub(r"\1", text[:fp.GREETING_SPAN]) + text[fp.GREETING_SPAN:]
    text = _R_URL.sub(lambda m: " " + m.group(1).lower().rstrip(".") + " ", text)
    text = fp._drop_addresses(text)
    text = _R_TOKEN.sub(lambda m: " " if re.search(r"\d", m.group(0)) else m.group(0), text)
    text = re.sub(r"\d+", "0", text)
    out = []
    for para in fp._PARAGRAPH.split(text.casefold()):
        words = fp._WORD.findall(para)
        if words:
            out.append(words)
    return out


def _texts() -> list[str]:
    seeds = load_seeds(CORPORA)["message"]
    texts = [fp.message_text(to_wire(m)) for m in seeds]
    rng = random.Random(11)
    texts += [fp.message_text(mutate(rng, rng.choice(seeds), seeds)) for _ in range(300)]
    texts += [
        "Dear Anna Schmidt,\n\nyour code is X8k2aLq0ZzP8mN3b, order 12345 of 2026-12-04 at 10:30.\n\n"
        "Visit HTTPS://WWW.Shop.Example/c/Xk29aLq0/7f3e?r=1 or www.Example.ORG. Mail ANNA.S@Example.org\n",
        "\n\n  > Hi Bob!\nGOOD  Morning Team:\nsee token abcdefghijkl (no digit) and abc-def_ghi/jk1 and 9f8e7d6c5b4a3f2e\n",
        "Sehr geehrter Herr Müller,\n\nIhre Bestellung Nr. ４５６ (full-width digits) ist unterwegs. STRASSE\n\n"
        "hello world 1234567890123 a1b2c3d4e5f6g7 ----------------------------------------1",
        "x" * 5000 + "\nDear Late Greeting,\n" + "word " * 100,
    ]
    return texts


def test_fast_normalization_equals_the_reference_on_corpus_and_mutated_text():
    need(CORPORA.is_dir(), f"shared corpora at {CORPORA}")
    texts = _texts()
    assert sum(t.isascii() for t in texts) > 100 and sum(not t.isascii() for t in texts) > 20
    differ = [t[:80] for t in texts if fp._paragraphs(fp._greeting_off(t)) != reference_paragraphs(t)]
    assert not differ, (len(differ), differ[:3])
