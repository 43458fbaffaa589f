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
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import NoScriptError

from gateway.accesslog import OncePer

logger = logging.getLogger(__name__)
# A write's wake-up, sent once a replica has it: only if the write took (a run fenced out must
# not announce an end it did not make). KEYS: the written hash. ARGV: the channel, the message,
# the status the hash has if the write took.
_ANNOUNCE = """
if redis.call('HGET', KEYS[1], 'status') == ARGV[3] then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
"""


class ReplicaAcks:
    def __init__(self, redis: Any, *, replicas: int, timeout_ms: int, cluster: bool) -> None:
        """`replicas` 0 (none found at start-up, or waiting turned off) waits for nothing."""
        self._redis = redis
        self._replicas = replicas
        self._timeout_ms = timeout_ms
        self._cluster = cluster
        self._warn = OncePer(60.0)

    @property
    def waits(self) -> bool:
        return self._replicas > 0

    def queue_wait(self, pipe: Any, key: str) -> None:
        """Queue the WAIT after the write to `key` on `pipe` (one node's connection)."""
        pipe.execute_command("WAIT", self._replicas, self._timeout_ms, **self._target(key))

    def _target(self, key: str) -> dict[str, Any]:
        return {"target_nodes": self._redis.get_node_from_key(key)} if self._cluster else {}

    def check(self, acked: int) -> None:
        if acked < self._replicas and self._warn():
            logger.warning(
                "a task write was not confirmed by a replica within %d ms: a failover now "
                "could lose it (replica down or lagging?)",
                self._timeout_ms,
            )

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
                self.queue_wait(pipe, keys[0])
                if announce is not None:
                    pipe.eval(_ANNOUNCE, 1, keys[0], *announce)
                reply, acked, *_ = await pipe.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError):
                await self._redis.script_load(script.script)
                continue
            for answer in (reply, acked):
                if isinstance(answer, Exception):
                    raise answer
            self.check(acked)
            return reply
        raise NoScriptError("the script could not be loaded")
