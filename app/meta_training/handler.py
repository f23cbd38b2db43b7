"""The meta-training job: a resumable fewshot.MetaTrainer run in the job's artifact folder.

Progress, the curve so far and a lease heartbeat go to the job row; a cancel request or a worker
shutdown stops the run at its next report, after a checkpoint. A run picked up again (after its
worker died and the lease ran out) resumes from that checkpoint. At the end the new
initialization and the active one are scored on the same validation episodes, and the new
version is registered (and promoted, if the run asked for it and the rule allows).

The validation groups are the dataset's, fixed when it was registered: the run trains on the rest
and validates on exactly those. Promotion compares the new version and the baseline paired, on
the same seeded episodes of those groups (fewshot.promotion), and refuses when a required shape
is worse beyond the margin, cannot be drawn, has too few episodes, or when a validation group was
part of either version's training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core import ml
from app.core.runtime import Runtime
from app.core.storage import initialization_key, sha256_file
from app.core.threads import training_threads, use_threads
from app.initializations import promotion, registry
from app.jobs import state
from app.jobs.heartbeat import Heartbeat
from app.jobs.runner import HandBack, PermanentJobError
from app.jobs.state import Claim, Outcome
from app.models import Dataset, Initialization, Job, utcnow

log = logging.getLogger(__name__)

EVAL_SEED = 20_240_601
EVAL_QUERIES = 5
# Paired episodes per shape a promotion needs (fewshot.promotion.MIN_EPISODES).
MIN_PROMOTION_EPISODES = 400
# Always required; the 5-shot shapes too when every validation class has 5 + queries images.
ONE_SHOT_SHAPES = ((5, 1, False), (20, 1, False))
FIVE_SHOT_SHAPES = ((5, 5, False), (20, 5, False))


def _without_paths(message: str, dataset_path: Path) -> str:
    """A job error for the API: the dataset's storage path (and folder) never shown."""
    for internal in (str(dataset_path), str(dataset_path.parent)):
        message = message.replace(internal, "the dataset")
    return message


def run_folder(job_id: uuid.UUID) -> str:
    """A meta-training job's folder (checkpoint, curve, result), in the worker's work_dir."""
    return f"jobs/{job_id}/run"


def version_for(job_id: uuid.UUID) -> str:
    """The version name a meta-training job registers (fixed per job, so it registers once)."""
    return f"mt-{job_id.hex[:12]}"


def train_config(params: dict[str, Any], start: ml.Initialization | None) -> Any:
    """The fewshot MetaTrainConfig of a job's settings."""
    algorithm = dict(params.get("algorithm") or {})
    order = algorithm.pop("order", "second")
    model = ml.ModelConfig.from_dict(params.get("model") or {}) if start is None else start.config
    return ml.MetaTrainConfig.from_dict(
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


def _units(data: ml.ImageDataset, by: str) -> ml.ImageDataset:

    if by == "class" or len(data.group_names) < 2:
        # A flat dataset: whole classes are held out instead of groups.
        return ml.ImageDataset(data.images, data.targets, data.classes, list(data.classes))
    return data


def validation_groups_of(details: dict[str, Any], data: ml.ImageDataset) -> tuple[list[str], str]:
    """The dataset's held-out groups (or classes) and which they are, fixed at registration.

    Datasets registered before the split was recorded get the same deterministic choice now.
    """
    held = details.get("validation_groups")
    by = str(details.get("validation_by") or ("group" if len(data.group_names) >= 2 else "class"))
    if isinstance(held, list) and held:
        return sorted(str(g) for g in held), by
    return ml.choose_validation_groups(_units(data, by).group_names), by


def split_fixed(units: ml.ImageDataset, held: list[str]) -> tuple[ml.ImageDataset, ml.ImageDataset]:
    """Train on everything but the held-out groups; validate on exactly them."""
    names = units.group_names
    missing = sorted(set(held) - set(names))
    if missing:
        raise ml.DatasetError(f"the dataset's validation groups are not in its data: {missing}")
    train = [g for g in names if g not in set(held)]
    if not train:
        raise ml.DatasetError("every group of the dataset is held out for validation")
    return units.subset_groups(train), units.subset_groups(held)


@dataclass
class _Data:
    fetch: Callable[[], Path]
    details: dict[str, Any]

    def load(self, config: Any) -> _Split:
        """Train and validation parts at a model config's size and mode (the same split always)."""
        # Fetched (and checked) at each load: a remote store's local copy may have been evicted
        # while the run trained.
        data = ml.load_dataset(self.fetch(), config)
        held, by = validation_groups_of(self.details, data)
        units = _units(data, by)
        train, val = split_fixed(units, held)
        return _Split(units, train, val, held, by)


@dataclass
class _Split:
    whole: ml.ImageDataset
    train: ml.ImageDataset
    val: ml.ImageDataset
    held: list[str]
    by: str


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

    def progress(self, report: ml.Progress, curve: list[dict[str, Any]], folder: Path) -> None:
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
    metrics = row.metrics or {}
    return {
        "initialization_version": row.version,
        "metrics": metrics,
        "promoted": promoted,
        # Why it was (or was not) promoted, and the paired comparison behind it.
        "promotion": metrics.get("promotion"),
    }


# --- evaluation and registration --------------------------------------------------------------


def required_shapes(val: ml.ImageDataset) -> list[tuple[int, int, bool]]:
    """5w1s and 20w1s always; 5w5s and 20w5s when every validation class has enough images."""
    import torch

    smallest = int(torch.bincount(val.targets, minlength=len(val.classes)).min())
    five_shot = list(FIVE_SHOT_SHAPES) if smallest >= 5 + EVAL_QUERIES else []
    return [*ONE_SHOT_SHAPES, *five_shot]


def _score(
    init: ml.Initialization,
    val: ml.ImageDataset,
    shapes: list[tuple[int, int, bool]],
    episodes: int,
    device: str,
) -> dict[str, Any]:
    results = ml.evaluate_shapes(
        init, val, [(w, k) for w, k, _ in shapes], episodes=episodes, seed=EVAL_SEED,
        queries=EVAL_QUERIES, device=device,
    )  # fmt: skip
    return {
        f"{w}w{k}s": {
            key: (v if not isinstance(v, float) else round(v, 5) if math.isfinite(v) else None)
            for key, v in r.to_dict().items()
        }
        for (w, k), r in results.items()
    }


def _data_key(config: Any) -> tuple[Any, ...]:
    return (config.in_channels, config.image_size, config.invert)


def _paired(
    candidate: ml.Initialization,
    active: ml.Initialization,
    val: ml.ImageDataset,
    active_val: ml.ImageDataset,
    shapes: list[tuple[int, int, bool]],
    episodes: int,
    device: str,
) -> ml.PromotionVerdict:
    """Both versions on the same seeded episodes per shape, each on its own decoding, paired."""
    return ml.compare_initializations(
        candidate, active, val, shapes, episodes=episodes, queries=EVAL_QUERIES,
        seed=EVAL_SEED, device=device, active_validation=None if active_val is val else active_val,
    )  # fmt: skip


def decide(
    compared: ml.PromotionVerdict,
    shapes: list[tuple[int, int, bool]],
    held: list[str],
    overlap: list[str],
) -> ml.PromotionVerdict:
    """The final verdict: the comparison's, with every known training overlap counted."""
    return ml.verdict(
        compared.comparisons, shapes, margin=compared.margin, min_episodes=ml.MIN_EPISODES,
        overlap=overlap, validation_groups=held,
    )  # fmt: skip


def _shape_key(c: Any) -> str:
    return f"{c.ways}w{c.shots}s" + ("-within" if c.within_group else "")


def comparison_card(metadata: dict[str, Any], promotion_doc: dict[str, Any] | None) -> str:
    """The model card: fewshot's card plus the promotion comparison, shape by shape."""
    text = ml.render_model_card(metadata)
    if not promotion_doc:
        return text
    lines = [
        "",
        f"## Promotion comparison against {promotion_doc.get('baseline_version')}",
        "",
        "Both versions on the same seeded episodes of the validation groups; difference = new - "
        f"baseline per episode (paired), 95% interval; margin {100 * promotion_doc['margin']:.2f} "
        "points.",
        "",
        "| task | new | baseline | difference (points) | episodes | not worse |",
        "|---|---|---|---|---|---|",
    ]
    for c in promotion_doc.get("comparisons", []):
        lines.append(
            f"| {c['name']} | {100 * c['candidate']:.2f}% | {100 * c['active']:.2f}% "
            f"| {100 * c['difference']:+.2f} ± {100 * c['ci95']:.2f} | {c['episodes']} "
            f"| {'yes' if c['not_worse'] else 'no'} |"
        )
    verdict = "promote" if promotion_doc["promote"] else "do not promote"
    lines += ["", f"Verdict: {verdict}. " + "; ".join(promotion_doc["reasons"]), ""]
    return text + "\n".join(lines)


def _register(
    session: Session,
    runtime: Runtime,
    claim: Claim,
    job: Job,
    init: ml.Initialization,
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
    card = {**init.metadata, "metrics": metrics.get("validation_detail") or {}}
    (staged / "README.md").write_text(comparison_card(card, metrics.get("promotion")))
    key = initialization_key(version)
    runtime.store.put_tree(key, staged)
    sha = sha256_file(staged / "weights.safetensors")
    # Read back: the row names what the store holds, not what this worker meant to write.
    runtime.store.local_file(f"{key}/weights.safetensors", sha)
    now = utcnow()
    row = Initialization(
        version=version,
        status="ready",
        source="trained",
        domain=init.config.domain[:64],
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


@dataclass
class _Run:
    """What the job row says to run, read in the first stage."""

    params: dict[str, Any]
    detail: dict[str, Any]
    dataset_details: dict[str, Any]
    dataset_key: str
    dataset_sha256: str
    dataset_path: Path
    start_row: Initialization | None


def _read_job(runtime: Runtime, claim: Claim) -> _Run | Outcome:
    """The run's settings, or the outcome when there is nothing (more) to run."""
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
        return _Run(
            params=dict(job.params),
            detail=dict(job.progress_detail or {}),
            dataset_details=dict(dataset.details or {}),
            dataset_key=dataset.artifact_key,
            dataset_sha256=dataset.sha256,
            dataset_path=runtime.store.local_file(dataset.artifact_key, dataset.sha256),
            start_row=start_row,
        )


def _load_split(data: _Data, config: Any, ways: int, dataset_path: Path) -> _Split:
    """The fixed train/validation split at the model's input, or a permanent invalid_dataset."""
    try:
        split = data.load(config)
        if len(split.train.classes) < ways:
            raise ml.DatasetError(
                f"the training part has {len(split.train.classes)} classes; ways up to "
                f"{ways} need at least that many"
            )
    except ml.DatasetError as exc:
        raise PermanentJobError("invalid_dataset", _without_paths(str(exc), dataset_path)) from exc
    return split


def _train(
    runtime: Runtime,
    claim: Claim,
    heartbeat: Heartbeat,
    reporter: _Reporter,
    trainer: Any,
    run: _Run,
    folder: Path,
) -> Any:
    """Train to the end (the result) or stop: the outcome of a cancel, or HandBack on shutdown."""
    extra: dict[str, Any] = {"iteration": trainer.iteration, "total": trainer.cfg.iterations}
    if trainer.iteration > 0:
        extra["resumes"] = [
            *run.detail.get("resumes", []),
            {"attempt": claim.attempt, "iteration": trainer.iteration},
        ]
        log.info("job %s: resuming from iteration %d", claim.job_id, trainer.iteration)
    # The data is loaded: say so now, not at the first report (which can be minutes away).
    reporter.stage("training", **extra)
    try:
        result = trainer.run(
            on_progress=lambda report: reporter.progress(report, trainer.curve, folder),
            should_stop=reporter.should_stop,
            log_every=max(1, int(run.params.get("log_every", 25))),
            show_progress=False,
            # Reports with no curve point: an ETA within seconds of the start.
            early_reports=(1, 2, 5, 10),
        )
    except ml.EpisodeError as exc:
        # E.g. classes with fewer images than shots + queries: another attempt would repeat it.
        message = _without_paths(str(exc), run.dataset_path)
        raise PermanentJobError("invalid_settings", message) from exc
    if not (result.cancelled or result.initialization is None):
        return result
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


def _baseline_row(runtime: Runtime, claim: Claim, domain: str) -> Initialization | None:
    """What the run's tenant adapts from now in the new version's domain (the baseline)."""
    with runtime.sessions() as session:
        run_tenant = session.scalar(select(Job.tenant_id).where(Job.id == claim.job_id))
        active_row = (
            None
            if run_tenant is None
            else registry.default_for(session=session, tenant_id=run_tenant)
        )
        # ... in the new version's domain: a photo model is compared with photo models only.
        if active_row is None or active_row.domain != domain:
            active_row = registry.active_initialization(session=session, domain=domain)
        return active_row


def _evaluate(
    new: ml.Initialization, split: _Split, shapes: list[tuple[int, int, bool]], episodes: int,
    params: dict[str, Any], result: Any, device: str,
) -> dict[str, Any]:  # fmt: skip
    """The new version alone on the validation episodes, with its accuracy at 0 inner steps."""
    metrics: dict[str, Any] = {
        "validation_detail": _score(new, split.val, shapes, episodes, device),
        "dataset": {"id": str(params.get("dataset_id")), "name": params.get("dataset_name")},
        "iterations": result.iteration,
        "wall_time_s": round(result.wall_time_s, 1),
        "validation_classes": len(split.val.classes),
        "validation_groups": split.held,
        "training_groups": sorted(split.train.group_names),
        "required_shapes": [f"{w}w{k}s" for w, k, _ in shapes],
    }
    metrics["validation"] = {
        shape: {k: r[k] for k in ("accuracy", "ci95", "episodes")}
        for shape, r in metrics["validation_detail"].items()
    }
    return metrics


def _compare_with_baseline(
    runtime: Runtime, active_row: Initialization | None, new: ml.Initialization, data: _Data,
    split: _Split, shapes: list[tuple[int, int, bool]], episodes: int, auto: bool,
    metrics: dict[str, Any],
) -> bool:  # fmt: skip
    """Pair the new version with the baseline, record the verdict in `metrics`; promote it?"""
    device = runtime.models.device
    if active_row is None:
        metrics["promotion"] = {
            "promote": auto,
            "reasons": ["no baseline version to compare with"],
            "baseline_version": None,
            "validation_groups": split.held,
            "comparisons": [],
            "episodes": episodes,
        }
        return auto
    active = runtime.models.initialization(active_row)
    same = _data_key(active.config) == _data_key(new.config)
    active_val = split.val if same else data.load(active.config).val
    compared = _paired(new, active, split.val, active_val, shapes, episodes, device)
    # The whole dataset infers the training groups of older versions that recorded only their
    # validation groups.
    overlap = sorted(
        set(ml.overlapping_groups(new.metadata, split.held, split.whole))
        | set(ml.overlapping_groups(active.metadata, split.held, split.whole))
    )
    final = decide(compared, shapes, split.held, overlap)
    metrics["promotion"] = {
        **final.to_dict(), "baseline_version": active_row.version, "episodes": episodes
    }  # fmt: skip
    metrics["baseline"] = {"version": active_row.version}
    metrics["comparison"] = {_shape_key(c): c.to_dict() for c in final.comparisons}
    metrics["baseline"]["validation"] = {
        _shape_key(c): {"accuracy": c.active, "episodes": c.episodes} for c in final.comparisons
    }
    return auto and final.promote


def _register_run(
    runtime: Runtime, claim: Claim, new: ml.Initialization, folder: Path,
    metrics: dict[str, Any], training_config: dict[str, Any], promote: bool,
) -> Outcome:  # fmt: skip
    """Register the version (and the job's success) unless the job is gone or it is done."""
    with runtime.sessions() as session:
        job = session.get(Job, claim.job_id)
        if job is None:
            # Deleted while it trained: nothing to register it under.
            return Outcome("skipped")
        try:
            done = _register(
                session, runtime, claim, job, new, folder, metrics, training_config, promote
            )
        except IntegrityError:
            session.rollback()
            return Outcome("skipped")
    if done is None:
        return Outcome("skipped")
    row, promoted = done
    log.info("job %s: registered %s (promoted: %s)", claim.job_id, row.version, promoted)
    return Outcome("done")


def run_meta_train(runtime: Runtime, claim: Claim, heartbeat: Heartbeat) -> Outcome:
    """Run (or resume) one meta-training job to the end, a cancel, or a shutdown.

    Stages, each recorded in the job's progress: loading, training, evaluating (the new
    version, then paired with the baseline: the promotion rule), registering.
    """
    # One long job on its own thread: torch's default team (serving threads use fewer).
    use_threads(training_threads(runtime.settings.torch_threads))
    run = _read_job(runtime, claim)
    if isinstance(run, Outcome):
        return run
    reporter = _Reporter(heartbeat, run.detail)
    reporter.stage("loading")
    # A working folder on this host; what the run makes is put into the store when it ends.
    folder = runtime.settings.work_dir / run_folder(claim.job_id)
    device = runtime.models.device
    start = runtime.models.initialization(run.start_row) if run.start_row is not None else None
    cfg = train_config(run.params, start)
    data = _Data(
        lambda: runtime.store.local_file(run.dataset_key, run.dataset_sha256), run.dataset_details
    )
    split = _load_split(data, cfg.model if start is None else start.config, cfg.ways[1],
                        run.dataset_path)  # fmt: skip
    trainer = ml.MetaTrainer(cfg, split.train, split.val, folder, start=start, device=device)
    result = _train(runtime, claim, heartbeat, reporter, trainer, run, folder)
    if isinstance(result, Outcome):
        return result

    reporter.stage("evaluating")
    new = result.initialization
    # Recorded with the version, so any later comparison can check for overlap.
    new.metadata.update(
        validation_groups=split.held,
        validation_by=split.by,
        training_groups=sorted(split.train.group_names),
    )
    auto = bool(run.params.get("auto_promote"))
    requested = int(run.params.get("validation_episodes", 200))
    episodes = max(requested, MIN_PROMOTION_EPISODES) if auto else requested
    shapes = required_shapes(split.val)
    active_row = _baseline_row(runtime, claim, new.config.domain)
    metrics = _evaluate(new, split, shapes, episodes, run.params, result, device)
    promote = _compare_with_baseline(
        runtime, active_row, new, data, split, shapes, episodes, auto, metrics
    )
    metrics["promotion"]["auto_promote"] = auto
    reporter.stage("registering")
    training_config = {**run.params, "resolved": cfg.to_dict()}
    return _register_run(runtime, claim, new, folder, metrics, training_config, promote)
