"""Request ids, the one access-log line per request, and log lines no caller can forge.

The line carries method, route, model, status, durations and byte counts; never a prompt, an
image, a header value or a key. Every value a caller chose (a path, a model) is escaped, so it
can neither end a line nor pose as another field.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import math
import re
import secrets
import time
from typing import TextIO

import msgspec
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

access_logger = logging.getLogger("gateway.access")

# Caller-chosen ids are echoed and logged, so only a plain token is accepted (no log injection).
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Request ids made here: unique, not secret (they only tie log lines together), so a random
# per-process prefix and a counter, without a system call per request as uuid4 makes.
_ID_PREFIX = secrets.token_hex(8)
_next_id = itertools.count(1).__next__
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


class RequestContext:
    """What one request did, filled in as it goes, for the log line and the metrics."""

    __slots__ = (
        "bytes_in",
        "call_goes_on",
        "caller_limit_s",
        "client",
        "mode",
        "model",
        "request_id",
        "route",
        "started",
        "upstream_s",
    )

    def __init__(self, request: web.Request) -> None:
        self.started = asyncio.get_running_loop().time()
        given = request.headers.get("X-Request-ID", "")
        self.request_id = given if _SAFE_ID.fullmatch(given) else f"{_ID_PREFIX}{_next_id():016x}"
        resource = request.match_info.route.resource
        self.route = resource.canonical if resource is not None else "other"
        self.model: str | None = None
        self.mode = "sync"  # "async" once the call runs as a task the caller does not wait on
        self.caller_limit_s = math.inf
        self.upstream_s: float | None = None
        self.bytes_in = 0
        # The caller's client name (`[clients.<name>]`), once a call needs it: empty until then.
        self.client = ""
        # A call run once goes on when its caller leaves (a retry attaches to it).
        self.call_goes_on = False

    def time_upstream(self, seconds: float) -> None:
        """The upstream's time of a call made elsewhere for this request (a call run once)."""
        self.upstream_s = seconds


REQUEST_CONTEXT = web.RequestKey("request_context", RequestContext)


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook: every proxied response, streamed or not, names its request id."""
    ctx = request.get(REQUEST_CONTEXT)
    if ctx is not None:
        response.headers["X-Request-ID"] = ctx.request_id


class BatchedLines:
    """Access lines written straight to a stream, all of one event-loop turn in one write.

    Through the logging module an access line cost ~28 µs of CPU per call on the hot path
    (`tests/perf/bench_cpu.py`, access log on vs off), about a tenth of the whole call; this
    costs ~2 µs. The lines look exactly like the logging handler's (`asctime levelname name
    message`); the CLI turns it on, so the logging path stays for embedders and tests."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._second = -1
        self._stamp = ""

    def write(self, message: str) -> None:
        now = time.time()
        if int(now) != self._second:
            self._second = int(now)
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        if not self._lines:
            asyncio.get_running_loop().call_soon(self.flush)
        self._lines.append(
            f"{self._stamp},{int(now % 1 * 1000):03d} INFO gateway.access {message}\n"
        )

    def flush(self) -> None:
        lines, self._lines = self._lines, []
        with contextlib.suppress(OSError, ValueError):  # a closed stderr loses lines, not calls
            self._stream.write("".join(lines))
            self._stream.flush()


_batched: BatchedLines | None = None


def write_access_lines_to(stream: TextIO) -> None:
    """Access lines go to `stream` in batches, past the logging module (whose level still
    decides whether there are any); the last batch is written at exit."""
    global _batched
    _batched = BatchedLines(stream)
    atexit.register(_batched.flush)


def _emit(logger: logging.Logger, message: str) -> None:
    if _batched is not None:
        _batched.write(message)
    else:
        logger.info("%s", message)


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        ctx = request.get(REQUEST_CONTEXT)
        if ctx is None:  # not a proxied call: probes, metrics, unknown paths
            line = (
                f"- {log_field(request.method)} {log_field(request.path)} "
                f"status={response.status} duration_ms={time * 1000:.1f}"
            )
        else:
            model = "-" if ctx.model is None else log_field(ctx.model)
            upstream_ms = "-" if ctx.upstream_s is None else f"{ctx.upstream_s * 1000:.1f}"
            line = (
                f"{ctx.request_id} {request.method} {ctx.route} model={model} "
                f"status={response.status} duration_ms={time * 1000:.1f} "
                f"upstream_ms={upstream_ms} bytes_in={ctx.bytes_in} "
                f"bytes_out={response.body_length}"
            )
        _emit(self.logger, line)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


class _Line(msgspec.Struct, omit_defaults=True):
    method: str
    route: str
    status: int
    duration_ms: float
    request_id: str | None = None
    model: str | None = None
    upstream_ms: float | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None


_encode_line = msgspec.json.Encoder().encode


class JsonAccessLogger(AccessLogger):
    """The same fields as one JSON object per line, for log shippers (`server.access_log_json`)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        ctx = request.get(REQUEST_CONTEXT)
        # JSON escapes line breaks itself; only what UTF-8 cannot hold needs escaping here.
        line = _Line(
            escape_controls(request.method),
            escape_controls(request.path),
            response.status,
            round(time * 1000, 1),
        )
        if ctx is not None:
            line = _Line(
                request.method,
                ctx.route,
                response.status,
                round(time * 1000, 1),
                request_id=ctx.request_id,
                model=None if ctx.model is None else escape_controls(ctx.model),
                upstream_ms=None if ctx.upstream_s is None else round(ctx.upstream_s * 1000, 1),
                bytes_in=ctx.bytes_in,
                bytes_out=response.body_length,
            )
        _emit(self.logger, _encode_line(line).decode())


class QuietBadRequests(logging.Filter):
    """aiohttp logs a client's malformed request (too many headers, bad framing) as an ERROR
    with a traceback; it is the client's fault, so it becomes one WARNING line. The parser's
    message is left out: it quotes the offending header line, credentials and all."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = "bad request from a client: %s (%s)"
            record.args = (type(exc).__name__, exc.code)
            record.exc_info = record.exc_text = None
        return True


def quiet_bad_requests() -> None:
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, QuietBadRequests) for f in server_log.filters):
        server_log.addFilter(QuietBadRequests())
