"""The one access-log line per request, written without a system call per line.

The line carries method, route, model, status, durations and byte counts; never a prompt, an
image, a header value or a key. Every value a caller chose (a path, a model) is escaped, so it
can neither end a line nor pose as another field.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import time
from typing import TextIO

import msgspec
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from gateway.context import REQUEST_CONTEXT
from gateway.logsafe import escape_controls, log_field

access_logger = logging.getLogger("gateway.access")


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
