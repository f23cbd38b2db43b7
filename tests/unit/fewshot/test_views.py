"""Test-time views: five crops and mirror images averaged into one embedding per image."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fewshot.backbone as backbone
from fewshot.backbone import Conv4, five_crops
from fewshot.config import ModelConfig
from fewshot.initialization import Initialization

CONFIG = ModelConfig(
    in_channels=3, image_size=20, width=8, norm="none", pooling="maxpool", readout="flatten",
    final_relu=False, feature_norm="l2", mirror_average=True, crop_views=0.9,
)  # fmt: skip


def test_five_crops_are_bilinear_resizes_of_the_centre_and_corners() -> None:
    x = torch.rand(2, 3, 20, 20)
    crops = five_crops(x, 0.9)
    side = 18
    boxes = [(1, 1), (0, 0), (0, 2), (2, 0), (2, 2)]
    for crop, (a, b) in zip(crops, boxes, strict=True):
        want = F.interpolate(
            x[..., a : a + side, b : b + side], size=(20, 20), mode="bilinear", align_corners=False
        )
        assert torch.allclose(crop, want, atol=1e-5)


def test_an_embedding_is_the_mean_of_its_views_and_independent_of_the_batch() -> None:
    init = Initialization.random(CONFIG, seed=1)
    module = init.module()
    x = torch.rand(4, 3, 20, 20)
    got = module.forward_with(init.params, x)
    plain = Conv4(dataclasses.replace(CONFIG, mirror_average=False, crop_views=0.0))
    views = [x, *five_crops(x, 0.9)]
    views += [v.flip(-1) for v in views]
    each = torch.stack([plain.forward_with(init.params, v) for v in views])
    want = F.normalize(each.mean(dim=0), dim=-1)
    assert module.view_count == 12
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(module.forward_with(init.params, x[1:2]), got[1:2], atol=1e-5)
    without = Conv4(dataclasses.replace(CONFIG, crop_views=0.0)).forward_with(init.params, x)
    assert not torch.allclose(got, without, atol=1e-3), "the crops changed nothing"


def test_old_configs_load_without_crop_views() -> None:
    data = CONFIG.to_dict()
    del data["crop_views"]
    assert ModelConfig.from_dict(data).crop_views == 0.0


def test_shifted_views_average_every_offset_within_the_radius() -> None:
    config = ModelConfig(in_channels=1, image_size=12, width=8, view_shift=1)
    init = Initialization.random(config, seed=3)
    module = init.module()
    x = torch.rand(3, 1, 12, 12)
    got = module.forward_with(init.params, x)
    plain = Conv4(dataclasses.replace(config, view_shift=0))
    padded = F.pad(x, (1, 1, 1, 1))
    copies = [
        padded[..., 1 + dy : 13 + dy, 1 + dx : 13 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
    ]
    want = torch.stack([plain.forward_with(init.params, c) for c in copies]).mean(dim=0)
    assert module.view_count == 9
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(module.forward_with(init.params, x[2:]), got[2:], atol=1e-5)
    assert not torch.allclose(got, plain.forward_with(init.params, x), atol=1e-4)


def test_old_configs_load_without_view_shift() -> None:
    data = ModelConfig().to_dict()
    del data["view_shift"]
    assert ModelConfig.from_dict(data).view_shift == 0


def test_a_large_multi_view_batch_is_embedded_in_passes_with_the_same_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = ModelConfig(in_channels=1, image_size=12, width=8, view_shift=1)
    init = Initialization.random(config, seed=4)
    module = init.module()
    assert module.first_map_size == 8 * 6 * 6  # stride-2 first convolution
    # A budget of four images' views a pass: 13 images take four passes, the last of one image.
    monkeypatch.setattr(
        backbone, "ACTIVATIONS_PER_PASS", 4 * module.view_count * module.first_map_size
    )
    passes: list[int] = []
    forward_views = module._forward_views
    monkeypatch.setattr(
        module, "_forward_views", lambda p, x: passes.append(len(x)) or forward_views(p, x)
    )
    x = torch.rand(13, 1, 12, 12)
    whole = module.forward_with(init.params, x)
    assert passes == [4, 4, 4, 1]
    one_by_one = torch.cat([forward_views(init.params, x[i : i + 1])[0] for i in range(13)])
    assert whole.shape == (13, config.feature_dim)
    assert torch.allclose(whole, one_by_one, atol=1e-5)
    # The norms before normalisation (the "unknown" norm check) come out of the same passes.
    norms = module.forward_with_norms(init.params, x)[1]
    alone = torch.cat([forward_views(init.params, x[i : i + 1])[1] for i in range(13)])
    assert norms.shape == (13,) and torch.allclose(norms, alone, atol=1e-5)
