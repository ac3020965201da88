"""Keyed hashes and signed tokens of the registry (pure: no I/O).

Everything is derived from the one configured secret, with a separate
sub-key per purpose, so a value made for one purpose never verifies as
another.

- ``address_hash(list, address)``: 12 bytes of HMAC-SHA256 over the list id and
  the normalized address. It is the only trace of an opted-out address (the
  list's suppression set), the key of the subscription cache and of the
  invalidation messages, and it is carried in unsubscribe tokens. Bound to the
  list, so the same person is not linkable across lists.
- unsubscribe token (no expiry: links in old mail must keep working, RFC 8058):
  ``01 | list id (8) | address hash (12) | MAC (10)`` = 31 bytes, 50 characters
  of lower-case base32: fits a mailto local part (``u+TOKEN@host``, at most 64
  octets) and survives case changes and subject lines.
- confirmation token: ``02 | list id (8) | address hash (12) | nonce (8) |
  expiry (4, unix seconds) | MAC (12)`` = 45 bytes, 72 characters. The nonce is
  stored with the pending subscriber and renewed when the subscription is
  started again, so an old link cannot confirm a later attempt.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
from dataclasses import dataclass

from .model import TokenError

_UNSUB = 1
_CONFIRM = 2
_UNSUB_LEN = 1 + 8 + 12 + 10
_CONFIRM_LEN = 1 + 8 + 12 + 8 + 4 + 12
UNSUBSCRIBE_TOKEN_CHARS = 50
CONFIRM_TOKEN_CHARS = 72


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _unb32(text: str) -> bytes:
    text = text.strip().upper()
    if not text or len(text) > 200 or not text.isalnum():
        raise TokenError("the link is damaged or not one of ours")
    try:
        return base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        raise TokenError("the link is damaged or not one of ours") from None


def _list_bytes(list_id: str) -> bytes:
    try:
        raw = bytes.fromhex(list_id)
    except ValueError:
        raw = b""
    if len(raw) != 8:
        raise ValueError(f"list id {list_id!r} is not 16 hex digits")
    return raw


@dataclass(frozen=True, slots=True)
class UnsubscribeClaim:
    list_id: str
    address_hash: str          # hex


@dataclass(frozen=True, slots=True)
class ConfirmClaim:
    list_id: str
    address_hash: str
    nonce: str                 # hex
    expires: int


class Keys:
    """The sub-keys derived from the configured secret."""

    def __init__(self, secret: bytes):
        if len(secret) < 16:
            raise ValueError("the registry secret must be at least 16 bytes")
        self._addr = self._derive(secret, b"address-hash")
        self._token = self._derive(secret, b"token")

    @staticmethod
    def _derive(secret: bytes, purpose: bytes) -> bytes:
        return hmac.new(secret, b"gateway-registry/" + purpose, hashlib.sha256).digest()

    # ------------------------------------------------------------- hashes
    def address_hash(self, list_id: str, normalized_address: str) -> str:
        msg = _list_bytes(list_id) + b"\0" + normalized_address.encode("utf-8", "surrogatepass")
        return hmac.new(self._addr, msg, hashlib.sha256).digest()[:12].hex()

    def _mac(self, payload: bytes, size: int) -> bytes:
        return hmac.new(self._token, payload, hashlib.sha256).digest()[:size]

    # ------------------------------------------------------------- unsubscribe
    def unsubscribe_token(self, list_id: str, address_hash: str) -> str:
        payload = bytes([_UNSUB]) + _list_bytes(list_id) + bytes.fromhex(address_hash)
        return _b32(payload + self._mac(payload, 10))

    def read_unsubscribe(self, token: str) -> UnsubscribeClaim:
        raw = _unb32(token)
        if len(raw) != _UNSUB_LEN or raw[0] != _UNSUB:
            raise TokenError("the link is damaged or not one of ours")
        payload, mac = raw[:-10], raw[-10:]
        if not hmac.compare_digest(mac, self._mac(payload, 10)):
            raise TokenError("the link is damaged or not one of ours")
        return UnsubscribeClaim(payload[1:9].hex(), payload[9:21].hex())

    # ------------------------------------------------------------- confirm
    def confirm_token(self, list_id: str, address_hash: str, nonce: str, expires: float) -> str:
        payload = (bytes([_CONFIRM]) + _list_bytes(list_id) + bytes.fromhex(address_hash)
                   + bytes.fromhex(nonce) + struct.pack(">I", int(expires)))
        return _b32(payload + self._mac(payload, 12))

    def read_confirm(self, token: str, now: float) -> ConfirmClaim:
        raw = _unb32(token)
        if len(raw) != _CONFIRM_LEN or raw[0] != _CONFIRM:
            raise TokenError("the link is damaged or not one of ours")
        payload, mac = raw[:-12], raw[-12:]
        if not hmac.compare_digest(mac, self._mac(payload, 12)):
            raise TokenError("the link is damaged or not one of ours")
        (expires,) = struct.unpack(">I", payload[29:33])
        if now > expires:
            raise TokenError("the link has expired", expired=True)
        return ConfirmClaim(payload[1:9].hex(), payload[9:21].hex(), payload[21:29].hex(), expires)


def api_key_hash(key: str) -> str:
    """API keys are 32 random bytes: a plain SHA-256 is enough to store them."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
