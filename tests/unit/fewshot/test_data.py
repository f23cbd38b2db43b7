"""The dataset loader (folders and zips, grouped or not, its cache) and the episode sampler."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fewshot.data
from fewshot.config import ModelConfig
from fewshot.data import ImageDataset, load_dataset, scan_dataset, split_groups
from fewshot.episodes import EpisodeSampler
from fewshot.errors import DatasetError, EpisodeError
from tests.fewshot_helpers import synthetic_dataset, write_image_folder, zip_folder

CONFIG = ModelConfig(width=8, image_size=12)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every load in this module caches into its own folder, never into the user's home."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("FEWSHOT_CACHE_DIR", str(folder))
    return folder


def _assert_same(a: ImageDataset, b: ImageDataset) -> None:
    """Two datasets hold the same images, targets, classes and groups."""
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.targets, b.targets)
    assert a.classes == b.classes
    assert a.groups == b.groups


def test_ungrouped_folder_and_zip(tmp_path: Path) -> None:
    keys = write_image_folder(tmp_path / "set", classes=3, images=4)
    folder = load_dataset(tmp_path / "set", CONFIG)
    assert folder.classes == keys == ["char00", "char01", "char02"]
    assert folder.groups == ["", "", ""]
    assert folder.images.shape == (12, 1, 12, 12)
    assert folder.images.dtype == torch.uint8
    assert torch.bincount(folder.targets).tolist() == [4, 4, 4]
    _assert_same(load_dataset(zip_folder(tmp_path / "set", tmp_path / "set.zip"), CONFIG), folder)


@pytest.mark.parametrize("prefix", ["", "images_background/"])
def test_grouped_folder_and_zip(tmp_path: Path, prefix: str) -> None:
    """root/group/class/img, also inside the official zips' single top folder."""
    write_image_folder(tmp_path / "set", groups=2, classes=3, images=2)
    folder = load_dataset(tmp_path / "set", CONFIG)
    assert folder.group_names == ["group0", "group1"]
    assert folder.classes[:2] == ["group0/char00", "group0/char01"]
    assert len(folder) == 12 and len(folder.classes) == 6
    archive = zip_folder(tmp_path / "set", tmp_path / "set.zip", prefix=prefix)
    _assert_same(load_dataset(archive, CONFIG), folder)
    assert scan_dataset(archive) == {
        "classes": 6,
        "groups": 2,
        "images": 12,
        "min_images_per_class": 2,
    }
    train, val = split_groups(folder, holdout=1)
    assert {*train.group_names, *val.group_names} == {"group0", "group1"}
    assert len(train) + len(val) == 12


def test_images_are_inverted_resized_and_greyscale(tmp_path: Path) -> None:
    """Dark strokes on white (any mode, any size) become bright strokes on black at 12x12."""
    canvas = np.full((40, 40, 3), 255, dtype=np.uint8)
    canvas[:20] = 0
    for name in ("a", "b"):
        (tmp_path / "set" / name).mkdir(parents=True)
        Image.fromarray(canvas, "RGB").save(tmp_path / "set" / name / "x.png")
    images = load_dataset(tmp_path / "set", CONFIG).images
    assert images.shape == (2, 1, 12, 12)
    assert bool((images[:, :, :5] > 250).all()) and bool((images[:, :, 7:] < 5).all())
    plain = load_dataset(tmp_path / "set", ModelConfig(image_size=12, invert=False)).images
    assert torch.equal(plain, 255 - images)


def test_second_load_of_a_zip_hits_the_cache(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_image_folder(tmp_path / "set", groups=2, classes=2, images=3)
    archive = zip_folder(tmp_path / "set", tmp_path / "set.zip")
    first = load_dataset(archive, CONFIG)
    assert len(list(cache_dir.glob("dataset-*.npz"))) == 1

    def no_reading(*_args: object) -> list[str]:
        raise AssertionError("the zip was read again instead of the cache")

    monkeypatch.setattr(fewshot.data, "_list_members", no_reading)
    _assert_same(load_dataset(archive, CONFIG), first)
    # Another image size is another cache entry (it must decode again).
    with pytest.raises(AssertionError, match="read again"):
        load_dataset(archive, ModelConfig(image_size=16))


def test_empty_cache_dir_setting_disables_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_image_folder(tmp_path / "set", classes=2, images=2)
    archive = zip_folder(tmp_path / "set", tmp_path / "set.zip")
    monkeypatch.setenv("FEWSHOT_CACHE_DIR", "")
    load_dataset(archive, CONFIG)
    assert not list(tmp_path.rglob("dataset-*.npz"))


def test_dataset_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="no PNG or JPEG images"):
        load_dataset(tmp_path / "empty", CONFIG)

    write_image_folder(tmp_path / "loose", classes=2, images=2)
    (tmp_path / "loose" / "stray.png").write_bytes((tmp_path / "loose/char00/00.png").read_bytes())
    with pytest.raises(DatasetError, match=r"'stray\.png' is not inside a class folder"):
        load_dataset(tmp_path / "loose", CONFIG)
    with pytest.raises(DatasetError, match="not inside a class folder"):
        load_dataset(zip_folder(tmp_path / "loose", tmp_path / "loose.zip"), CONFIG)

    write_image_folder(tmp_path / "broken", classes=2, images=2)
    (tmp_path / "broken" / "char01" / "bad.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DatasetError, match=r"char01/bad.png: not a decodable image"):
        load_dataset(tmp_path / "broken", CONFIG)
    with pytest.raises(DatasetError, match="not a decodable image"):
        load_dataset(zip_folder(tmp_path / "broken", tmp_path / "broken.zip"), CONFIG)

    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nowhere", CONFIG)
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(DatasetError, match="neither a folder nor a zip"):
        load_dataset(tmp_path / "plain.txt", CONFIG)
    with zipfile.ZipFile(tmp_path / "docs.zip", "w") as archive:
        archive.writestr("readme/notes.txt", "text only")
    with pytest.raises(DatasetError, match="no PNG or JPEG"):
        load_dataset(tmp_path / "docs.zip", CONFIG)


def test_sampler_is_seeded_and_shaped() -> None:
    sampler = EpisodeSampler(synthetic_dataset(classes=12, per_class=6), rotations=True)
    a = sampler.sample(np.random.default_rng(5), tasks=3, ways=4, shots=2, queries=3)
    b = sampler.sample(np.random.default_rng(5), tasks=3, ways=4, shots=2, queries=3)
    c = sampler.sample(np.random.default_rng(6), tasks=3, ways=4, shots=2, queries=3)
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.support_x, c.support_x)
    assert a.support_x.shape == (3, 8, 1, 12, 12) and a.query_x.shape == (3, 12, 1, 12, 12)
    assert a.support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert a.query_y[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert float(a.support_x.max()) <= 1.0


def test_sampler_within_group_and_its_errors() -> None:
    data = synthetic_dataset(classes=12, per_class=4, groups=3)
    sampler = EpisodeSampler(data, within_group=True)
    batch = sampler.sample(np.random.default_rng(0), tasks=5, ways=4, shots=1, queries=1)
    images = (data.images.float() / 255).flatten(1)
    for task in batch.support_x:
        classes = {int(data.targets[(images == x.flatten()).all(dim=1)][0]) for x in task}
        assert len({data.groups[c] for c in classes}) == 1
    with pytest.raises(EpisodeError, match="no group has 5 classes"):
        sampler.sample(np.random.default_rng(0), tasks=1, ways=5, shots=1, queries=1)
    with pytest.raises(EpisodeError, match="need ways >= 2"):
        sampler.sample(np.random.default_rng(0), tasks=1, ways=1, shots=1, queries=1)
    with pytest.raises(EpisodeError, match="13-way tasks need 13 classes"):
        EpisodeSampler(data).sample(np.random.default_rng(0), tasks=1, ways=13, shots=1, queries=1)


def test_within_group_counts_rotated_classes_towards_the_ways() -> None:
    # 3 groups of 4 classes: 4 classes x 4 rotations lets a group hold a 10-way task.
    data = synthetic_dataset(classes=12, per_class=4, groups=3)
    sampler = EpisodeSampler(data, within_group=True, rotations=True)
    batch = sampler.sample(np.random.default_rng(0), tasks=2, ways=10, shots=1, queries=1)
    assert batch.support_x.shape[:2] == (2, 10)
    with pytest.raises(EpisodeError, match="no group has 17 classes"):
        sampler.sample(np.random.default_rng(0), tasks=1, ways=17, shots=1, queries=1)


def test_random_shift_translates_each_image_by_its_offset() -> None:
    from fewshot.episodes import random_shift

    images = torch.zeros(3, 1, 6, 6)
    images[:, 0, 2, 3] = 1.0  # one bright pixel per image
    offsets = torch.tensor([[2, 2], [0, 4], [4, 1]])  # (dy, dx) - shift: moves by -2..+2
    out = random_shift(images, 2, offsets)
    assert out.shape == images.shape
    for i, (dy, dx) in enumerate(offsets.tolist()):
        assert out[i].sum() == 1.0
        assert out[i, 0, 2 - (dy - 2), 3 - (dx - 2)] == 1.0


def test_sampler_shift_is_seeded_and_off_by_default() -> None:
    data = synthetic_dataset()
    plain = EpisodeSampler(data).sample(np.random.default_rng(3), 2, 3, 1, 2)
    unshifted = EpisodeSampler(data, shift=0).sample(np.random.default_rng(3), 2, 3, 1, 2)
    torch.testing.assert_close(plain.support_x, unshifted.support_x)
    first = EpisodeSampler(data, shift=2).sample(np.random.default_rng(3), 2, 3, 1, 2)
    second = EpisodeSampler(data, shift=2).sample(np.random.default_rng(3), 2, 3, 1, 2)
    torch.testing.assert_close(first.query_x, second.query_x)
    assert not torch.equal(first.query_x, plain.query_x)
