"""Initializations and adapted models survive save/load exactly; bad files raise CheckpointError."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fewshot
from fewshot.config import ModelConfig
from fewshot.initialization import CONFIG_FILE, WEIGHTS_FILE
from tests.fewshot_helpers import TINY, random_images, tiny_init


def _saved_init(folder: Path) -> fewshot.Initialization:
    """A tiny float32 initialization with metadata, saved to `folder`."""
    init = tiny_init(dtype=torch.float32)
    init.metadata.update({"version": "tiny-v1", "validation_groups": ["a", "b"], "metrics": {}})
    init.save(folder)
    return init


def test_initialization_round_trip_is_exact(tmp_path: Path) -> None:
    init = _saved_init(tmp_path / "init")
    loaded = fewshot.Initialization.load(tmp_path / "init")
    assert loaded.config == init.config
    assert loaded.metadata == init.metadata
    assert loaded.version == "tiny-v1"
    assert loaded.params.keys() == init.params.keys()
    assert loaded.step_sizes.keys() == init.step_sizes.keys()
    for name, value in init.params.items():
        assert torch.equal(loaded.params[name], value), name
        assert loaded.params[name].dtype == value.dtype
    for name, value in init.step_sizes.items():
        assert torch.equal(loaded.step_sizes[name], value), name
    support = random_images(4, seed=1, dtype=torch.float32)
    a = fewshot.adapt(init, support, ["a", "b", "a", "b"])
    b = fewshot.adapt(loaded, support, ["a", "b", "a", "b"])
    assert torch.equal(a.params["head.weight"], b.params["head.weight"])


def test_adapted_model_round_trip_is_exact(tmp_path: Path) -> None:
    init = _saved_init(tmp_path / "init")
    labels = ["zebra", "ant", "zebra", "mouse", "ant", "zebra"]
    model = fewshot.adapt(init, random_images(6, seed=2, dtype=torch.float32), labels, mode="head")
    model.save(tmp_path / "adapted.safetensors")
    for loaded in (
        fewshot.AdaptedModel.load(tmp_path / "adapted.safetensors"),
        fewshot.AdaptedModel.load(tmp_path / "adapted.safetensors", init),
    ):
        assert loaded.labels == ["zebra", "ant", "mouse"]
        assert loaded.config == model.config
        assert (loaded.mode, loaded.steps) == ("head", TINY.inner_steps)
        assert loaded.support_accuracy == model.support_accuracy
        assert loaded.initialization_version == "tiny-v1"
        assert loaded.params.keys() == model.params.keys()
        for name, value in model.params.items():
            assert torch.equal(loaded.params[name], value), name
        queries = random_images(5, seed=3, dtype=torch.float32)
        assert torch.equal(loaded.predict_proba(queries), model.predict_proba(queries))


def test_a_head_mode_model_can_leave_its_backbone_to_the_initialization(tmp_path: Path) -> None:
    init = _saved_init(tmp_path / "init")
    images = random_images(4, seed=2, dtype=torch.float32)
    head = fewshot.adapt(init, images, ["a", "b", "a", "b"], mode="head")
    full = fewshot.adapt(init, images, ["a", "b", "a", "b"], mode="full")
    assert head.backbone_shared and not full.backbone_shared
    # The shared backbone is the initialization's memory: not counted in the model's bytes.
    assert head.nbytes < full.nbytes / 10
    small = head.save(tmp_path / "head.safetensors", with_backbone=False)
    whole = head.save(tmp_path / "whole.safetensors")
    assert small.stat().st_size < whole.stat().st_size / 5
    assert not any(k.startswith("blocks.") for k in load_file(str(small)))
    with pytest.raises(fewshot.CheckpointError, match="initialization"):
        fewshot.AdaptedModel.load(small)
    loaded = fewshot.AdaptedModel.load(small, init)
    assert loaded.backbone_shared and loaded.params.keys() == head.params.keys()
    assert all(loaded.params[k] is v for k, v in init.params.items() if k.startswith("blocks."))
    queries = random_images(5, seed=3, dtype=torch.float32)
    assert torch.equal(loaded.predict_proba(queries), head.predict_proba(queries))
    # A full-mode model keeps its own backbone whatever it is asked.
    kept = full.save(tmp_path / "full.safetensors", with_backbone=False)
    assert any(k.startswith("blocks.") for k in load_file(str(kept)))
    assert torch.equal(
        fewshot.AdaptedModel.load(kept).predict_proba(queries), full.predict_proba(queries)
    )


def test_initialization_with_wrong_shapes_raises(tmp_path: Path) -> None:
    folder = tmp_path / "init"
    _saved_init(folder)
    document = json.loads((folder / CONFIG_FILE).read_text())
    document["model"]["width"] = 16
    (folder / CONFIG_FILE).write_text(json.dumps(document))
    with pytest.raises(fewshot.CheckpointError, match="shapes do not match"):
        fewshot.Initialization.load(folder)

    _saved_init(folder)
    tensors = load_file(str(folder / WEIGHTS_FILE))
    del tensors["blocks.3.bias"]
    save_file(tensors, str(folder / WEIGHTS_FILE))
    with pytest.raises(fewshot.CheckpointError, match=r"missing \['blocks.3.bias'\]"):
        fewshot.Initialization.load(folder)


@pytest.mark.parametrize("content", [b"not a safetensors file", pickle.dumps({"w": [1.0, 2.0]})])
def test_non_safetensors_files_raise(tmp_path: Path, content: bytes) -> None:
    folder = tmp_path / "init"
    _saved_init(folder)
    (folder / WEIGHTS_FILE).write_bytes(content)
    with pytest.raises(fewshot.CheckpointError, match="cannot read initialization"):
        fewshot.Initialization.load(folder)
    (tmp_path / "adapted.safetensors").write_bytes(content)
    with pytest.raises(fewshot.CheckpointError, match="cannot read adapted model"):
        fewshot.AdaptedModel.load(tmp_path / "adapted.safetensors")
    with pytest.raises(fewshot.CheckpointError):
        fewshot.Initialization.load(tmp_path / "missing")


def test_adapted_model_with_wrong_shapes_raises(tmp_path: Path) -> None:
    init = _saved_init(tmp_path / "init")
    model = fewshot.adapt(init, random_images(4, seed=4, dtype=torch.float32), ["a", "b", "c", "a"])
    path = model.save(tmp_path / "adapted.safetensors")
    other = fewshot.Initialization.random(ModelConfig(width=16, image_size=12))
    with pytest.raises(fewshot.CheckpointError, match="do not match"):
        fewshot.AdaptedModel.load(path, other)

    # Labels that disagree with the head's rows.
    model.labels = ["a", "b"]
    model.save(path)
    with pytest.raises(fewshot.CheckpointError, match="do not match its config and 2 labels"):
        fewshot.AdaptedModel.load(path)

    # A safetensors file of another kind (an initialization's weights) is refused too.
    with pytest.raises(fewshot.CheckpointError, match="not an adapted model"):
        fewshot.AdaptedModel.load(tmp_path / "init" / WEIGHTS_FILE)
