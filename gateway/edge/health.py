"""Liveness and readiness probes."""

from __future__ import annotations

from aiohttp import web

from gateway.tasks.service import TASKS


class Readiness:
    """Turns unready when SIGTERM starts the drain, so load balancers stop routing here."""

    def __init__(self) -> None:
        self.draining = False


READINESS = web.AppKey("readiness", Readiness)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[READINESS].draining:
        return web.json_response({"status": "draining"}, status=503)
    if not request.app[TASKS].reachable:  # checked in the background: a probe never waits
        return web.json_response({"status": "task store unreachable"}, status=503)
    return web.json_response({"status": "ready"})
