"""Promotion maths: deterministic validation groups, paired comparisons, refusal rules."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fewshot
from fewshot.promotion import ShapeComparison, trained_groups
from tests.fewshot_helpers import synthetic_dataset, tiny_init

SHAPES = [(3, 1, False), (3, 2, False)]


def test_validation_groups_depend_only_on_names_and_seed() -> None:
    names = [f"alphabet{i}" for i in range(30)]
    chosen = fewshot.choose_validation_groups(names, 5, seed="omniglot")
    assert len(chosen) == 5 and chosen == sorted(chosen) and set(chosen) <= set(names)
    assert fewshot.choose_validation_groups(list(reversed(names)), 5, seed="omniglot") == chosen
    assert fewshot.choose_validation_groups(names, 5, seed="other") != chosen
    assert len(fewshot.choose_validation_groups(names)) == round(0.15 * 30)
    with pytest.raises(fewshot.DatasetError):
        fewshot.choose_validation_groups(["only"])
    with pytest.raises(fewshot.DatasetError):
        fewshot.choose_validation_groups(names[:3], 3)


def test_trained_groups_from_metadata() -> None:
    data = synthetic_dataset(groups=4)  # groups g0..g3
    assert trained_groups({"training_groups": ["g1", "g0"]}) == ["g0", "g1"]
    assert trained_groups({"validation_groups": ["g3"]}, data) == ["g0", "g1", "g2"]
    assert trained_groups({"validation_groups": ["elsewhere"]}, data) == []
    assert fewshot.overlapping_groups({"training_groups": ["g1"]}, ["g1", "g2"]) == ["g1"]


def test_paired_difference() -> None:
    diff, ci = fewshot.paired_difference([1.0, 0.8, 0.6, 1.0], [0.8, 0.8, 0.4, 0.8])
    assert diff == pytest.approx(0.15)
    assert ci == pytest.approx(1.96 * torch.tensor([0.2, 0.0, 0.2, 0.2]).std().item() / 2)
    with pytest.raises(ValueError):
        fewshot.paired_difference([1.0], [1.0, 0.0])


def _comparison(difference: float, ci: float, episodes: int = 400) -> ShapeComparison:
    return ShapeComparison(5, 1, False, episodes, 0.9 + difference, 0.9, difference, ci, 0.005)


def test_verdict_refuses_worse_missing_short_and_overlapping() -> None:
    required = [(5, 1, False), (20, 1, False)]
    good = [_comparison(0.001, 0.003), dataclasses.replace(_comparison(0.0, 0.002), ways=20)]
    assert fewshot.verdict(good, required).promote
    worse = [good[0], dataclasses.replace(_comparison(-0.01, 0.003), ways=20)]
    refused = fewshot.verdict(worse, required)
    assert not refused.promote and "20-way 1-shot" in refused.reasons[0]
    missing = fewshot.verdict(good[:1], required)
    assert not missing.promote and "cannot supply" in missing.reasons[0]
    short = fewshot.verdict([_comparison(0.0, 0.001, episodes=20), good[1]], required)
    assert not short.promote and "20 episodes < 400" in short.reasons[0]
    overlap = fewshot.verdict(good, required, overlap=["Latin"])
    assert not overlap.promote and "Latin" in overlap.reasons[0]
    assert not fewshot.verdict(good, []).promote  # an empty comparison never promotes
    # Within the margin but with an interval reaching below it: not shown to be "not worse".
    assert not fewshot.verdict([_comparison(-0.004, 0.003), good[1]], required).promote


def test_compare_initializations_is_paired_and_refuses_a_worse_version() -> None:
    data = synthetic_dataset(groups=3)
    active = tiny_init(dtype=torch.float32)
    same = fewshot.compare_initializations(
        active, active, data, SHAPES, episodes=24, min_episodes=20
    )
    assert same.promote, same.reasons
    assert all(c.difference == 0.0 and c.ci95 == 0.0 for c in same.comparisons)
    # A version whose last block is zero maps every image to one point: chance accuracy.
    broken_params = {
        k: (torch.zeros_like(v) if k.startswith("blocks.9") else v)
        for k, v in active.params.items()
    }
    broken = dataclasses.replace(active, params=broken_params)
    worse = fewshot.compare_initializations(
        broken, active, data, SHAPES, episodes=24, min_episodes=20
    )
    assert not worse.promote and all(c.difference < 0 for c in worse.comparisons)
    # A required shape the data cannot supply (50 ways) refuses promotion.
    big = fewshot.compare_initializations(
        active, active, data, [*SHAPES, (50, 1, False)], episodes=24, min_episodes=20
    )
    assert not big.promote and "50-way 1-shot" in " ".join(big.reasons)
    # Validation groups the candidate was trained on refuse promotion.
    trained = dataclasses.replace(active, metadata={"training_groups": ["g0", "g1"]})
    overlap = fewshot.compare_initializations(
        trained, active, data, SHAPES, episodes=24, min_episodes=20
    )
    assert not overlap.promote and "g0" in overlap.reasons[0]
    assert overlap.to_dict()["comparisons"][0]["name"] == "3-way 1-shot"
