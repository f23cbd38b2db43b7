"""The meta-training job: a resumable fewshot.MetaTrainer run in the job's artifact folder.

Progress, the curve so far and a lease heartbeat go to the job row; a cancel request or a worker
shutdown stops the run at its next report, after a checkpoint. A run picked up again (after its
worker died and the lease ran out) resumes from that checkpoint. At the end the new
initialization and the active one are scored on the same validation episodes, and the new
version is registered (and promoted, if the run asked for it and the rule allows).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.runtime import Runtime
from app.core.storage import initialization_key, sha256_file
from app.core.threads import training_threads, use_threads
from app.initializations import promotion, registry
from app.jobs import state
from app.jobs.heartbeat import Heartbeat
from app.jobs.runner import HandBack, PermanentJobError
from app.jobs.state import Claim, Outcome
from app.models import Dataset, Initialization, Job, utcnow

if TYPE_CHECKING:
    from fewshot.data import ImageDataset
    from fewshot.initialization import Initialization as FewshotInitialization
    from fewshot.training import Progress

log = logging.getLogger(__name__)

COMPARISON_SHAPES = ((5, 1), (20, 1))
EVAL_SEED = 20_240_601


def _without_paths(message: str, dataset_path: Path) -> str:
    """A job error for the API: the dataset's storage path (and folder) never shown."""
    for internal in (str(dataset_path), str(dataset_path.parent)):
        message = message.replace(internal, "the dataset")
    return message


def run_folder(job_id: uuid.UUID) -> str:
    """Artifact key of a meta-training job's folder (checkpoint, curve, result)."""
    return f"jobs/{job_id}/run"


def version_for(job_id: uuid.UUID) -> str:
    """The version name a meta-training job registers (fixed per job, so it registers once)."""
    return f"mt-{job_id.hex[:12]}"


def train_config(params: dict[str, Any], start: FewshotInitialization | None) -> Any:
    """The fewshot MetaTrainConfig of a job's settings."""
    from fewshot.config import MetaTrainConfig, ModelConfig

    algorithm = dict(params.get("algorithm") or {})
    order = algorithm.pop("order", "second")
    model = ModelConfig.from_dict(params.get("model") or {}) if start is None else start.config
    return MetaTrainConfig.from_dict(
        {
            **algorithm,
            "second_order": order != "first",
            "val_every": int(params.get("validate_every", 500)),
            "val_episodes": int(params.get("validation_episodes", 200)),
            "checkpoint_every_s": float(params.get("checkpoint_every_s", 120.0)),
            "max_seconds": params.get("max_seconds"),
            "model": model.to_dict(),
        }
    )


# --- data -------------------------------------------------------------------------------------


def _split(data: ImageDataset, fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    from fewshot.data import ImageDataset, split_groups

    if len(data.group_names) < 2:
        # A flat dataset: hold out whole classes instead of groups.
        data = ImageDataset(data.images, data.targets, data.classes, list(data.classes))
    groups = len(data.group_names)
    holdout = min(groups - 1, max(1, round(groups * fraction)))
    return split_groups(data, holdout, seed=seed)


@dataclass
class _Data:
    path: Path
    fraction: float
    seed: int

    def split(self, config: Any) -> tuple[ImageDataset, ImageDataset]:
        """Train and validation parts at a model config's size and mode (the same split always)."""
        from fewshot.data import load_dataset

        return _split(load_dataset(self.path, config), self.fraction, self.seed)


# --- the job row ------------------------------------------------------------------------------


class _Reporter:
    """Writes the run's stage and progress to the job row through its heartbeat."""

    def __init__(self, heartbeat: Heartbeat, detail: dict[str, Any]) -> None:
        self.heartbeat = heartbeat
        self.detail = detail
        self._lock = threading.Lock()

    def stage(self, name: str, **extra: Any) -> None:
        """Record what the run is doing now."""
        with self._lock:
            self.detail.update(stage=name, **extra)
            self.heartbeat.update(progress_detail=dict(self.detail))

    def progress(self, report: Progress, curve: list[dict[str, Any]], folder: Path) -> None:
        """on_progress: iteration of total, ETA, the curve so far, the last checkpoint."""
        checkpoint = None
        with contextlib.suppress(OSError, ValueError, KeyError):
            checkpoint = json.loads((folder / "state.json").read_text())["iteration"]
        with self._lock:
            self.detail.update(
                stage="training",
                iteration=report.iteration,
                total=report.total,
                elapsed_seconds=round(report.elapsed_s, 2),
                eta_seconds=None if report.eta_s is None else round(report.eta_s, 1),
                checkpoint_iteration=checkpoint,
                curve=list(curve),
            )
            fraction = report.iteration / max(report.total, 1)
            self.heartbeat.update(progress=min(0.99, fraction), progress_detail=dict(self.detail))

    def should_stop(self) -> bool:
        """should_stop: a cancel request, a lost lease or a process shutdown."""
        return self.heartbeat.should_stop()


def _result(row: Initialization, promoted: bool) -> dict[str, Any]:
    return {
        "initialization_version": row.version,
        "metrics": row.metrics,
        "promoted": promoted,
    }


# --- evaluation and registration --------------------------------------------------------------


def _score(
    init: FewshotInitialization, val: ImageDataset, episodes: int, device: str
) -> dict[str, Any]:
    from fewshot.evaluate import evaluate_shapes

    results = evaluate_shapes(
        init, val, COMPARISON_SHAPES, episodes=episodes, seed=EVAL_SEED, device=device
    )
    return {
        f"{w}w{k}s": {
            "accuracy": round(r.accuracy, 5),
            "ci95": round(r.ci95 if math.isfinite(r.ci95) else 0.0, 5),
            "episodes": r.episodes,
        }
        for (w, k), r in results.items()
    }


def compare(new: dict[str, Any], active: dict[str, Any]) -> dict[str, Any]:
    """Per shape: the difference and whether the new one is not worse beyond the 95% intervals."""
    out: dict[str, Any] = {}
    for shape, score in new.items():
        if shape not in active:
            continue
        other = active[shape]
        margin = math.hypot(score["ci95"], other["ci95"])
        difference = score["accuracy"] - other["accuracy"]
        out[shape] = {
            "difference": round(difference, 5),
            "ci95": round(margin, 5),
            "not_worse": difference >= -margin,
        }
    return out


def _register(
    session: Session,
    runtime: Runtime,
    claim: Claim,
    job: Job,
    init: FewshotInitialization,
    folder: Path,
    metrics: dict[str, Any],
    training_config: dict[str, Any],
    promote: bool,
) -> tuple[Initialization, bool] | None:
    """Record the new version and the job's success in one transaction."""
    version = version_for(job.id)
    init.metadata.update({"version": version, "metrics": metrics})
    init.metadata.pop("curve", None)
    staged = init.save(folder / "register")
    key = initialization_key(version)
    runtime.store.copy_tree_in(staged, key)
    sha = sha256_file(runtime.store.path(f"{key}/weights.safetensors"))
    now = utcnow()
    row = Initialization(
        version=version,
        status="ready",
        source="trained",
        config=init.config.to_dict(),
        training_config=training_config,
        metrics=metrics,
        artifact_key=key,
        sha256=sha,
        is_active=False,
        dataset_id=job.dataset_id,
        parent_version=job.params.get("start_version"),
        # The version belongs to the tenant whose data trained it; only that tenant sees it.
        tenant_id=job.tenant_id,
        created_at=now,
    )
    session.add(row)
    session.flush()
    promoted = False
    if promote:
        # Auto-promotion makes it the tenant's own default; other tenants are unaffected.
        if job.tenant_id is not None:
            promotion.make_tenant_default(
                session=session,
                row=row,
                tenant_id=job.tenant_id,
                action="auto_promote",
                actor=f"job:{job.id}",
            )
        else:
            promotion.make_active(
                session=session, row=row, action="auto_promote", actor=f"job:{job.id}"
            )
        promoted = True
    if not state.finish(
        session,
        claim,
        result=_result(row, promoted),
        progress_detail={**job.progress_detail, "stage": "done"},
    ):
        return None
    return row, promoted


def run_meta_train(runtime: Runtime, claim: Claim, heartbeat: Heartbeat) -> Outcome:
    """Run (or resume) one meta-training job to the end, a cancel, or a shutdown."""
    import fewshot
    from fewshot.training import MetaTrainer

    # One long job on its own thread: torch's default team (serving threads use fewer).
    use_threads(training_threads(runtime.settings.torch_threads))
    with runtime.sessions() as session:
        job = session.get(Job, claim.job_id)
        if job is None:
            return Outcome("skipped")
        existing = session.scalar(
            select(Initialization).where(Initialization.version == version_for(job.id))
        )
        if existing is not None:
            # An earlier delivery registered the version and died before marking the job.
            state.finish(session, claim, result=_result(existing, False))
            return Outcome("skipped")
        if job.cancel_requested_at is not None:
            state.end_fenced(session, claim, "cancelled")
            return Outcome("done")
        dataset = session.get(Dataset, job.dataset_id) if job.dataset_id else None
        if dataset is None:
            raise PermanentJobError("dataset_missing", "the job's dataset no longer exists")
        start_row = (
            session.get(Initialization, job.initialization_id) if job.initialization_id else None
        )
        params = dict(job.params)
        detail = dict(job.progress_detail or {})
        dataset_path = runtime.store.verify(dataset.artifact_key, dataset.sha256)

    reporter = _Reporter(heartbeat, detail)
    reporter.stage("loading")
    folder = runtime.store.path(run_folder(claim.job_id))
    device = runtime.models.device
    start = runtime.models.initialization(start_row) if start_row is not None else None
    cfg = train_config(params, start)
    data = _Data(dataset_path, float(params.get("validation_split", 0.2)), cfg.seed)
    try:
        train, val = data.split(cfg.model if start is None else start.config)
        if len(train.classes) < cfg.ways[1]:
            raise fewshot.DatasetError(
                f"the training part has {len(train.classes)} classes; ways up to "
                f"{cfg.ways[1]} need at least that many"
            )
    except fewshot.DatasetError as exc:
        raise PermanentJobError("invalid_dataset", _without_paths(str(exc), dataset_path)) from exc
    trainer = MetaTrainer(cfg, train, val, folder, start=start, device=device)
    extra: dict[str, Any] = {"iteration": trainer.iteration, "total": cfg.iterations}
    if trainer.iteration > 0:
        extra["resumes"] = [
            *detail.get("resumes", []),
            {"attempt": claim.attempt, "iteration": trainer.iteration},
        ]
        log.info("job %s: resuming from iteration %d", claim.job_id, trainer.iteration)
    # The data is loaded: say so now, not at the first report (which can be minutes away).
    reporter.stage("training", **extra)
    try:
        result = trainer.run(
            on_progress=lambda report: reporter.progress(report, trainer.curve, folder),
            should_stop=reporter.should_stop,
            log_every=max(1, int(params.get("log_every", 25))),
            show_progress=False,
            # Reports with no curve point: an ETA within seconds of the start.
            early_reports=(1, 2, 5, 10),
        )
    except fewshot.EpisodeError as exc:
        # E.g. classes with fewer images than shots + queries: another attempt would repeat it.
        raise PermanentJobError("invalid_settings", _without_paths(str(exc), dataset_path)) from exc
    if result.cancelled or result.initialization is None:
        with runtime.sessions() as session:
            if heartbeat.cancelled:
                state.end_fenced(
                    session,
                    claim,
                    "cancelled",
                    progress_detail={**reporter.detail, "stage": "cancelled"},
                )
                return Outcome("done")
        if not heartbeat.lost:
            # A shutdown: the checkpoint is written; the next attempt resumes from it.
            raise HandBack()
        return Outcome("skipped")

    reporter.stage("evaluating")
    episodes = int(params.get("validation_episodes", 200))
    new_scores = _score(result.initialization, val, episodes, device)
    with runtime.sessions() as session:
        # The baseline is what the tenant's new tasks adapt from now.
        run_tenant = session.scalar(select(Job.tenant_id).where(Job.id == claim.job_id))
        active_row = (
            registry.active_initialization(session=session)
            if run_tenant is None
            else registry.default_for(session=session, tenant_id=run_tenant)
        )
    metrics: dict[str, Any] = {
        "validation": new_scores,
        "dataset": {"id": str(params.get("dataset_id")), "name": params.get("dataset_name")},
        "iterations": result.iteration,
        "wall_time_s": round(result.wall_time_s, 1),
        "validation_classes": len(val.classes),
    }
    if active_row is not None:
        active = runtime.models.initialization(active_row)
        _, active_val = data.split(active.config)
        active_scores = _score(active, active_val, episodes, device)
        comparison = compare(new_scores, active_scores)
        metrics["baseline"] = {"version": active_row.version, "validation": active_scores}
        metrics["comparison"] = comparison
        promote = bool(params.get("auto_promote")) and all(
            c["not_worse"] for c in comparison.values()
        )
    else:
        promote = bool(params.get("auto_promote"))
    reporter.stage("registering")
    with runtime.sessions() as session:
        job = session.get(Job, claim.job_id)
        assert job is not None
        try:
            done = _register(
                session, runtime, claim, job, result.initialization, folder, metrics,
                {**params, "resolved": cfg.to_dict()}, promote,
            )  # fmt: skip
        except IntegrityError:
            session.rollback()
            return Outcome("skipped")
    if done is None:
        return Outcome("skipped")
    row, promoted = done
    log.info("job %s: registered %s (promoted: %s)", claim.job_id, row.version, promoted)
    return Outcome("done")
