"""Which request targets may leave for the upstream.

The upstream origin comes from configuration only (see `Upstream.url`); what a caller chooses
is the path and query, and only in origin form under /v1/ or /v1beta/. A segment that an
upstream or a proxy in front of it could read as a step up the tree (`..`, `%2e%2e`, `..%2f`,
`..;`), a backslash, or a control character never leaves: the injected key must not reach a
route outside the API.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote

from aiohttp import HttpVersion, HttpVersion10

from gateway.errors import BadRequest, MethodNotAllowed

ALLOWED_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
_PREFIXES = ("/v1/", "/v1beta/")
# A segment made only of these needs no closer look: no dot, no escape, no backslash.
_PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9_\-:~+@!$&'()*,;=]*")
# A whole path of plain segments (most calls): one match instead of one per segment.
_PLAIN_PATH = re.compile(r"/v1(?:beta)?(?:/[A-Za-z0-9_\-:~+@!$&'()*,;=]*)+")
_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f\\/]")
# Percent-decoding more than this often is a riddle, not a path.
_MAX_DECODES = 3


def _printable(text: str) -> str:
    return text if text.isprintable() and len(text) <= 32 else "this method"


class VersionNotSupported(BadRequest):
    code = "http_version_not_supported"
    default_message = "HTTP/1.0 or later is required."


def check_version(version: HttpVersion) -> None:
    """A request line without a version parses as HTTP/0.9, whose requests have no headers:
    what follows it is a header block smuggled in, not a client's request."""
    if version < HttpVersion10:
        raise VersionNotSupported()


def check_method(method: str) -> None:
    if method not in ALLOWED_METHODS:
        allowed = ", ".join(sorted(ALLOWED_METHODS))
        raise MethodNotAllowed(
            f"{_printable(method)} is not forwarded; use one of {allowed}.", ALLOWED_METHODS
        )


def check_target(target: str) -> str:
    """`target` (path and query) if it may be sent upstream; BadRequest otherwise."""
    if not target.startswith(_PREFIXES):
        # Absolute form (`POST https://elsewhere/v1/...`) is for proxies; this is not one.
        raise BadRequest("The request target must be a path under /v1/ or /v1beta/.")
    path, _, query = target.partition("?")
    if query and ("#" in query or _UNSAFE_CHARS.search(query.replace("/", ""))):
        raise BadRequest("The request target holds characters that are not forwarded.")
    if "#" in path:
        raise BadRequest("The request target holds characters that are not forwarded.")
    if not _PLAIN_PATH.fullmatch(path):
        for segment in path.split("/"):
            if not _PLAIN_SEGMENT.fullmatch(segment):
                _check_segment(segment)
    return target


def _check_segment(segment: str) -> None:
    decoded = segment
    for _ in range(_MAX_DECODES):
        if _UNSAFE_CHARS.search(decoded) or _is_dots(decoded):
            raise BadRequest(
                "The request path holds a dot segment, an encoded slash or backslash, or a "
                "control character; such paths are not forwarded."
            )
        if "%" not in decoded:
            return
        try:
            decoded = unquote(decoded, errors="strict")
        except UnicodeDecodeError:
            # Overlong or broken UTF-8 (`%c0%ae` is a dot to lenient decoders).
            raise BadRequest("The request path is not percent-encoded UTF-8.") from None
    raise BadRequest("The request path is percent-encoded too many times.")


def _is_dots(segment: str) -> bool:
    """A segment some server would read as `.` or `..`: dots only, once look-alikes (fullwidth
    U+FF0E) are folded, path parameters (`..;x`) cut and trailing spaces dropped (IIS)."""
    name = unicodedata.normalize("NFKC", segment.split(";", 1)[0]).rstrip(" ")
    return bool(name) and not name.strip(".")
