"""Task workers: claim a queued task, make its upstream call (`call.py`), keep the answer.

A cancel is watched through the task's status in the store (woken by its change), so it aborts
the running upstream call whichever replica the DELETE arrived at.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable

import msgspec
from aiohttp import web

from gateway.admission import ADMISSION, Admission
from gateway.aio import until_set
from gateway.auth import AUTH, Auth
from gateway.config import Config
from gateway.errors import StoreUnavailable
from gateway.logsafe import OncePer
from gateway.metrics import METRICS, Metrics
from gateway.tasks.call import Outcome, TaskCall, failed
from gateway.tasks.follow import IDLE_S
from gateway.tasks.idempotency import kept_for_retries
from gateway.tasks.images import ImageCopies
from gateway.tasks.models import TERMINAL, Claim, Status, StoredResponse, TaskError, TaskStore
from gateway.tasks.results import Results, ResultStoreUnavailable, discard, put_within
from gateway.tasks.service import TASKS
from gateway.upstream import UPSTREAM, Upstream
from gateway.usage.meter import SENT_FAILURES, USAGE, Meter, Result, answered

logger = logging.getLogger(__name__)

# How long one claim blocks on an empty queue; a stop interrupts it at once.
_CLAIM_WAIT_S = 5.0
# After a store failure, before trying again.
_RETRY_S = 1.0


class Worker:
    def __init__(
        self,
        store: TaskStore,
        upstream: Upstream,
        auth: Auth,
        config: Config,
        metrics: Metrics,
        admission: Admission | None = None,
        results: Results | None = None,
        usage: Meter | None = None,
    ) -> None:
        self._store = store
        self._usage = usage
        self._results = results
        self._call = TaskCall(upstream, auth, admission, config.tasks.result_max_bytes, results)
        self._images = ImageCopies(config.tasks, results, metrics)
        self._config = config
        self._metrics = metrics
        self._stopping = asyncio.Event()
        self._store_down_said = OncePer(60.0)

    def stop(self) -> None:
        """Claim nothing more; tasks already running go on."""
        self._stopping.set()

    async def run(self) -> None:
        self._metrics.task_workers.inc()
        try:
            await self._loop()
        finally:
            self._metrics.task_workers.dec()

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            self._metrics.worker_heartbeat.set_to_current_time()
            try:
                # A claim cut short by the stop leaves at most one task claimed but not run;
                # its lease hands it on.
                claim = await until_set(self._stopping, self._store.claim(_CLAIM_WAIT_S))
                if claim is not None:
                    await self._run(claim)
            except StoreUnavailable:
                # Queued and running tasks stay in the store; pick up where we are when it is back.
                if self._store_down_said():  # once a minute, not once a second per loop
                    logger.warning("task store unreachable; workers retry every %.0f s", _RETRY_S)
                await asyncio.sleep(_RETRY_S)
            except Exception:
                # A bug must not silently take a worker away; the task's lease hands it on.
                logger.exception("task worker failed")
                await asyncio.sleep(_RETRY_S)

    async def run_here(
        self,
        claim: Claim,
        credential: str,
        answered: asyncio.Future[Outcome | None],
        timed: Callable[[float], None],
    ) -> None:
        """A sync call's task, run by the replica that holds its caller: under the limits a
        plain call meets (`admission`), not the task slots. `answered` gets this run's answer
        once the task keeps it, or at once if the task store is unreachable (an outage delays
        the caller's retries, never the caller); None if the task was cancelled, or ended by
        another run that took this one over (its replica stalled past the lease): the caller
        then gets the answer the task keeps, as every retry does."""
        try:
            await self._run(claim, credential, answered, timed)
        except StoreUnavailable:
            logger.warning(
                "%s answered, but the task store could not keep it", claim.record.task.id
            )
        except Exception:
            logger.exception("%s run failed", claim.record.task.id)
        finally:
            if not answered.done():
                answered.set_result(None)

    async def _run(
        self,
        claim: Claim,
        credential: str | None = None,
        answered: asyncio.Future[Outcome | None] | None = None,
        timed: Callable[[float], None] | None = None,
    ) -> None:
        task_id, attempt = claim.record.task.id, claim.record.attempt
        model = self._metrics.model_label(claim.record.task.model)
        if attempt == 1:
            self._metrics.task_wait(model).observe(time.time() - claim.record.submitted_at)
        started = time.monotonic()
        handover = False
        try:
            async with self._leased(task_id):
                status = await self._end(claim, credential, answered, timed)
            if status is not None and claim.job.body_ref is not None:
                # A request body in the results store goes with its task's end (a cancelled
                # task's, with the sweep).
                await discard(self._results, claim.job.body_ref)
            if status is not None:
                self._metrics.tasks(model, status).inc()
                self._metrics.task_duration(model, status).observe(time.monotonic() - started)
        except asyncio.CancelledError:
            handover = True  # shutting down mid-run: another worker takes the task now
            logger.info("%s handed over: this worker is stopping", task_id)
            raise
        finally:
            with contextlib.suppress(StoreUnavailable):  # else the lease lapses by itself
                await self._store.release(task_id, handover=handover)

    async def _end(
        self,
        claim: Claim,
        credential: str | None,
        answered: asyncio.Future[Outcome | None] | None,
        timed: Callable[[float], None] | None,
    ) -> Status | None:
        """The upstream call, its answer kept and the task ended: the task's end status, or
        None when the task was cancelled or taken over meanwhile."""
        task_id, attempt = claim.record.task.id, claim.record.attempt
        outcome = await self._outcome(claim, credential, timed)
        self._count(claim, outcome)
        if outcome is None:
            logger.info("%s cancelled or ended elsewhere; upstream call aborted", task_id)
            return None
        kept = await self._kept(task_id, attempt, *outcome)
        # The caller gets the body in hand, not a read of the copy just stored.
        hand = functools.partial(_hand, answered, kept if kept[0].body_ref is None else outcome)
        status = await self._finish(task_id, attempt, *kept, store_down=hand)
        if status is not None:
            hand()
        return status

    def _count(self, claim: Claim, outcome: Outcome | None) -> None:
        """Count the call against its client's usage and settle its budget hold (the task's
        id: a run after a lost worker settles it no more). A run cancelled or taken over made
        its call, so it costs the estimate."""
        record = claim.record
        if self._usage is None or record.ask is None:
            return
        result = Result(None, sent=True)
        if outcome is not None:
            response, error = outcome
            if error is None or error.code.isdigit():  # the upstream's own answer
                result = answered(response.status, response.body)
            else:
                result = Result(None, sent=error.code in SENT_FAILURES)
        retention_s = self._config.tasks.retention_s
        self._usage.settle_soon(record.client, record.ask, record.task.id, result, retention_s)

    @contextlib.asynccontextmanager
    async def _leased(self, task_id: str) -> AsyncIterator[None]:
        """The run's lease renewed until its end is written, the answer kept included: a slow
        results store or task store must not hand a paid-for task to another worker."""
        renewal = asyncio.ensure_future(self._renew(task_id))
        try:
            yield
        finally:
            renewal.cancel()
            await asyncio.gather(renewal, return_exceptions=True)

    async def _outcome(
        self, claim: Claim, credential: str | None, timed: Callable[[float], None] | None
    ) -> Outcome | None:
        """The upstream call's answer, or None if the task was cancelled while it ran."""
        task_id = claim.record.task.id
        call = asyncio.ensure_future(self._call(claim.job, claim.record.task, credential, timed))
        cancel = asyncio.ensure_future(self._cancelled(task_id))
        try:
            await asyncio.wait((call, cancel), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in (call, cancel):
                pending.cancel()
            await asyncio.gather(call, cancel, return_exceptions=True)
        return None if call.cancelled() else call.result()

    async def _finish(
        self,
        task_id: str,
        attempt: int,
        response: StoredResponse,
        error: TaskError | None,
        store_down: Callable[[], None],
    ) -> Status | None:
        """Keep the answer, waiting out a store outage for up to a lease: the upstream was
        paid for it, and after the lease another worker would pay again. The task's end
        status, or None when the task had been cancelled or taken over meanwhile.
        `store_down` is called when the store first fails to answer."""
        give_up = asyncio.get_running_loop().time() + self._config.tasks.lease_s
        while True:
            try:
                task = await self._store.finish(
                    task_id, attempt, response, error, keep_name=kept_for_retries(error)
                )
                if task is None:
                    return None
                logger.info("%s %s (upstream status %d)", task_id, task.status, response.status)
                return task.status
            except StoreUnavailable:
                store_down()
                if asyncio.get_running_loop().time() > give_up:
                    raise
                await asyncio.sleep(_RETRY_S)

    async def _kept(
        self, task_id: str, attempt: int, response: StoredResponse, error: TaskError | None
    ) -> Outcome:
        """The answer as the store keeps it: a large body goes to the results store first,
        and the task keeps a reference. An answer that cannot be kept fails the task loudly.
        A run that took another over writes a name of its own: the run it took over, if it
        is still alive, must not overwrite the answer the task keeps. Image URLs in it are
        copied first (`images.py`): the upstream's expire long before the answer does."""
        if error is None:
            response = await self._images.kept(task_id, response)
        if self._results is None or len(response.body) <= self._config.tasks.result_inline_bytes:
            return response, error
        try:
            name = task_id if attempt <= 1 else f"{task_id}.{attempt}"
            timeout_s = self._config.tasks.result_store_timeout_s
            ref = await put_within(self._results, name, response.body, timeout_s)
        except ResultStoreUnavailable as failure:
            self._metrics.result_store_errors.inc()
            logger.error(
                "%s answered, but the results store failed: %s", task_id, failure.__cause__
            )
            return failed(failure)
        return msgspec.structs.replace(response, body=b"", body_ref=ref), error

    async def _renew(self, task_id: str) -> None:
        while True:
            # Three tries per lease, so one slow round trip never loses a healthy task.
            await asyncio.sleep(self._config.tasks.lease_s / 3)
            with contextlib.suppress(StoreUnavailable):
                await self._store.renew(task_id)

    async def _cancelled(self, task_id: str) -> None:
        """Returns when the task is cancelled, or has ended otherwise (another run, taken over
        from this one, finished it: this run's answer would be fenced out), or is gone. A store
        outage is waited out, not taken for any of these."""
        while True:
            try:
                status = await self._store.ended(task_id, IDLE_S)
                if status is None or status in TERMINAL:
                    return
            except StoreUnavailable:
                await asyncio.sleep(_RETRY_S)


def _hand(answered: asyncio.Future[Outcome | None] | None, outcome: Outcome) -> None:
    """Give a caller waiting for this run (a sync call run here) its answer, once."""
    if answered is not None and not answered.done():
        answered.set_result(outcome)


class WorkerPool:
    """The task work of one process: `tasks.workers` loops claiming queued tasks, and the sync
    calls run here for the callers this replica holds, all sharing one Worker."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._worker: Worker | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._here: set[asyncio.Task[None]] = set()
        self._drain_until = 0.0

    def stop(self) -> None:
        """SIGTERM: claim nothing more; running tasks get the drain timeout to finish."""
        if self._worker is not None and self._drain_until == 0.0:
            self._worker.stop()
            self._drain_until = (
                asyncio.get_running_loop().time() + self._config.server.drain_timeout_s
            )

    def run_here(
        self, claim: Claim, credential: str, timed: Callable[[float], None]
    ) -> asyncio.Future[Outcome | None]:
        """Run a sync call's task (created `here`) to its end, whether or not its caller stays:
        a retry attaches to it. Its own asyncio task, so a caller that leaves cancels nothing;
        the future is its answer, as soon as the upstream gave it; `timed` gets the upstream's
        time before that, as the pass-through's access line has it."""
        assert self._worker is not None
        answered: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
        run = asyncio.create_task(self._worker.run_here(claim, credential, answered, timed))
        self._here.add(run)
        run.add_done_callback(self._here.discard)
        return answered

    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        self._worker = Worker(
            app[TASKS].store,
            app[UPSTREAM],
            app[AUTH],
            self._config,
            app[METRICS],
            app.get(ADMISSION),
            app[TASKS].results,
            app.get(USAGE),
        )
        self._loops = [
            asyncio.create_task(self._worker.run()) for _ in range(self._config.tasks.workers)
        ]
        yield
        self.stop()
        running = [*self._loops, *self._here]
        left = self._drain_until - asyncio.get_running_loop().time()
        _, late = await asyncio.wait(running, timeout=max(left, 0)) if running else ((), ())
        for work in late:
            work.cancel()  # each hands its task over to another worker
        await asyncio.gather(*running, return_exceptions=True)


WORKER_POOL = web.AppKey("workers", WorkerPool)
