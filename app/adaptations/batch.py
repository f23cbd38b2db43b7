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
from sqlalchemy.exc import IntegrityError

from app.adaptations.handler import _DONE, _forget_if_task_deleted, _result
from app.core import metrics
from app.core.images import decode_stored
from app.core.runtime import Runtime
from app.core.storage import ArtifactCorrupt, adapted_weights_key, sha256_file
from app.jobs import state
from app.jobs.batch import BatchResult, Held
from app.jobs.runner import PermanentJobError
from app.jobs.state import Claim, Outcome
from app.models import AdaptedModel, Initialization, Job, SupportExample, Task

if TYPE_CHECKING:
    from torch import Tensor

    import fewshot

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
    import fewshot

    results: BatchResult = {}
    loaded: list[_Loaded] = []
    runtime.models.use_serving_threads()
    for claim, _ in held:
        try:
            item = _load(runtime, claim)
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
            models = _adapt(init, items, "head" if mode == "head" else "full", steps, runtime)
            compute = (time.perf_counter() - started) / len(items)
        except fewshot.CheckpointError as exc:
            log.error("initialization %s unreadable: %s", items[0].init_row.version, exc)
            error = PermanentJobError(
                "initialization_unreadable", "the initialization's files could not be read"
            )
            results.update({item.claim.job_id: error for item in items})
            continue
        except Exception as exc:
            results.update({item.claim.job_id: exc for item in items})
            continue
        for item, model in zip(items, models, strict=True):
            if isinstance(model, fewshot.EpisodeError):
                results[item.claim.job_id] = PermanentJobError("invalid_support_set", str(model))
                continue
            metrics.ADAPT_COMPUTE.labels(model.mode).observe(compute)
            try:
                results[item.claim.job_id] = _record(runtime, item, model, compute)
            except Exception as exc:
                results[item.claim.job_id] = exc
    return results


def _adapt(
    init: fewshot.Initialization,
    items: list[_Loaded],
    mode: fewshot.config.AdaptMode,
    steps: int | None,
    runtime: Runtime,
) -> list[fewshot.AdaptedModel | fewshot.EpisodeError]:
    import fewshot
    from fewshot.batched import adapt_many
    from fewshot.fast import adapt_fast

    device = runtime.models.device
    if len(items) == 1:
        item = items[0]
        try:
            return [adapt_fast(init, item.support, item.labels, mode=mode, steps=steps,
                               device=device)]  # fmt: skip
        except fewshot.EpisodeError as exc:
            return [exc]
    supports = [(item.support, item.labels) for item in items]
    return adapt_many(
        init, supports, mode=mode, steps=steps, device=device,
        max_batch=runtime.settings.adapt_batch_max_jobs,
    )  # fmt: skip


def _load(runtime: Runtime, claim: Claim) -> _Loaded | Outcome:
    """Read one job's task, support set and initialization; decode and preprocess its images."""
    import torch

    import fewshot

    with runtime.sessions() as session:
        job = session.get(Job, claim.job_id)
        task = (
            session.get(Task, job.task_id) if job is not None and job.task_id is not None else None
        )
        if job is None or task is None:
            return Outcome("skipped")
        existing = session.scalar(select(AdaptedModel).where(AdaptedModel.job_id == job.id))
        if existing is not None:
            # An earlier delivery did the work and died before marking the job; just finish it.
            state.finish(session, claim, result=_result(existing), progress_detail=_DONE)
            return Outcome("skipped")
        examples = list(
            session.scalars(
                select(SupportExample)
                .where(SupportExample.task_id == task.id)
                .order_by(SupportExample.position)
            )
        )
        init_row = (
            session.get(Initialization, job.initialization_id)
            if job.initialization_id is not None
            else None
        ) or task.initialization
        steps_param = job.params.get("steps", task.steps)
        mode = str(job.params.get("mode", task.mode))
        session.expunge(init_row)
        task_id, support_sha256 = task.id, task.support_set_sha256
    try:
        init = runtime.models.initialization(init_row)
        # Read, decoded and shrunk one at a time, as the lone handler does.
        side = runtime.settings.max_decoded_side
        support = torch.cat(
            [
                fewshot.preprocess_images(
                    [decode_stored(runtime.store.read_bytes(e.image_key, e.sha256), side)],
                    init.config,
                )
                for e in examples
            ]
        )
    except fewshot.EpisodeError as exc:
        raise PermanentJobError("invalid_support_set", str(exc)) from exc
    except fewshot.CheckpointError as exc:
        log.error("job %s: initialization unreadable: %s", claim.job_id, exc)
        raise PermanentJobError(
            "initialization_unreadable", "the initialization's files could not be read"
        ) from exc
    except ArtifactCorrupt as exc:
        raise PermanentJobError("artifact_corrupt", exc.detail) from exc
    except FileNotFoundError as exc:
        raise PermanentJobError(
            "artifact_missing", "a stored file this task needs is missing"
        ) from exc
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
    runtime: Runtime, item: _Loaded, model: fewshot.AdaptedModel, compute: float
) -> Outcome:
    """Store one job's weights and row, and finish the job in the same transaction."""
    claim = item.claim
    key = adapted_weights_key(item.task_id, claim.job_id)
    path = model.save(runtime.store.path(key))
    row = AdaptedModel(
        task_id=item.task_id,
        job_id=claim.job_id,
        initialization_id=item.init_row.id,
        initialization_version=item.init_row.version,
        mode=model.mode,
        steps=model.steps,
        step_size=None,
        seed=0,
        support_set_sha256=item.support_sha256,
        support_accuracy=float(model.support_accuracy),
        labels=list(model.labels),
        weights_key=key,
        sha256=sha256_file(path),
        size_bytes=path.stat().st_size,
        compute_seconds=compute,
        device=str(runtime.models.device),
    )
    with runtime.sessions() as session:
        try:
            session.add(row)
            session.flush()
            finished = state.finish(session, claim, result=_result(row), progress_detail=_DONE)
        except IntegrityError:
            # Another delivery recorded this job's model first, or the task was deleted.
            session.rollback()
            if not _forget_if_task_deleted(runtime, session, item.task_id):
                log.info("job %s: adapted model already recorded by another delivery", claim.job_id)
            return Outcome("skipped")
        if not finished:
            _forget_if_task_deleted(runtime, session, item.task_id)
            return Outcome("skipped")
        model_id = row.id
    runtime.models.put_adapted(model_id, model)
    return Outcome("done")
