"""Signed links: a task's events or result path that works without a header, for a while.

A browser's EventSource cannot send `Authorization`, and a client key in a page is a key given
away. A signed link names one path of one task and an expiry, under an HMAC whose secret every
replica derives from the task store's shared owner key, never from a caller's key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Callable

from multidict import MultiMapping

# Derived, not the owner key itself: a signature must never help guess an owner hash.
_PURPOSE = b"image-gateway signed task links v1"
# Signs a task path: its signed link.
Signer = Callable[[str], str]
_EXPIRY = re.compile(r"[0-9]{1,12}")


def link_secret(owner_key: bytes) -> bytes:
    return hmac.new(owner_key, _PURPOSE, hashlib.sha256).digest()


def _signature(secret: bytes, path: str, expires_at: int) -> str:
    # The path holds the task id: a link of one task, or of its events, opens nothing else.
    mac = hmac.new(secret, f"{path}\n{expires_at}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def sign(secret: bytes, path: str, ttl_s: float, now: float | None = None) -> str:
    """`path` with `exp` (epoch seconds) and `sig` query parameters."""
    expires_at = int((time.time() if now is None else now) + ttl_s)
    return f"{path}?exp={expires_at}&sig={_signature(secret, path, expires_at)}"


def is_signed(query: MultiMapping[str]) -> bool:
    """Whether the request claims a signed link (then it is judged as one, and only as one)."""
    return "sig" in query or "exp" in query


def verify(secret: bytes, path: str, query: MultiMapping[str]) -> bool:
    """Whether `query` signs `path` and has not expired."""
    sig, exp = query.getall("sig", ()), query.getall("exp", ())
    if len(sig) != 1 or len(exp) != 1 or not _EXPIRY.fullmatch(exp[0]):
        return False
    expires_at = int(exp[0])
    if expires_at < time.time():
        return False
    return hmac.compare_digest(sig[0], _signature(secret, path, expires_at))
