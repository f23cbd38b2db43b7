"""Channels-last maps on CPU inference: the layout switches only where it may, results unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fewshot.backbone as backbone
from fewshot.backbone import serving_layout, shared_module
from tests.fewshot_helpers import TINY, random_images, tiny_init

CONFIG = dataclasses.replace(TINY, norm="none", in_channels=3, mirror_average=True, crop_views=0.9)


def test_inference_on_cpu_gets_channels_last_and_training_keeps_its_layout() -> None:
    x = torch.rand(2, 3, 8, 8)
    with torch.inference_mode():
        assert serving_layout(x).is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert serving_layout(x).is_contiguous(memory_format=torch.channels_last)
    assert serving_layout(x) is x  # autograd on: the training paths' layout stays
    with torch.no_grad():
        # Under vmap a memory format cannot be queried: the maps pass unchanged, no error.
        out = torch.vmap(lambda t: serving_layout(t) * 1.0)(torch.rand(3, 2, 3, 8, 8))
    assert out.shape == (3, 2, 3, 8, 8)


def test_switch_off_leaves_maps_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbone, "CHANNELS_LAST_ON_CPU", False)
    x = torch.rand(2, 3, 8, 8)
    with torch.inference_mode():
        assert serving_layout(x) is x


def test_embeddings_are_the_same_in_either_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    init = tiny_init(CONFIG)
    module = shared_module(CONFIG)
    x = random_images(7, CONFIG, seed=5)
    seen: list[bool] = []
    conv2d = F.conv2d

    def spy(inp: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(inp.is_contiguous(memory_format=torch.channels_last))
        return conv2d(inp, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(backbone.F, "conv2d", spy)
    with torch.inference_mode():
        fast = module.forward_with(init.params, x)
    assert seen and all(seen)  # every convolution of the served embedding ran channels-last
    seen.clear()
    monkeypatch.setattr(backbone, "CHANNELS_LAST_ON_CPU", False)
    with torch.inference_mode():
        plain = module.forward_with(init.params, x)
    assert seen and not any(seen)
    torch.testing.assert_close(fast, plain)
    # Gradients flow through the training layout as before.
    params = {k: v.clone().requires_grad_(True) for k, v in init.params.items()}
    module.forward_with(params, x).sum().backward()
    assert all(p.grad is not None for k, p in params.items() if k.startswith("blocks."))
