"""The Redis task store, in parts: `keys` (every key shape), `creation` (a task, its name and
its place in the queue, in order; or, on a standalone Redis, all in one script that may start
it at once), `transitions` (the Lua scripts that change a task's status), `queue` (the fair
waiting set, the stream and its consumer group, here-leases), `claiming` (a worker taking and
starting its next task), `slots` (concurrency limits across replicas), `wakeups` (pub/sub),
`waiting` (for a task's end), and `store`, which keeps the `TaskStore` contract with them.
Nothing else in the gateway talks to Redis but the usage ledger (`gateway/usage/redis_ledger.py`),
over this store's client with keys and scripts of its own."""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any

from redis import Redis as SyncRedis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError
from redis.maint_notifications import MaintNotificationsConfig
from yarl import URL

from gateway.config import TasksConfig
from gateway.tasks.redis.observed import Observer
from gateway.tasks.redis.store import RedisStore

__all__ = ["RedisStore", "connect"]

logger = logging.getLogger(__name__)
_SPARE_CONNECTIONS = 64
# A hung Redis must not hang a worker for good; longer than any command the store waits on.
# Callers wait much less (`tasks.store_timeout_s`, `observed.py`).
_SOCKET_TIMEOUT_S = 15.0
# redis-py 8 asks every new connection for Redis Enterprise's maintenance notifications: a round
# trip that a connection dying mid-failover fails with errors redis-py does not wrap (a closed
# transport's RuntimeError, a missing writer's AttributeError), i.e. 500s instead of 503s.
_NO_MAINTENANCE_NOTIFICATIONS = MaintNotificationsConfig(enabled=False)


def connect(
    tasks: TasksConfig, observe: Observer, on_wait_skipped: Callable[[], object] = lambda: None
) -> RedisStore:
    """The store on `tasks.redis_url`: a standalone Redis (or Valkey), or a Redis Cluster found
    from any one of its nodes; told apart at start-up and logged. `rediss://` and
    `redis://user:password@` work for both. `on_wait_skipped`: told of each write not waited
    for on a replica (`replicas.py`)."""
    url = tasks.redis_url
    assert url is not None
    client: Any
    cluster, replicas = _probe(url)
    connections: dict[str, Any] = {
        "max_connections": tasks.workers + _SPARE_CONNECTIONS,
        "socket_connect_timeout": 2.0,
        "socket_timeout": _SOCKET_TIMEOUT_S,
        "maint_notifications_config": _NO_MAINTENANCE_NOTIFICATIONS,
    }
    if cluster:
        client = RedisCluster.from_url(url, **connections)
    else:
        # Requests share the pool; past it, a command waits briefly for a free connection.
        pool = BlockingConnectionPool.from_url(url, timeout=5.0, **connections)
        client = Redis.from_pool(pool)  # owns the pool: closing the client closes it
    return RedisStore(
        client,
        # Unique per process: a restarted worker must not inherit its predecessor's claims.
        consumer=f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}",
        retention_s=tasks.retention_s,
        prefix=tasks.key_prefix,
        lease_s=tasks.lease_s,
        max_deliveries=tasks.max_deliveries,
        observe=observe,
        caps=tasks.queue_caps(),
        cluster=cluster,
        replicas=1 if replicas and tasks.replica_ack_timeout_ms > 0 else 0,
        replica_ack_timeout_ms=tasks.replica_ack_timeout_ms,
        deadline_s=tasks.store_timeout_s,
        on_wait_skipped=on_wait_skipped,
    )


def _probe(url: str) -> tuple[bool, int]:
    """Whether `url` names a node of a Redis Cluster, and how many replicas it has (a cluster:
    replica nodes in all). Asked once, at start-up, before the event loop serves anything; a
    Redis unreachable then is taken for a standalone one without replicas (a cluster would
    then answer MOVED, which fails its calls loudly until the gateway restarts)."""
    where = f"{URL(url).host}:{URL(url).port}"
    probe = SyncRedis.from_url(url, socket_connect_timeout=2.0, socket_timeout=2.0)
    try:
        cluster = bool(probe.info("cluster").get("cluster_enabled"))
        if cluster:
            nodes = probe.execute_command("CLUSTER", "NODES")  # type: ignore[no-untyped-call]
            nodes = nodes.decode().splitlines()
            flags = [set(line.split()[2].split(",")) for line in nodes]
            replicas = sum("slave" in node and "fail" not in node for node in flags)
        else:
            replicas = int(probe.info("replication").get("connected_slaves", 0))
    except RedisError as exc:
        logger.warning("task store: Redis at %s unreachable (%s); taken for standalone", where, exc)
        return False, 0
    finally:
        probe.close()
    kind = "Redis Cluster" if cluster else "standalone Redis"
    logger.info("task store: %s at %s, %d replicas", kind, where, replicas)
    return cluster, replicas
