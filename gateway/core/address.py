"""RFC 5321 envelope paths (MAIL FROM / RCPT TO), with RFC 6531 SMTPUTF8.

This is deliberately stricter than RFC 5322 addr-spec: no comments, no
folding white space, no obsolete forms. It also recognises the address forms
that have been used to turn mail servers into open relays (source routes,
%-hacks, bang paths, quoted local parts hiding an ``@``) so the relay check can
refuse them whoever sends them.
"""
from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from dataclasses import dataclass

import idna

MAX_LOCAL = 64        # RFC 5321 4.5.3.1.1
MAX_PATH = 256        # RFC 5321 4.5.3.1.3 (including the angle brackets)
MAX_ADDRESS = MAX_PATH - 2
MAX_DNS_NAME = 253    # a textual DNS name (RFC 1035 255 octets on the wire)

# atext of RFC 5322 3.2.3
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_ATOM_ASCII = re.compile(rf"[{_ATEXT}]+\Z")
_ATOM_UTF8 = re.compile(rf"(?:[{_ATEXT}]|[^\x00-\x7f])+\Z")
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_QTEXT_OK = re.compile(r'(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*\Z')
_QTEXT_OK_UTF8 = re.compile(r'(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*\Z')
_DCONTENT = re.compile(r"[\x21-\x5a\x5e-\x7e]+\Z")
_HEX4 = re.compile(r"[0-9A-Fa-f]{1,4}\Z")
_IPV4 = re.compile(r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}\Z")
_TLD = re.compile(r"(?:[A-Za-z0-9-]*[A-Za-z]|xn--[A-Za-z0-9-]+)\Z")  # no real TLD ends in a digit


class AddressError(ValueError):
    """An envelope address the gateway will not take.

    ``kind`` is ``syntax`` (RFC 5321 violation), ``trick`` (a form used to abuse
    relays; refused under P-RELAY) or ``utf8`` (non-ASCII without SMTPUTF8).
    """

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class EnvelopeAddress:
    local: str            # local part as sent (quoted form kept, unquoted value in .local_value)
    domain: str           # domain as sent ("" for the null path)
    domain_ascii: str     # lower-case A-label form, or the literal "[..]" form
    is_literal: bool = False
    quoted: bool = False

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    @property
    def addr(self) -> str:
        """The address as it travels in the envelope (``local@domain``, or ``""``)."""
        if self.is_null:
            return ""
        return f"{self.local}@{self.domain}"

    @property
    def normalized(self) -> str:
        """The comparison form: local part as sent, domain as lower-case A-label."""
        if self.is_null:
            return ""
        return f"{self.local}@{self.domain_ascii}"

    @property
    def needs_smtputf8(self) -> bool:
        return not self.addr.isascii()

    def __str__(self) -> str:
        return self.addr


NULL_PATH = EnvelopeAddress("", "", "")


def _unsafe_unicode(text: str) -> str | None:
    """A character no mailbox name should hold: controls, format/bidi, private use,
    unassigned, surrogates, Unicode spaces and line separators (as email-validator)."""
    for ch in text:
        if ch < "\x80":
            continue
        cat = unicodedata.category(ch)
        if cat[0] in "CZ":
            return f"U+{ord(ch):04X} {unicodedata.name(ch, cat)}"
    return None


def _split_path(arg: str) -> tuple[str, str]:
    """Split ``<path> params`` into the path inside the brackets and the rest."""
    arg = arg.strip()
    if not arg.startswith("<"):
        # RFC 5321 requires the brackets; many clients send them, we insist.
        raise AddressError("syntax", "path must be enclosed in <>")
    # Find the closing bracket, honouring quoted strings.
    i, n, inq = 1, len(arg), False
    while i < n:
        c = arg[i]
        if inq:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                inq = False
        elif c == '"':
            inq = True
        elif c == ">":
            break
        i += 1
    else:
        raise AddressError("syntax", "missing closing >")
    path = arg[1:i]
    rest = arg[i + 1:]
    if rest and not rest.startswith(" "):
        raise AddressError("syntax", "garbage after >")
    return path, rest.strip()


def _parse_local(local: str, utf8: bool) -> tuple[str, bool]:
    if not local:
        raise AddressError("syntax", "empty local part")
    if len(local.encode("utf-8", "surrogatepass")) > MAX_LOCAL:
        raise AddressError("syntax", "local part longer than 64 octets")
    if not local.isascii():
        if not utf8:
            raise AddressError("utf8", "non-ASCII local part without SMTPUTF8")
        bad = _unsafe_unicode(local)
        if bad:
            raise AddressError("syntax", f"unsafe character {bad} in local part")
        if unicodedata.category(local[0].lstrip('"')[:1] or "a")[0] == "M" or \
                (local.startswith('"') and len(local) > 1 and unicodedata.category(local[1])[0] == "M"):
            raise AddressError("syntax", "local part starts with a combining character")
        nfc = unicodedata.normalize("NFC", local)
        if nfc != local:
            # Readers compare the NFC form (RFC 6532 3.1): it must be valid too,
            # or U+037E GREEK QUESTION MARK would smuggle in a ";".
            _parse_local(nfc, utf8)
    if local.startswith('"'):
        if len(local) < 2 or not local.endswith('"'):
            raise AddressError("syntax", "unterminated quoted local part")
        inner = local[1:-1]
        if not (_QTEXT_OK_UTF8 if utf8 else _QTEXT_OK).match(inner):
            if not utf8 and not inner.isascii():
                raise AddressError("utf8", "non-ASCII local part without SMTPUTF8")
            raise AddressError("syntax", "invalid character in quoted local part")
        value = re.sub(r"\\(.)", r"\1", inner)
        if "@" in value or "%" in value or "!" in value:
            raise AddressError("trick", "quoted local part hides a routing character")
        return local, True
    atom = _ATOM_UTF8 if utf8 else _ATOM_ASCII
    for part in local.split("."):
        if not part:
            raise AddressError("syntax", "empty atom in local part (leading, trailing or double dot)")
        if not atom.match(part):
            if not utf8 and not part.isascii():
                raise AddressError("utf8", "non-ASCII local part without SMTPUTF8")
            raise AddressError("syntax", "invalid character in local part")
    if "%" in local:
        raise AddressError("trick", "%-hack routing in local part")
    if "!" in local:
        raise AddressError("trick", "bang path in local part")
    return local, False


def _parse_literal(domain: str) -> str:
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):  # RFC 5321 spells the tag "IPv6"; taken in any case
        if not _ipv6_rfc5321(inner[5:]):
            raise AddressError("syntax", "invalid IPv6 address literal (RFC 5321 4.1.3)")
        try:
            ip = ipaddress.IPv6Address(inner[5:])
        except ValueError:
            raise AddressError("syntax", "invalid IPv6 address literal") from None
        return f"[IPv6:{ip.compressed}]"
    if not _IPV4.match(inner) and "." in inner and ":" not in inner:
        raise AddressError("syntax", "invalid IPv4 address literal")
    if ":" in inner:
        tag, _, content = inner.partition(":")
        if not _LDH_LABEL.match(tag) or not _DCONTENT.match(content or "-"):
            raise AddressError("syntax", "invalid general address literal")
        raise AddressError("syntax", f"unsupported address literal tag {tag!r}")
    try:
        ip4 = ipaddress.IPv4Address(inner)
    except ValueError:
        raise AddressError("syntax", "invalid IPv4 address literal") from None
    return f"[{ip4}]"


def _ipv6_rfc5321(s: str) -> bool:
    """The IPv6 address literal grammar of RFC 5321 4.1.3 (stricter than RFC 4291:
    "::" stands for at least two groups, so 7 groups plus "::" is refused)."""
    full, comp = 8, 6
    if "." in s:
        cut = s.rfind(":")
        if cut < 0 or not _IPV4.match(s[cut + 1:]):
            return False
        s = s[:cut + 1]
        if not s.endswith("::"):
            s = s[:-1]
        full, comp = 6, 4
    if "::" in s:
        left, sep, right = s.partition("::")
        if "::" in right:
            return False
        groups = (left.split(":") if left else []) + (right.split(":") if right else [])
        return len(groups) <= comp and all(_HEX4.match(g) for g in groups)
    groups = s.split(":")
    return len(groups) == full and all(_HEX4.match(g) for g in groups)


def parse_domain(domain: str, utf8: bool) -> str:
    """Validate a domain; return its lower-case A-label form."""
    if not domain:
        raise AddressError("syntax", "empty domain")
    if domain.endswith("."):
        raise AddressError("syntax", "domain ends with a dot")
    if not domain.isascii():
        if not utf8:
            raise AddressError("utf8", "non-ASCII domain without SMTPUTF8")
        try:
            ascii_domain = idna.encode(domain, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise AddressError("syntax", f"invalid internationalized domain ({exc})") from None
    else:
        ascii_domain = domain
    if len(ascii_domain) > MAX_DNS_NAME:
        raise AddressError("syntax", f"domain longer than {MAX_DNS_NAME} octets")
    labels = ascii_domain.split(".")
    for label in labels:
        if not label:
            raise AddressError("syntax", "empty label in domain")
        if not _LDH_LABEL.match(label):
            raise AddressError("syntax", f"invalid domain label {label[:70]!r}")
        if label[2:4] == "--" and label[:4].lower() != "xn--":
            raise AddressError("syntax", f"reserved label {label!r} (\"--\" in positions 3-4, RFC 5891 4.2.3.1)")
    if labels[-1].isdigit():
        raise AddressError("syntax", "top-level domain is numeric")
    if ascii_domain.lower().startswith("xn--") or "xn--" in ascii_domain.lower():
        try:
            idna.decode(ascii_domain)
        except idna.IDNAError as exc:
            raise AddressError("syntax", f"invalid A-label ({exc})") from None
    return ascii_domain.lower()


def _deliverable_domain(ascii_domain: str) -> None:
    """A mailbox domain the Internet can route to: at least two labels and a real-looking TLD."""
    if "." not in ascii_domain:
        raise AddressError("syntax", "domain has no dot (not a public mail domain)")
    if not _TLD.match(ascii_domain.rsplit(".", 1)[1]):
        raise AddressError("syntax", "top-level domain must end with a letter (or be an A-label)")


def parse_mailbox(mailbox: str, utf8: bool) -> EnvelopeAddress:
    """Parse ``local@domain`` (no brackets)."""
    if mailbox.startswith("@"):
        raise AddressError("trick", "source route")
    # The local part may be quoted and contain '@': split at the last '@'
    # outside quotes.
    at = -1
    inq = False
    i = 0
    while i < len(mailbox):
        c = mailbox[i]
        if inq:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                inq = False
        elif c == '"':
            inq = True
        elif c == "@":
            at = i
        i += 1
    if inq:
        raise AddressError("syntax", "unterminated quoted string")
    if at < 0:
        raise AddressError("syntax", "missing @domain")
    local, domain = mailbox[:at], mailbox[at + 1:]
    if "@" in local and not local.startswith('"'):
        raise AddressError("trick", "several @ in address")
    if any(c in mailbox for c in "\r\n\x00"):
        raise AddressError("syntax", "control character in address")
    local, quoted = _parse_local(local, utf8)
    if domain.startswith("[") and domain.endswith("]"):
        return EnvelopeAddress(local, domain, _parse_literal(domain), is_literal=True, quoted=quoted)
    if not domain.isascii() and utf8:
        bad = _unsafe_unicode(domain)
        if bad:
            raise AddressError("syntax", f"unsafe character {bad} in domain")
    ascii_domain = parse_domain(domain, utf8)
    _deliverable_domain(ascii_domain)
    measured = local if local.isascii() else unicodedata.normalize("NFC", local)
    if len(measured.encode("utf-8", "surrogatepass")) + 1 + max(len(domain.encode("utf-8")), len(ascii_domain)) > MAX_ADDRESS:
        raise AddressError("syntax", f"address longer than {MAX_ADDRESS} octets")
    return EnvelopeAddress(local, domain, ascii_domain, quoted=quoted)


@functools.lru_cache(maxsize=8192)
def parse_path(arg: str, *, utf8: bool, allow_null: bool) -> tuple[EnvelopeAddress, str]:
    """Parse a MAIL FROM / RCPT TO argument (after ``FROM:``/``TO:``).

    Returns the address and the parameter string. Raises :class:`AddressError`.
    """
    path, rest = _split_path(arg)
    if len(path.encode("utf-8", "surrogatepass")) + 2 > MAX_PATH:
        raise AddressError("syntax", "path longer than 256 octets")
    if path == "":
        if not allow_null:
            raise AddressError("syntax", "null path not allowed here")
        return NULL_PATH, rest
    if path.startswith("@"):
        # A-d-l source route: "@a,@b:user@c" (RFC 5321 4.1.2 says receivers
        # MUST accept it and SHOULD ignore the route; an open-relay vector
        # nonetheless, and no legitimate client sends it any more).
        raise AddressError("trick", "source route")
    if path != path.strip() or " " in path.replace('\\ ', '') and not path.startswith('"'):
        raise AddressError("syntax", "white space in address")
    return parse_mailbox(path, utf8), rest


_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?\Z")


def parse_params(rest: str) -> dict[str, str | bool]:
    """ESMTP parameters (RFC 5321 4.1.2 esmtp-param); raises AddressError on bad syntax."""
    params: dict[str, str | bool] = {}
    for token in rest.split():
        m = _PARAM.match(token)
        if not m:
            raise AddressError("syntax", f"bad parameter {token[:40]!r}")
        key = m.group(1).upper()
        params[key] = m.group(2) if m.group(2) is not None else True
    return params
