"""Password hashing with scrypt (a slow, memory-hard KDF from the standard library).

Format: ``scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>``. Verification runs in a
worker thread so a login never stalls the event loop.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os

_R, _P, _DKLEN = 8, 1, 32


def hash_password(password: str, n: int = 2 ** 14) -> str:
    salt = os.urandom(16)
    dk = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=_R, p=_P, dklen=_DKLEN,
                        maxmem=256 * 1024 * 1024)
    b64 = base64.b64encode
    return f"scrypt${n}${_R}${_P}${b64(salt).decode()}${b64(dk).decode()}"


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
                            maxmem=256 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(dk, expected)


# A hash to burn the same time on when the account does not exist, so timing
# does not tell which account names exist (P-HARVEST).
_DUMMY = hash_password("not-a-real-password", n=2 ** 14)


async def verify_password_async(password: bytes | str, encoded: str | None) -> bool:
    loop = asyncio.get_running_loop()
    if encoded is None:
        await loop.run_in_executor(None, verify_password, password, _DUMMY)
        return False
    return await loop.run_in_executor(None, verify_password, password, encoded)
