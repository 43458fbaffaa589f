"""Images the stand-in answers by address (`response_format=url`), as APIYI hosts them: served at
/_fake/images/ until `POST /_fake/images/forget` (as upstream links expire)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib

from aiohttp import web

from gateway.fake.behaviour import error


@dataclasses.dataclass(frozen=True)
class HostedImage:
    """An image answered by address, and how its address answers (steered by the generation's
    `X-Fake-Image-Delay` and `X-Fake-Image-Redirect` headers)."""

    body: bytes
    delay_s: float = 0.0
    redirect: str | None = None


IMAGES = web.AppKey("images", dict[str, HostedImage])


def hosted_url(request: web.Request, image: bytes) -> str:
    """The address the generation `request` answers its `image` with."""
    hosted = HostedImage(
        image,
        float(request.headers.get("X-Fake-Image-Delay", 0)),
        request.headers.get("X-Fake-Image-Redirect"),
    )
    digest = hashlib.sha256(repr(hosted).encode()).hexdigest()[:32]
    request.app[IMAGES][digest] = hosted
    return f"{request.scheme}://{request.host}/_fake/images/{digest}.png"


async def image_view(request: web.Request) -> web.Response:
    image = request.app[IMAGES].get(request.match_info["digest"])
    if image is None:
        return error(404, "no such image")
    await asyncio.sleep(image.delay_s)
    if image.redirect is not None:
        raise web.HTTPFound(image.redirect)
    return web.Response(body=image.body, content_type="image/png")


async def forget_images_view(request: web.Request) -> web.Response:
    request.app[IMAGES].clear()
    return web.json_response({})


def add_image_routes(app: web.Application) -> None:
    app[IMAGES] = {}
    app.router.add_get("/_fake/images/{digest}.png", image_view)
    app.router.add_post("/_fake/images/forget", forget_images_view)
