"""Running several waiting jobs of one kind in one pass, each claimed, renewed and ended on its own.

A delivery of a batchable kind (adapt) claims its own job, then up to the configured number of
other queued jobs of that kind, oldest first, with one conditional UPDATE that counts an attempt
and takes a lease for each (a job another worker claimed first is simply not in the batch).
Every claimed job gets its own heartbeat and is finished, failed, released or handed back on its
own through app.jobs.state, so one bad job never fails the others. The Celery messages of the
jobs taken this way find them finished (or held) when they arrive and do nothing; a job
released for a retry is re-sent by the reaper.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from app.core.config import Settings
from app.core.runtime import Runtime
from app.jobs import state
from app.jobs.heartbeat import Heartbeat
from app.jobs.state import Claim, Outcome
from app.models import Job

log = logging.getLogger(__name__)

# Jobs this process ended in a batch (succeeded, failed or cancelled there): their own messages
# arrive afterwards and are skipped without a database round trip. Bounded; a job that is not
# remembered just takes the usual claim, which finds it ended.
_ENDED_LIMIT = 65536
_ended: OrderedDict[uuid.UUID, None] = OrderedDict()
_ended_lock = threading.Lock()


def ended_in_batch(job_id: uuid.UUID) -> bool:
    """True when a batch of this process ended the job (its message needs no claim)."""
    with _ended_lock:
        return job_id in _ended


def _remember_ended(job_ids: list[uuid.UUID]) -> None:
    with _ended_lock:
        for job_id in job_ids:
            _ended[job_id] = None
        while len(_ended) > _ENDED_LIMIT:
            _ended.popitem(last=False)


Held = tuple[Claim, Heartbeat]
BatchResult = dict[uuid.UUID, Outcome | BaseException]
BatchHandler = Callable[[Runtime, list[Held]], BatchResult]


@dataclass(frozen=True)
class Batching:
    """How one kind of job is batched: its handler and the settings that size the batch."""

    handler: str
    max_jobs_setting: str
    wait_ms_setting: str

    def max_jobs(self, settings: Settings) -> int:
        """Jobs per batch (1: no batching)."""
        return int(getattr(settings, self.max_jobs_setting))

    def wait_seconds(self, settings: Settings) -> float:
        """How long a delivery that found a line waits for the batch to fill."""
        return float(getattr(settings, self.wait_ms_setting)) / 1000


BATCHED: dict[str, Batching] = {
    "adapt": Batching("app.adaptations.batch:run_adapt_batch", "adapt_batch_max_jobs",
                      "adapt_batch_wait_ms"),
}  # fmt: skip


def batching_of(kind: str, settings: Settings) -> Batching | None:
    """The batching of a kind when it is configured to take more than one job, else None."""
    batching = BATCHED.get(kind)
    if batching is None or batching.max_jobs(settings) <= 1:
        return None
    return batching


def _handler(batching: Batching) -> BatchHandler:
    module, _, attribute = batching.handler.partition(":")
    handler: BatchHandler = getattr(importlib.import_module(module), attribute)
    return handler


def waiting_jobs(runtime: Runtime, kind: str, limit: int) -> list[uuid.UUID]:
    """Ids of queued jobs of a kind, oldest first (any worker may claim them meanwhile)."""
    with runtime.sessions() as session:
        return list(
            session.scalars(
                select(Job.id)
                .where(Job.kind == kind, Job.state == "queued", Job.attempts < Job.max_attempts)
                .order_by(Job.created_at)
                .limit(limit)
            )
        )


def claim_more(runtime: Runtime, first: Claim, batching: Batching) -> list[Claim]:
    """Up to the batch size minus one other queued jobs of the first claim's kind, claimed."""
    settings = runtime.settings
    limit = batching.max_jobs(settings) - 1
    try:
        ids = waiting_jobs(runtime, first.kind, limit)
        wait = batching.wait_seconds(settings)
        if ids and len(ids) < limit and wait > 0:
            # A line exists: give it a moment to grow into a fuller batch.
            time.sleep(wait)
            ids = waiting_jobs(runtime, first.kind, limit)
        others = [job_id for job_id in ids if job_id != first.job_id]
        with runtime.sessions() as session:
            return state.claim_queued(session, others, first.kind, settings)
    except OperationalError:
        log.exception("could not take more jobs into the batch (database unavailable)")
        return []


EndRun = Callable[[Runtime, Claim, Heartbeat, "Outcome | BaseException | None"], Outcome]


def run_batch(
    runtime: Runtime,
    claims: list[Claim],
    batching: Batching,
    *,
    end_run: EndRun,
    stopping: Callable[[], bool],
) -> Outcome:
    """Run claimed jobs of one kind in one pass; the outcome of the first (this delivery's) job.

    `end_run` ends each job from its result (the runner's rules); `stopping` says when this
    process shuts down.
    """
    first = claims[0]
    held: list[Held] = []
    for claim in claims:
        heartbeat = Heartbeat(runtime, claim, stop=stopping)
        heartbeat.start()
        held.append((claim, heartbeat))
    try:
        try:
            results = _handler(batching)(runtime, held)
        except Exception as exc:
            log.exception("a batch of %d %s jobs failed as a whole", len(held), first.kind)
            results = {claim.job_id: exc for claim in claims}
        outcomes = {
            claim.job_id: end_run(runtime, claim, heartbeat, results.get(claim.job_id))
            for claim, heartbeat in held
        }
    finally:
        for _, heartbeat in held:
            heartbeat.close()
    # The first job is this delivery's own; the others' messages are still on their way.
    _remember_ended(
        [job_id for job_id, outcome in outcomes.items() if outcome.status in ("done", "failed")]
    )
    return outcomes[first.job_id]
