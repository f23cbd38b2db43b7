"""The "unknown" score over sampled tasks: calibrating its threshold and reporting its rates.

Adapts tasks with fewshot.adapted and scores them with fewshot.unknown, so neither of those needs
the other's module (no import cycle).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from fewshot.episodes import EpisodeSampler
from fewshot.errors import EpisodeError
from fewshot.evaluate import CachedHeads, shape_name
from fewshot.fast import adapt_fast
from fewshot.unknown import (
    CALIBRATION_SHOTS,
    DEFAULT_THRESHOLD,
    NORM_SHARE,
    UnknownCalibration,
    plda_of,
)

if TYPE_CHECKING:
    from fewshot.backbone import Conv4
    from fewshot.data import ImageDataset
    from fewshot.initialization import Initialization
    from fewshot.plda import PLDA


@dataclass
class OpenSetScores:
    """Per-episode raw scores of in-task queries, out-of-task queries, blank and noise images,
    and (`norms`) each one's pre-normalisation embedding norm, in the same order."""

    shots: int
    in_task: list[float] = field(default_factory=list)
    in_task_correct: list[bool] = field(default_factory=list)
    out_of_task: list[float] = field(default_factory=list)
    blank: list[float] = field(default_factory=list)
    noise: list[float] = field(default_factory=list)
    norms: dict[str, list[float]] = field(
        default_factory=lambda: {"in_task": [], "out_of_task": [], "blank": [], "noise": []}
    )

    def p_values(self, calibration: UnknownCalibration, kind: str, ways: int) -> Tensor:
        """The calibrated scores [n] of one kind ("in_task", "out_of_task", "blank", "noise")."""
        raw = torch.tensor(getattr(self, kind), dtype=torch.float32)
        norms = torch.tensor(self.norms[kind], dtype=torch.float32)
        known = norms if len(norms) == len(raw) else None  # None: a path without norms
        return calibration.p_values(raw, torch.full((len(raw),), self.shots), ways, known)


def fit_unknown_plda(init: Initialization, dataset: ImageDataset, dim: int) -> PLDA:
    """fewshot.plda's model fitted on `init`'s embeddings of every image of `dataset` (the
    training classes, never the ones it is calibrated or scored on); store it with
    `init.unknown_tensors = model.to_tensors()` before calibrating."""
    from fewshot.plda import fit_plda

    features, _ = _embedded(init, dataset)
    return fit_plda(features, dataset.targets, dim)


def embedding_norms(init: Initialization, dataset: ImageDataset) -> Tensor:
    """Pre-normalisation embedding norms [n] of every image of `dataset` under `init`'s backbone."""
    return _embedded(init, dataset)[1]


def _embedded(init: Initialization, dataset: ImageDataset) -> tuple[Tensor, Tensor]:
    # Every image's served embedding [n, D] and pre-normalisation norm [n], 256 images a pass.
    module = init.module()
    with torch.inference_mode():
        parts = [
            module.forward_with_norms(init.params, part.float().div(255.0))
            for part in torch.split(dataset.images, 256)
        ]
    return torch.cat([f for f, _ in parts]), torch.cat([n for _, n in parts])


def open_set_scores(
    init: Initialization,
    dataset: ImageDataset,
    *,
    ways: int,
    shots: int,
    episodes: int,
    queries: int = 5,
    seed: int = 0,
    steps: int | None = None,
    within_group: bool = False,
    embedded: Tensor | None = None,
    norms: Tensor | None = None,
) -> OpenSetScores:
    """Adapt (served steps) to `episodes` tasks of `ways` classes and score queries of those
    classes, of `ways` other classes of `dataset` (out of task), a blank and a noise image.

    `embedded` (fewshot.evaluate.head_embeddings of a head-mode `init`): the same tasks scored
    on embeddings computed once per image, equal to serving up to float rounding; `norms`
    (embedding_norms of the same images) saves computing them again.
    """

    sampler = EpisodeSampler(dataset, within_group=within_group)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    out = OpenSetScores(shots=shots)
    if embedded is not None:
        heads, module, plda = CachedHeads(init, embedded), init.module(), plda_of(init)
        norms = embedding_norms(init, dataset) if norms is None else norms
        shape = dataset.images.shape[1:]
        with torch.inference_mode():
            for _ in range(episodes):
                support, query = sampler.sample_indices(rng, 1, 2 * ways, shots, queries)
                odd = torch.cat(
                    [torch.zeros(1, *shape), torch.rand((1, *shape), generator=generator)]
                )
                drawn = (support[0], query[0])
                _score_cached(
                    heads, module, init, out, ways, shots, queries, drawn, odd, steps, norms, plda
                )
        return out
    labels = [str(k) for k in range(ways)]
    for _ in range(episodes):
        batch = sampler.sample(rng, 1, 2 * ways, shots, queries)  # half the classes stay unseen
        sx, sy, qx, qy = batch.support_x[0], batch.support_y[0], batch.query_x[0], batch.query_y[0]
        keep = sy < ways
        # The served loop (same answers as fewshot.adapt up to rounding, a fraction of the work).
        model = adapt_fast(init, sx[keep], [labels[int(k)] for k in sy[keep]], steps=steps)
        shape = qx.shape[1:]
        blank = torch.zeros(1, *shape)
        noise = torch.rand((1, *shape), generator=generator)
        scores = model.predict_scores(torch.cat([qx, blank, noise]), threshold=0.0)
        n = qx.shape[0]
        inside = qy < ways
        predicted = scores.probabilities[:n].argmax(dim=1)
        out.in_task += scores.raw[:n][inside].tolist()
        out.in_task_correct += (predicted[inside] == qy[inside]).tolist()
        out.out_of_task += scores.raw[:n][~inside].tolist()
        out.blank.append(float(scores.raw[n]))
        out.noise.append(float(scores.raw[n + 1]))
        if scores.norms is not None:
            _add_norms(out, scores.norms, inside)
    return out


def _add_norms(out: OpenSetScores, norms: Tensor, inside: Tensor) -> None:
    # norms [n + 2]: the n queries (`inside` [n] marks in-task ones), then blank and noise.
    n = inside.shape[0]
    out.norms["in_task"] += norms[:n][inside].tolist()
    out.norms["out_of_task"] += norms[:n][~inside].tolist()
    out.norms["blank"].append(float(norms[n]))
    out.norms["noise"].append(float(norms[n + 1]))


def _score_cached(
    heads: CachedHeads,
    module: Conv4,
    init: Initialization,
    out: OpenSetScores,
    ways: int,
    shots: int,
    queries: int,
    drawn: tuple[Tensor, Tensor],
    odd: Tensor,
    steps: int | None,
    norms: Tensor,
    plda: PLDA | None,
) -> None:
    """open_set_scores' step on cached embeddings: adapt to the first `ways` of the drawn
    classes (support and query indices `drawn`); score the queries and the blank and noise
    images `odd` [2, C, H, W] into `out`; `norms` [n] the dataset's embedding_norms."""
    from fewshot.head import head_logits
    from fewshot.unknown import class_prototypes, familiarity

    support, query = drawn
    drawn_y = torch.arange(2 * ways).repeat_interleave(shots)
    qy = torch.arange(2 * ways).repeat_interleave(queries)
    keep = drawn_y < ways
    index, sy = support[keep], drawn_y[keep]
    path, _ = heads.path(index, sy, ways, steps)
    weight, bias = path[-1]
    odd_features, odd_norms = module.forward_with_norms(init.params, odd)
    odd_features = odd_features.to(heads.features.dtype)
    queried = torch.cat([heads.features[query], odd_features])
    predicted = head_logits(queried, weight, bias, heads.log_scale).argmax(dim=1)
    prototypes = class_prototypes(heads.features[index], sy, ways)
    counts = torch.full((ways,), shots)
    raw, _ = familiarity(queried, prototypes, counts, init.config.unknown_distance, plda)
    n = query.shape[0]
    inside = qy < ways
    out.in_task += raw[:n][inside].tolist()
    out.in_task_correct += (predicted[:n][inside] == qy[inside]).tolist()
    out.out_of_task += raw[:n][~inside].tolist()
    out.blank.append(float(raw[n]))
    out.noise.append(float(raw[n + 1]))
    _add_norms(out, torch.cat([norms[query].float(), odd_norms.float()]), inside)


def calibrate_unknown(
    init: Initialization,
    dataset: ImageDataset,
    *,
    shots: Sequence[int] = CALIBRATION_SHOTS,
    ways: Sequence[int] = (5, 20),
    episodes: int = 60,
    queries: int = 5,
    seed: int = 77,
    threshold: float = DEFAULT_THRESHOLD,
    embedded: Tensor | None = None,
    norm_check: bool = True,
    norms: Tensor | None = None,
    norm_share: float = NORM_SHARE,
) -> UnknownCalibration:
    """Calibrate the "unknown" score of `init` on held-out `dataset` (e.g. validation groups).

    `episodes` tasks per (ways, shots); shapes the data cannot supply are skipped. With
    `norm_check`, the pre-normalisation norms of every image of `dataset` are kept for
    fewshot.unknown's norm check (`norms`: embedding_norms of `dataset` when the caller has
    them, e.g. from fewshot.evaluate.head_embeddings_and_norms), which spends `norm_share` of
    the threshold. Store the result with
    `init.metadata["unknown"] = calibration.to_dict()`.
    """

    if norms is None and (norm_check or embedded is not None):
        norms = embedding_norms(init, dataset)
    table: dict[tuple[int, int], list[float]] = {}
    for k in shots:
        for n in ways:
            try:
                found = open_set_scores(
                    init, dataset, ways=n, shots=k, episodes=episodes, queries=queries,
                    seed=seed + 1000 * k + n, embedded=embedded, norms=norms,
                )  # fmt: skip
            except EpisodeError:
                continue
            if found.in_task:
                table[(n, k)] = sorted(found.in_task)
    if not table:
        raise ValueError("the calibration data cannot supply any task shape")
    counts = {f"{w}x{k}": len(v) for (w, k), v in table.items()}
    held_out = sorted(norms.tolist()) if norm_check and norms is not None else None
    full = UnknownCalibration(
        scores_by_shape=table, threshold=threshold, norms=held_out, norm_share=norm_share
    )
    compressed = full.compressed()
    compressed.details = {"calibration_queries": counts, "distance": init.config.unknown_distance}
    return compressed


def unknown_report(
    init: Initialization,
    dataset: ImageDataset,
    calibration: UnknownCalibration,
    *,
    shapes: Sequence[tuple[int, int]] = ((5, 1), (5, 5), (5, 20), (20, 1), (20, 5)),
    episodes: int = 50,
    seed: int = 4242,
    threshold: float | None = None,
    within_group_shapes: Sequence[tuple[int, int]] = (),
    embedded: Tensor | None = None,
    norms: Tensor | None = None,
) -> dict[str, dict[str, float]]:
    """Per shape at `threshold` (default: the calibration's): kept in-task share, in-task accuracy
    (correct and kept), out-of-task share flagged unknown, blank and noise share flagged.

    `within_group_shapes`: shapes also reported with every class of a task, and the out-of-task
    classes, from one group (Lake et al.'s within-alphabet runs), named "... within-alphabet".
    Shapes the data cannot supply are left out.
    """
    t = calibration.threshold if threshold is None else threshold
    if norms is None and embedded is not None:
        norms = embedding_norms(init, dataset)
    report: dict[str, dict[str, float]] = {}
    todo = [(w, k, False) for w, k in shapes] + [(w, k, True) for w, k in within_group_shapes]
    for ways, shots, within in todo:
        try:
            found = open_set_scores(
                init, dataset, ways=ways, shots=shots, episodes=episodes,
                seed=seed + ways + shots + (1000 if within else 0), within_group=within,
                embedded=embedded, norms=norms,
            )  # fmt: skip
        except EpisodeError:
            continue  # a shape the data cannot supply (twice its ways in classes)

        def flagged(kind: str, found: OpenSetScores = found, ways: int = ways) -> np.ndarray:
            return np.asarray((found.p_values(calibration, kind, ways) < t).numpy())

        kept = ~flagged("in_task")
        correct = np.array(found.in_task_correct)
        report[shape_name(ways, shots, within)] = {
            "threshold": t,
            "in_task_kept": float(kept.mean()),
            "in_task_accuracy": float((kept & correct).mean()),
            "in_task_accuracy_without_unknown": float(correct.mean()),
            "out_of_task_flagged": float(flagged("out_of_task").mean()),
            "blank_flagged": float(flagged("blank").mean()),
            "noise_flagged": float(flagged("noise").mean()),
            "episodes": float(episodes),
        }
    return report
