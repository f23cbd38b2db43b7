"""Promotion maths: held-out group splits, paired comparisons of two initializations, verdicts.

A candidate initialization replaces the active one only if, on the SAME seeded episodes from
groups (alphabets) neither was trained on, no required task shape is worse beyond a stated margin
(a non-inferiority test): per shape the paired per-episode difference (candidate - active), its
mean and 95% normal-approximation interval; "not worse" means the interval's lower end is above
-margin. Pairing removes the between-episode variance both versions share, so 400 episodes resolve
differences of a few tenths of a point where unpaired intervals cannot.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fewshot.errors import DatasetError

if TYPE_CHECKING:
    import torch

    from fewshot.data import ImageDataset
    from fewshot.initialization import Initialization

MIN_EPISODES = 400
DEFAULT_MARGIN = 0.005
Shape = tuple[int, int]


def choose_validation_groups(
    groups: Sequence[str], count: int | None = None, *, fraction: float = 0.15, seed: str = "0"
) -> list[str]:
    """Validation groups picked deterministically from group names (at dataset registration).

    Each name is ranked by sha256(f"{seed}/{name}"), so the choice depends only on the names and
    the seed (not on their order, nor on the machine) and can be recomputed and audited later.
    `count` defaults to round(fraction * len(groups)), at least 1; at least one group is left
    for training. Returns the chosen names sorted.
    """
    names = sorted(set(groups))
    if len(names) < 2:
        raise DatasetError(
            f"a validation split by group needs at least 2 groups, got {len(names)}: {names}"
        )
    wanted = max(1, round(fraction * len(names))) if count is None else count
    if not 1 <= wanted < len(names):
        raise DatasetError(f"cannot hold out {wanted} of {len(names)} groups")
    ranked = sorted(names, key=lambda n: hashlib.sha256(f"{seed}/{n}".encode()).hexdigest())
    return sorted(ranked[:wanted])


def trained_groups(metadata: dict[str, Any], data: ImageDataset | None = None) -> list[str]:
    """Groups an initialization was meta-trained on, from its metadata.

    `training_groups` when recorded; otherwise, for older versions that recorded only their
    `validation_groups`, the groups of `data` outside those (assumed to be the same dataset
    when `data` holds every validation group). Empty when nothing is known.
    """
    recorded = metadata.get("training_groups")
    if isinstance(recorded, list):
        return sorted(str(g) for g in recorded)
    held = metadata.get("validation_groups")
    if data is None or not isinstance(held, list):
        return []
    names = set(data.group_names)
    if not held or not set(map(str, held)) <= names:
        return []
    return sorted(names - set(map(str, held)))


def overlapping_groups(
    metadata: dict[str, Any], validation_groups: Sequence[str], data: ImageDataset | None = None
) -> list[str]:
    """Validation groups that the initialization described by `metadata` was trained on."""
    return sorted(set(validation_groups) & set(trained_groups(metadata, data)))


def paired_difference(candidate: Sequence[float], active: Sequence[float]) -> tuple[float, float]:
    """Mean of per-episode (candidate - active) and its 95% half-width; episodes must match."""
    a, b = np.asarray(candidate, dtype=np.float64), np.asarray(active, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores need equal lengths, got {a.shape} and {b.shape}")
    if a.size < 2:
        return float((a - b).mean()) if a.size else float("nan"), float("nan")
    diff = a - b
    return float(diff.mean()), 1.96 * float(diff.std(ddof=1)) / math.sqrt(diff.size)


@dataclass
class ShapeComparison:
    """Both versions on the same episodes of one shape, and their paired difference (fractions)."""

    ways: int
    shots: int
    within_group: bool
    episodes: int
    candidate: float
    active: float
    difference: float
    ci95: float
    margin: float

    @property
    def name(self) -> str:
        """E.g. "20-way 1-shot" or "20-way 1-shot within-group"."""
        suffix = " within-group" if self.within_group else ""
        return f"{self.ways}-way {self.shots}-shot{suffix}"

    @property
    def not_worse(self) -> bool:
        """True when the 95% interval of the difference lies above -margin."""
        return math.isfinite(self.ci95) and self.difference - self.ci95 > -self.margin

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (with the name and the per-shape verdict)."""
        return {**asdict(self), "name": self.name, "not_worse": self.not_worse}


@dataclass
class PromotionVerdict:
    """Whether to promote, why (or why not), and every shape's comparison."""

    promote: bool
    reasons: list[str]
    comparisons: list[ShapeComparison] = field(default_factory=list)
    validation_groups: list[str] = field(default_factory=list)
    margin: float = DEFAULT_MARGIN

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict, for the API and the model card."""
        return {
            "promote": self.promote,
            "reasons": list(self.reasons),
            "margin": self.margin,
            "validation_groups": list(self.validation_groups),
            "comparisons": [c.to_dict() for c in self.comparisons],
        }


def verdict(
    comparisons: Sequence[ShapeComparison],
    required: Sequence[tuple[int, int, bool]],
    *,
    margin: float = DEFAULT_MARGIN,
    min_episodes: int = MIN_EPISODES,
    overlap: Sequence[str] = (),
    validation_groups: Sequence[str] = (),
) -> PromotionVerdict:
    """Promote only if every required (ways, shots, within_group) shape was compared on at least
    `min_episodes` paired episodes, none is worse beyond `margin`, and no validation group was
    part of either version's training (`overlap`)."""
    reasons: list[str] = []
    if not required:
        reasons.append("no required shapes: nothing to compare")
    if overlap:
        reasons.append(
            "validation groups overlap a version's training groups: " + ", ".join(overlap)
        )
    by_key = {(c.ways, c.shots, c.within_group): c for c in comparisons}
    for key in required:
        comparison = by_key.get(key)
        name = f"{key[0]}-way {key[1]}-shot" + (" within-group" if key[2] else "")
        if comparison is None:
            reasons.append(f"{name}: the validation data cannot supply this shape")
        elif comparison.episodes < min_episodes:
            reasons.append(f"{name}: {comparison.episodes} episodes < {min_episodes}")
        elif not comparison.not_worse:
            reasons.append(
                f"{name}: {100 * comparison.difference:+.2f} ± {100 * comparison.ci95:.2f} points, "
                f"worse beyond the {100 * margin:.2f}-point margin"
            )
    return PromotionVerdict(
        promote=not reasons,
        reasons=reasons or ["no required shape is worse beyond the margin"],
        comparisons=list(comparisons),
        validation_groups=sorted(validation_groups),
        margin=margin,
    )


def compare_initializations(
    candidate: Initialization,
    active: Initialization,
    validation: ImageDataset,
    shapes: Sequence[tuple[int, int, bool]] = (
        (5, 1, False),
        (5, 5, False),
        (20, 1, False),
        (20, 5, False),
    ),
    *,
    episodes: int = MIN_EPISODES,
    queries: int = 5,
    seed: int = 2024,
    margin: float = DEFAULT_MARGIN,
    required: Sequence[tuple[int, int, bool]] | None = None,
    min_episodes: int = MIN_EPISODES,
    device: str | torch.device = "cpu",
    active_validation: ImageDataset | None = None,
) -> PromotionVerdict:
    """Score both versions on the same seeded episodes of `validation` per shape; return the verdict.

    `shapes`: (ways, shots, within_group); shapes the data cannot supply are left out of the
    comparisons (and refuse promotion when `required`, which defaults to `shapes`).
    Groups either version was trained on (from metadata) refuse promotion.
    `active_validation`: the same data decoded for the active version when it reads images at
    another size or mode; episodes are drawn by index from one seed, so they are the same tasks.
    """
    from fewshot.errors import EpisodeError
    from fewshot.evaluate import episode_scores

    results: list[ShapeComparison] = []
    for ways, shots, within in shapes:
        scores: list[list[float]] = []
        try:
            for init, data in (
                (candidate, validation),
                (active, validation if active_validation is None else active_validation),
            ):
                per_steps = episode_scores(
                    init.to(device), data, ways=ways, shots=shots, queries=queries,
                    episodes=episodes, steps_list=[init.config.inner_steps], seed=seed,
                    mode=init.config.default_mode,
                    within_group=within, device=device,
                )  # fmt: skip
                scores.append(per_steps[init.config.inner_steps])
        except EpisodeError:
            continue
        difference, ci = paired_difference(scores[0], scores[1])
        results.append(
            ShapeComparison(
                ways=ways,
                shots=shots,
                within_group=within,
                episodes=len(scores[0]),
                candidate=float(np.mean(scores[0])),
                active=float(np.mean(scores[1])),
                difference=difference,
                ci95=ci,
                margin=margin,
            )
        )
    groups = validation.group_names
    overlap = sorted(
        set(overlapping_groups(candidate.metadata, groups))
        | set(overlapping_groups(active.metadata, groups))
    )
    return verdict(
        results,
        list(shapes) if required is None else required,
        margin=margin,
        min_episodes=min_episodes,
        overlap=overlap,
        validation_groups=groups,
    )
