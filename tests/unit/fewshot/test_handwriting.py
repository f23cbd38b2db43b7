"""Handwriting augmentation: warps keep blank paper blank, strokes thicken, rotations relabel."""

from __future__ import annotations

import torch

from fewshot.handwriting import (
    HandwritingAugment,
    augment_handwriting,
    rotate_as_classes,
    stroke_width,
    warp,
)

NONE = HandwritingAugment(
    degrees=0.0, scale=(1.0, 1.0), shear=0.0, shift=0.0, thicken=0.0, thin=0.0
)


def _character() -> torch.Tensor:
    x = torch.zeros(2, 1, 20, 20)
    x[:, :, 5:15, 9:11] = 1.0  # a vertical stroke
    return x


def test_a_null_warp_is_the_identity_and_blank_stays_blank() -> None:
    g = torch.Generator().manual_seed(0)
    x = _character()
    assert torch.allclose(warp(x, NONE, g), x, atol=1e-5)
    blank = torch.zeros(3, 1, 20, 20)
    assert float(warp(blank, HandwritingAugment(), g).abs().max()) == 0.0


def test_warps_move_strokes_but_keep_their_ink_roughly() -> None:
    g = torch.Generator().manual_seed(1)
    x = _character()
    out = warp(x, HandwritingAugment(degrees=15.0), g)
    assert not torch.allclose(out, x, atol=1e-3)
    ratio = out.sum() / x.sum()
    assert 0.6 < float(ratio) < 1.5


def test_thickening_adds_ink_and_thinning_removes_it() -> None:
    g = torch.Generator().manual_seed(2)
    x = _character()
    thick = stroke_width(x, HandwritingAugment(thicken=1.0, thin=-1.0), g)  # amount in [1, 1]
    thin = stroke_width(x, HandwritingAugment(thicken=-1.0, thin=1.0), g)  # amount in [-1, -1]
    assert float(thick.sum()) > float(x.sum()) > float(thin.sum())


def test_augment_returns_unit_range_floats_of_the_same_shape() -> None:
    images = (_character() * 255).to(torch.uint8)
    out = augment_handwriting(images, HandwritingAugment(), torch.Generator().manual_seed(3))
    assert out.shape == images.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_rotations_become_classes_four_per_original() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.rand(64, 1, 6, 6)
    y = torch.arange(64) % 5
    out, labels = rotate_as_classes(x, y, g)
    turns = labels % 4
    assert torch.equal(labels // 4, y)
    assert len(set(turns.tolist())) == 4
    for i in range(64):
        assert torch.equal(out[i], torch.rot90(x[i], int(turns[i]), dims=(-2, -1)))
