"""Log lines no caller can forge: every value a caller chose is escaped so it can neither end a
line nor pose as another field; and warnings said at most once per interval."""

from __future__ import annotations

import logging
import re
import time

# What a log line shows of a caller's value as it is; anything else is escaped and quoted.
_PLAIN_FIELD = re.compile(r"[A-Za-z0-9._:/{}@+-]{1,200}")
# Characters that end or hide a line somewhere (terminals, `str.splitlines`, log shippers), and
# lone surrogates, which no UTF-8 log file can hold.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def escape_controls(text: str) -> str:
    """`text` with every line-breaking or unencodable character written as an escape."""
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def log_field(value: str) -> str:
    """A caller's value as one field of a text log line."""
    if _PLAIN_FIELD.fullmatch(value):
        return value
    escaped = escape_controls(value[:200].replace("\\", "\\\\").replace('"', '\\"'))
    return f'"{escaped}"'


class OncePer:
    """True once per `seconds`: for a warning that would otherwise come with every call or
    from every worker (a store outage)."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._next = 0.0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self._seconds
        return True


class OneLineFormatter(logging.Formatter):
    """Every log message stays one line, whatever a caller put into it; tracebacks are ours."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        if not record.message.isprintable():  # line breaks, controls and surrogates are not
            record.message = escape_controls(record.message)
        return super().formatMessage(record)
