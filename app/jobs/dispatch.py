"""Handing committed jobs to whatever runs them: a thread pool here, or Celery workers via Redis."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Protocol

from sqlalchemy import or_, select

from app.core.runtime import Runtime
from app.jobs import state
from app.jobs.kinds import KINDS, handler_of
from app.jobs.liveness import consumer_key
from app.jobs.notices import EndPublisher, EndSubscriber
from app.jobs.watch import JobWatch, Watches
from app.models import Job, utcnow

log = logging.getLogger(__name__)


class Dispatcher(Protocol):
    """Sends a job id to a runner; called only after the job row is committed."""

    def submit(self, job_id: uuid.UUID, kind: str, queue: str) -> None:
        """Send one job to be run."""

    def ping(self) -> bool:
        """True when jobs can be sent right now."""

    def backlog(self, queue: str) -> int | None:
        """Messages waiting in a queue, or None when that cannot be known."""

    def consumers(self, queue: str) -> int | None:
        """Live workers consuming a queue, or None when that cannot be known."""

    def watch(self, job_id: uuid.UUID) -> AbstractContextManager[JobWatch]:
        """A handle to wait on while the job runs."""

    def close(self) -> None:
        """Stop sending; finish or drop in-flight work."""


class InProcessDispatcher:
    """The embedded default: jobs run on a thread pool in this process, through the same runner."""

    def __init__(self, runtime: Runtime, threads: int) -> None:
        # Adaptation's handler is imported now, not by the first job (which would wait for it).
        handler_of(KINDS["adapt"])

        self.runtime = runtime
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="maml-serve-job")
        # Meta-training runs for hours; its own thread keeps adaptations flowing meanwhile.
        self._train_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maml-serve-train")
        self._timers: set[threading.Timer] = set()
        # The waiting requests' watches, notified whenever a run of their job ends, and told
        # the state when the job itself ended (after the commit, from app.jobs.state).
        self._watches = Watches()
        state.add_end_listener(self._watches.notify)
        self._closed = False
        self._lock = threading.Lock()

    def submit(self, job_id: uuid.UUID, kind: str, queue: str) -> None:
        """Queue the job on the pool."""
        with self._lock:
            if self._closed:
                return
            pool = self._train_pool if queue == "train" else self._pool
            pool.submit(self._run, job_id, kind, queue)

    def _run(self, job_id: uuid.UUID, kind: str, queue: str) -> None:
        from app.jobs.runner import run_job

        try:
            outcome = run_job(self.runtime, job_id)
        except Exception:
            log.exception("job %s crashed the in-process runner", job_id)
            return
        finally:
            self._watches.notify(job_id)
        if outcome.retry_in is not None:
            self._later(outcome.retry_in, job_id, kind, queue)

    def _later(self, delay: float, job_id: uuid.UUID, kind: str, queue: str) -> None:
        def fire() -> None:
            self._timers.discard(timer)
            self.submit(job_id, kind, queue)

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        with self._lock:
            if self._closed:
                return
            self._timers.add(timer)
        timer.start()

    def resume_unfinished(self) -> int:
        """Resubmit jobs a previous run of this process left queued or running."""
        with self.runtime.sessions() as session:
            jobs = session.execute(
                select(Job.id, Job.kind, Job.queue).where(
                    or_(Job.state == "queued", Job.state == "running"), Job.kind.in_(KINDS)
                )
            ).all()
            # Leases of a dead process would otherwise delay the rerun until they expire.
            for job in session.scalars(select(Job).where(Job.state == "running")):
                job.lease_expires_at = utcnow()
            session.commit()
        for job_id, kind, queue in jobs:
            self.submit(job_id, kind, queue)
        return len(jobs)

    def ping(self) -> bool:
        """The pool is always reachable while open."""
        return not self._closed

    def backlog(self, queue: str) -> int | None:
        """Jobs wait in the database's order here; the pool's queue is not inspected."""
        return None

    def consumers(self, queue: str) -> int | None:
        """This process runs every queue itself; there are no workers to count."""
        return None

    def watch(self, job_id: uuid.UUID) -> AbstractContextManager[JobWatch]:
        """Wake the waiter as soon as a run of this job ends."""
        return self._watches.watch(job_id, pushed=True)

    def close(self) -> None:
        """Cancel pending retries and wait for running jobs."""
        with self._lock:
            self._closed = True
            timers = list(self._timers)
        for timer in timers:
            timer.cancel()
        from app.jobs.runner import clear_stop, request_stop

        # A running meta-training checkpoints and goes back to the queue; the next start resumes it.
        request_stop(self.runtime)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._train_pool.shutdown(wait=True, cancel_futures=True)
        state.remove_end_listener(self._watches.notify)
        clear_stop(self.runtime)


class CeleryDispatcher:
    """Production: publish the job id to its queue on the broker; workers re-read the row."""

    def __init__(self, runtime: Runtime) -> None:
        from app.jobs.broker import make_celery

        self.celery = make_celery(runtime.settings)
        self._settings = runtime.settings
        self._subscriber = EndSubscriber(runtime.settings)
        self._publisher: EndPublisher | None = None

    def start_notices(self) -> None:
        """For an API process: hear of job ends (waiters wake at once) and publish its own ends."""
        self._subscriber.start()
        if self._publisher is None:
            # Jobs an API ends itself (cancelled while queued) wake waiters in other processes.
            self._publisher = EndPublisher(self._settings)

    def submit(self, job_id: uuid.UUID, kind: str, queue: str) -> None:
        """Publish the job id (JSON) to the kind's queue."""
        self.celery.send_task(KINDS[kind].task_name, args=[str(job_id)], queue=queue)

    def backlog(self, queue: str) -> int | None:
        """Messages ready in the broker's queue (those a worker holds are not counted)."""
        try:
            with self.celery.connection_for_write() as connection:
                declared = connection.default_channel.queue_declare(queue=queue, passive=True)
                return int(declared.message_count)
        except Exception:
            return None

    def ping(self) -> bool:
        """True when the broker answers a PING (a frozen one accepts TCP but never answers)."""
        try:
            with self.celery.connection_for_write() as connection:
                return bool(connection.default_channel.client.ping())
        except Exception:
            return False

    def consumers(self, queue: str) -> int | None:
        """Workers whose mark on `queue` has not expired, or None when the broker is unreachable."""
        try:
            with self.celery.connection_for_write() as connection:
                client = connection.default_channel.client
                pattern = consumer_key(queue, "*")
                return sum(1 for _ in client.scan_iter(match=pattern, count=1000))
        except Exception:
            return None

    def announce(self, queues: Sequence[str], worker: str, ttl: int) -> None:
        """Mark `queues` as consumed by `worker` for `ttl` seconds."""
        with self.celery.connection_for_write() as connection:
            pipeline = connection.default_channel.client.pipeline()
            for queue in queues:
                pipeline.set(consumer_key(queue, worker), "1", ex=ttl)
            pipeline.execute()

    def watch(self, job_id: uuid.UUID) -> AbstractContextManager[JobWatch]:
        """Woken by the job's end notice from the worker; polling while notices are unavailable."""
        return self._subscriber.watch(job_id)

    def close(self) -> None:
        """Stop the notice threads and close the broker connection pool."""
        self._subscriber.close()
        if self._publisher is not None:
            self._publisher.close()
        self.celery.close()


def make_dispatcher(runtime: Runtime) -> InProcessDispatcher | CeleryDispatcher:
    """Celery when a broker URL is configured, the in-process pool otherwise."""
    if runtime.settings.uses_celery:
        return CeleryDispatcher(runtime)
    return InProcessDispatcher(runtime, runtime.settings.executor_threads)
