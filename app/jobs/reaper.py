"""The reaper: the database says what must run; the broker only carries messages that can be lost.

A worker killed mid-job leaves its job `running` under a lease that runs out; a broker that
restarts without persistence drops `queued` messages; Redis would redeliver an unacknowledged
message only after its visibility timeout (an hour or more). Every worker runs this loop:

- a running job whose lease ran out with attempts left is re-sent (once per lease period);
- a running job whose lease ran out with no attempt left is failed (`attempts_exhausted`);
- queued jobs are re-sent only as many as the broker's queue lacks, so a backlog waiting in line
  is not multiplied.

Conditional UPDATEs on `jobs.sent_at` give each job to one reaper; the claim makes any duplicate
delivery a no-op.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core import metrics
from app.core.runtime import Runtime
from app.jobs import state
from app.jobs.kinds import KINDS, QUEUES
from app.models import Job

log = logging.getLogger(__name__)

Send = Callable[[uuid.UUID, str, str], None]
Backlog = Callable[[str], "int | None"]


def _unknown_backlog(_queue: str) -> int | None:
    return None


def reap(runtime: Runtime, send: Send, backlog: Backlog = _unknown_backlog) -> int:
    """One pass: fail exhausted jobs, re-send abandoned and lost ones; returns how many were sent."""
    settings = runtime.settings
    with runtime.sessions() as session:
        for job_id in state.fail_all_exhausted(session):
            metrics.LEASE_EXPIRIES.labels("exhausted").inc()
            log.warning("job %s failed: its attempts are spent and its last lease ran out", job_id)
        taken = state.take_abandoned(session, settings)
        metrics.LEASE_EXPIRIES.labels("resent").inc(len(taken))
        for queue in QUEUES:
            waiting = backlog(queue)
            limit = None if waiting is None else _queued(session, queue) - waiting
            taken.extend(state.take_unsent(session, settings, queue, limit))
    for job_id, kind in taken:
        send(job_id, kind, KINDS[kind].queue)
        metrics.RESENDS.labels(kind).inc()
        log.info("re-sent %s job %s (its message was lost or its worker died)", kind, job_id)
    return len(taken)


def _queued(session: Session, queue: str) -> int:
    return int(
        session.scalar(
            select(func.count()).select_from(Job).where(Job.queue == queue, Job.state == "queued")
        )
        or 0
    )


def interval(runtime: Runtime) -> float:
    """Seconds between passes: half the shortest lease, so recovery takes at most 1.5 leases."""
    return min(kind.lease_seconds(runtime.settings) for kind in KINDS.values()) / 2


def reaper_loop(runtime: Runtime, send: Send, backlog: Backlog, stop: threading.Event) -> None:
    """Reap every `interval` seconds until `stop` is set."""
    while not stop.is_set():
        try:
            reap(runtime, send, backlog)
        except Exception:
            log.exception("could not look for stale jobs")
        stop.wait(interval(runtime))
