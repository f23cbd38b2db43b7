"""Accuracy of an initialization over sampled few-shot episodes, with a 95% confidence interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from fewshot.config import AdaptMode
from fewshot.data import ImageDataset
from fewshot.episodes import EpisodeSampler
from fewshot.errors import EpisodeError
from fewshot.initialization import Initialization
from fewshot.tasks import query_logits


@dataclass
class EvalResult:
    """Mean query accuracy over episodes and its 95% normal-approximation interval half-width."""

    accuracy: float
    ci95: float
    episodes: int
    ways: int
    shots: int
    queries: int
    mode: str
    steps: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


def evaluate(
    init: Initialization,
    dataset: ImageDataset,
    *,
    ways: int,
    shots: int,
    queries: int = 5,
    episodes: int = 100,
    mode: AdaptMode = "full",
    steps: int | None = None,
    seed: int = 0,
    batch: int = 16,
    within_group: bool = False,
    device: str | torch.device = "cpu",
    sampler: EpisodeSampler | None = None,
) -> EvalResult:
    """Adapt to `episodes` seeded tasks from `dataset` and score their queries (no rotations)."""
    steps = init.config.inner_steps if steps is None else steps
    sampler = sampler or EpisodeSampler(dataset, within_group=within_group, device=device)
    rng = np.random.default_rng(seed)
    module = init.module()
    meta = {k: v.detach().to(device) for k, v in init.params.items()}
    sizes = {k: v.detach().to(device) for k, v in init.step_sizes.items()}
    scores: list[float] = []
    remaining = episodes
    with torch.no_grad():
        while remaining > 0:
            tasks = min(batch, remaining)
            b = sampler.sample(rng, tasks, ways, shots, queries)
            out = query_logits(
                module,
                meta,
                sizes,
                b.support_x,
                b.support_y,
                b.query_x,
                ways,
                steps=steps,
                default_step_size=init.config.inner_step_size,
                mode=mode,
                first_order=True,
            )
            correct = (out.argmax(dim=-1) == b.query_y).float().mean(dim=1)
            scores.extend(correct.cpu().tolist())
            remaining -= tasks
    values = np.array(scores)
    ci = (
        1.96 * float(values.std(ddof=1)) / math.sqrt(len(values))
        if len(values) > 1
        else float("nan")
    )
    return EvalResult(
        accuracy=float(values.mean()),
        ci95=ci,
        episodes=len(values),
        ways=ways,
        shots=shots,
        queries=queries,
        mode=mode,
        steps=steps,
    )


def evaluate_shapes(
    init: Initialization,
    dataset: ImageDataset,
    shapes: Sequence[tuple[int, int]],
    *,
    episodes: int,
    seed: int,
    queries: int = 5,
    device: str | torch.device = "cpu",
    sampler: EpisodeSampler | None = None,
) -> dict[tuple[int, int], EvalResult]:
    """evaluate() for each (ways, shots), skipping shapes the data has too few classes or images for."""
    sampler = sampler or EpisodeSampler(dataset, device=device)
    on_device = init.to(device)
    out: dict[tuple[int, int], EvalResult] = {}
    for ways, shots in shapes:
        if len(dataset.classes) < ways:
            continue
        try:
            out[(ways, shots)] = evaluate(
                on_device, dataset, ways=ways, shots=shots, queries=queries, episodes=episodes,
                seed=seed, device=device, sampler=sampler,
            )  # fmt: skip
        except EpisodeError:  # too few images per class for this shape
            continue
    return out
