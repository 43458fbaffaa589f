"""The Redis task store, in parts: `keys` (every key shape), `transitions` (the Lua scripts
that change a task's status), `queue` (the fair waiting set, the stream and its consumer
group), `slots`
(concurrency limits across replicas), `wakeups` (pub/sub), and `store`, which keeps the
`TaskStore` contract with them. Nothing else in the gateway talks to Redis."""

from __future__ import annotations

import os
import secrets
import socket

from redis.asyncio import BlockingConnectionPool, Redis

from gateway.config import TasksConfig
from gateway.tasks.redis.observed import Observer
from gateway.tasks.redis.store import RedisStore

__all__ = ["RedisStore", "connect"]

_SPARE_CONNECTIONS = 64


def connect(tasks: TasksConfig, observe: Observer) -> RedisStore:
    """The store on `tasks.redis_url`, its client sized for the workers of this process."""
    assert tasks.redis_url is not None
    # Each worker blocks on the queue with a connection of its own; requests share the rest.
    # Past that, a command waits briefly for a free connection rather than failing.
    pool = BlockingConnectionPool.from_url(
        tasks.redis_url,
        max_connections=tasks.workers + _SPARE_CONNECTIONS,
        timeout=5.0,
        socket_connect_timeout=2.0,
        # A hung Redis must not hang callers; longer than a claim's blocking read (5 s).
        socket_timeout=15.0,
    )
    return RedisStore(
        Redis.from_pool(pool),  # owns the pool: closing the client closes it
        # Unique per process: a restarted worker must not inherit its predecessor's claims.
        consumer=f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}",
        retention_s=tasks.retention_s,
        prefix=tasks.key_prefix,
        lease_s=tasks.lease_s,
        max_deliveries=tasks.max_deliveries,
        observe=observe,
        max_queued_per_caller=tasks.max_queued_per_caller,
        max_queued_bytes_per_caller=tasks.max_queued_bytes_per_caller,
    )
