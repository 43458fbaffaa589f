"""The baseline: a bare 30-line aiohttp reverse proxy, for side-by-side figures only."""

import sys

from aiohttp import ClientSession, TCPConnector, web

UPSTREAM = sys.argv[1]
PORT = int(sys.argv[2])


async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
    app["session"] = ClientSession(connector=TCPConnector(limit=0), auto_decompress=False)
    yield
    await app["session"].close()


async def handle(request: web.Request) -> web.StreamResponse:
    headers = [(k, v) for k, v in request.headers.items() if k.lower() != "host"]
    async with request.app["session"].request(
        request.method, UPSTREAM + request.path_qs, headers=headers, data=await request.read()
    ) as up:
        out = web.StreamResponse(status=up.status)
        out.content_type = up.content_type
        await out.prepare(request)
        async for chunk in up.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
        return out


app = web.Application(client_max_size=2**30)
app.cleanup_ctx.append(session_ctx)
app.router.add_route("*", "/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=PORT, access_log=None, print=None, backlog=8192)
