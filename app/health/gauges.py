"""Gauges read at scrape time from the database and the broker, so every API process agrees."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from app.core.runtime import Runtime
from app.initializations import registry
from app.jobs.dispatch import Dispatcher
from app.jobs.kinds import KINDS, QUEUES
from app.models import JOB_STATES, Job

log = logging.getLogger(__name__)


class StateCollector(Collector):
    """Queue depth per queue, jobs by kind and state, live consumers, the active initialization."""

    def __init__(self, runtime: Runtime, dispatcher: Dispatcher) -> None:
        self.runtime = runtime
        self.dispatcher = dispatcher

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One reading of each gauge; a dependency that does not answer leaves its gauges out."""
        try:
            yield from self._from_database()
        except Exception:
            log.warning("metrics: the database did not answer; job gauges left out", exc_info=True)
        depth = GaugeMetricFamily(
            "maml_serve_queue_depth",
            "Messages waiting in each broker queue (absent when jobs run in-process).",
            labels=["queue"],
        )
        consumers = GaugeMetricFamily(
            "maml_serve_queue_consumers",
            "Workers whose heartbeat says they consume each queue.",
            labels=["queue"],
        )
        # One bounded PING first: a frozen broker would otherwise cost a timeout per queue.
        reachable = self.dispatcher.ping()
        for queue in QUEUES if reachable else ():
            waiting = self.dispatcher.backlog(queue)
            if waiting is not None:
                depth.add_metric([queue], waiting)
            live = self.dispatcher.consumers(queue)
            if live is not None:
                consumers.add_metric([queue], live)
        yield depth
        yield consumers

    def _from_database(self) -> Iterator[GaugeMetricFamily]:
        with self.runtime.sessions() as session:
            counts = {
                (kind, state): int(count)
                for kind, state, count in session.execute(
                    select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)
                )
            }
            active = registry.active_versions(session=session)
        jobs = GaugeMetricFamily(
            "maml_serve_jobs", "Jobs by kind and state.", labels=["kind", "state"]
        )
        for kind in KINDS:
            for state in JOB_STATES:
                jobs.add_metric([kind, state], counts.get((kind, state), 0))
        yield jobs
        queued = GaugeMetricFamily(
            "maml_serve_queued_jobs", "Jobs waiting for a worker, per queue.", labels=["queue"]
        )
        for queue in QUEUES:
            names = [kind.name for kind in KINDS.values() if kind.queue == queue]
            queued.add_metric([queue], sum(counts.get((name, "queued"), 0) for name in names))
        yield queued
        version = GaugeMetricFamily(
            "maml_serve_active_initialization",
            "1 for each domain's active version (new tasks of that domain adapt from it).",
            labels=["version", "domain"],
        )
        for row in active:
            version.add_metric([row.version, row.domain], 1)
        yield version
