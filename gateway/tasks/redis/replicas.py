"""Waiting for a replica after the writes a failover must not lose.

Redis replicates asynchronously: a primary answers a write before any replica has it, and a
replica promoted after the primary dies lacks what it had not received yet. For the gateway
two writes matter: a task's creation (its caller holds a 202 and a task id that must exist
after a failover) and its end (the paid answer; lost, the task would run upstream again). After
each, on the same connection, `WAIT 1 <timeout>` holds the reply until a replica has the write,
so an acknowledged task or answer survives the primary. Other writes (start, renew, events
before the end) are not waited for: losing one re-runs a task at worst, never loses it.

WAIT needs the connection that wrote (it waits for that client's last write), hence a pipeline
with the write first; in a Redis Cluster the WAIT goes to the node of the written key.

A node with no replica connected (a primary promoted by a failover, whose own replica has not
come back) would time every WAIT out: a WAIT that times out asks the node (ROLE), and one
without a replica is not waited on for `_ALONE_S`, then asked again by the next WAIT.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import NoScriptError, RedisError

from gateway.logsafe import OncePer

logger = logging.getLogger(__name__)
# How long a node found without a replica is not waited on; then a WAIT asks again.
_ALONE_S = 10.0
# A write's wake-up, sent once a replica has it: only if the write took (a run fenced out must
# not announce an end it did not make). KEYS: the written hash. ARGV: the channel, the message,
# the status the hash has if the write took.
_ANNOUNCE = """
if redis.call('HGET', KEYS[1], 'status') == ARGV[3] then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
"""


class ReplicaAcks:
    def __init__(
        self,
        redis: Any,
        *,
        replicas: int,
        timeout_ms: int,
        cluster: bool,
        on_skip: Callable[[], object] = lambda: None,
    ) -> None:
        """`replicas` 0 (none found at start-up, or waiting turned off) waits for nothing.
        `on_skip`: told of each write not waited for, its node having no replica."""
        self._redis = redis
        self._replicas = replicas
        self._timeout_ms = timeout_ms
        self._cluster = cluster
        self._on_skip = on_skip
        self._alone_until: dict[str, float] = {}  # node name -> when to wait on it again
        self._warn = OncePer(60.0)

    @property
    def waits(self) -> bool:
        return self._replicas > 0

    def queue_wait(self, pipe: Any, key: str) -> bool:
        """Queue the WAIT after the write to `key` on `pipe` (one node's connection), unless
        that node has no replica to wait for: whether it queued one."""
        if not self.waits:
            return False
        if self._alone_until.get(self._node_name(key), 0.0) > time.monotonic():
            self._on_skip()
            return False
        pipe.execute_command("WAIT", self._replicas, self._timeout_ms, **self._target(key))
        return True

    def _target(self, key: str) -> dict[str, Any]:
        return {"target_nodes": self._redis.get_node_from_key(key)} if self._cluster else {}

    def _node_name(self, key: str) -> str:
        return str(self._redis.get_node_from_key(key).name) if self._cluster else ""

    async def check(self, key: str, acked: int) -> None:
        """After a WAIT for the write to `key`: a node that timed it out for want of any
        replica is not waited on for a while; one whose replica lags is warned of."""
        if acked >= self._replicas:
            return
        if await self._alone(key, acked):
            self._alone_until[self._node_name(key)] = time.monotonic() + _ALONE_S
            return
        if self._warn():
            logger.warning(
                "a task write was not confirmed by a replica within %d ms: a failover now "
                "could lose it (replica down or lagging?)",
                self._timeout_ms,
            )

    async def _alone(self, key: str, acked: int) -> bool:
        """Whether the node of `key` has no replica connected: its ROLE says; if it may not be
        asked (an ACL), none acknowledging says."""
        try:
            role = await self._redis.execute_command("ROLE", **self._target(key))
        except RedisError:
            return acked == 0
        return bool(role[0] == b"master" and not role[2])

    async def run(
        self,
        script: Any,
        keys: list[str],
        args: list[Any],
        announce: tuple[str, str, str] | None = None,
    ) -> Any:
        """Run a registered script and wait for a replica to have what it wrote; then announce
        it (`_ANNOUNCE`: channel, message, status): a waiter hears of the write only once a
        failover would keep it. The script publishes itself when nothing is waited for."""
        if not self.waits:
            return await script(keys=keys, args=args)
        for _ in range(2):  # a Redis that restarted or failed over has forgotten its scripts
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                waited = self.queue_wait(pipe, keys[0])
                if announce is not None:
                    pipe.eval(_ANNOUNCE, 1, keys[0], *announce)
                replies = await pipe.execute(raise_on_error=False)
            reply, acked = replies[0], replies[1] if waited else self._replicas
            if isinstance(reply, NoScriptError):
                await self._redis.script_load(script.script)
                continue
            for answer in (reply, acked):
                if isinstance(answer, Exception):
                    raise answer
            await self.check(keys[0], acked)
            return reply
        raise NoScriptError("the script could not be loaded")
