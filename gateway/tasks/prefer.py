"""The `Prefer` request header (RFC 7240): `respond-async` and `wait=N`."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import msgspec

from gateway.errors import BadRequest

# One preference per match: commas inside quoted strings do not split.
_ITEM = re.compile(r'(?:[^,"]|"(?:[^"\\]|\\.)*")+')
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class Preferences(msgspec.Struct, frozen=True):
    respond_async: bool = False
    wait_s: float | None = None


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def parse_prefer(headers: Iterable[str]) -> Preferences:
    """Preferences from every `Prefer` header. Names are case-insensitive, unknown ones are
    ignored, and a preference given twice counts the first time only (RFC 7240 section 2)."""
    seen: dict[str, str] = {}
    for header in headers:
        for item in _ITEM.findall(header):
            name, _, value = item.split(";", 1)[0].partition("=")
            name = name.strip().lower()
            if _TOKEN.fullmatch(name) and name not in seen:
                seen[name] = _unquote(value.strip())
    wait_s = None
    if "wait" in seen:
        try:
            wait_s = float(seen["wait"])
        except ValueError:
            wait_s = math.nan
        if not (math.isfinite(wait_s) and wait_s >= 0):
            raise BadRequest("Prefer: wait must be a non-negative number of seconds.")
    return Preferences(respond_async="respond-async" in seen, wait_s=wait_s)
