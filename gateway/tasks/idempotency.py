"""Calls that run once: `Idempotency-Key`, and the OpenAI SDK's own retries.

A keyed call (async or sync) is a task found again by its key; a sync call from the OpenAI SDK
(it sends `x-stainless-retry-count`) runs as a task too, so a retry after a dropped connection
attaches to the generation already under way instead of paying for another. Only hashes are
stored: a fingerprint of the request, never the prompt.
"""

from __future__ import annotations

import hashlib
import mmap
import re

import msgspec
from multidict import MultiMapping

from gateway.admission import CallerOverloaded, Overloaded
from gateway.errors import BadRequest, RequestTimeout, UpstreamUnreachable
from gateway.tasks.call import RequestBodyLost
from gateway.tasks.models import TaskError

_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # visible ASCII, as Stripe and the IETF draft allow
SDK_RETRY_HEADER = "x-stainless-retry-count"


class RunOnce(msgspec.Struct, frozen=True):
    """How a call is made to run once: by the caller's key, or by the SDK's retry count."""

    key: str | None = None
    sdk_retry: int | None = None

    def name(self, owner: str, fingerprint: str) -> str:
        """The store name under which the call is found again, scoped to the credential."""
        scope = (
            f"key\0{owner}\0{self.key}" if self.key is not None else f"sdk\0{owner}\0{fingerprint}"
        )
        return hashlib.sha256(scope.encode()).hexdigest()


def run_once(headers: MultiMapping[str]) -> RunOnce | None:
    """The caller's wish for a call that runs once, if it made one."""
    key = headers.get("Idempotency-Key")
    if key is not None:
        if not _KEY.fullmatch(key):
            raise BadRequest("Idempotency-Key must be 1 to 255 visible ASCII characters.")
        return RunOnce(key=key)
    retry = headers.get(SDK_RETRY_HEADER)
    if retry is not None and retry.isdecimal() and len(retry) < 6:
        return RunOnce(sdk_retry=int(retry))
    return None


# What a call that runs once keeps for its retries: outcomes where the upstream ran, as Stripe
# and the IETF idempotency-key draft do. What the OpenAI SDK retries on (408, 409, 429, 5xx) and
# the gateway's own retry-safe refusals reach their caller but are not kept: the retry goes
# upstream again, as it would without the gateway. A deadline or a broken connection after the
# call was sent is kept: the upstream may have run (and billed) it.
_NOT_KEPT = frozenset(
    (
        "408",
        "409",
        "429",
        *(
            refusal.code
            for refusal in (
                UpstreamUnreachable,
                RequestTimeout,
                Overloaded,
                CallerOverloaded,
                RequestBodyLost,
            )
        ),
    )
)


def kept_for_retries(error: TaskError | None) -> bool:
    """Whether a retry of the call gets this outcome again (True) or runs the call anew."""
    if error is None:
        return True
    code = error.code
    return code not in _NOT_KEPT and not (len(code) == 3 and code.startswith("5"))


# Delimiters in a form whose fingerprint ignores its boundary: a real form (the OpenAI SDK's
# edit with 16 images) has tens.
_MAX_PARTS = 1024


def fingerprint(
    method: str, path_qs: str, owner: str, body: bytes | mmap.mmap, boundary: bytes = b""
) -> str:
    """What a retry of the request must match. A multipart body's `boundary` does not count:
    a client that builds the same form again (the OpenAI SDK, on each retry) picks a new
    random one, and its retry is the same call."""
    digest = hashlib.sha256()
    for part in (method.encode(), path_qs.encode(), owner.encode()):
        digest.update(len(part).to_bytes(4, "big") + part)
    if not boundary:
        digest.update(body)
        return digest.hexdigest()
    delimiter = b"--" + boundary
    cuts = _delimiters(body, delimiter)
    if cuts is None:  # no form has that many parts: hashed as it came, boundary and all
        digest.update(body)
        return digest.hexdigest()
    # The parts between delimiters, each after its length: no body's bytes can pass for a
    # delimiter.
    with memoryview(body) as view:
        at = 0
        for found in (*cuts, len(body)):
            digest.update((found - at).to_bytes(8, "big"))
            digest.update(view[at:found])
            at = found + len(delimiter)
    return digest.hexdigest()


def _delimiters(body: bytes | mmap.mmap, delimiter: bytes) -> list[int] | None:
    """Where `delimiter` stands in `body`; None past `_MAX_PARTS` of them, so a body of
    nothing but delimiters (a one-letter boundary) is not walked in Python a few bytes at a
    time, which held the event loop for seconds per 10 MB."""
    cuts: list[int] = []
    at = 0
    while (found := body.find(delimiter, at)) != -1:
        if len(cuts) == _MAX_PARTS:
            return None
        cuts.append(found)
        at = found + len(delimiter)
    return cuts
