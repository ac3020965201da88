"""Bounded fuzzing of the pure parsers (issue 11), and the crashes it found.

bench/fuzz_parsers.py mutates real-world seeds (shared/corpora) with hostile
fragments and feeds them to the address, header, MIME, date, Received and
wire parsers. Here it runs a fixed count with fixed seeds, so CI sees the
same inputs every time; `python bench/fuzz_parsers.py --iterations N` runs
longer. A parser may only raise its documented error.

The crash it found first: an encoded-word whose charset name holds an 8-bit
byte or a NUL (``codecs.lookup`` raises ValueError / UnicodeEncodeError, not
LookupError), and codecs that are not text encodings (base64, rot13,
undefined). Such a message could be neither relayed nor refused: the client
got 451 4.3.0 on every attempt.
"""
from __future__ import annotations

import email.utils
import time

import pytest

from bench.fuzz_parsers import TARGETS, load_seeds, run
from gateway.message.parse import EncodedWordError, decode_lenient, decode_words, parse_content_type
from smtp_client import send


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fuzz_parsers_raise_only_their_documented_errors(seed):
    report = run(4000, seed)
    assert report.crashes == []
    # every target got its share of the inputs
    assert all(n >= 4000 // 3 - 1 for n in report.per_target.values()), report.per_target


def test_fuzz_seeds_come_from_the_corpora():
    seeds = load_seeds()
    assert len(seeds["message"]) >= 100          # SpamAssassin ham + spam, mail-parser mails
    assert len(seeds["address"]) >= 100          # the is_email vectors
    assert len(seeds["line"]) >= 100             # Received and Date vectors
    assert {t.kind for t in TARGETS} == set(seeds)


@pytest.mark.parametrize("word", [
    "=?\xff?Q?x?=", "=?x\x00y?B?QQ==?=", "=?\udcff?Q?x?=", "=?é?Q?x?=",
    "=?base64?B?QQ==?=", "=?rot13?Q?nop?=", "=?zlib?B?eJwDAAAAAAE=?=", "=?undefined?Q?x?=",
])
def test_bad_charset_names_are_an_encoded_word_error(word):
    with pytest.raises(EncodedWordError):
        decode_words(f"Hello {word}")
    assert decode_lenient(f"Hello {word}") == f"Hello {word}"


def test_rfc2231_parameter_with_a_bad_charset_falls_back_to_utf8():
    ct = parse_content_type("text/plain; name*=base64''caf%C3%A9; x*=\x00''a")
    assert ct is not None
    assert ct[1]["name"] == "café"


async def test_bad_charset_in_a_subject_gets_a_clear_refusal_not_451(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    msg = (b"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.org>\r\n"
           b"Subject: =?\xc3\xa9?Q?caf=C3=A9?=\r\nDate: " + email.utils.formatdate(time.time()).encode() +
           b"\r\nMessage-ID: <%d@example.com>\r\n\r\nbody\r\n" % time.time_ns())
    r = await send(h.port(), msg, params=" SMTPUTF8 BODY=8BITMIME")
    assert r.decode("utf-8", "replace") == (
        "550 5.6.0 P-HDR Invalid header: Subject: unknown charset 'é' in encoded-word [hdr.encoded_word]")
    assert sink.messages == []
