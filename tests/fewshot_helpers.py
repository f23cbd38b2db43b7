"""Helpers for the fewshot core tests: an independent reference inner loop and generated datasets."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

import fewshot
from fewshot.config import AdaptMode, ModelConfig
from fewshot.data import ImageDataset

TINY = ModelConfig(width=8, image_size=12, inner_steps=3, inner_step_size=0.1)


def tiny_init(
    config: ModelConfig = TINY, seed: int = 0, dtype: torch.dtype = torch.float64
) -> fewshot.Initialization:
    """A random initialization whose biases, norms, temperature and step sizes are all non-trivial."""
    init = fewshot.Initialization.random(config, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    params = {}
    for name, value in init.params.items():
        noise = 0.1 * torch.randn(value.shape, generator=generator)
        params[name] = (value + noise if value.dim() < 4 else value).to(dtype)
    steps = {
        name: (0.05 + 0.1 * torch.rand(size.shape, generator=generator)).to(dtype)
        for name, size in init.step_sizes.items()
    }
    return fewshot.Initialization(config=config, params=params, step_sizes=steps, metadata={})


def random_images(
    count: int, config: ModelConfig = TINY, seed: int = 0, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Images [count, C, H, W] in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    shape = (count, config.in_channels, config.image_size, config.image_size)
    return torch.rand(shape, generator=generator).to(dtype)


# --- the reference: plain torch.nn.functional and torch.autograd, no torch.func ----------------


def reference_embed(params: Mapping[str, Tensor], x: Tensor, config: ModelConfig) -> Tensor:
    """Conv4 written out layer by layer with torch.nn.functional."""
    index, h = 0, x
    stride = 2 if config.pooling == "stride" else 1
    for _ in range(config.depth):
        conv_w, conv_b = params[f"blocks.{index}.weight"], params[f"blocks.{index}.bias"]
        h = F.conv2d(h, conv_w, conv_b, stride=stride, padding=1)
        index += 1
        if config.norm == "group":
            norm_w, norm_b = params[f"blocks.{index}.weight"], params[f"blocks.{index}.bias"]
            h = F.group_norm(h, config.norm_groups, norm_w, norm_b, eps=1e-5)
            index += 1
        h = F.relu(h)
        index += 1
        if config.pooling == "maxpool":
            h = F.max_pool2d(h, 2, ceil_mode=True)
            index += 1
    return h.mean(dim=(-2, -1))


def reference_logits(params: Mapping[str, Tensor], features: Tensor) -> Tensor:
    """Scaled linear head on features."""
    out = features @ params["head.weight"].T + params["head.bias"]
    return params["head.log_scale"].exp() * out


def reference_adapt(
    meta: Mapping[str, Tensor],
    step_sizes: Mapping[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    n_way: int,
    config: ModelConfig,
    *,
    steps: int,
    mode: AdaptMode = "full",
    first_order: bool = False,
) -> dict[str, Tensor]:
    """A hand-written SGD loop: prototype head, then `steps` steps of torch.autograd.grad."""
    features = reference_embed(meta, support_x, config)
    prototypes = torch.stack([features[support_y == k].mean(dim=0) for k in range(n_way)])
    # The head is a parameter of its own, initialised from the prototypes: cloning the backbone
    # makes the inner gradients partial derivatives (not through the prototypes), as for a copy.
    fast = {name: value.clone() for name, value in meta.items()}
    fast["head.weight"] = 2 * prototypes
    fast["head.bias"] = -(prototypes**2).sum(dim=1)
    names = ["head.weight", "head.bias"]
    if mode == "full":
        names = [n for n in meta if not n.startswith("head.")] + names
    for t in range(steps):
        feats = features if mode == "head" else reference_embed(fast, support_x, config)
        loss = F.cross_entropy(reference_logits(fast, feats), support_y)
        # First order keeps the graph alive (retain_graph) because the head's prototypes share it.
        grads = torch.autograd.grad(
            loss, [fast[n] for n in names], create_graph=not first_order, retain_graph=True
        )
        for name, g in zip(names, grads, strict=True):
            size = step_sizes[name][t] if name in step_sizes else config.inner_step_size
            fast[name] = fast[name] - size * g
    return fast


# --- generated image datasets ---------------------------------------------------------------


def pattern_png(path: Path, seed: int, size: int = 20, mode: str = "L") -> None:
    """Write a distinct dark-on-white drawing (random strokes) as PNG."""
    rng = np.random.default_rng(seed)
    canvas = np.full((size, size), 255, dtype=np.uint8)
    canvas[rng.random((size, size)) < 0.25] = 0
    image = Image.fromarray(canvas, "L").convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def write_image_folder(
    root: Path, *, groups: int = 0, classes: int = 3, images: int = 4, size: int = 20
) -> list[str]:
    """root/<class>/<img>.png (groups=0) or root/<group>/<class>/<img>.png; returns class keys."""
    keys = []
    group_names = [f"group{g}" for g in range(groups)] if groups else [""]
    seed = 0
    for group in group_names:
        for c in range(classes):
            key = f"{group}/char{c:02d}" if group else f"char{c:02d}"
            keys.append(key)
            for i in range(images):
                seed += 1
                pattern_png(
                    root / key / f"{i:02d}.png", seed, size=size, mode="RGB" if i % 2 else "L"
                )
    return keys


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    """Zip every file under `folder`, with member names prefixed by `prefix`."""
    with zipfile.ZipFile(archive, "w") as out:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                out.write(file, prefix + file.relative_to(folder).as_posix())
    return archive


def synthetic_dataset(
    classes: int = 24, per_class: int = 10, size: int = 12, groups: int = 3, seed: int = 0
) -> ImageDataset:
    """Classes are random blob patterns; images are shifted, noisy copies (learnable structure)."""
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for c in range(classes):
        template = (rng.random((size, size)) < 0.3).astype(np.float32)
        for _ in range(per_class):
            shifted = np.roll(template, rng.integers(-1, 2, size=2), axis=(0, 1))
            noisy = np.clip(shifted + 0.35 * rng.standard_normal((size, size)), 0, 1)
            images.append((noisy * 255).astype(np.uint8)[None])
            targets.append(c)
    return ImageDataset(
        images=torch.from_numpy(np.stack(images)),
        targets=torch.tensor(targets),
        classes=[f"g{c % groups}/c{c}" for c in range(classes)],
        groups=[f"g{c % groups}" for c in range(classes)],
    )
