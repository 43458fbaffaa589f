"""Redis's clock, as this process reads it: the time a write is fenced at (`lua/fence.lua`) is
Redis's, so the gateway's own clock may be off by any amount."""

from __future__ import annotations

import asyncio
from typing import Any


class RedisClock:
    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._offset_s: float | None = None  # Redis's time less the event loop's

    async def read(self) -> None:
        """Read Redis's time (TIME) against the event loop's; also a ping."""
        loop = asyncio.get_running_loop()
        before = loop.time()
        seconds, micros = await self._redis.time()
        self._offset_s = seconds + micros / 1e6 - (before + loop.time()) / 2

    async def fence_ms(self, at: float) -> int:
        """`at` (the event loop's time) on Redis's clock, in ms. Read first if never read."""
        if self._offset_s is None:
            await self.read()
        assert self._offset_s is not None
        return int((at + self._offset_s) * 1000)
