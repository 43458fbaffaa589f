"""Which headers cross the gateway, and the caller's own deadline."""

from __future__ import annotations

import math

from multidict import CIMultiDict, MultiMapping

from gateway.errors import BadRequest

# RFC 9110 section 7.6.1; plus Host (the upstream's comes from its URL) and Expect (the gateway
# answered the caller's 100-continue itself and sends the body without waiting again).
_HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        "trailer",
        "host",
        "expect",
    )
)


def strip_hop_by_hop(headers: MultiMapping[str]) -> CIMultiDict[str]:
    """End-to-end headers only: the fixed hop-by-hop set and any header named in Connection."""
    dropped = _HOP_BY_HOP
    if "Connection" in headers:
        dropped = dropped.union(
            token.strip().lower()
            for value in headers.getall("Connection")
            for token in value.split(",")
        )
    return CIMultiDict([(k, v) for k, v in headers.items() if k.lower() not in dropped])


# Key-injection mode: callers are tenants of the organisation's upstream account, so some
# headers stay on their side of the gateway. From callers: where a request came from (the
# gateway's own network, or a caller's spoof) and which of the organisation's accounts pays.
_CALLER_SIDE = frozenset(("forwarded", "x-real-ip", "openai-organization", "openai-project"))
# From the upstream: its cookies (a session of the organisation's), what its servers are, and
# which accounts the organisation's key belongs to. Alt-Svc names the upstream's endpoints as
# if they were the gateway's.
_UPSTREAM_SIDE = frozenset(
    (
        "set-cookie",
        "set-cookie2",
        "server",
        "via",
        "x-powered-by",
        "alt-svc",
        "openai-organization",
        "openai-project",
    )
)


def drop_caller_side(headers: CIMultiDict[str]) -> None:
    """Key-injection mode: remove (in place) what a caller's headers say about its network or
    which account is billed."""
    for name in {k.lower() for k in headers}:
        if name in _CALLER_SIDE or name.startswith("x-forwarded-"):
            headers.popall(name, None)


def answer_headers(headers: MultiMapping[str], injecting: bool) -> CIMultiDict[str]:
    """The upstream answer's headers a caller gets: the end-to-end ones, and in key-injection
    mode none of the upstream's side (rate limits, request ids and `x-should-retry` stay)."""
    kept = strip_hop_by_hop(headers)
    if injecting:
        for name in _UPSTREAM_SIDE:
            kept.popall(name, None)
    return kept


def header_pairs(headers: MultiMapping[str]) -> list[tuple[str, str]]:
    """Headers as plain pairs for storing; multidict's `istr` names do not serialise."""
    return [(str(k), v) for k, v in headers.items()]


def caller_timeout_s(headers: MultiMapping[str]) -> float:
    """The caller's `X-Request-Timeout`: it may shorten a deadline, never lengthen it."""
    raw = headers.get("X-Request-Timeout")
    if raw is None:
        return math.inf
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise BadRequest("X-Request-Timeout must be a positive number of seconds.")
    return value
