"""Supervised pre-training of a backbone as an all-classes cosine classifier, resumable.

The first stage of Pretrain -> Meta-train -> Fine-tune (Chen et al. 2019, "A closer look at
few-shot classification"; Tian et al. 2020, "Rethinking few-shot image classification"):
the backbone learns to tell all C training classes apart at once, with a cosine classifier
(Gidaris & Komodakis 2018; Chen et al.'s Baseline++), label smoothing and photo augmentation
(random resized crop, horizontal flip, colour jitter). Each epoch is checkpointed
(safetensors + JSON, never pickles), and the epoch whose backbone gives the best cosine-prototype
accuracy on the validation classes is kept.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fewshot.backbone import Conv4, fold_batch_norm
from fewshot.config import ModelConfig
from fewshot.data import ImageDataset
from fewshot.evaluate import mean_ci95
from fewshot.handwriting import HandwritingAugment, augment_handwriting, rotate_as_classes
from fewshot.initialization import Initialization
from fewshot.inner import HEAD_BIAS, HEAD_SCALE, HEAD_WEIGHT

CHECKPOINT_FILE = "pretrain.safetensors"
BEST_FILE = "pretrain-best.safetensors"
STATE_FILE = "pretrain-state.json"


@dataclass
class PretrainConfig:
    """Settings of one pre-training run (SGD with warm-up and cosine decay)."""

    epochs: int = 40
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    warmup_epochs: float = 1.0
    # Random resized crop: share of the image's area kept, and the aspect ratio range.
    crop_area: tuple[float, float] = (0.3, 1.0)
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    # Brightness, contrast and saturation factors drawn from [1 - jitter, 1 + jitter].
    jitter: float = 0.4
    # The cosine classifier's starting scale (learned).
    scale_init: float = 10.0
    val_episodes: int = 300
    val_queries: int = 15
    # Validation episodes: N ways, and whether each draws its classes from one group (alphabet).
    val_ways: int = 5
    val_within_group: bool = False
    # "photo": crops, flips, colour jitter; "handwriting": affine warps and stroke width
    # (fewshot.handwriting), with `rotation_classes` making 4 classes of each by 90-degree turns;
    # "none": the images as they are.
    augmentation: str = "photo"
    rotation_classes: bool = False
    # "bf16": forward passes under CPU/GPU autocast (AMX/tensor cores: ~2x faster here);
    # weights, optimizer state and the loss stay float32.
    precision: str = "fp32"
    seed: int = 0
    max_seconds: float | None = None
    # Where the backbone trains ("cpu", "cuda"); augmentation runs there too, its random draws
    # on the CPU generator, so a run's episodes are the same on either.
    device: str = "cpu"
    model: ModelConfig = field(default_factory=ModelConfig)

    @property
    def score_keys(self) -> tuple[str, str]:
        """The two validation accuracies whose sum picks the best epoch."""
        within = "_within" if self.val_within_group else ""
        return (f"val_{self.val_ways}w1s{within}", f"val_{self.val_ways}w5s{within}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainConfig:
        """Build from a dict written by to_dict."""
        kwargs = dict(data)
        kwargs["model"] = ModelConfig.from_dict(kwargs.get("model", {}))
        for key in ("crop_area", "crop_aspect"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


def augment(images: Tensor, cfg: PretrainConfig, generator: torch.Generator) -> Tensor:
    """uint8 images [B, C, H, W] -> augmented float [B, C, S, S] by cfg.augmentation."""
    if cfg.augmentation == "handwriting":
        return augment_handwriting(images, HandwritingAugment(), generator)
    if cfg.augmentation == "none":
        return images.float().div_(255.0)
    return augment_photo(images, cfg, generator)


def augment_photo(images: Tensor, cfg: PretrainConfig, generator: torch.Generator) -> Tensor:
    """Random resized crops, flips and colour jitter of uint8 images [B, C, H, W] -> float [B, C, S, S].

    One affine grid per image (bilinear) does crop, resize to S = cfg.model.image_size and flip.
    """
    batch = images.shape[0]
    x = images.float().div_(255.0)

    def uniform(low: float, high: float) -> Tensor:
        return (torch.rand(batch, generator=generator) * (high - low) + low).to(x.device)

    area = uniform(*cfg.crop_area)
    log_aspect = uniform(math.log(cfg.crop_aspect[0]), math.log(cfg.crop_aspect[1]))
    aspect = torch.exp(log_aspect)
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(batch, generator=generator) * 2 - 1) * (1 - width)
    cy = (torch.rand(batch, generator=generator) * 2 - 1) * (1 - height)
    flip = torch.ones(batch, device=x.device)
    if cfg.flip:
        flip = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0).to(x.device)
    theta = torch.zeros(batch, 2, 3, device=x.device)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = height
    theta[:, 1, 2] = cy
    side = cfg.model.image_size
    grid = F.affine_grid(theta, [batch, x.shape[1], side, side], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if cfg.jitter > 0:
        j = cfg.jitter
        shape = (batch, 1, 1, 1)
        x = x * uniform(1 - j, 1 + j).view(shape)
        grey = x.mean(dim=1, keepdim=True)
        x = grey.mean(dim=(2, 3), keepdim=True) + (
            x - grey.mean(dim=(2, 3), keepdim=True)
        ) * uniform(1 - j, 1 + j).view(shape)
        if x.shape[1] == 3:
            grey = x.mean(dim=1, keepdim=True)
            x = grey + (x - grey) * uniform(1 - j, 1 + j).view(shape)
    return x.clamp_(0.0, 1.0)


class CosineClassifier(nn.Module):
    """Logits [B, C] = scale * cos(f, w_c) over C learned class vectors (Gidaris & Komodakis 2018)."""

    def __init__(self, dim: int, classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, dim) * (1.0 / math.sqrt(dim)))
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def forward(self, features: Tensor) -> Tensor:
        """Scaled cosine similarities of features [B, D] to every class vector."""
        cos = F.normalize(features, dim=-1) @ F.normalize(self.weight, dim=-1).T
        return torch.exp(self.log_scale) * cos


@torch.no_grad()
def embed_all(backbone: Conv4, images: Tensor, chunk: int = 512) -> Tensor:
    """Embeddings [n, D] of uint8 images [n, C, H, W] at full view (no augmentation)."""
    backbone.eval()
    device = next(backbone.parameters()).device
    parts = [
        backbone(part.to(device).float().div_(255.0)).cpu() for part in torch.split(images, chunk)
    ]
    return torch.cat(parts)


def prototype_accuracy(
    features: Tensor,
    targets: Tensor,
    *,
    ways: int,
    shots: int,
    queries: int,
    episodes: int,
    seed: int,
    groups: Sequence[str] | None = None,
) -> tuple[float, float]:
    """Mean and 95% CI of cosine nearest-prototype accuracy over seeded episodes of fixed features.

    With `groups` (one name per class), each episode's classes come from one group of at least
    `ways` classes (Lake et al. 2015's within-alphabet runs).
    """
    rng = np.random.default_rng(seed)
    features = F.normalize(features, dim=-1)
    by_class = [
        torch.nonzero(targets == c).flatten().numpy() for c in range(int(targets.max()) + 1)
    ]
    pools = [np.arange(len(by_class))]
    if groups is not None:
        names = sorted(set(groups))
        members = [np.array([c for c, g in enumerate(groups) if g == n]) for n in names]
        pools = [m for m in members if len(m) >= ways]
    scores = []
    for _ in range(episodes):
        pool = pools[int(rng.integers(len(pools)))]
        classes = rng.choice(pool, ways, replace=False)
        support, query = [], []
        for c in classes:
            picked = rng.choice(by_class[c], shots + queries, replace=False)
            support.append(features[torch.from_numpy(picked[:shots])])
            query.append(features[torch.from_numpy(picked[shots:])])
        prototypes = F.normalize(torch.stack([s.mean(0) for s in support]), dim=-1)
        q = torch.cat(query)
        truth = torch.arange(ways).repeat_interleave(queries)
        scores.append(float(((q @ prototypes.T).argmax(1) == truth).float().mean()))
    return mean_ci95(scores)


def validation_scores(backbone: Conv4, val: ImageDataset, cfg: PretrainConfig) -> dict[str, float]:
    """Cosine-prototype accuracy and CI at 1 and 5 shots, cfg.val_ways ways, keyed by score_keys."""
    features = embed_all(backbone, val.images)
    groups = val.groups if cfg.val_within_group else None
    out: dict[str, float] = {}
    for shots, key in zip((1, 5), cfg.score_keys, strict=True):
        acc, ci = prototype_accuracy(
            features, val.targets, ways=cfg.val_ways, shots=shots, queries=cfg.val_queries,
            episodes=cfg.val_episodes, seed=1000 + shots, groups=groups,
        )  # fmt: skip
        out[key], out[f"{key}_ci95"] = acc, ci
    return out


def lr_at(cfg: PretrainConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up, then cosine decay to zero over all epochs."""
    total = cfg.epochs * steps_per_epoch
    warm = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


class Pretrainer:
    """Trains backbone + cosine classifier epoch by epoch; resumes from the run folder's checkpoint."""

    def __init__(
        self, train: ImageDataset, val: ImageDataset, cfg: PretrainConfig, out_dir: str | Path
    ) -> None:
        self.train, self.val, self.cfg = train, val, cfg
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        # channels_last runs the CPU convolutions ~15% faster here.
        self.device = torch.device(cfg.device)
        self.backbone = Conv4(cfg.model).to(self.device, memory_format=torch.channels_last)  # type: ignore[call-overload]
        classes = len(train.classes) * (4 if cfg.rotation_classes else 1)
        self.classifier = CosineClassifier(cfg.model.feature_dim, classes, cfg.scale_init).to(
            self.device
        )
        # The training images live where the model does (Omniglot: ~35 MB at 42 px).
        self.images = train.images.to(self.device)
        self.targets = train.targets.to(self.device)
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for module in (self.backbone, self.classifier):
            for p in module.parameters():
                (decay if p.dim() > 1 else no_decay).append(p)
        self.optimizer = torch.optim.SGD(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=True,
        )
        self.epoch = 0
        self.best: dict[str, Any] | None = None
        self.curve: list[dict[str, Any]] = []
        self.seconds = 0.0
        if (self.out_dir / STATE_FILE).exists():
            self._resume()

    def _named(self) -> dict[str, Tensor]:
        tensors = {f"backbone.{k}": v for k, v in self.backbone.state_dict().items()}
        tensors.update({f"classifier.{k}": v for k, v in self.classifier.state_dict().items()})
        return tensors

    def _params(self) -> list[tuple[str, nn.Parameter]]:
        named = [(f"backbone.{k}", p) for k, p in self.backbone.named_parameters()]
        return named + [(f"classifier.{k}", p) for k, p in self.classifier.named_parameters()]

    def checkpoint(self) -> None:
        """Write weights, momentum buffers and the JSON state, each atomically."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in self._named().items()}
        for name, p in self._params():
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"momentum.{name}"] = buf.cpu().contiguous()
        tmp = self.out_dir / (CHECKPOINT_FILE + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(self.out_dir / CHECKPOINT_FILE)
        state = {
            "epoch": self.epoch,
            "best": self.best,
            "curve": self.curve,
            "seconds": self.seconds,
            "config": self.cfg.to_dict(),
        }
        tmp = self.out_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.out_dir / STATE_FILE)

    def _resume(self) -> None:
        state = json.loads((self.out_dir / STATE_FILE).read_text())
        tensors = load_file(str(self.out_dir / CHECKPOINT_FILE))
        self.backbone.load_state_dict(
            {
                k.removeprefix("backbone."): v
                for k, v in tensors.items()
                if k.startswith("backbone.")
            }
        )
        self.classifier.load_state_dict(
            {
                k.removeprefix("classifier."): v
                for k, v in tensors.items()
                if k.startswith("classifier.")
            }
        )
        for name, p in self._params():
            buf = tensors.get(f"momentum.{name}")
            if buf is not None:
                self.optimizer.state[p]["momentum_buffer"] = buf.to(self.device).clone()
        self.epoch = int(state["epoch"])
        self.best = state["best"]
        self.curve = list(state["curve"])
        self.seconds = float(state["seconds"])

    def validate(self) -> dict[str, float]:
        """Cosine-prototype accuracy on the validation classes at 1 and 5 shots (cfg.score_keys)."""
        return validation_scores(self.backbone, self.val, self.cfg)

    def train_epoch(self, on_step: Callable[[int, int, float], object] | None = None) -> float:
        """One pass over the training images in a seeded order; returns the mean loss."""
        cfg = self.cfg
        n = len(self.train)
        steps = n // cfg.batch_size
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + self.epoch)
        order = torch.randperm(n, generator=generator)
        self.backbone.train()
        total = 0.0
        for i in range(steps):
            index = order[i * cfg.batch_size : (i + 1) * cfg.batch_size].to(self.device)
            x = augment(self.images[index], cfg, generator)
            y = self.targets[index]
            if cfg.rotation_classes:
                x, y = rotate_as_classes(x, y, generator)
            x = x.contiguous(memory_format=torch.channels_last)
            lr = lr_at(cfg, self.epoch * steps + i, steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(x.device.type, torch.bfloat16, enabled=cfg.precision == "bf16"):
                logits = self.classifier(self.backbone(x))
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            self.optimizer.step()
            total += float(loss.detach())
            if on_step is not None:
                on_step(i + 1, steps, float(loss.detach()))
        return total / max(1, steps)

    def run(self, on_epoch: Callable[[dict[str, Any]], object] | None = None, **kw: Any) -> bool:
        """Train until cfg.epochs or cfg.max_seconds; True when all epochs are done."""
        start = time.monotonic()
        spent_before = self.seconds
        while self.epoch < self.cfg.epochs:
            if (
                self.cfg.max_seconds is not None
                and time.monotonic() - start >= self.cfg.max_seconds
            ):
                return False
            t0 = time.monotonic()
            loss = self.train_epoch(**kw)
            self.epoch += 1
            point: dict[str, Any] = {"epoch": self.epoch, "loss": loss, **self.validate()}
            self.seconds = spent_before + (time.monotonic() - start)
            point["minutes"] = self.seconds / 60
            point["epoch_minutes"] = (time.monotonic() - t0) / 60
            self.curve.append(point)
            score = sum(point[k] for k in self.cfg.score_keys)
            if self.best is None or score > self.best["score"]:
                self.best = {"epoch": self.epoch, "score": score, **point}
                tensors = {k: v.detach().cpu().contiguous() for k, v in self._named().items()}
                tmp = self.out_dir / (BEST_FILE + ".tmp")
                save_file(tensors, str(tmp))
                tmp.replace(self.out_dir / BEST_FILE)
            self.checkpoint()
            if on_epoch is not None:
                on_epoch(point)
        return True


def initialization_from(
    backbone_state: dict[str, Tensor], log_scale: float, config: ModelConfig, step_size: float
) -> Initialization:
    """An Initialization from a pre-trained backbone, for the prototype head and the inner loop.

    With unit features and prototypes, the head's logits 2 f.c - |c|^2 are 2 cos - 1: the
    classifier's scale s becomes the head temperature s / 2.
    """
    params = {k: v.detach().clone() for k, v in backbone_state.items()}
    params[HEAD_SCALE] = torch.tensor(log_scale - math.log(2.0))
    names = [*[n for n in params if not n.startswith("head.")], HEAD_WEIGHT, HEAD_BIAS]
    step_sizes = {n: torch.full((config.inner_steps,), step_size) for n in names}
    return Initialization(config=config, params=params, step_sizes=step_sizes, metadata={})


def best_initialization(out_dir: str | Path, step_size: float = 0.0) -> Initialization:
    """The best epoch's backbone of a run folder as an Initialization (BatchNorm folded)."""
    out_dir = Path(out_dir)
    state = json.loads((out_dir / STATE_FILE).read_text())
    cfg = PretrainConfig.from_dict(state["config"])
    tensors = load_file(str(out_dir / BEST_FILE))
    backbone = {
        k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")
    }
    log_scale = float(tensors["classifier.log_scale"])
    model = cfg.model
    if model.norm == "batch":
        backbone, model = fold_batch_norm(backbone, model)
    init = initialization_from(backbone, log_scale, model, step_size)
    init.metadata["pretraining"] = {
        "config": state["config"],
        "best": state["best"],
        "minutes": state["seconds"] / 60,
        "curve": state["curve"],
    }
    return init
