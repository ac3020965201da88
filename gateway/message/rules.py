"""The header rules of issue 5 over a parsed header block (:mod:`gateway.message.parse`).

``check_structure`` (hdr.*), ``check_trace`` (trace.*) and ``check_subject``
(subj.*), with the helpers they share with the check modules (related domains,
display names, quoted earlier messages).

Everything here is pure: a parsed header block, the message bytes and settings
in, :class:`Finding` lists out. The check modules in ``gateway/checks/data_*.py``
decide what to do with them.
"""
from __future__ import annotations

import binascii
import re
from typing import Iterator

from .findings import Finding
from .parse import (Mailbox, ParsedHeaders, address_count, check_mime, clip, date_timestamp, decode_lenient,
                    decoded_once, parse_received, parsed_address_list, valid_message_id)
from .settings import HeaderSettings

# --------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------

# Fields that RFC 5322 3.6 allows at most once (From and Date exactly once).
SINGULAR = ("from", "date", "sender", "reply-to", "to", "cc", "bcc", "message-id",
            "in-reply-to", "references", "subject")
REQUIRED = ("from", "date")
_CANON = {"from": "From", "date": "Date", "sender": "Sender", "reply-to": "Reply-To", "to": "To",
          "cc": "Cc", "bcc": "Bcc", "message-id": "Message-ID", "in-reply-to": "In-Reply-To",
          "references": "References", "subject": "Subject"}
# Address headers and whether they take a group (RFC 5322 3.6.2/3.6.3/3.6.6).
ADDRESS_FIELDS = {"from": False, "sender": False, "reply-to": True, "to": True, "cc": True,
                  "bcc": True, "resent-from": False, "resent-sender": False, "resent-to": True,
                  "resent-cc": True, "resent-bcc": True}


def check_structure(data: bytes, parsed: ParsedHeaders, settings: HeaderSettings, now: float | None,
                    ) -> list[Finding]:
    """RFC 5322 structural findings (hdr.*). ``now`` is epoch seconds, None = no window."""
    out: list[Finding] = list(parsed.defects)
    idx = parsed.index
    fields = parsed.fields
    if "from" not in idx:
        out.append(Finding("hdr.required", "missing From header"))
    if "date" not in idx:  # its own id: with an account the gateway may add one (RFC 6409 8)
        out.append(Finding("hdr.date_missing", "no Date header"))
    if len(idx) != len(fields):  # some field name occurs more than once
        for name in SINGULAR:
            pos = idx.get(name)
            if pos is not None and len(pos) > 1:
                out.append(Finding("hdr.duplicate", f"duplicate {_CANON[name]} header"))
    # addresses
    from_boxes: list[Mailbox] | None = None
    for name, allow_group in ADDRESS_FIELDS.items():
        positions = idx.get(name)
        if positions is None:
            continue
        for i in positions:
            fname, value = fields[i]
            if not value.strip():
                if name == "bcc":
                    continue  # RFC 5322 3.6.3: Bcc may be empty
                out.append(Finding("hdr.address", f"{fname} header is empty"))
                continue
            if name == "from":  # the mailboxes themselves are wanted by check_subject too
                boxes, err = parsed_address_list(parsed, value, allow_group)
                count = len(boxes)
            else:
                count, err = address_count(value, allow_group)
            if err is not None:
                out.append(Finding("hdr.address", f"{fname} header does not parse: {err}"))
                continue
            if name == "from":
                if not boxes:
                    out.append(Finding("hdr.address", "From header holds no mailbox"))
                from_boxes = boxes if from_boxes is None else from_boxes
            elif name in ("sender", "resent-sender") and count != 1:
                out.append(Finding("hdr.address", f"{fname} must hold exactly one mailbox"))
    if from_boxes is not None and len(from_boxes) > 1 and "sender" not in idx:
        out.append(Finding("hdr.from_sender", f"From holds {len(from_boxes)} mailboxes and there is no Sender"))
    # date
    positions = idx.get("date")
    if positions:
        date_value = fields[positions[0]][1]
        try:
            ts = date_timestamp(date_value)
        except ValueError as exc:
            out.append(Finding("hdr.date", f"Date {clip(date_value, 40)!r}: {exc}"))
        else:
            if now is not None:
                delta = ts - now
                if delta > settings.date_future_seconds:
                    out.append(Finding("hdr.date_window",
                                       f"Date is {_human(delta)} in the future (limit {_human(settings.date_future_seconds)})"))
                elif -delta > settings.date_past_seconds:
                    out.append(Finding("hdr.date_window",
                                       f"Date is {_human(-delta)} in the past (limit {_human(settings.date_past_seconds)})"))
    # message-id
    positions = idx.get("message-id")
    if not positions:
        out.append(Finding("hdr.message_id_missing", "no Message-ID header"))
    else:
        mid = fields[positions[0]][1]
        if not valid_message_id(mid):
            out.append(Finding("hdr.message_id", f"Message-ID {clip(mid, 50)!r} is not <left@right>"))
    # encoded-words
    for fname, value in fields:
        if "=?" in value:
            word_err = decoded_once(parsed, value)[1]
            if word_err is not None:
                out.append(Finding("hdr.encoded_word", f"{fname}: {word_err}"))
                break
    # MIME
    if "content-type" in idx or "content-transfer-encoding" in idx:
        out.extend(check_mime(data, parsed, settings.mime_max_depth))
    return out


def _human(seconds: float) -> str:
    s = int(abs(seconds))
    if s >= 86400:
        return f"{s / 86400:.1f} days"
    if s >= 3600:
        return f"{s / 3600:.1f} hours"
    if s >= 60:
        return f"{s // 60} minutes"
    return f"{s} seconds"


# --- trace (P-PATH) ------------------------------------------------------------------------


def check_trace(parsed: ParsedHeaders, settings: HeaderSettings, hostnames: list[str] | tuple[str, ...],
                trace_header: str = "X-Gateway-Trace") -> list[Finding]:
    """Client-supplied trace that claims to be the gateway's (trace.*)."""
    out: list[Finding] = []
    if parsed.has(trace_header):
        out.append(Finding("trace.forged_header", f"client supplied the gateway's own {trace_header} header"))
    received = parsed.index.get("received")
    if not received:
        return out
    own = {h.lower().rstrip(".") for h in hostnames if h}
    if own:
        for i in received:
            value = parsed.fields[i][1]
            low = value.lower()
            if not any(h in low for h in own):
                continue  # cheap pre-filter: most trace lines name none of our hosts
            r = parse_received(value)
            for clause in ("by", "from", "helo"):
                host = r.get(clause)
                if host and host.lower().rstrip(".") in own:
                    out.append(Finding("trace.forged_received",
                                       f"Received header claims {clause} {host}, a host of this gateway"))
                    return out
    return out


# --- misleading headers (P-SUBJ / P-FORGE) ------------------------------------------------------

# A reply marker at the start of the Subject: Re (every language), Aw (German
# "Antwort"), Antw (Dutch), any case, an optional counter ("Re[2]:", "Re(2):").
# Forward markers (Fwd/Fw, WG, TR, Doorst, RV, I) are deliberately not here: a
# forward starts a new thread (RFC 5322 3.6.4 ties In-Reply-To/References to
# replies), so a forward without them is normal and never a fake reply.
_REPLY_MARK = re.compile(r"\s*(re|aw|antw)\s*(?:\[\d+\]|\(\d+\))?\s*:", re.I)
# How much of the body the fake-reply rule reads for quoted text (hot path:
# only messages with a reply marker and no thread headers are searched at all).
REPLY_BODY_PREFIX = 32 * 1024
# Text of the earlier message quoted in the body, as the real clients write it
# (quotes_earlier_message). Searched in the lower-cased bytes as sent:
# quoted-printable leaves all of it readable (a "=3d" may stand for "=");
# base64 text is decoded first (_reply_texts). Every search starts with a
# literal (bytes.find, or a regex whose first character is a literal), so a
# 32 KiB body costs about a dozen C-speed scans.
_QUOTE_LINE_STARTS = (b">", b"&gt;")          # >-quoted lines (HTML-escaped in Hotmail/MSN)
# Outlook "-----Original Message-----" (and in German, French, Dutch, Spanish,
# Italian), Hotmail "----Original Message Follows----"
_SEPARATOR = re.compile(rb"---+[ \t]*(?:original message|urspr(?:\xc3\xbc|\xfc|=c3=bc|=fc|ue)ngliche nachricht"
                        rb"|message d'origine|oorspronkelijk bericht|mensaje original|messaggio originale)")
# HTML: Outlook / Exchange (Windows, Mac) reply header, Gmail, Yahoo
_HTML_MARKERS = (b"divrplyfwdmsg", b"olk_src_body_section")
_QUOTE_CLASSES = (b"gmail_", b"yahoo_")        # gmail_quote, yahoo_quoted: found through "quote"
_CITE = re.compile(rb"<blockquote[^>]{0,200}?type=(?:3d)?[\"']?cite")  # Apple Mail, Thunderbird
# Attribution lines end with a colon: "On .. Bob wrote:", AOL's "In a message
# dated .., Bob writes:", "Bob a écrit :", "Bob escribió:", "Bob ha scritto:";
# German and Dutch put the name after the verb: "Am .. schrieb Bob <b@x.de>:",
# "Op .. schreef Bob:". A colon at a line end (or before HTML markup) is found
# first, then the line before it is read.
_COLON_EOL = re.compile(rb":[ \t]*(?:\r?\n|<|=\r?\n|\Z)")
_ATTRIBUTION_ENDS = (b"wrote", b"writes", b"ha scritto", b"escribi\xc3\xb3", b"escribi\xf3", b"escribi=c3=b3",
                     b"escribi=f3", b"escribio", b"a \xc3\xa9crit", b"a \xe9crit", b"a =c3=a9crit", b"a =e9crit",
                     b"a &eacute;crit", b"a &#233;crit", b"a ecrit")
_ATTRIBUTION_VERBS = (b"schrieb", b"schreef")
# French puts a (no-break) space before the colon: "a écrit :", U+00A0 / U+202F, raw, QP or HTML
_TRAILING_SPACE = re.compile(rb"(?:[ \t\xa0]|\xc2\xa0|=c2=a0|=a0|&nbsp;|\xe2\x80\xaf|=e2=80=af)+\Z")
_SPACE_ENDS = (b" ", b"\t", b"\xa0", b"=a0", b"&nbsp;", b"\xaf", b"=af")
# Outlook's header block of the earlier message: "From: .." at a line start or
# right after an HTML tag, and on that line or the next "Sent: .." (bold
# "*From:*" in plain text, <b>From:</b> in HTML).
_HEADER_FROM = re.compile(rb"[\n>][ \t]*\*?(?:from|von|de|van)[ \t]?:")  # at a line start or after a tag
_SENT = re.compile(rb"(?:sent|gesendet|envoy[^\s:]{0,8}|verzonden|enviado|inviato)[ \t]?:")
_MAX_HITS = 64  # occurrences of one key examined per text
# a MIME part in the body prefix: boundary line, its header lines, then base64-alphabet lines
_B64_TEXT_PART = re.compile(
    rb"^--[^\r\n]*\r?\n((?:[^\r\n]+\r?\n){1,30}?)\r?\n([A-Za-z0-9+/=\r\n]+)", re.M)
_TEXT_PART = re.compile(rb"^content-type[ \t]*:[ \t]*text/", re.M)  # in lower-cased part headers
_OBFUSCATION = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_EMAIL_IN_NAME = re.compile(r"[^\s<>\"'@(),;:\[\]]+@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                            r"[A-Za-z][A-Za-z0-9-]*[A-Za-z0-9])")
_DOMAIN_IN_NAME = re.compile(r"(?<![\w@.\-])((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                             r"([A-Za-z]{2,24}|xn--[A-Za-z0-9-]+))(?![\w@\-]|\.[A-Za-z0-9])")
# Top-level domains that ordinary words rarely end in ("St.Louis" must not count as a domain).
_COMMON_TLDS = frozenset("""com net org info biz edu gov mil int name pro mobi asia tel aero coop jobs
travel io app dev xyz online site shop store club top live email link click page cloud tech ai
icu vip win bid loan work fun space website digital today news blog group global world agency
services solutions support company business finance bank money pay""".split())
_LIST_HEADERS = ("list-id", "list-unsubscribe", "list-post", "list-help", "x-mailman-version",
                 "mailing-list", "x-majordomo-version")
_SECOND_LEVEL = frozenset("co com net org gov edu ac ne or go gob mil nic ltd plc sch".split())
_LOOKALIKE = str.maketrans({"0": "o", "1": "l", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "|": "l"})


def org_domain(domain: str) -> str:
    """A cheap organizational-domain guess (last two labels, three under co.uk-style suffixes)."""
    labels = domain.lower().rstrip(".").split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def related_domains(a: str, b: str) -> bool:
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    return a == b or a.endswith("." + b) or b.endswith("." + a) or org_domain(a) == org_domain(b)


def is_bulk(parsed: ParsedHeaders, extra: dict) -> bool:
    """List or bulk mail: registry said so, or the message says so itself."""
    if extra.get("list") is not None or extra.get("bulk"):
        return True
    if not parsed.index.keys().isdisjoint(_LIST_HEADERS):
        return True
    prec = parsed.get("precedence")
    return prec is not None and prec.strip().lower() in ("bulk", "list")


def display_text(box: Mailbox) -> str:
    """What a mail reader shows as the mailbox's name: the display name, and the text
    of comments around it (old ``addr (Name)`` form), encoded-words decoded."""
    display = decode_lenient(box.display)
    if box.comment:
        display = f"{display} {decode_lenient(box.comment)}".strip()
    return display


def display_domains(display: str) -> tuple[list[str], list[str]]:
    """Domains a display name shows: (domains of the e-mail addresses in it, bare domain names)."""
    # both patterns need a literal "@" / "." : most display names hold neither
    addresses = [m.group(1).lower() for m in _EMAIL_IN_NAME.finditer(display)] if "@" in display else []
    rest = _EMAIL_IN_NAME.sub(" ", display) if addresses else display
    bare: list[str] = []
    if "." not in rest:
        return addresses, bare
    for m in _DOMAIN_IN_NAME.finditer(rest):
        tld = m.group(2).lower()
        if len(tld) == 2 or tld in _COMMON_TLDS or tld.startswith("xn--"):
            bare.append(m.group(1).lower())
    return addresses, bare


def _own_domain(domain: str, own: tuple[str, ...]) -> bool:
    """``domain`` is one of ``own`` (the account's sender domains) or below one of them."""
    return any(domain == d or domain.endswith("." + d) for d in own)


def brand_in_name(display: str, brands: dict[str, str]) -> tuple[str, str] | None:
    if not brands:
        return None
    norm = " " + re.sub(r"[^a-z0-9]+", " ", display.lower().translate(_LOOKALIKE)) + " "
    for brand, dom in brands.items():
        b = " " + re.sub(r"[^a-z0-9]+", " ", brand.lower()).strip() + " "
        if b in norm:
            return brand, dom
    return None


def _reply_texts(data: bytes, parsed: ParsedHeaders) -> list[bytes]:
    """The first REPLY_BODY_PREFIX bytes of the body, and the base64 text in them
    decoded (a base64 body, or base64 text/* parts of a multipart)."""
    start = parsed.body_start
    raw = data[start:start + REPLY_BODY_PREFIX]
    out = [raw]
    cte = parsed.get("content-transfer-encoding")
    if cte is not None and cte.strip().lower() == "base64":
        ct = (parsed.get("content-type") or "text/plain").strip().lower()
        if ct.startswith("text/"):
            out.append(_b64_prefix(raw))
    elif b"ase64" in raw:  # cheap pre-filter for "base64"/"Base64"
        for m in _B64_TEXT_PART.finditer(raw):
            head = m.group(1).lower()
            if b"base64" in head and _TEXT_PART.search(head):
                out.append(_b64_prefix(m.group(2)))
    return out


def _b64_prefix(block: bytes) -> bytes:
    """The bytes a (possibly cut-off) base64 block decodes to, as far as it is whole."""
    m = re.match(rb"(?:[A-Za-z0-9+/=]+\r?\n)*", block)
    text = re.sub(rb"\s+", b"", block[:m.end()] if m else b"")
    text = text[:len(text) - len(text) % 4]
    try:
        return binascii.a2b_base64(text)
    except binascii.Error:
        return b""


def quotes_earlier_message(data: bytes, parsed: ParsedHeaders) -> bool:
    """The body's first REPLY_BODY_PREFIX bytes hold quoted text of an earlier
    message, in one of the forms real mail clients write: >-quoted lines,
    Outlook's "-----Original Message-----" or From:/Sent: block, an attribution
    line ("On .. wrote:", "Am .. schrieb ..:", "Le .. a écrit :", AOL's
    "In a message dated .. writes:"), or the HTML quote markers of Apple Mail /
    Thunderbird (<blockquote type="cite">), Outlook (divRplyFwdMsg), Gmail
    (gmail_quote), Yahoo and Thunderbird."""
    return any(_quotes(t) for t in _reply_texts(data, parsed))


def _quotes(text: bytes) -> bool:
    if text.startswith(_QUOTE_LINE_STARTS) or b"\n>" in text or b"\n&gt;" in text:
        return True
    low = text.lower()
    if _SEPARATOR.search(low) or any(k in low for k in _HTML_MARKERS):
        return True
    for i in _hits(low, b"quote"):
        if low.endswith(_QUOTE_CLASSES, 0, i) or (low.endswith(b"<block", 0, i) and _CITE.match(low, i - 6)):
            return True
    for n, m in enumerate(_COLON_EOL.finditer(low)):
        if n >= _MAX_HITS:
            break
        i = m.start()
        line = low[max(low.rfind(b"\n", 0, i) + 1, i - 300):i]
        line = _TRAILING_SPACE.sub(b"", line) if line.endswith(_SPACE_ENDS) else line
        if line.endswith(_ATTRIBUTION_ENDS) or any(v in line for v in _ATTRIBUTION_VERBS):
            return True
    for n, m in enumerate(_HEADER_FROM.finditer(b"\n" + low[:REPLY_BODY_PREFIX])):
        if n >= _MAX_HITS:
            break
        e = m.end() - 1  # offset in low (one "\n" was put in front)
        stop = low.find(b"\n", low.find(b"\n", e) + 1)
        if _SENT.search(low, e, stop if stop >= 0 else len(low)):
            return True
    return False


def _hits(text: bytes, word: bytes) -> Iterator[int]:
    """Offsets of the first _MAX_HITS occurrences of ``word`` in ``text``."""
    i = text.find(word)
    n = 0
    while i >= 0 and n < _MAX_HITS:
        yield i
        n += 1
        i = text.find(word, i + len(word))


def _discussion_list(parsed: ParsedHeaders) -> bool:
    """List-Post names where members post (RFC 2369; "List-Post: NO" = announce-only)."""
    for v in parsed.get_all("list-post"):
        if "<" in v and not v.strip().lower().startswith("no"):
            return True
    return False


def check_subject(data: bytes, parsed: ParsedHeaders, settings: HeaderSettings, extra: dict,
                  own_domains: tuple[str, ...] | list[str] = ()) -> list[Finding]:
    """Misleading-header findings (subj.*).

    Fake replies: a Subject that starts with a reply marker (Re/Aw/Antw, see
    _REPLY_MARK; forwards never count) is a real reply when the message has
    In-Reply-To or References, an Outlook/Exchange Thread-Index, or quoted
    text of the earlier message in the first REPLY_BODY_PREFIX bytes of its
    body (quotes_earlier_message). Otherwise the evidence of a fake is
    *strong*, and ``subj.fake_reply_bulk`` (refused by default) is reported,
    only when all of these hold: the message is list or bulk mail
    (is_bulk), it is not discussion-list mail (no List-Post naming where
    members post: on a discussion list a member's short reply from a client
    that writes no thread headers is ordinary). A base64 text body or text
    part is decoded before it is searched. Any other reply marker without
    evidence is ``subj.fake_reply`` (flagged by default).

    Display names: an e-mail address shown in a From display name whose
    domain is neither related to the From domain (related_domains) nor one
    of ``own_domains`` (the account's verified/approved sender domains, and
    below them) is ``subj.display_name`` (refused by default, P-FORGE); a bare
    domain-like word ("CNET News.com Daily Dispatch") is ``subj.display_domain``
    (flagged by default): brands often look like domains.
    """
    out: list[Finding] = []
    bulk = is_bulk(parsed, extra)
    idx = parsed.index
    fields = parsed.fields
    positions = idx.get("subject")
    if positions:
        decoded = decoded_once(parsed, fields[positions[0]][1])[0]
        m = _REPLY_MARK.match(decoded)
        if (m and "in-reply-to" not in idx and "references" not in idx and "thread-index" not in idx
                and not quotes_earlier_message(data, parsed)):
            marker = m.group(1) + ":"
            why = "but has no In-Reply-To, References or Thread-Index and quotes no earlier message"
            if not bulk:
                out.append(Finding("subj.fake_reply", f"message Subject starts with {marker!r} {why}"))
            elif _discussion_list(parsed):
                out.append(Finding("subj.fake_reply",
                                   f"discussion-list mail (List-Post) Subject starts with {marker!r} {why}"))
            else:
                out.append(Finding("subj.fake_reply_bulk", f"list/bulk mail Subject starts with {marker!r} {why}"))
        m = _OBFUSCATION.search(decoded)
        if m:
            out.append(Finding("subj.obfuscated",
                               f"Subject decodes to control or bidi character U+{ord(m.group()):04X}"))
    positions = idx.get("from")
    boxes: list[Mailbox] = parsed_address_list(parsed, fields[positions[0]][1], False)[0] if positions else []
    brands = settings.brand_domains
    own = tuple(d.lower().rstrip(".") for d in own_domains)
    for box in boxes:
        display = display_text(box)
        if not display:
            continue
        dom = box.domain_lower.strip("[]")
        addresses, bare = display_domains(display)
        for shown in addresses:
            if not related_domains(shown, dom) and not _own_domain(shown, own):
                out.append(Finding("subj.display_name",
                                   f"From display name shows an address in {shown} but the address is in {dom}"))
                break
        else:
            for shown in bare:
                if not related_domains(shown, dom) and not _own_domain(shown, own):
                    out.append(Finding("subj.display_domain",
                                       f"From display name shows the domain name {shown} but the address is in {dom}"))
                    break
        hit = brand_in_name(display, brands) if brands else None
        if hit and not related_domains(hit[1], dom):
            out.append(Finding("subj.brand",
                               f"From display name names {hit[0]} (would impersonate {hit[1]}) but the address is in {dom}"))
    if bulk and boxes:
        for i in idx.get("reply-to", ()):
            rts, err = parsed_address_list(parsed, fields[i][1], True)
            if err is not None:
                continue
            for rt in rts:
                if not any(related_domains(rt.domain, b.domain) for b in boxes):
                    out.append(Finding("subj.reply_to_domain",
                                       f"list/bulk mail with Reply-To in {rt.domain_lower}, From in {boxes[0].domain_lower}"))
                    break
    return out
