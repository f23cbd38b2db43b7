"""The adapt job: the task's initialization adapted to its support set, weights stored once."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core import metrics, ml
from app.core.images import decode_stored
from app.core.runtime import Runtime
from app.core.storage import (
    ArtifactCorrupt,
    adapted_weights_key,
    delete_owned,
    sha256_bytes,
    task_prefix,
)
from app.jobs import state
from app.jobs.heartbeat import Heartbeat
from app.jobs.runner import PermanentJobError
from app.jobs.state import Claim, Outcome
from app.models import AdaptedModel, Initialization, Job, SupportExample, Task

if TYPE_CHECKING:
    from torch import Tensor


log = logging.getLogger(__name__)

_DONE = {"stage": "done"}


def _result(row: AdaptedModel, diagnostics: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "adapted_model_id": str(row.id),
        "task_id": str(row.task_id),
        "support_accuracy": row.support_accuracy,
    }
    if diagnostics is not None:
        out["diagnostics"] = diagnostics
    return out


def support_diagnostics(embeddings: Tensor, labels: list[str]) -> dict[str, Any] | None:
    """Leave-one-out accuracy and confusable pairs of a support set from its embeddings [S, D]
    under the initialization (None if they fail)."""
    try:
        return ml.diagnose_embeddings(embeddings, labels).to_dict()
    except Exception:
        # Diagnostics inform; a failure in them must never fail the adaptation itself.
        log.exception("support-set diagnostics failed")
        return None


@contextmanager
def permanent_failures(job_id: uuid.UUID) -> Iterator[None]:
    """Turn the errors another attempt would repeat into PermanentJobError with their code."""
    try:
        yield
    except ml.EpisodeError as exc:
        raise PermanentJobError("invalid_support_set", str(exc)) from exc
    except ml.CheckpointError as exc:
        # The reader's message names the file: it goes to the log, not to the job.
        log.error("job %s: initialization unreadable: %s", job_id, exc)
        raise PermanentJobError(
            "initialization_unreadable", "the initialization's files could not be read"
        ) from exc
    except ArtifactCorrupt as exc:
        raise PermanentJobError("artifact_corrupt", exc.detail) from exc
    except FileNotFoundError as exc:
        raise PermanentJobError(
            "artifact_missing", "a stored file this task needs is missing"
        ) from exc


def load_support(
    runtime: Runtime, init: ml.Initialization, examples: Sequence[SupportExample]
) -> Tensor:
    """Support images [S, C, H, W], read, decoded and shrunk one at a time.

    A support set of large images is never in memory at full size.
    """
    import torch

    side = runtime.settings.max_decoded_side
    return torch.cat(
        [
            ml.preprocess_images(
                [decode_stored(support_image_bytes(runtime, e), side)], init.config
            )
            for e in examples
        ]
    )


def support_image_bytes(runtime: Runtime, example: SupportExample) -> bytes:
    """A support image's bytes, from its row or its file, checked against its sha256."""
    if example.image_key is not None:
        return runtime.store.read_bytes(example.image_key, example.sha256)
    data = example.data
    if data is None or sha256_bytes(data) != example.sha256:
        log.error("support example %s does not match its recorded sha256", example.id)
        raise ArtifactCorrupt("a stored support image failed its integrity check")
    return data


def store_and_finish(
    runtime: Runtime,
    session: Session,
    claim: Claim,
    *,
    task_id: uuid.UUID,
    init_row: Initialization,
    support_sha256: str,
    model: ml.AdaptedModel,
    compute: float,
    diagnostics: dict[str, Any] | None,
) -> Outcome:
    """Write one job's weights and adapted-model row, and finish the job in that transaction."""
    key = adapted_weights_key(task_id, claim.job_id)
    # What is the initialization's (the calibration table; the backbone in head mode) is loaded
    # from there. Written with an fsync before the row that names it is committed.
    data = model.to_bytes(with_calibration=False, with_backbone=False)
    sha256 = runtime.store.put_bytes(key, data)
    row = AdaptedModel(
        task_id=task_id,
        job_id=claim.job_id,
        initialization_id=init_row.id,
        initialization_version=init_row.version,
        mode=model.mode,
        steps=model.steps,
        step_size=None,
        seed=0,
        support_set_sha256=support_sha256,
        support_accuracy=float(model.support_accuracy),
        labels=list(model.labels),
        weights_key=key,
        sha256=sha256,
        size_bytes=len(data),
        compute_seconds=compute,
        device=str(runtime.models.device),
    )
    try:
        session.add(row)
        session.flush()
        finished = state.finish(
            session, claim, result=_result(row, diagnostics), progress_detail=_DONE
        )
    except IntegrityError:
        # A concurrent delivery recorded this job's model first (job_id is unique), or the
        # task was deleted meanwhile (its foreign key fails).
        session.rollback()
        if not _forget_if_task_deleted(runtime, session, task_id):
            log.info("job %s: adapted model already recorded by another delivery", claim.job_id)
        session.rollback()
        return Outcome("skipped")
    if not finished:
        _forget_if_task_deleted(runtime, session, task_id)
        session.rollback()
        return Outcome("skipped")
    runtime.models.put_adapted(row.id, model)
    return Outcome("done")


def _forget_if_task_deleted(runtime: Runtime, session: Session, task_id: uuid.UUID) -> bool:
    """Remove the files of a task deleted while it adapted (the weights just written would
    otherwise outlive it); True when it was deleted."""
    if session.scalar(select(Task.id).where(Task.id == task_id)) is not None:
        return False
    log.info("task %s was deleted while adapting; its files are removed", task_id)
    delete_owned(runtime.store, task_prefix(task_id))
    return True


def run_adapt(runtime: Runtime, claim: Claim, heartbeat: Heartbeat) -> Outcome:
    """Adapt the task's pinned initialization to its support set and store the weights."""
    with runtime.sessions() as session:
        # The job, its task, the version it adapts (a re-adaptation names its own; a first
        # adaptation uses the task's pinned one) and a model an earlier delivery recorded: one
        # query.
        found = session.execute(
            select(Job, Task, Initialization, AdaptedModel)
            .join(Task, Task.id == Job.task_id)
            .join(
                Initialization,
                Initialization.id == func.coalesce(Job.initialization_id, Task.initialization_id),
            )
            .outerjoin(AdaptedModel, AdaptedModel.job_id == Job.id)
            .where(Job.id == claim.job_id)
        ).one_or_none()
        if found is None:
            return Outcome("skipped")
        job, task, init_row, existing = found
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
        mode = str(job.params.get("mode", task.mode))
        steps_param = job.params.get("steps", task.steps)
        runtime.models.use_serving_threads()
        with permanent_failures(claim.job_id):
            init = runtime.models.initialization(init_row)
            support = load_support(runtime, init, examples)
            labels = [e.label for e in examples]
            started = time.perf_counter()
            # The fast single-task loop: fewshot.adapt's result, with less work per step; its
            # first pass also gives the embeddings the diagnostics need.
            model, embeddings = ml.adapt_fast_with_embeddings(
                init,
                support,
                labels,
                mode="head" if mode == "head" else "full",
                steps=None if steps_param is None else int(steps_param),
                device=runtime.models.device,
            )
            compute = time.perf_counter() - started
            diagnostics = support_diagnostics(embeddings, labels)
        metrics.ADAPT_COMPUTE.labels(model.mode).observe(compute)
        return store_and_finish(
            runtime,
            session,
            claim,
            task_id=task.id,
            init_row=init_row,
            support_sha256=task.support_set_sha256,
            model=model,
            compute=compute,
            diagnostics=diagnostics,
        )
