"""Support-set diagnostics: leave-one-out accuracy and the most confusable class pairs."""

from __future__ import annotations

import time

import pytest
import torch

import fewshot
from fewshot.config import ModelConfig
from tests.fewshot_helpers import TINY, random_images, tiny_init


def test_leave_one_out_on_identical_copies_and_singletons() -> None:
    init = tiny_init(dtype=torch.float32)
    base = random_images(3, TINY, seed=4, dtype=torch.float32)
    # a: two identical images (LOO exact), b: two identical images, c: one image (not evaluated).
    images = torch.cat([base[0:1], base[0:1], base[1:2], base[1:2], base[2:3]])
    report = fewshot.diagnose_support(init, images, ["a", "a", "b", "b", "c"])
    assert report.leave_one_out_accuracy == 1.0
    assert report.evaluated_images == 4
    assert report.per_class == {"a": 1.0, "b": 1.0, "c": None}
    assert len(report.confusable_pairs) == 3
    sims = [p.similarity for p in report.confusable_pairs]
    assert sims == sorted(sims, reverse=True) and all(-1.0 <= s <= 1.0 for s in sims)


def test_a_mislabelled_image_lowers_leave_one_out_and_duplicate_classes_pair_first() -> None:
    init = tiny_init(dtype=torch.float32)
    base = random_images(4, TINY, seed=5, dtype=torch.float32)
    # Class "x" and class "y" hold the same image: the most confusable pair, similarity 1.
    images = torch.cat([base[0:1], base[0:1], base[1:2], base[1:2], base[2:3], base[3:4]])
    labels = ["x", "x", "y", "y", "z", "z"]
    report = fewshot.diagnose_support(init, torch.cat([images[:2], images[:2], images[4:]]), labels)
    top = report.confusable_pairs[0]
    assert {top.first, top.second} == {"x", "y"} and top.similarity == pytest.approx(1.0, abs=1e-4)
    # Swap one image of x into z's place: leave-one-out can no longer be perfect.
    bad = fewshot.diagnose_support(init, images, ["x", "z", "y", "y", "z", "x"])
    assert bad.leave_one_out_accuracy is not None and bad.leave_one_out_accuracy < 1.0


def test_leave_one_out_matches_a_direct_loop() -> None:
    init = tiny_init(dtype=torch.float32)
    images = random_images(9, TINY, seed=6, dtype=torch.float32)
    labels = ["a", "b", "c", "a", "b", "c", "a", "b", "b"]
    report = fewshot.diagnose_support(init, images, labels)
    from fewshot.inner import embed

    feats = embed(init.module(), init.params, images).double()
    correct = []
    for i in range(9):
        keep = [j for j in range(9) if j != i]
        protos = torch.stack(
            [feats[[j for j in keep if labels[j] == c]].mean(0) for c in ("a", "b", "c")]
        )
        correct.append("abc"[int(((protos - feats[i]) ** 2).sum(1).argmin())] == labels[i])
    assert report.leave_one_out_accuracy == pytest.approx(sum(correct) / 9)


def test_diagnostics_are_fast_at_the_omniglot_size() -> None:
    config = ModelConfig()
    init = fewshot.Initialization.random(config)
    images = torch.rand(100, 1, 28, 28)
    labels = [f"class{i % 20}" for i in range(100)]
    fewshot.diagnose_support(init, images, labels)  # warm-up
    start = time.perf_counter()
    fewshot.diagnose_support(init, images, labels)
    # Tens of ms on an idle core; the bound only catches a regression to per-image loops.
    assert time.perf_counter() - start < 3.0
    with pytest.raises(fewshot.EpisodeError):
        fewshot.diagnose_support(init, images[:2], ["same", "same"])
