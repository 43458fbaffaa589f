"""The `gateway` command: serve | worker | fake-upstream | hash-key. Logging is set up here only."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

import msgspec

from gateway.accesslog import write_access_lines_to
from gateway.auth import key_digest
from gateway.config import ConfigError, load_config
from gateway.logsafe import OneLineFormatter

logger = logging.getLogger("gateway")


_ENVIRONMENT = """environment:
  GATEWAY_CONFIG            the config file (when --config is not given)
  GATEWAY_UPSTREAM_URL      upstream base URL (upstream.url), default https://api.apiyi.com/v1
  GATEWAY_UPSTREAM_API_KEY  key-injection mode: the key sent upstream; callers need a client key
  GATEWAY_REDIS_URL         Redis for tasks (tasks.redis_url); unset: the embedded store
  GATEWAY_RESULTS_URL       large task results (tasks.results_url): file:///dir, or
                            s3://bucket/prefix with AWS_ENDPOINT_URL, AWS_REGION,
                            AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
"""


class _Parser(argparse.ArgumentParser):
    """A mistake on the command line is one line on stderr, like every other refusal; the
    usage it would have printed above it is one `--help` away."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    # --log-level is taken before or after the subcommand (`gateway serve --log-level debug`).
    common = _Parser(add_help=False)
    common.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="DEBUG, INFO, WARNING or ERROR (default INFO)",
    )
    parser = _Parser(
        prog="gateway",
        description=__doc__,
        parents=[common],
        epilog="`gateway serve --help` names the environment variables the gateway reads.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, epilog: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=help,
            parents=[common],
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    config_help = (
        "TOML file (default: $GATEWAY_CONFIG or "
        "config/gateway.toml when present, else built-in defaults)"
    )
    # The commands that read the configuration are the ones the environment speaks to.
    serve = command("serve", "run the HTTP gateway (and task workers)", _ENVIRONMENT)
    serve.add_argument("--config", type=Path, help=config_help)
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=_port, help="listen port (overrides server.port)")

    worker = command("worker", "run task workers alone, against Redis (no HTTP)", _ENVIRONMENT)
    worker.add_argument("--config", type=Path, help=config_help)

    fake = command("fake-upstream", "run the APIYI stand-in for development and tests")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=_port, default=8090)
    fake.add_argument("--latency-s", type=float, default=0.0, help="default generation time")
    fake.add_argument("--image-bytes", type=int, default=256 * 1024, help="default image size")

    command(
        "hash-key",
        "print the SHA-256 digest of a client key read from stdin, for auth.client_key_sha256",
    )
    return parser


def _port(text: str) -> int:
    """A port number, refused by argparse in one line rather than by bind() in a traceback."""
    if not text.isdigit() or not 0 <= (port := int(text)) <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port number (0 to 65535)")
    return port


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not built for every platform)
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.log_level = getattr(args, "log_level", "INFO")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=args.log_level, handlers=[handler])
    # The access log writes a record per request: skip computing the record fields our format
    # never shows (the logging HOWTO's "Optimization" section).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    write_access_lines_to(sys.stderr)
    if args.command == "hash-key":
        key = sys.stdin.read().strip()
        if not key:
            print("gateway hash-key: no key on stdin", file=sys.stderr)
            return 2
        print(key_digest(key))
        return 0

    from gateway.edge.server import CannotListen, cannot_listen, serve, work

    if args.command == "fake-upstream":
        from gateway.fake import FakeSettings, serve_fake

        settings = FakeSettings(latency_s=args.latency_s, image_bytes=args.image_bytes)
        try:
            _run(serve_fake(settings, args.host, args.port))
        except OSError as exc:  # bind(): the port is taken, or the address not ours
            print(f"gateway: {cannot_listen(f'{args.host}:{args.port}', exc)}", file=sys.stderr)
            return 1
        return 0

    try:
        config = load_config(args.config)
        if args.command == "worker":
            _run(work(config))
            return 0
        if args.host or args.port is not None:
            server = msgspec.structs.replace(
                config.server,
                host=args.host or config.server.host,
                port=config.server.port if args.port is None else args.port,
            )
            config = msgspec.structs.replace(config, server=server)
        _run(serve(config))
    except ConfigError as exc:
        print(f"gateway: bad configuration: {exc}", file=sys.stderr)
        return 2
    except CannotListen as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    return 0
