"""Running one delivery of a job: claim it, keep its lease alive, call its kind's handler, end it.

Celery tasks and the in-process executor both call `run_job`. A message that arrives twice, or
after a crash, finds the job finished (or held by a live worker) and does nothing.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import OperationalError

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
        return handler(runtime, claimed, heartbeat)
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
                state.fail(
                    session,
                    job_id,
                    attempt=claimed.attempt,
                    code="internal_error",
                    message=f"the job failed on every attempt; last error: {type(exc).__name__}",
                )
                return Outcome("failed")
            state.release(session, claimed)
        return Outcome("retry", retry_in=float(2**claimed.attempt))
    finally:
        heartbeat.close()


def end_run(
    runtime: Runtime, claimed: Claim, heartbeat: Heartbeat, result: Outcome | BaseException | None
) -> Outcome:
    """End one claimed run of a batch from what its handler gave, as run_job ends a lone run."""
    job_id = claimed.job_id
    if isinstance(result, Outcome):
        return result
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
                state.fail(
                    session,
                    job_id,
                    attempt=claimed.attempt,
                    code="internal_error",
                    message=f"the job failed on every attempt; last error: {type(result).__name__}",
                )
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
