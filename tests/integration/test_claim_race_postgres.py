"""Twenty threads claiming one job on PostgreSQL: exactly one claim, one attempt counted."""

from __future__ import annotations

import threading

import pytest

from app.core.config import Settings
from app.core.runtime import Runtime
from app.jobs import state
from app.jobs.state import Claim, Outcome
from app.models import Job

# A hang (a missing timeout) fails the test instead of blocking the run.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_twenty_threads_claim_one_job_once(production_settings: Settings) -> None:
    runtime = Runtime.build(production_settings)
    try:
        with runtime.sessions() as session:
            job = state.new_job(kind="adapt", settings=production_settings)
            session.add(job)
            session.commit()
            job_id = job.id
        barrier = threading.Barrier(20)
        results: list[Claim | Outcome] = []
        errors: list[BaseException] = []

        def claim() -> None:
            try:
                with runtime.sessions() as session:
                    barrier.wait(timeout=30)
                    results.append(state.claim(session, job_id, production_settings))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=claim) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == [] and len(results) == 20
        claims = [r for r in results if isinstance(r, Claim)]
        assert len(claims) == 1 and claims[0].attempt == 1
        assert all(r == Outcome("skipped") for r in results if not isinstance(r, Claim))
        with runtime.sessions() as session:
            row = session.get(Job, job_id)
            assert row is not None and row.state == "running" and row.attempts == 1
            assert row.claimed_by == claims[0].worker
            session.delete(row)
            session.commit()
    finally:
        runtime.close()


def test_the_claim_is_fenced_by_the_attempt(production_settings: Settings) -> None:
    runtime = Runtime.build(production_settings)
    try:
        with runtime.sessions() as session:
            job = state.new_job(kind="adapt", settings=production_settings)
            session.add(job)
            session.commit()
            claimed = state.claim(session, job.id, production_settings)
            assert isinstance(claimed, Claim)
            stale = Claim(job.id, claimed.kind, claimed.attempt + 1, claimed.worker)
            assert not state.renew(session, stale, production_settings)
            assert state.renew(session, claimed, production_settings)
            session.delete(session.get(Job, job.id))
            session.commit()
    finally:
        runtime.close()
