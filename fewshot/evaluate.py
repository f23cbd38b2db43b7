"""Accuracy of an initialization over sampled few-shot episodes, with a 95% confidence interval."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewshot.config import AdaptMode
from fewshot.data import ImageDataset
from fewshot.episodes import EpisodeSampler
from fewshot.errors import EpisodeError
from fewshot.initialization import Initialization
from fewshot.inner import InnerRecipe
from fewshot.stepchoice import chooses_steps
from fewshot.vmapped import query_logits

# The model card's task shapes for grouped data: (ways, shots, within one group, queries per
# class); Lake et al. 2015's runs are within-alphabet 20-way 1-shot with one query per class.
CARD_SHAPES = (
    (5, 1, False, 5),
    (5, 5, False, 5),
    (20, 1, False, 5),
    (20, 5, False, 5),
    (20, 1, True, 1),
)


def shape_name(ways: int, shots: int, within_group: bool = False) -> str:
    """A task shape's name in cards and reports, e.g. "20-way 1-shot within-alphabet"."""
    return f"{ways}-way {shots}-shot" + (" within-alphabet" if within_group else "")


@dataclass
class EvalResult:
    """Mean query accuracy over episodes and its 95% normal-approximation interval half-width.

    `accuracy_0_steps` is the same episodes' accuracy with no inner step (the prototype head on
    the meta-learned backbone, a Prototypical Network); `adaptation_gain` is the paired mean of
    (served steps - 0 steps) per episode, with its 95% interval half-width.
    """

    accuracy: float
    ci95: float
    episodes: int
    ways: int
    shots: int
    queries: int
    mode: str
    steps: int
    accuracy_0_steps: float | None = None
    ci95_0_steps: float | None = None
    adaptation_gain: float | None = None
    adaptation_gain_ci95: float | None = None
    # With steps chosen per task (config.step_candidates): the mean count chosen.
    chosen_steps_mean: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% normal-approximation half-width (nan for fewer than 2 values)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return float("nan"), float("nan")
    ci = 1.96 * float(array.std(ddof=1)) / math.sqrt(array.size) if array.size > 1 else float("nan")
    return float(array.mean()), ci


def episode_scores(
    init: Initialization,
    dataset: ImageDataset,
    *,
    ways: int,
    shots: int,
    queries: int = 5,
    episodes: int = 100,
    mode: AdaptMode = "full",
    steps_list: Sequence[int] = (5,),
    seed: int = 0,
    batch: int = 16,
    within_group: bool = False,
    device: str | torch.device = "cpu",
    sampler: EpisodeSampler | None = None,
    on_progress: Callable[[int], object] | None = None,
) -> dict[int, list[float]]:
    """Per-episode query accuracy for each inner-step count in `steps_list`, on the SAME episodes.

    Episodes are drawn from `seed` alone, so two initializations (or two step counts) scored
    with one seed see identical tasks and can be compared paired. `on_progress(n)` is called
    after every n finished episodes.
    """
    sampler = sampler or EpisodeSampler(dataset, within_group=within_group, device=device)
    rng = np.random.default_rng(seed)
    module = init.module()
    meta = {k: v.detach().to(device) for k, v in init.params.items()}
    sizes = {k: v.detach().to(device) for k, v in init.step_sizes.items()}
    recipe = InnerRecipe.from_config(init.config)
    scores: dict[int, list[float]] = {steps: [] for steps in steps_list}
    remaining = episodes
    with torch.no_grad():
        while remaining > 0:
            tasks = min(batch, remaining)
            b = sampler.sample(rng, tasks, ways, shots, queries)
            for steps in scores:
                out = query_logits(
                    module, meta, sizes, b.support_x, b.support_y, b.query_x, ways,
                    steps=steps, default_step_size=init.config.inner_step_size, mode=mode,
                    first_order=True, recipe=recipe,
                )  # fmt: skip
                correct = (out.argmax(dim=-1) == b.query_y).float().mean(dim=1)
                scores[steps].extend(correct.cpu().tolist())
            remaining -= tasks
            if on_progress is not None:
                on_progress(tasks)
    return scores


def prototype_read_out(init: Initialization) -> Initialization:
    """`init` without fewshot.nuisance's whitening: at 0 steps, the prototype read-out that
    adaptation is measured against (the same object when it has none)."""
    if init.config.nuisance_shrinkage >= 1.0:
        return init
    return replace(init, config=replace(init.config, nuisance_shrinkage=1.0))


def served_scores(
    init: Initialization,
    dataset: ImageDataset,
    *,
    ways: int,
    shots: int,
    queries: int = 5,
    episodes: int = 100,
    seed: int = 0,
    batch: int = 16,
    within_group: bool = False,
    device: str | torch.device = "cpu",
    sampler: EpisodeSampler | None = None,
    on_progress: Callable[[int], object] | None = None,
) -> tuple[list[float], list[float], list[int]]:
    """Per-episode accuracy as served (fewshot.fast.adapt_fast, steps chosen per task), at 0
    steps (the prototype read-out), and the steps chosen, on the episodes episode_scores draws
    from `seed`."""
    from fewshot.fast import adapt_fast

    plain = prototype_read_out(init)

    sampler = sampler or EpisodeSampler(dataset, within_group=within_group, device=device)
    rng = np.random.default_rng(seed)
    served: list[float] = []
    zero: list[float] = []
    chosen: list[int] = []
    remaining = episodes
    with torch.no_grad():
        while remaining > 0:
            tasks = min(batch, remaining)
            b = sampler.sample(rng, tasks, ways, shots, queries)
            for t in range(tasks):
                labels = [str(int(v)) for v in b.support_y[t]]
                truth = b.query_y[t]
                for source, steps, out in ((init, None, served), (plain, 0, zero)):
                    model = adapt_fast(
                        source, b.support_x[t], labels, mode="head", steps=steps, device=device
                    )
                    predicted = model.predict_proba(b.query_x[t]).argmax(dim=1)
                    names = torch.tensor([int(model.labels[i]) for i in predicted.tolist()])
                    out.append(float((names.to(truth.device) == truth).float().mean()))
                    if steps is None:
                        chosen.append(model.steps)
            remaining -= tasks
            if on_progress is not None:
                on_progress(tasks)
    return served, zero, chosen


def evaluate(
    init: Initialization,
    dataset: ImageDataset,
    *,
    ways: int,
    shots: int,
    queries: int = 5,
    episodes: int = 100,
    mode: AdaptMode | None = None,
    steps: int | None = None,
    seed: int = 0,
    batch: int = 16,
    within_group: bool = False,
    device: str | torch.device = "cpu",
    sampler: EpisodeSampler | None = None,
    on_progress: Callable[[int], object] | None = None,
) -> EvalResult:
    """Adapt to `episodes` seeded tasks from `dataset` and score their queries (no rotations).

    Also scores the same episodes at 0 inner steps (accuracy_0_steps) and their paired gain.
    `mode` None: the initialization's default; steps None with config.step_candidates (head
    mode): each task's steps are chosen from its support set, as served.
    """
    mode = init.config.default_mode if mode is None else mode
    if chooses_steps(init, mode, steps):
        served, zero_scores, chosen = served_scores(
            init, dataset, ways=ways, shots=shots, queries=queries, episodes=episodes,
            seed=seed, batch=batch, within_group=within_group, device=device, sampler=sampler,
            on_progress=on_progress,
        )  # fmt: skip
        scores = {-1: served, 0: zero_scores}
        steps_key = -1
        steps = max(init.config.step_candidates or (init.config.inner_steps,))
    else:
        steps = init.config.inner_steps if steps is None else steps
        steps_list = [steps] if steps == 0 else [steps, 0]
        scores = episode_scores(
            init, dataset, ways=ways, shots=shots, queries=queries, episodes=episodes,
            mode=mode, steps_list=steps_list, seed=seed, batch=batch,
            within_group=within_group, device=device, sampler=sampler, on_progress=on_progress,
        )  # fmt: skip
        steps_key, chosen = steps, []
    return paired_result(
        scores[steps_key], scores[0], chosen, ways=ways, shots=shots, queries=queries, mode=mode,
        steps=steps,
    )  # fmt: skip


def paired_result(
    served: Sequence[float],
    zero: Sequence[float],
    chosen: Sequence[int],
    *,
    ways: int,
    shots: int,
    queries: int,
    mode: AdaptMode,
    steps: int,
) -> EvalResult:
    """An EvalResult from per-episode accuracy as served and at 0 steps on the same episodes."""
    accuracy, ci = mean_ci95(served)
    zero_acc, zero_ci = mean_ci95(zero)
    gain, gain_ci = mean_ci95(np.array(served) - np.array(zero))
    return EvalResult(
        accuracy=accuracy, ci95=ci, episodes=len(served), ways=ways, shots=shots,
        queries=queries, mode=mode, steps=steps, accuracy_0_steps=zero_acc, ci95_0_steps=zero_ci,
        adaptation_gain=gain, adaptation_gain_ci95=gain_ci,
        chosen_steps_mean=float(np.mean(chosen)) if chosen else None,
    )  # fmt: skip


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


def head_embeddings(init: Initialization, dataset: ImageDataset) -> Tensor:
    """Every image of `dataset` embedded under a head-mode `init`: [copies, n, D], each image
    first, then (when the recipe fits shifted support views) its four shifted copies."""
    return head_embeddings_and_norms(init, dataset)[0]


def head_embeddings_and_norms(init: Initialization, dataset: ImageDataset) -> tuple[Tensor, Tensor]:
    """head_embeddings [copies, n, D] and each image's embedding norm before normalisation [n]
    (fewshot.unknown's norm check), from the same pass."""
    from fewshot.inner import support_views

    if init.config.default_mode != "head":
        raise ValueError("evaluate_head_cached serves head-mode initializations only")
    module = init.module()
    shift = init.config.inner_shift_views
    copies = 5 if shift > 0 else 1
    with torch.inference_mode():
        parts, norms = [], []
        # Parts of 256 images bound the float copies of the inputs; Conv4 bounds the activations.
        for part in torch.split(dataset.images, 256):
            x = part.float().div(255.0)
            x = support_views(x, torch.zeros(len(x), dtype=torch.long), shift)[0]
            features, norm = module.forward_with_norms(init.params, x)
            parts.append(features.view(copies, len(part), -1))
            norms.append(norm.view(copies, len(part))[0])  # the image itself, not its copies
        return torch.cat(parts, dim=1), torch.cat(norms)


class CachedHeads:
    """Served head-mode adaptation on embeddings cached per image (head_embeddings): the
    prototype head, steps chosen per task, the support-fit guard and the closed-form head steps,
    as fewshot.fast.adapt_fast computes them, without embedding anything again."""

    def __init__(self, init: Initialization, embedded: Tensor) -> None:
        from fewshot.fast import prepare
        from fewshot.inner import HEAD_SCALE

        if init.config.default_mode != "head":
            raise ValueError("evaluate_head_cached serves head-mode initializations only")
        self.config = init.config
        self.embedded = embedded
        self.features = embedded[0]
        self.sizes = prepare(init, torch.device("cpu")).sizes
        self.log_scale = init.params[HEAD_SCALE]
        self.recipe = InnerRecipe.from_config(init.config)

    def path(
        self, index: Tensor, y: Tensor, ways: int, steps: int | None = None
    ) -> tuple[list[tuple[Tensor, Tensor]], int]:
        """Head (weight [N, D], bias [N]) after 0..steps served steps on the support images
        `index` [S] labelled `y` [S], and the steps (`steps`, else chosen as served)."""
        from fewshot.stepchoice import head_path, served_head_steps

        fs = self.features[index]
        copies = self.embedded.shape[0]
        views = self.embedded[:, index].reshape(-1, fs.shape[1]) if copies > 1 else None
        default = self.config.inner_step_size
        if steps is None:
            steps = served_head_steps(
                self.config, fs, views, y, ways, self.log_scale, self.sizes, default
            )
        fitted = (views, y.repeat(copies)) if views is not None else None
        path = head_path(
            fs, y, ways, self.log_scale, self.sizes, steps, default, self.recipe, fitted
        )
        return path, steps


def head_cached_scores(
    init: Initialization,
    dataset: ImageDataset,
    *,
    ways: int,
    shots: int,
    queries: int = 15,
    episodes: int = 600,
    seed: int = 0,
    batch: int = 16,
    within_group: bool = False,
    on_progress: Callable[[int], object] | None = None,
    embedded: Tensor | None = None,
) -> tuple[list[float], list[float], list[int]]:
    """Per-episode accuracy as served, at 0 steps (the prototype read-out), and the steps
    chosen (as served_scores), for a head-mode initialization, each image embedded once.

    Head mode adapts no backbone layer, so an image's embedding (and those of its shifted
    support views, which shift each image on its own) is the same in every task: the served
    computation (CachedHeads) on cached embeddings gives the served accuracy up to float
    rounding, on the episodes evaluate() draws from `seed`, at a fraction of the cost when an
    image is embedded as many views.
    `embedded`: head_embeddings(init, dataset), when already computed (several shapes share it).
    """
    from fewshot.head import head_logits, prototype_head

    heads = CachedHeads(init, head_embeddings(init, dataset) if embedded is None else embedded)
    sampler = EpisodeSampler(dataset, within_group=within_group)
    rng = np.random.default_rng(seed)
    served: list[float] = []
    zero: list[float] = []
    chosen: list[int] = []
    remaining = episodes
    with torch.inference_mode():
        while remaining > 0:
            tasks = min(batch, remaining)
            supports, query_sets = sampler.sample_indices(rng, tasks, ways, shots, queries)
            sy = torch.arange(ways).repeat_interleave(shots)
            qy = torch.arange(ways).repeat_interleave(queries)
            for support, query in zip(supports, query_sets, strict=True):
                path, steps = heads.path(support, sy, ways)
                fq = heads.features[query]
                fs = heads.features[support]
                read_out = prototype_head(fs, torch.nn.functional.one_hot(sy, ways).to(fs.dtype))
                for out, (weight, bias) in ((zero, read_out), (served, path[-1])):
                    logits = head_logits(fq, weight, bias, heads.log_scale)
                    out.append(float((logits.argmax(1) == qy).float().mean()))
                chosen.append(steps)
            remaining -= tasks
            if on_progress is not None:
                on_progress(tasks)
    return served, zero, chosen


def evaluate_head_cached(
    init: Initialization,
    dataset: ImageDataset,
    *,
    ways: int,
    shots: int,
    queries: int = 15,
    episodes: int = 600,
    seed: int = 0,
    batch: int = 16,
    within_group: bool = False,
    on_progress: Callable[[int], object] | None = None,
    embedded: Tensor | None = None,
) -> EvalResult:
    """evaluate() for a head-mode initialization on embeddings cached per image (head_cached_scores)."""
    served, zero, chosen = head_cached_scores(
        init, dataset, ways=ways, shots=shots, queries=queries, episodes=episodes, seed=seed,
        batch=batch, within_group=within_group, on_progress=on_progress, embedded=embedded,
    )  # fmt: skip
    steps = max(init.config.step_candidates or (init.config.inner_steps,))
    return paired_result(
        served, zero, chosen, ways=ways, shots=shots, queries=queries, mode="head", steps=steps
    )
