"""The adapt job in batches: many tasks' support sets adapted in one vmapped pass, each job alone.

Each job is read, checked and recorded on its own (its own errors, its own transaction); only
the inner loops share compute, through `fewshot.batched.adapt_many` for jobs that use the same
initialization, mode and number of steps (one job alone takes the fast single-task loop).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.adaptations.handler import (
    _DONE,
    _result,
    load_support,
    permanent_failures,
    store_and_finish,
    support_diagnostics,
)
from app.core import metrics, ml
from app.core.runtime import Runtime
from app.jobs import state
from app.jobs.batch import BatchResult, Held
from app.jobs.runner import PermanentJobError
from app.jobs.state import Claim, Outcome
from app.models import AdaptedModel, Initialization, Job, SupportExample, Task

if TYPE_CHECKING:
    from torch import Tensor


log = logging.getLogger(__name__)


@dataclass
class _Loaded:
    """One job's inputs, read and decoded."""

    claim: Claim
    task_id: uuid.UUID
    support_sha256: str
    init_row: Initialization
    mode: str
    steps: int | None
    support: Tensor
    labels: list[str]


def run_adapt_batch(runtime: Runtime, held: list[Held]) -> BatchResult:
    """Adapt every held job's task; an Outcome or the exception that ended each job."""
    results: BatchResult = {}
    loaded: list[_Loaded] = []
    runtime.models.use_serving_threads()
    for claim, rows in _read_rows(runtime, [claim for claim, _ in held]):
        try:
            item = _load(runtime, claim, rows)
        except Exception as exc:
            results[claim.job_id] = exc
            continue
        if isinstance(item, Outcome):
            results[claim.job_id] = item
        else:
            loaded.append(item)
    groups: dict[tuple[str, str, int | None], list[_Loaded]] = {}
    for item in loaded:
        groups.setdefault((item.init_row.version, item.mode, item.steps), []).append(item)
    for (_, mode, steps), items in groups.items():
        try:
            init = runtime.models.initialization(items[0].init_row)
            started = time.perf_counter()
            models, embeddings = _adapt(
                init, items, "head" if mode == "head" else "full", steps, runtime
            )
            compute = (time.perf_counter() - started) / len(items)
        except ml.CheckpointError as exc:
            log.error("initialization %s unreadable: %s", items[0].init_row.version, exc)
            error = PermanentJobError(
                "initialization_unreadable", "the initialization's files could not be read"
            )
            results.update({item.claim.job_id: error for item in items})
            continue
        except Exception as exc:
            results.update({item.claim.job_id: exc for item in items})
            continue
        # One session (one connection) records the group, each job in its own transaction.
        with runtime.sessions() as session:
            for item, model, embedded in zip(items, models, embeddings, strict=True):
                if isinstance(model, ml.EpisodeError):
                    error = PermanentJobError("invalid_support_set", str(model))
                    results[item.claim.job_id] = error
                    continue
                metrics.ADAPT_COMPUTE.labels(model.mode).observe(compute)
                try:
                    results[item.claim.job_id] = _record(
                        runtime, session, item, model, compute, embedded
                    )
                except Exception as exc:
                    session.rollback()
                    results[item.claim.job_id] = exc
    return results


def _adapt(
    init: ml.Initialization,
    items: list[_Loaded],
    mode: ml.AdaptMode,
    steps: int | None,
    runtime: Runtime,
) -> tuple[list[ml.AdaptedModel | ml.EpisodeError], list[Tensor | None]]:
    """Each item's model (or why its support set is invalid) and its support embeddings under
    the initialization (for the diagnostics; None when it has no model)."""
    device = runtime.models.device
    if len(items) == 1 or ml.chooses_steps(init, mode, steps):
        # Steps chosen per task (each support set its own count) do not stack: one at a time.
        models: list[ml.AdaptedModel | ml.EpisodeError] = []
        embeddings: list[Tensor | None] = []
        for item in items:
            try:
                model, embedded = ml.adapt_fast_with_embeddings(
                    init, item.support, item.labels, mode=mode, steps=steps, device=device
                )
            except ml.EpisodeError as exc:
                models.append(exc)
                embeddings.append(None)
                continue
            models.append(model)
            embeddings.append(embedded)
        return models, embeddings
    supports = [(item.support, item.labels) for item in items]
    models = ml.adapt_many(
        init, supports, mode=mode, steps=steps, device=device,
        max_batch=runtime.settings.adapt_batch_max_jobs,
    )  # fmt: skip
    valid = [i for i, model in enumerate(models) if not isinstance(model, ml.EpisodeError)]
    embeddings = [None] * len(items)
    for i, embedded in zip(
        valid,
        ml.embed_supports(init, [items[i].support for i in valid], device=device),
        strict=True,
    ):
        embeddings[i] = embedded
    return models, embeddings


@dataclass
class _Rows:
    """One job's rows, read with the others of its batch (None: gone)."""

    job: Job | None
    task: Task | None
    existing: AdaptedModel | None
    examples: list[SupportExample]
    init_row: Initialization | None


def _read_rows(runtime: Runtime, claims: list[Claim]) -> list[tuple[Claim, _Rows]]:
    """The rows of every claimed job in five queries (not five per job), detached."""
    ids = [claim.job_id for claim in claims]
    with runtime.sessions() as session:
        jobs = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(ids)))}
        task_ids = [job.task_id for job in jobs.values() if job.task_id is not None]
        tasks = {
            task.id: task for task in session.scalars(select(Task).where(Task.id.in_(task_ids)))
        }
        existing = {
            row.job_id: row
            for row in session.scalars(select(AdaptedModel).where(AdaptedModel.job_id.in_(ids)))
        }
        examples: dict[uuid.UUID, list[SupportExample]] = {}
        for example in session.scalars(
            select(SupportExample)
            .where(SupportExample.task_id.in_(task_ids))
            .order_by(SupportExample.task_id, SupportExample.position)
        ):
            examples.setdefault(example.task_id, []).append(example)
        init_ids = {job.initialization_id for job in jobs.values()}
        init_ids |= {task.initialization_id for task in tasks.values()}
        inits = {
            row.id: row
            for row in session.scalars(
                select(Initialization).where(Initialization.id.in_(init_ids - {None}))
            )
        }
        session.expunge_all()
    out = []
    for claim in claims:
        job = jobs.get(claim.job_id)
        task = tasks.get(job.task_id) if job is not None and job.task_id is not None else None
        init_id = None
        if job is not None and task is not None:
            init_id = job.initialization_id or task.initialization_id
        rows = _Rows(
            job=job,
            task=task,
            existing=existing.get(claim.job_id),
            examples=examples.get(task.id, []) if task is not None else [],
            init_row=inits.get(init_id) if init_id is not None else None,
        )
        out.append((claim, rows))
    return out


def _load(runtime: Runtime, claim: Claim, rows: _Rows) -> _Loaded | Outcome:
    """Check one job's rows; decode and preprocess its support images."""
    job, task, init_row = rows.job, rows.task, rows.init_row
    if job is None or task is None or init_row is None:
        return Outcome("skipped")
    if rows.existing is not None:
        # An earlier delivery did the work and died before marking the job; just finish it.
        with runtime.sessions() as session:
            state.finish(session, claim, result=_result(rows.existing), progress_detail=_DONE)
        return Outcome("skipped")
    examples = rows.examples
    steps_param = job.params.get("steps", task.steps)
    mode = str(job.params.get("mode", task.mode))
    task_id, support_sha256 = task.id, task.support_set_sha256
    with permanent_failures(claim.job_id):
        init = runtime.models.initialization(init_row)
        support = load_support(runtime, init, examples)
    return _Loaded(
        claim=claim,
        task_id=task_id,
        support_sha256=support_sha256,
        init_row=init_row,
        mode=mode,
        steps=None if steps_param is None else int(steps_param),
        support=support,
        labels=[e.label for e in examples],
    )


def _record(
    runtime: Runtime,
    session: Session,
    item: _Loaded,
    model: ml.AdaptedModel,
    compute: float,
    embeddings: Tensor | None,
) -> Outcome:
    """Store one job's weights and row, and finish the job in the same transaction."""
    diagnostics = None if embeddings is None else support_diagnostics(embeddings, item.labels)
    return store_and_finish(
        runtime,
        session,
        item.claim,
        task_id=item.task_id,
        init_row=item.init_row,
        support_sha256=item.support_sha256,
        model=model,
        compute=compute,
        diagnostics=diagnostics,
    )
