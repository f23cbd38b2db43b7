"""Centring folded into the last convolution: the same as subtracting the mean, nothing else."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fewshot.backbone import Conv4
from fewshot.centering import centred, channel_means
from fewshot.config import ModelConfig
from fewshot.initialization import Initialization


def _module(init: Initialization) -> Conv4:
    module = Conv4(init.config)
    module.load_state_dict({k: v for k, v in init.params.items() if not k.startswith("head.")})
    return module.eval()


@pytest.mark.parametrize("mirror", [False, True])
def test_centred_embeddings_equal_normalised_features_minus_the_channel_mean(mirror: bool) -> None:
    config = ModelConfig(
        in_channels=3, image_size=20, width=8, norm="none", pooling="maxpool",
        readout="flatten", final_relu=False, feature_norm="l2", mirror_average=mirror,
    )  # fmt: skip
    init = Initialization.random(config, seed=3)
    images = torch.randint(0, 256, (12, 3, 20, 20), dtype=torch.uint8)
    mean = channel_means(_module(init), images)
    out = centred(init, images)

    raw = _module(
        dataclasses.replace(
            init, config=dataclasses.replace(config, feature_norm="none", mirror_average=False)
        )
    )
    x = images.float() / 255

    def expected(batch: torch.Tensor) -> torch.Tensor:
        maps = raw.blocks(batch) - mean.view(1, -1, 1, 1)
        return F.normalize(maps.flatten(1), dim=-1)

    want = expected(x)
    if mirror:
        want = F.normalize(0.5 * (want + expected(x.flip(-1))), dim=-1)
    with torch.no_grad():
        got = _module(out)(x)
        plain = _module(init)(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3), "centring changed nothing"
    # The images it was centred on now average zero at the last convolution.
    assert channel_means(_module(out), images).abs().max() < 1e-4
    assert out.metadata["centring"]["images"] == 12


def test_centring_refuses_a_backbone_whose_last_convolution_is_followed_by_a_relu() -> None:
    config = ModelConfig(in_channels=1, image_size=20, width=8, norm="none", final_relu=True)
    init = Initialization.random(config)
    with pytest.raises(ValueError, match="max-pooling alone"):
        centred(init, torch.zeros(2, 1, 20, 20, dtype=torch.uint8))
