"""MAML meta-training (Finn et al. 2017) with MAML++ options (Antoniou et al. 2019).

The outer loop updates the initialization through the adapted weights on each task's query set:
second order, first order, or first order early and second order late. Step sizes can be learned
per layer and per step (LSLR); the multi-step loss and cosine-annealed Adam are options.
Resumable: a checkpoint (safetensors + state.json) is written every few minutes.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from fewshot.config import MetaTrainConfig, ModelConfig, StepSizeTransform
from fewshot.data import ImageDataset
from fewshot.episodes import EpisodeSampler
from fewshot.errors import EpisodeError
from fewshot.evaluate import evaluate_shapes
from fewshot.initialization import Initialization
from fewshot.inner import InnerRecipe, effective_step_sizes, raw_step_sizes
from fewshot.openset import calibrate_unknown
from fewshot.optim import Adam, cosine_lr
from fewshot.unknown import METADATA_KEY as UNKNOWN_KEY
from fewshot.unknown import UnknownCalibration
from fewshot.vmapped import query_logits

CHECKPOINT_FILE = "checkpoint.safetensors"
STATE_FILE = "state.json"
CURVE_FILE = "curve.json"
CURVE_PLOT = "curve.png"
RESULT_DIR = "initialization"
VALIDATION_SHAPES = ((5, 1), (20, 1))

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """What a progress callback sees: iteration of total, timing, and the latest curve point."""

    iteration: int
    total: int
    elapsed_s: float
    eta_s: float | None
    point: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    """The trained initialization, where it was written, and whether the run was cancelled."""

    initialization: Initialization | None
    path: Path | None
    cancelled: bool
    iteration: int
    wall_time_s: float
    curve: list[dict[str, Any]]


def task_shape(cfg: MetaTrainConfig, rng: np.random.Generator) -> tuple[int, int, int]:
    """Draw (tasks, ways, shots) for one meta-iteration; fewer tasks when ways are many."""
    ways = int(rng.integers(cfg.ways[0], cfg.ways[1] + 1))
    shots = int(rng.integers(cfg.shots[0], cfg.shots[1] + 1))
    # Paper ratio: 32 tasks at 5 ways, 16 at 20 ways (tasks ~ 1/sqrt(ways)).
    tasks = max(2, round(cfg.meta_batch * math.sqrt(cfg.ways[0] / ways)))
    return tasks, ways, shots


def _progress(cfg: MetaTrainConfig, iteration: int, elapsed: float) -> float:
    by_iter = iteration / max(cfg.iterations, 1)
    by_time = elapsed / cfg.max_seconds if cfg.max_seconds else 0.0
    return min(1.0, max(by_iter, by_time))


def _fit_step_sizes(
    init: Initialization,
    steps: int,
    value: float,
    transform: StepSizeTransform = "identity",
    reset: bool = False,
    head_value: float | None = None,
) -> dict[str, Tensor]:
    """Stored step sizes [steps] per adapted name, converted to `transform` from the start's."""
    names = [*[n for n in init.params if not n.startswith("head.")], "head.weight", "head.bias"]
    start_transform = init.config.step_size_transform
    out = {}
    for name in names:
        old = None if reset else init.step_sizes.get(name)
        if old is None:
            start = head_value if head_value is not None and name.startswith("head.") else value
            out[name] = raw_step_sizes(torch.full((steps,), float(start)), transform)
        else:
            last = old[-1:].expand(max(steps - old.shape[0], 0))
            stored = torch.cat([old[:steps], last]).clone().float()
            if start_transform != transform:
                effective = effective_step_sizes({name: stored}, start_transform)[name]
                stored = raw_step_sizes(effective, transform)
            out[name] = stored
    return out


def _recipe_config(config: ModelConfig, cfg: MetaTrainConfig) -> ModelConfig:
    """`config` with the run's inner steps, step size and any support-loss recipe overrides."""
    overrides: dict[str, Any] = {
        "inner_steps": cfg.inner_steps,
        "inner_step_size": cfg.inner_step_size,
    }
    for key in (
        "inner_temperature",
        "inner_label_smoothing",
        "inner_shift_views",
        "step_size_transform",
    ):
        value = getattr(cfg, key)
        if value is not None:
            overrides[key] = value
    return ModelConfig.from_dict({**config.to_dict(), **overrides})


class MetaTrainer:
    """One resumable meta-training run writing into `out_dir`."""

    def __init__(
        self,
        cfg: MetaTrainConfig,
        train: ImageDataset,
        val: ImageDataset | None,
        out_dir: str | Path,
        *,
        start: Initialization | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.device = torch.device(device)
        if start is None:
            start = Initialization.random(_recipe_config(cfg.model, cfg), seed=cfg.seed)
        self.base = start
        self.config = _recipe_config(start.config, cfg)
        self.recipe = InnerRecipe.from_config(self.config)
        self.module = start.module()
        self.params = {
            k: v.detach().clone().float().to(self.device).requires_grad_(True)
            for k, v in start.params.items()
        }
        sizes = _fit_step_sizes(
            start,
            cfg.inner_steps,
            cfg.inner_step_size,
            self.config.step_size_transform,
            reset=cfg.reset_step_sizes,
            head_value=cfg.head_step_size,
        )
        self.step_sizes = {
            k: v.to(self.device).requires_grad_(cfg.learn_step_sizes) for k, v in sizes.items()
        }
        trainable = dict(self.params)
        if cfg.learn_step_sizes:
            trainable.update({f"step_size.{k}": v for k, v in self.step_sizes.items()})
        self.optimizer = Adam(
            trainable,
            lr_scales={f"step_size.{k}": cfg.step_size_lr_factor for k in self.step_sizes},
        )
        self.train_sampler = EpisodeSampler(
            train, rotations=cfg.rotations, shift=cfg.shift, device=self.device
        )
        # Same images, tasks drawn within one group; shares the image tensor.
        self.group_sampler = copy.copy(self.train_sampler)
        self.group_sampler.within_group = True
        if cfg.within_group_fraction > 0:
            largest = max((g.size for g in self.group_sampler.group_classes), default=0)
            if largest * self.group_sampler.multiplier < cfg.ways[1]:
                raise EpisodeError(
                    f"within_group_fraction needs a group with {cfg.ways[1]}-way tasks; the "
                    f"largest group has {largest} classes (rotations: {cfg.rotations})"
                )
        self.val = val
        self.val_sampler = EpisodeSampler(val, device=self.device) if val is not None else None
        self.iteration = 0
        self.elapsed = 0.0
        self.curve: list[dict[str, Any]] = []
        self._resume()

    def _resume(self) -> None:
        state_path = self.out_dir / STATE_FILE
        if not state_path.exists():
            return
        state = json.loads(state_path.read_text())
        tensors = load_file(str(self.out_dir / CHECKPOINT_FILE), device=str(self.device))
        with torch.no_grad():
            for k, v in self.params.items():
                v.copy_(tensors[f"param.{k}"])
            for k, v in self.step_sizes.items():
                v.copy_(tensors[f"step_size.{k}"])
        self.optimizer.load_state_tensors(tensors, int(state["adam_step"]))
        self.iteration = int(state["iteration"])
        self.elapsed = float(state["elapsed_s"])
        self.curve = list(state["curve"])

    def snapshot(self) -> Initialization:
        """The current meta-parameters as an Initialization (on CPU)."""
        return Initialization(
            config=self.config,
            params={k: v.detach().cpu().clone() for k, v in self.params.items()},
            step_sizes={k: v.detach().cpu().clone() for k, v in self.step_sizes.items()},
            # A new initialization: only its lineage carries over, not the parent's metrics.
            metadata={"parent_version": self.base.metadata["version"]}
            if "version" in self.base.metadata
            else {},
        )

    def checkpoint(self) -> None:
        """Write checkpoint.safetensors + state.json atomically (temporary name, then rename)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"param.{k}": v.detach().cpu().contiguous() for k, v in self.params.items()}
        tensors.update(
            {f"step_size.{k}": v.detach().cpu().contiguous() for k, v in self.step_sizes.items()}
        )
        tensors.update(
            {k: v.detach().cpu().contiguous() for k, v in self.optimizer.state_tensors().items()}
        )
        tmp = self.out_dir / (CHECKPOINT_FILE + ".tmp")
        save_file(tensors, str(tmp))
        state = {
            "iteration": self.iteration,
            "adam_step": self.optimizer.step_count,
            "elapsed_s": self.elapsed,
            "curve": self.curve,
            "config": self.cfg.to_dict(),
        }
        tmp_state = self.out_dir / (STATE_FILE + ".tmp")
        tmp_state.write_text(json.dumps(state))
        tmp.replace(self.out_dir / CHECKPOINT_FILE)
        tmp_state.replace(self.out_dir / STATE_FILE)
        (self.out_dir / CURVE_FILE).write_text(json.dumps(self.curve, indent=1))

    def meta_step(self, rng: np.random.Generator) -> tuple[float, float]:
        """One outer update on a meta-batch; returns (mean query loss, mean query accuracy)."""
        cfg = self.cfg
        progress = _progress(cfg, self.iteration, self.elapsed)
        first_order = (not cfg.second_order) or progress < cfg.first_order_fraction
        tasks, ways, shots = task_shape(cfg, rng)
        within = cfg.within_group_fraction > 0 and rng.random() < cfg.within_group_fraction
        sampler = self.group_sampler if within else self.train_sampler
        batch = sampler.sample(rng, tasks, ways, shots, cfg.queries)
        out = query_logits(
            self.module,
            self.params,
            self.step_sizes,
            batch.support_x,
            batch.support_y,
            batch.query_x,
            ways,
            steps=cfg.inner_steps,
            default_step_size=cfg.inner_step_size,
            mode=cfg.adapt_mode,
            first_order=first_order,
            every_step=cfg.multi_step_loss,
            recipe=self.recipe,
        )
        target = batch.query_y
        if cfg.multi_step_loss:
            # MAML++ MSL: weight every step's query loss, annealing towards the last step alone.
            n = out.shape[0]
            decay = min(1.0, progress / 0.3)
            weights = torch.full((n,), (1 - decay) / n, device=out.device)
            weights[-1] += decay
            losses = torch.stack([F.cross_entropy(o.flatten(0, 1), target.flatten()) for o in out])
            loss = (weights * losses).sum()
            final = out[-1]
        else:
            loss = F.cross_entropy(out.flatten(0, 1), target.flatten())
            final = out
        loss.backward()  # type: ignore[no-untyped-call]
        lr = (
            cosine_lr(cfg.outer_lr, cfg.min_outer_lr, progress)
            if cfg.cosine_annealing
            else cfg.outer_lr
        )
        self.optimizer.step(lr, max_norm=10.0)
        accuracy = (final.argmax(dim=-1) == target).float().mean()
        return float(loss.detach()), float(accuracy)

    def validate(self) -> dict[str, float]:
        """Accuracy on held-out validation episodes (5-way and 20-way 1-shot), same seeds each time."""
        if self.val is None or self.val_sampler is None:
            return {}
        results = evaluate_shapes(
            self.snapshot(), self.val, VALIDATION_SHAPES, episodes=self.cfg.val_episodes,
            seed=12345, device=self.device, sampler=self.val_sampler,
        )  # fmt: skip
        return {f"val_{w}w{k}s": r.accuracy for (w, k), r in results.items()}

    def run(
        self,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        log_every: int = 25,
        show_progress: bool = True,
        early_reports: Sequence[int] = (),
    ) -> TrainResult:
        """Train to the configured iterations or time budget; checkpoint, log, and save the result."""
        cfg = self.cfg
        first = self.iteration
        last_checkpoint = time.monotonic()
        window: list[tuple[float, float]] = []
        bar = tqdm(
            total=cfg.iterations,
            initial=self.iteration,
            disable=not show_progress,
            desc="meta-train",
        )
        cancelled = False
        started = time.monotonic() - self.elapsed
        while self.iteration < cfg.iterations and not (
            cfg.max_seconds and self.elapsed >= cfg.max_seconds
        ):
            rng = np.random.default_rng([cfg.seed, self.iteration])
            window.append(self.meta_step(rng))
            self.iteration += 1
            self.elapsed = time.monotonic() - started
            bar.update(1)
            validate_now = cfg.val_every > 0 and self.iteration % cfg.val_every == 0
            if self.iteration % log_every == 0 or validate_now or self.iteration == cfg.iterations:
                point: dict[str, Any] = {
                    "iteration": self.iteration,
                    "loss": float(np.mean([w[0] for w in window])),
                    "train_accuracy": float(np.mean([w[1] for w in window])),
                    "elapsed_s": round(self.elapsed, 2),
                }
                window = []
                if validate_now or self.iteration == cfg.iterations:
                    point.update(self.validate())
                self.curve.append(point)
                bar.set_postfix(
                    {k: round(v, 4) for k, v in point.items() if k.startswith(("loss", "val_"))}
                )
                if on_progress is not None:
                    on_progress(self._progress_report(point))
                if should_stop is not None and should_stop():
                    cancelled = True
                    break
            elif on_progress is not None and self.iteration - first in early_reports:
                # The iterations of this call listed (1 = its first) report too, with no curve
                # point: an ETA is known long before the first log_every point.
                on_progress(self._progress_report({}))
            if time.monotonic() - last_checkpoint >= cfg.checkpoint_every_s:
                self.checkpoint()
                last_checkpoint = time.monotonic()
        bar.close()
        self.checkpoint()
        try:
            plot_curve(self.curve, self.out_dir / CURVE_PLOT)
        except ImportError as exc:  # matplotlib is optional where only training runs (a GPU box)
            logger.warning("curve plot skipped: %s", exc)
        if cancelled:
            return TrainResult(None, None, True, self.iteration, self.elapsed, self.curve)
        result = self.snapshot()
        result.metadata.update(
            {
                "training": cfg.to_dict(),
                "iterations": self.iteration,
                "wall_time_s": round(self.elapsed, 1),
                "hardware": _hardware(self.device),
                "curve": self.curve,
            }
        )
        calibration = self.calibrate_unknown(result)
        if calibration is not None:
            result.metadata[UNKNOWN_KEY] = calibration.to_dict()
        path = result.save(self.out_dir / RESULT_DIR)
        return TrainResult(result, path, False, self.iteration, self.elapsed, self.curve)

    def calibrate_unknown(self, init: Initialization) -> UnknownCalibration | None:
        """The "unknown" calibration of `init` on the validation groups (None if not possible)."""
        if self.val is None or self.cfg.unknown_calibration_episodes <= 0:
            return None
        try:
            return calibrate_unknown(init, self.val, episodes=self.cfg.unknown_calibration_episodes)
        except (EpisodeError, ValueError) as exc:
            logger.warning("unknown calibration skipped: %s", exc)
            return None

    def _progress_report(self, point: dict[str, Any]) -> Progress:
        cfg = self.cfg
        fraction = _progress(cfg, self.iteration, self.elapsed)
        eta = self.elapsed * (1 - fraction) / fraction if fraction > 0 else None
        return Progress(self.iteration, cfg.iterations, self.elapsed, eta, point)


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads (torch {torch.__version__})"


def plot_curve(curve: list[dict[str, Any]], path: str | Path) -> None:
    """Draw meta-train loss and validation accuracy against iteration to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curve:
        # Before the first point (a run just started): say so rather than draw empty axes.
        fig = plt.figure(figsize=(10, 4))
        fig.text(0.5, 0.5, "no points yet", ha="center", va="center", fontsize=20, color="0.4")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if curve:
        its = [p["iteration"] for p in curve]
        left.plot(its, [p["loss"] for p in curve], label="meta-train query loss")
        left.set_yscale("log")
        keys = sorted({k for p in curve for k in p if k.startswith("val_")})
        for key in keys:
            pts = [(p["iteration"], p[key]) for p in curve if key in p]
            right.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=key)
        right.plot(
            its, [p["train_accuracy"] for p in curve], alpha=0.4, label="train query accuracy"
        )
    left.set_xlabel("meta-iteration")
    left.set_title("meta-train loss")
    left.legend()
    right.set_xlabel("meta-iteration")
    right.set_title("accuracy")
    right.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
