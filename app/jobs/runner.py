"""Running one delivery of a job: claim it, keep its lease alive, call its kind's handler, end it.

Celery tasks and the in-process executor both call `run_job`. A message that arrives twice, or
after a crash, finds the job finished (or held by a live worker) and does nothing.

Transient failures: a database that cannot be reached to claim the job sends the message again
later (no attempt counted); an artifact store that is unavailable (StorageUnavailable) is
waited for while the claim is kept (`run_waiting_for_storage`); any other error spends the
attempt and the job is retried with backoff until its attempts are spent.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from app.core import metrics
from app.core.errors import StorageUnavailable
from app.core.runtime import Runtime
from app.jobs import state
from app.jobs.batch import batching_of, claim_more, ended_in_batch, run_batch
from app.jobs.heartbeat import Heartbeat
from app.jobs.kinds import handler_of, kind_of
from app.jobs.state import Claim, Outcome

log = logging.getLogger(__name__)

# Set when this process shuts down; per-runtime events stop the runs of one embedded app.
_stopping = threading.Event()
_stop_events: dict[int, threading.Event] = {}


class PermanentJobError(Exception):
    """A failure that another attempt would repeat (bad data, corrupt artifact)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class HandBack(Exception):
    """Raised by a handler that stopped early for a shutdown: requeue without spending an attempt."""


def _stop_event(runtime: Runtime) -> threading.Event:
    return _stop_events.setdefault(id(runtime), threading.Event())


def request_stop(runtime: Runtime | None = None) -> None:
    """Ask running jobs (of one runtime, or all) to hand their work back at their next check."""
    if runtime is None:
        _stopping.set()
    else:
        _stop_event(runtime).set()


def clear_stop(runtime: Runtime) -> None:
    """Forget a runtime's stop request once its runs have ended."""
    _stop_events.pop(id(runtime), None)


def stopping(runtime: Runtime) -> bool:
    """True once this process or runtime is shutting down."""
    return _stopping.is_set() or _stop_event(runtime).is_set()


Handler = Callable[[Runtime, Claim, Heartbeat], Outcome]

# Seconds between runs of a job that found the artifact store unavailable: these, then the last
# one again until storage_wait_seconds are spent.
STORAGE_BACKOFF = (1.0, 2.0, 4.0, 8.0, 10.0)
WAITING_FOR_STORAGE = "waiting_for_storage"


def storage_backoff(waits: int) -> float:
    """Seconds before the next run of a job that has already waited `waits` times for storage."""
    return STORAGE_BACKOFF[min(waits, len(STORAGE_BACKOFF) - 1)]


def run_waiting_for_storage(
    runtime: Runtime,
    claimed: Claim,
    heartbeat: Heartbeat,
    run: Callable[[], Outcome],
    error: StorageUnavailable | None = None,
) -> Outcome:
    """`run()` the claimed job (unless `error` says its first run already failed) and, while
    the artifact store is unavailable, run it again after a backoff.

    The worker keeps the claim meanwhile: the heartbeat renews the lease, so no other worker
    takes the job over and no attempt is spent, and the job's progress_detail says that it
    waits for storage and when it runs again. (Celery's countdown is not used for this: it
    becomes an ETA on the sending worker's clock, which another worker reads on its own.)
    After storage_wait_seconds in all the last StorageUnavailable is raised, to be handled
    like any other error; a shutdown hands the job back, a cancel request ends it, and a lost
    lease (another worker took over) ends this run.
    """
    limit = runtime.settings.storage_wait_seconds
    started = time.monotonic()
    waits = 0
    while True:
        if error is None:
            try:
                return run()
            except StorageUnavailable as exc:
                error = exc
        delay = storage_backoff(waits)
        waited = time.monotonic() - started
        if waited + delay > limit:
            raise error
        waits += 1
        metrics.STORAGE_WAITS.labels(claimed.kind).inc()
        log.warning(
            "job %s: the artifact store is unavailable; running it again in %g s "
            "(wait %d, %.1f s so far)",
            claimed.job_id, delay, waits, waited,
        )  # fmt: skip
        _note_waiting(runtime, heartbeat, waits=waits, waited=waited, delay=delay)
        stopped = _pause(runtime, claimed, heartbeat, delay)
        if stopped is not None:
            return stopped
        error = None


def _note_waiting(
    runtime: Runtime, heartbeat: Heartbeat, *, waits: int, waited: float, delay: float
) -> None:
    """Say in the job's progress_detail that it waits for the artifact store (with a renewal)."""
    from app.models import Job

    try:
        with runtime.sessions() as session:
            detail = session.scalar(
                select(Job.progress_detail).where(Job.id == heartbeat.claim.job_id)
            )
            session.commit()
        note = {"waits": waits, "waited_seconds": round(waited, 1), "next_run_in_seconds": delay}
        heartbeat.update(
            progress_detail={**(detail or {}), "stage": WAITING_FOR_STORAGE, "storage": note}
        )
    except OperationalError:
        # The heartbeat keeps the lease; the note is only information.
        log.warning("job %s: could not note the wait for storage", heartbeat.claim.job_id)


def _pause(
    runtime: Runtime, claimed: Claim, heartbeat: Heartbeat, seconds: float
) -> Outcome | None:
    """Sleep `seconds` unless the job must stop: None when the wait ran out, else its outcome
    (HandBack raised at a shutdown)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if heartbeat.lost:
            return Outcome("skipped")
        if heartbeat.cancelled:
            with runtime.sessions() as session:
                state.end_fenced(
                    session, claimed, "cancelled", progress_detail={"stage": "cancelled"}
                )
            return Outcome("done")
        if stopping(runtime):
            raise HandBack()
        time.sleep(min(left, 0.2))
    return None


def run_job(runtime: Runtime, job_id: uuid.UUID) -> Outcome:
    """Deliver one job: claim it, run its handler under a heartbeat, record how it ended."""
    settings = runtime.settings
    if ended_in_batch(job_id):
        # A batch of this process already ended this job: nothing to claim.
        return Outcome("skipped")
    try:
        with runtime.sessions() as session:
            claimed = state.claim(session, job_id, settings)
    except OperationalError:
        log.exception("job %s: database unavailable while claiming", job_id)
        return Outcome("retry", retry_in=5.0)
    if isinstance(claimed, Outcome):
        return claimed
    batching = batching_of(claimed.kind, settings)
    more = claim_more(runtime, claimed, batching) if batching is not None else []
    if batching is not None and more:
        # Other jobs of its kind were waiting: this delivery runs them all in one pass.
        return run_batch(
            runtime,
            [claimed, *more],
            batching,
            end_run=end_run,
            stopping=lambda: stopping(runtime),
        )
    kind = kind_of(claimed.kind)
    heartbeat = Heartbeat(runtime, claimed, stop=lambda: stopping(runtime))
    heartbeat.start()
    try:
        if kind is None:
            raise PermanentJobError(
                "unknown_job_kind", f"no runner for jobs of kind {claimed.kind!r}"
            )
        handler: Handler = handler_of(kind)
        return run_waiting_for_storage(
            runtime, claimed, heartbeat, lambda: handler(runtime, claimed, heartbeat)
        )
    except HandBack:
        with runtime.sessions() as session:
            state.hand_back(session, claimed)
        log.info("job %s handed back at shutdown (attempt not counted)", job_id)
        return Outcome("handed_back")
    except PermanentJobError as exc:
        log.warning("job %s failed: %s: %s", job_id, exc.code, exc.message)
        _safely(state.fail, runtime, job_id, attempt=claimed.attempt, code=exc.code,
                message=exc.message)  # fmt: skip
        return Outcome("failed")
    except Exception as exc:
        log.exception("job %s: attempt %d failed", job_id, claimed.attempt)
        if heartbeat.lost:
            return Outcome("skipped")
        with runtime.sessions() as session:
            job_max = _max_attempts(session, job_id, settings.job_max_attempts)
            if claimed.attempt >= job_max:
                state.fail(session, job_id, attempt=claimed.attempt, **_last_error(exc))
                return Outcome("failed")
            state.release(session, claimed)
        return Outcome("retry", retry_in=float(2**claimed.attempt))
    finally:
        heartbeat.close()


def _last_error(exc: BaseException) -> dict[str, str]:
    """The code and message of a job that failed on every attempt, the last one with `exc`."""
    if isinstance(exc, StorageUnavailable):
        return {
            "code": exc.code,
            "message": "the artifact store stayed unavailable on every attempt; try again later",
        }
    return {
        "code": "internal_error",
        "message": f"the job failed on every attempt; last error: {type(exc).__name__}",
    }


def end_run(
    runtime: Runtime, claimed: Claim, heartbeat: Heartbeat, result: Outcome | BaseException | None
) -> Outcome:
    """End one claimed run of a batch from what its handler gave, as run_job ends a lone run."""
    job_id = claimed.job_id
    if isinstance(result, Outcome):
        return result
    kind = kind_of(claimed.kind)
    if isinstance(result, StorageUnavailable) and kind is not None:
        # Waited for on its own, as a lone run of the job would be.
        handler: Handler = handler_of(kind)
        try:
            return run_waiting_for_storage(
                runtime,
                claimed,
                heartbeat,
                lambda: handler(runtime, claimed, heartbeat),
                error=result,
            )
        except Exception as exc:
            result = exc
    if isinstance(result, HandBack):
        with runtime.sessions() as session:
            state.hand_back(session, claimed)
        return Outcome("handed_back")
    if isinstance(result, PermanentJobError):
        log.warning("job %s failed: %s: %s", job_id, result.code, result.message)
        _safely(state.fail, runtime, job_id, attempt=claimed.attempt, code=result.code,
                message=result.message)  # fmt: skip
        return Outcome("failed")
    if result is None:
        result = RuntimeError("the batch handler gave no result for this job")
    log.error("job %s: attempt %d failed: %r", job_id, claimed.attempt, result)
    if heartbeat.lost:
        return Outcome("skipped")
    try:
        with runtime.sessions() as session:
            if claimed.attempt >= _max_attempts(session, job_id, runtime.settings.job_max_attempts):
                state.fail(session, job_id, attempt=claimed.attempt, **_last_error(result))
                return Outcome("failed")
            state.release(session, claimed)
    except OperationalError:
        log.exception("job %s: could not record its failure (database unavailable)", job_id)
    return Outcome("retry", retry_in=float(2**claimed.attempt))


def _max_attempts(session: Any, job_id: uuid.UUID, default: int) -> int:
    from app.models import Job

    job = session.get(Job, job_id)
    return int(job.max_attempts) if job is not None else default


def _safely(transition: Callable[..., Any], runtime: Runtime, *args: Any, **kwargs: Any) -> None:
    try:
        with runtime.sessions() as session:
            transition(session, *args, **kwargs)
    except OperationalError:
        # The lease runs out and the reaper hands the job on; nothing is lost.
        log.exception("could not record the end of a job (database unavailable)")
