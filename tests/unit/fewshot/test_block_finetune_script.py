"""scripts/explore_block_finetune.py: its cached-trunk path is the served embedding, its steps act."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fewshot.backbone import shared_module
from fewshot.head import head_logits
from fewshot.inner import HEAD_SCALE
from fewshot.nuisance import initial_head
from tests.fewshot_helpers import TINY, random_images, tiny_init

_PATH = Path(__file__).resolve().parents[3] / "scripts" / "explore_block_finetune.py"
_SPEC = importlib.util.spec_from_file_location("explore_block_finetune", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
script = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(script)

CONFIG = dataclasses.replace(
    TINY, norm="none", in_channels=3, mirror_average=True, crop_views=0.9, readout="flatten"
)


def test_cached_trunk_then_tail_is_the_served_embedding() -> None:
    init = tiny_init(CONFIG)
    module = shared_module(CONFIG)
    x = random_images(5, CONFIG, seed=3)
    maps = script.trunk_maps(module, init.params, x)
    cached = script.tail_embeddings(module, init.params, maps, x.shape[0])
    torch.testing.assert_close(cached, module.forward_with(init.params, x))
    per_view = script.tail_embeddings(module, init.params, maps, x.shape[0], per_view=True)
    assert per_view.shape == (module.view_count * 5, cached.shape[1])


@pytest.mark.parametrize("per_view", [False, True])
def test_zero_steps_is_the_prototype_read_out_and_steps_change_it(per_view: bool) -> None:
    init = tiny_init(CONFIG)
    module = shared_module(CONFIG)
    sx, qx = random_images(6, CONFIG, seed=1), random_images(30, CONFIG, seed=2)
    sy, qy = torch.tensor([0, 0, 1, 1, 2, 2]), torch.arange(30) % 3
    support = module.forward_with(init.params, sx)
    weight, bias = initial_head(support, F.one_hot(sy, 3).to(support.dtype), None, 1.0)
    logits = head_logits(
        module.forward_with(init.params, qx), weight, bias, init.params[HEAD_SCALE]
    )
    expected = float((logits.argmax(dim=1) == qy).float().mean())
    out = script.block_finetune_accuracies(init, sx, sy, qx, qy, 3, 5.0, [0, 30], per_view)
    assert out[0] == pytest.approx(expected)
    assert set(out) == {0, 30}


@pytest.mark.parametrize("per_view", [False, True])
def test_steps_fit_the_support_set(per_view: bool) -> None:
    init = tiny_init(CONFIG)
    x, y = random_images(24, CONFIG, seed=4), torch.arange(24) % 4
    out = script.block_finetune_accuracies(init, x, y, x, y, 4, 2.0, [0, 60], per_view)
    # Random images under random labels: prototypes miss some, the tuned block and head fit them.
    assert out[0] < 1.0
    assert out[60] > out[0]
