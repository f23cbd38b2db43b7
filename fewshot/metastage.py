"""Episodic fine-tuning after pre-training (Meta-Baseline, Chen et al. 2021), resumable.

Each episode's loss is the cross-entropy of its queries under the head that serving builds:
the prototype head (unit embeddings, logits exp(log_scale) * (2 f.c - |c|^2)) and, with
`inner_steps` > 0, that head after the served closed-form head steps on the support set's
views (fewshot.stepchoice.head_path, differentiated through; Proto-MAML's head-only inner loop,
Triantafillou et al. 2020, with learned per-step sizes as in MAML++, Antoniou et al. 2019).
So what is trained is what serves. The run checkpoints every `checkpoint_every_s` seconds into
its folder (safetensors + JSON, no pickles) and the same call resumes it.

With `average_every` > 0 the stage's result is the running mean of its weights taken every
`average_every` episodes from `average_from` on (stochastic weight averaging, Izmailov et al.
2018): the episodic loss is noisy enough that single snapshots differ by a point on validation,
and picking the best of them on validation flatters it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fewshot.backbone import Conv4
from fewshot.data import ImageDataset
from fewshot.head import head_logits
from fewshot.initialization import Initialization
from fewshot.inner import (
    HEAD_BIAS,
    HEAD_SCALE,
    HEAD_WEIGHT,
    InnerRecipe,
    raw_step_sizes,
    support_views,
)
from fewshot.pretrain import PretrainConfig, augment, validation_scores
from fewshot.stepchoice import head_path

META_STATE_FILE = "meta-state.json"
META_CHECKPOINT = "meta-checkpoint.safetensors"
META_CHECKPOINT_STATE = "meta-checkpoint.json"


@dataclass
class MetaStageConfig:
    """Settings of the episodic stage: episode shapes, SGD, validation and checkpoints."""

    episodes: int = 1500
    ways: int = 5
    shots: tuple[int, ...] = (1, 5)
    queries: int = 15
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    val_every: int = 250
    # Share of episodes whose classes all come from one group (alphabet), and whether each
    # class is turned by a random multiple of 90 degrees into a new class (handwriting).
    within_group_fraction: float = 0.0
    rotations: bool = False
    # Served head steps inside each episode (0: the prototype head alone), their starting
    # step size (learned per step through softplus), and the step sizes' learning-rate factor.
    inner_steps: int = 0
    inner_step_size: float = 0.1
    # Episodes with fewer shots a class train the prototype head alone, as such tasks are
    # served (ModelConfig.steps_min_shots).
    steps_min_shots: int = 0
    step_size_lr_factor: float = 1.0
    # The first blocks keep their pre-trained weights and normalisation statistics: at 84 px
    # the second block holds ~70% of Conv4's multiply-adds, so freezing two halves an episode.
    frozen_blocks: int = 0
    # Gradient norm clip: one diverging inner loop must not throw the backbone away.
    clip_norm: float = 10.0
    # Weight averaging: 0 keeps the best validated snapshot instead.
    average_every: int = 0
    average_from: int = 0
    checkpoint_every_s: float = 180.0
    max_seconds: float | None = None
    seed: int = 0
    # Where the episodes train ("cpu", "cuda"); episodes are drawn and augmented from the same
    # CPU random streams either way.
    device: str = "cpu"


def episode(
    dataset: ImageDataset,
    rng: np.random.Generator,
    ways: int,
    shots: int,
    queries: int,
    *,
    within_group: bool = False,
    rotations: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Support [W*K, C, H, W] / labels [W*K] and query [W*Q, ...] / [W*Q] uint8 images of one task."""
    pool = np.arange(len(dataset.classes))
    if within_group:
        groups = [
            np.array([c for c, g in enumerate(dataset.groups) if g == name])
            for name in dataset.group_names
        ]
        pools = [m for m in groups if len(m) >= ways]
        if pools:
            pool = pools[int(rng.integers(len(pools)))]
    classes = rng.choice(pool, ways, replace=False)
    support: list[Tensor] = []
    query: list[Tensor] = []
    for c in classes:
        members = torch.nonzero(dataset.targets == int(c)).flatten().numpy()
        picked = rng.choice(members, shots + queries, replace=False)
        images = dataset.images[torch.from_numpy(picked)]
        if rotations:
            images = torch.rot90(images, int(rng.integers(4)), dims=(-2, -1))
        support.append(images[:shots])
        query.append(images[shots:])
    return (
        torch.cat(support),
        torch.arange(ways).repeat_interleave(shots),
        torch.cat(query),
        torch.arange(ways).repeat_interleave(queries),
    )


def frozen_layers(module: Conv4, blocks: int) -> list[nn.Module]:
    """The layers of the backbone's first `blocks` blocks (each block starts at a convolution)."""
    if not 0 <= blocks <= sum(isinstance(m, nn.Conv2d) for m in module.blocks):
        raise ValueError(f"frozen_blocks={blocks} is outside the backbone's blocks")
    layers: list[nn.Module] = []
    seen = 0
    for layer in module.blocks:
        if isinstance(layer, nn.Conv2d):
            seen += 1
        if seen > blocks:
            break
        layers.append(layer)
    return layers


class MetaStage:
    """Fine-tunes an initialization's backbone, head scale and head step sizes on episodes."""

    def __init__(
        self,
        init: Initialization,
        train: ImageDataset,
        val: ImageDataset,
        cfg: MetaStageConfig,
        augment_cfg: PretrainConfig,
        out_dir: str | Path,
    ) -> None:
        if cfg.inner_steps > 0 and cfg.inner_steps != init.config.inner_steps:
            raise ValueError(
                f"the stage trains {cfg.inner_steps} head steps but the initialization serves "
                f"{init.config.inner_steps}: set its config's inner_steps to match"
            )
        self.init, self.train, self.val, self.cfg = init, train, val, cfg
        self.augment_cfg = augment_cfg
        self.recipe = InnerRecipe.from_config(init.config)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.device = torch.device(cfg.device)
        self.module = Conv4(init.config)
        self.module.load_state_dict(
            {k: v for k, v in init.params.items() if not k.startswith("head.")}
        )
        self.module.to(self.device)
        self.frozen = frozen_layers(self.module, cfg.frozen_blocks)
        for layer in self.frozen:
            layer.requires_grad_(False)
        self.log_scale = nn.Parameter(init.params[HEAD_SCALE].detach().clone().to(self.device))
        start = torch.full((max(1, cfg.inner_steps),), cfg.inner_step_size)
        # Softplus keeps every learned step size positive.
        self.raw_steps = nn.Parameter(raw_step_sizes(start, "softplus").to(self.device))
        self.optimizer = torch.optim.SGD(
            [
                {
                    "params": [p for p in self.module.parameters() if p.requires_grad],
                    "weight_decay": cfg.weight_decay,
                },
                {"params": [self.log_scale], "weight_decay": 0.0},
                {
                    "params": [self.raw_steps],
                    "weight_decay": 0.0,
                    "lr": cfg.lr * cfg.step_size_lr_factor,
                },
            ],
            lr=cfg.lr,
            momentum=cfg.momentum,
        )
        self.rng = np.random.default_rng(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.episode = 0
        self.seconds = 0.0
        self.curve: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.losses: list[float] = []
        self.average: dict[str, Tensor] | None = None
        self.averaged = 0
        if (self.out_dir / META_CHECKPOINT_STATE).exists():
            self._resume()

    @property
    def keys(self) -> tuple[str, str]:
        """The validation accuracies whose sum picks the best episode."""
        return self.augment_cfg.score_keys

    def step_sizes(self) -> Tensor:
        """The head's effective step size per inner step [inner_steps]."""
        return F.softplus(self.raw_steps)

    def loss(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        """Query cross-entropy [] under the served head for one episode of float images."""
        ways = int(sy.max()) + 1
        views_x, views_y = support_views(sx, sy, self.recipe.shift_views)
        bf16 = self.augment_cfg.precision == "bf16"
        with torch.autocast(sx.device.type, torch.bfloat16, enabled=bf16):
            features = self.module(torch.cat([views_x, qx])).float()
        fv, fq = features[: views_x.shape[0]], features[views_x.shape[0] :]
        fs = fv[: sx.shape[0]]  # the unshifted support comes first
        shots = int(torch.bincount(sy, minlength=ways).min())
        steps = self.cfg.inner_steps if shots >= self.cfg.steps_min_shots else 0
        sizes = self.step_sizes()
        per_step = {HEAD_WEIGHT: [sizes[t] for t in range(steps)]}
        per_step[HEAD_BIAS] = per_step[HEAD_WEIGHT]
        weight, bias = head_path(
            fs, sy, ways, self.log_scale, per_step, steps,  # type: ignore[arg-type]
            self.cfg.inner_step_size, self.recipe, views=(fv, views_y),
        )[-1]  # fmt: skip
        return F.cross_entropy(head_logits(fq, weight, bias, self.log_scale), qy)

    def train_episode(self) -> float:
        """One augmented episode's SGD step; returns its loss."""
        cfg = self.cfg
        self.module.train()
        for layer in self.frozen:
            layer.eval()  # frozen BatchNorm keeps its pre-trained statistics
        shots = int(self.rng.choice(cfg.shots))
        within = bool(self.rng.random() < cfg.within_group_fraction)
        sx, sy, qx, qy = episode(
            self.train, self.rng, cfg.ways, shots, cfg.queries,
            within_group=within, rotations=cfg.rotations,
        )  # fmt: skip
        x = augment(torch.cat([sx, qx]).to(self.device), self.augment_cfg, self.generator)
        sy, qy = sy.to(self.device), qy.to(self.device)
        loss = self.loss(x[: sx.shape[0]], sy, x[sx.shape[0] :], qy)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        self.optimizer.step()
        return float(loss.detach())

    def weights(self) -> dict[str, Tensor]:
        """The backbone's current weights and the head's log-scale, detached copies."""
        params = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        params[HEAD_SCALE] = self.log_scale.detach().cpu().clone()
        return params

    def accumulate(self) -> None:
        """Fold the current weights into the running mean (weight averaging)."""
        current = self.weights()
        self.averaged += 1
        if self.average is None:
            self.average = current
            return
        for k, v in current.items():
            self.average[k] += (v - self.average[k]) / self.averaged

    def snapshot(self, params: dict[str, Tensor] | None = None) -> Initialization:
        """The current (or given) weights as an Initialization whose head steps are the learned ones."""
        init = self.init
        params = self.weights() if params is None else {k: v.clone() for k, v in params.items()}
        step_sizes = {k: v.clone() for k, v in init.step_sizes.items()}
        if self.cfg.inner_steps > 0:
            # Only the head's sizes were trained; the backbone's stay as the initialization set them.
            sizes = self.step_sizes().detach().cpu()
            learned = raw_step_sizes(sizes, init.config.step_size_transform)
            step_sizes[HEAD_WEIGHT], step_sizes[HEAD_BIAS] = learned.clone(), learned.clone()
        return Initialization(
            config=init.config, params=params, step_sizes=step_sizes, metadata=dict(init.metadata)
        )

    def validate(self) -> dict[str, Any]:
        """Validation scores at this episode, recorded on the curve; keeps the best weights."""
        point: dict[str, Any] = {"episode": self.episode}
        if self.losses:
            point["loss"] = float(np.mean(self.losses))
        point.update(validation_scores(self.module, self.val, self.augment_cfg))
        point["step_sizes"] = [round(float(v), 4) for v in self.step_sizes().detach()]
        self.losses = []
        if self.average is not None:
            averaged = Conv4(self.init.config)
            averaged.load_state_dict({k: v for k, v in self.average.items() if k != HEAD_SCALE})
            averaged.to(self.device)
            scores = validation_scores(averaged, self.val, self.augment_cfg)
            point.update({f"average_{k}": v for k, v in scores.items()})
            point["averaged"] = self.averaged
        self.curve.append(point)
        if self.average is not None:
            # The average is the result, whatever its validation score: no selection on val.
            prefixed = {k: point[f"average_{k}"] for k in self.keys}
            self.best = {"score": sum(prefixed.values()), **point}
            self.snapshot(self.average).save(self.out_dir / "meta-best")
            return point
        score = sum(point[k] for k in self.keys)
        if self.best is None or score > self.best["score"]:
            self.best = {"score": score, **point}
            self.snapshot().save(self.out_dir / "meta-best")
        return point

    def checkpoint(self) -> None:
        """Weights, momentum, random states and the curve, each file written atomically."""
        tensors = {
            f"module.{k}": v.detach().cpu().contiguous()
            for k, v in self.module.state_dict().items()
        }
        tensors["log_scale"] = self.log_scale.detach().cpu().clone()
        tensors["raw_steps"] = self.raw_steps.detach().cpu().clone()
        tensors["torch_rng"] = self.generator.get_state()
        for k, v in (self.average or {}).items():
            tensors[f"average.{k}"] = v.contiguous()
        params = [*self.module.parameters(), self.log_scale, self.raw_steps]
        for i, p in enumerate(params):
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"momentum.{i}"] = buf.cpu().contiguous()
        tmp = self.out_dir / (META_CHECKPOINT + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(self.out_dir / META_CHECKPOINT)
        state = {
            "episode": self.episode,
            "seconds": self.seconds,
            "curve": self.curve,
            "best": self.best,
            "losses": self.losses,
            "averaged": self.averaged,
            "numpy_rng": self.rng.bit_generator.state,
            "config": asdict(self.cfg),
        }
        tmp = self.out_dir / (META_CHECKPOINT_STATE + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.out_dir / META_CHECKPOINT_STATE)

    def _resume(self) -> None:
        state = json.loads((self.out_dir / META_CHECKPOINT_STATE).read_text())
        tensors = load_file(str(self.out_dir / META_CHECKPOINT))
        self.module.load_state_dict(
            {k.removeprefix("module."): v for k, v in tensors.items() if k.startswith("module.")}
        )
        with torch.no_grad():
            self.log_scale.copy_(tensors["log_scale"])
            self.raw_steps.copy_(tensors["raw_steps"])
        self.generator.set_state(tensors["torch_rng"])
        params = [*self.module.parameters(), self.log_scale, self.raw_steps]
        for i, p in enumerate(params):
            buf = tensors.get(f"momentum.{i}")
            if buf is not None:
                self.optimizer.state[p]["momentum_buffer"] = buf.to(self.device).clone()
        self.rng.bit_generator.state = state["numpy_rng"]
        self.episode = int(state["episode"])
        self.seconds = float(state["seconds"])
        self.curve = list(state["curve"])
        self.best = state["best"]
        self.losses = list(state["losses"])
        self.averaged = int(state.get("averaged", 0))
        average = {
            k.removeprefix("average."): v for k, v in tensors.items() if k.startswith("average.")
        }
        self.average = average or None

    def run(
        self,
        on_validate: Callable[[dict[str, Any]], object] | None = None,
        on_episode: Callable[[int, float], object] | None = None,
    ) -> bool:
        """Train until cfg.episodes or cfg.max_seconds; True when all episodes are done."""
        cfg = self.cfg
        start = time.monotonic()
        before = self.seconds
        last_save = start
        if self.episode == 0 and not self.curve:
            point = self.validate()
            if on_validate is not None:
                on_validate(point)
        while self.episode < cfg.episodes:
            if cfg.max_seconds is not None and time.monotonic() - start >= cfg.max_seconds:
                self.seconds = before + time.monotonic() - start
                self.checkpoint()
                return False
            loss = self.train_episode()
            self.episode += 1
            self.losses.append(loss)
            every = cfg.average_every
            if every > 0 and self.episode >= cfg.average_from and self.episode % every == 0:
                self.accumulate()
            if on_episode is not None:
                on_episode(self.episode, loss)
            if self.episode % cfg.val_every == 0 or self.episode == cfg.episodes:
                point = self.validate()
                if on_validate is not None:
                    on_validate(point)
            if time.monotonic() - last_save >= cfg.checkpoint_every_s:
                self.seconds = before + time.monotonic() - start
                self.checkpoint()
                last_save = time.monotonic()
        self.seconds = before + time.monotonic() - start
        self.checkpoint()
        return True

    def best_initialization(self) -> Initialization:
        """The best validated weights, with the stage's config, best point and curve in metadata."""
        best = Initialization.load(self.out_dir / "meta-best")
        best.metadata = dict(self.init.metadata)
        best.metadata["meta_stage"] = {
            "config": asdict(self.cfg),
            "best": self.best,
            "curve": self.curve,
            "minutes": self.seconds / 60,
        }
        state = {"best": self.best, "curve": self.curve}
        (self.out_dir / META_STATE_FILE).write_text(json.dumps(state, indent=1))
        return best


def meta_stage(
    init: Initialization,
    train: ImageDataset,
    val: ImageDataset,
    cfg: MetaStageConfig,
    augment_cfg: PretrainConfig,
    out_dir: str | Path,
    on_validate: Callable[[dict[str, Any]], object] | None = None,
) -> Initialization:
    """Run (or resume) the stage to its end and return the best initialization on validation."""
    stage = MetaStage(init, train, val, cfg, augment_cfg, out_dir)
    stage.run(on_validate=on_validate)
    return stage.best_initialization()
