"""An APIYI stand-in for development, tests and benchmarks (`gateway fake-upstream`).

It answers the endpoints the gateway fronts in APIYI's shapes, with real PNG bytes. Every request
may steer it with headers (the gateway forwards them like any other):
  X-Fake-Latency: seconds        generation time (streams spread their events over it)
  X-Fake-Image-Bytes: n          size of the image returned
  X-Fake-Fault: one of           500|502|503 (error after the latency), 429 (at once, with
                                 Retry-After), hang (never answers), drop (closes the connection
                                 without answering), reset (half the body, then a TCP reset),
                                 malformed (200 with a truncated JSON body), trickle (the body in
                                 1 KiB pieces spread over the latency)
With `response_format: url` an image comes back as an address on the stand-in; the generation's
  X-Fake-Image-Delay: seconds    makes that address wait before answering
  X-Fake-Image-Redirect: url     makes that address redirect (302) there
and `POST /_fake/images/forget` forgets every such image (404 from then on), as links expire.
`GET /_fake/stats` counts requests, distinct connections, cancellations; `GET /_fake/last`
describes the last request (headers, body digest); `POST /_fake/reset` zeroes both.
"""

from gateway.fake.app import create_fake_app, serve_fake, start_fake
from gateway.fake.behaviour import STATS, FakeSettings, FakeStats, png, png_b64

__all__ = [
    "STATS",
    "FakeSettings",
    "FakeStats",
    "create_fake_app",
    "png",
    "png_b64",
    "serve_fake",
    "start_fake",
]
