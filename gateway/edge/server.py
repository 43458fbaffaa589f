"""Running an app on a real socket, and draining it on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from aiohttp import web
from yarl import URL

from gateway.accesslog import AccessLogger, JsonAccessLogger, access_logger, quiet_bad_requests
from gateway.config import Config, ConfigError
from gateway.edge.app import create_app, create_metrics_app, create_worker_app
from gateway.edge.health import READINESS
from gateway.netopts import listening_socket
from gateway.tasks.service import describe_store

logger = logging.getLogger(__name__)


class CannotListen(Exception):
    """The listening address is taken or not ours: said in one line, not a traceback."""


def cannot_listen(where: str, exc: OSError) -> CannotListen:
    """bind()'s failure as one line: asyncio's own message repeats the address at length
    (a name that does not resolve has a negative errno: its own message says it)."""
    reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)
    return CannotListen(f"cannot listen on {where}: {reason}")


async def start(app: web.Application, config: Config) -> web.AppRunner:
    """Serve `app` on the configured address (port 0 picks a free one: `runner.addresses`)."""
    quiet_bad_requests()
    runner = web.AppRunner(
        app,
        # A caller that hangs up must stop its upstream call now, not when it would have ended.
        handler_cancellation=True,
        # Accepted sockets inherit the listening socket's keep-alive options (set in full there);
        # aiohttp's own per-connection SO_KEEPALIVE call would only repeat part of that.
        tcp_keepalive=False,
        access_log_class=JsonAccessLogger if config.server.access_log_json else AccessLogger,
        access_log=access_logger if config.server.access_log else None,
        keepalive_timeout=config.server.idle_timeout_s,
        shutdown_timeout=config.server.drain_timeout_s,
    )
    await runner.setup()
    host, port = config.server.host, config.server.port
    try:  # after set-up: a caller that reaches the port finds the app ready
        sock = listening_socket(host, port, config.tcp_keepalive)
    except OSError as exc:
        await runner.cleanup()
        raise cannot_listen(f"{host}:{port}", exc) from None
    await web.SockSite(runner, sock).start()
    return runner


async def start_metrics(main: web.Application, config: Config) -> web.AppRunner | None:
    """The operators' port (`server.metrics_port`), when one is configured."""
    if not config.server.metrics_port:
        return None
    runner = web.AppRunner(create_metrics_app(main), access_log=None)
    await runner.setup()
    host, port = config.server.host, config.server.metrics_port
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise cannot_listen(f"{host}:{port} (server.metrics_port)", exc) from None
    logger.info("metrics and probes on port %d", config.server.metrics_port)
    return runner


async def serve(config: Config) -> None:
    app = create_app(config)
    runner = await start(app, config)
    upstream = URL(config.upstream.url).with_user(None).with_query(None)  # no secrets in logs
    logger.info("gateway listening on %s, upstream %s", runner.addresses[0][:2], upstream)
    logger.info("async tasks: %s", describe_store(config))
    await _run_until_signalled(app, runner, config, "in-flight calls")


async def work(config: Config) -> None:
    """`gateway worker`: task workers without HTTP, sharing the Redis of the serving replicas."""
    if config.tasks.redis_url is None:
        raise ConfigError("gateway worker needs Redis (GATEWAY_REDIS_URL or tasks.redis_url)")
    app = create_worker_app(config)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    logger.info("%d task workers on %s", config.tasks.workers, describe_store(config))
    await _run_until_signalled(app, runner, config, "running tasks")


async def _run_until_signalled(
    app: web.Application, runner: web.AppRunner, config: Config, work: str
) -> None:
    """Until SIGTERM or SIGINT; then turn unready and drain. The runner's cleanup closes the
    listening socket first, then waits for in-flight work up to the drain timeout; the
    operators' port closes last, so probes and metrics see the drain."""
    try:
        operators = await start_metrics(app, config)
    except CannotListen:
        await runner.cleanup()  # the main port's, and the task store and upstream it opened
        raise
    await _until_signalled()
    logger.info("draining: %s get up to %.0f s", work, config.server.drain_timeout_s)
    app[READINESS].draining = True
    await runner.cleanup()
    if operators is not None:
        await operators.cleanup()
    logger.info("stopped")


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
