"""Password hashing with scrypt (a slow, memory-hard KDF from the standard library).

Format: ``scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>``. Verification runs in a
worker thread so a login never stalls the event loop; one verification needs
``128 * r * n`` bytes (128 MiB at n = 2^17, r = 8), so the account store caps
how many run at once (``auth.max_concurrent_verifications``).

The cost ``n`` is ``auth.scrypt_n`` (docs/sender-auth.md, "Password hashes":
the measured cost per AUTH and why the default is what it is).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os

R, P, DKLEN = 8, 1, 32
MIN_N = 2 ** 14          # the least auth.scrypt_n the config takes (unless auth.insecure_test_scrypt)
MAX_N = 2 ** 17          # the most: 128 MiB per verification at r = 8
DEFAULT_N = 2 ** 15      # see docs/sender-auth.md for the figures behind this choice
# scrypt refuses to allocate more than this (a stored hash with a larger n fails to verify).
_MAXMEM = 2 * 128 * R * MAX_N


def memory_per_verify(n: int, r: int = R) -> int:
    """Bytes one scrypt verification at (n, r) allocates."""
    return 128 * r * n


def hash_password(password: str | bytes, n: int = DEFAULT_N) -> str:
    if isinstance(password, str):
        password = password.encode("utf-8")
    salt = os.urandom(16)
    dk = hashlib.scrypt(password, salt=salt, n=n, r=R, p=P, dklen=DKLEN, maxmem=_MAXMEM)
    return _encode(n, salt, dk)


def _encode(n: int, salt: bytes, dk: bytes) -> str:
    b64 = base64.b64encode
    return f"scrypt${n}${R}${P}${b64(salt).decode()}${b64(dk).decode()}"


def hash_params(encoded: str) -> tuple[int, int, int] | None:
    """(n, r, p) of an encoded hash, or None if it is not one of ours."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return None
    try:
        return int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        return None


def dummy_hash(n: int) -> str:
    """A hash with the parameters real ones get at cost ``n``, that no password
    matches (random salt and digest; nothing is computed). Verifying against it
    for an unknown account costs what a known account costs, so the time of an
    AUTH does not tell which account names exist (P-HARVEST)."""
    return _encode(n, os.urandom(16), os.urandom(DKLEN))


def verify_password(password: bytes | str, encoded: str) -> bool:
    if isinstance(password, str):
        password = password.encode("utf-8")
    try:
        scheme, n, r, p, salt_b64, hash_b64 = encoded.split("$")
        if scheme != "scrypt":
            return False
        salt = base64.b64decode(salt_b64)
        expected = base64.b64decode(hash_b64)
        dk = hashlib.scrypt(password, salt=salt, n=int(n), r=int(r), p=int(p), dklen=len(expected),
                            maxmem=_MAXMEM)
    except (ValueError, TypeError, MemoryError):
        return False
    return hmac.compare_digest(dk, expected)


async def verify_password_async(password: bytes | str, encoded: str) -> bool:
    """``verify_password`` in the default executor."""
    return await asyncio.get_running_loop().run_in_executor(None, verify_password, password, encoded)
