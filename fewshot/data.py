"""Image-folder datasets: the official Omniglot layout and any "one folder per class" set.

Accepted layouts, from a folder or a zip:
    root/<class>/<image>                     (ungrouped)
    root/<group>/<class>/<image>             (grouped, e.g. Omniglot's alphabet/character)
    images_background/<alphabet>/characterNN/XXXX_YY.png   (the official Omniglot zips)
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from fewshot.config import ModelConfig
from fewshot.errors import DatasetError
from fewshot.images import decode_image, to_array

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class ImageDataset:
    """Decoded images [n, C, H, W] uint8 with a class index per image; classes carry a group."""

    images: Tensor
    targets: Tensor
    classes: list[str]
    groups: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def group_names(self) -> list[str]:
        """Distinct groups (e.g. alphabets) in sorted order."""
        return sorted(set(self.groups))

    def subset_groups(self, keep: Sequence[str]) -> ImageDataset:
        """The classes whose group is in `keep`, re-indexed from 0."""
        wanted = set(keep)
        kept = [c for c, g in enumerate(self.groups) if g in wanted]
        return self._subset_classes(kept)

    def _subset_classes(self, kept: list[int]) -> ImageDataset:
        remap = torch.full((len(self.classes),), -1, dtype=torch.long)
        remap[torch.tensor(kept, dtype=torch.long)] = torch.arange(len(kept))
        new_targets = remap[self.targets]
        mask = new_targets >= 0
        return ImageDataset(
            images=self.images[mask],
            targets=new_targets[mask],
            classes=[self.classes[c] for c in kept],
            groups=[self.groups[c] for c in kept],
        )


def split_groups(
    dataset: ImageDataset, holdout: int, seed: int = 0
) -> tuple[ImageDataset, ImageDataset]:
    """Split by group (alphabet): `holdout` groups, chosen by `seed`, become the validation set."""
    names = dataset.group_names
    if holdout <= 0 or holdout >= len(names):
        raise DatasetError(f"cannot hold out {holdout} of {len(names)} groups")
    order = np.random.default_rng(seed).permutation(len(names))
    held = {names[i] for i in order[:holdout]}
    train = [n for n in names if n not in held]
    return dataset.subset_groups(train), dataset.subset_groups(sorted(held))


@dataclass(frozen=True)
class _Entry:
    member: str
    class_key: str
    group: str


def _is_image(name: str) -> bool:
    parts = PurePosixPath(name).parts
    hidden = any(p.startswith(".") or p == "__MACOSX" for p in parts)
    return not hidden and PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _entries(names: list[str]) -> list[_Entry]:
    files = sorted(n for n in names if _is_image(n))
    if not files:
        raise DatasetError("no PNG or JPEG images found; expected one folder per class")
    depths = {len(PurePosixPath(n).parts) for n in files}
    if min(depths) < 2:
        loose = next(n for n in files if len(PurePosixPath(n).parts) < 2)
        raise DatasetError(
            f"image {loose!r} is not inside a class folder; expected root/<class>/<image>"
        )
    entries = []
    for name in files:
        parts = PurePosixPath(name).parts
        class_key = "/".join(parts[:-1])
        group = "/".join(parts[:-2]) if len(parts) >= 3 else ""
        entries.append(_Entry(member=name, class_key=class_key, group=group))
    # A single shared top folder (images_background/...) is a wrapper, not a group level.
    roots = {PurePosixPath(e.member).parts[0] for e in entries}
    if len(roots) == 1 and min(depths) >= 4:
        root = next(iter(roots)) + "/"
        entries = [_Entry(e.member, e.class_key, e.group.removeprefix(root)) for e in entries]
    return entries


def _list_members(path: Path) -> list[str]:
    if path.is_dir():
        return [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return [i.filename for i in archive.infolist() if not i.is_dir()]
    raise DatasetError(f"{path} is neither a folder nor a zip file")


def _read_members(path: Path, members: list[str]) -> Iterator[tuple[str, bytes]]:
    if path.is_dir():
        for member in members:
            yield member, (path / member).read_bytes()
        return
    with zipfile.ZipFile(path) as archive:
        for member in members:
            yield member, archive.read(member)


def dataset_classes(path: str | Path) -> dict[str, str]:
    """Each class of a dataset folder or zip and its group ("" when flat), without decoding."""
    return {e.class_key: e.group for e in _entries(_list_members(Path(path)))}


def scan_dataset(path: str | Path) -> dict[str, object]:
    """Counts of classes, groups and images in a dataset, without decoding any image."""
    entries = _entries(_list_members(Path(path)))
    per_class: dict[str, int] = {}
    for e in entries:
        per_class[e.class_key] = per_class.get(e.class_key, 0) + 1
    return {
        "classes": len(per_class),
        "groups": len({e.group for e in entries}),
        "images": len(entries),
        "min_images_per_class": min(per_class.values()),
    }


def _cache_file(path: Path, config: ModelConfig) -> Path | None:
    root = os.environ.get("FEWSHOT_CACHE_DIR", str(Path.home() / ".cache" / "maml-serve"))
    if root == "":
        return None
    stat = path.stat()
    key = json.dumps(
        [
            str(path.resolve()),
            stat.st_size,
            stat.st_mtime_ns,
            config.in_channels,
            config.image_size,
            config.invert,
        ]
    )
    return Path(root) / f"dataset-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"


def load_dataset(
    path: str | Path, config: ModelConfig | None = None, *, workers: int = 2
) -> ImageDataset:
    """Decode a dataset folder or zip into an ImageDataset at the config's size and mode.

    A decoded copy of a zip is cached as .npz (no pickles) under $FEWSHOT_CACHE_DIR
    (default ~/.cache/maml-serve; set it to "" to disable).
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist")
    config = config or ModelConfig()
    cache = _cache_file(path, config) if path.is_file() else None
    if cache is not None and cache.exists():
        with np.load(cache, allow_pickle=False) as stored:
            meta = json.loads(str(stored["meta"]))
            return ImageDataset(
                images=torch.from_numpy(stored["images"]),
                targets=torch.from_numpy(stored["targets"]),
                classes=meta["classes"],
                groups=meta["groups"],
            )
    entries = _entries(_list_members(path))
    class_keys = sorted({e.class_key for e in entries})
    class_index = {k: i for i, k in enumerate(class_keys)}
    group_of = {e.class_key: e.group for e in entries}

    def decode(item: tuple[str, bytes]) -> np.ndarray:
        member, data = item
        try:
            return to_array(decode_image(data), config)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"{member}: not a decodable image ({exc})") from exc

    members = [e.member for e in entries]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(decode, _read_members(path, members), chunksize=64))
    images = torch.from_numpy(np.stack(arrays))
    targets = torch.tensor([class_index[e.class_key] for e in entries], dtype=torch.long)
    names = [k.split("/")[-1] for k in class_keys]
    groups = [group_of[k] for k in class_keys]
    classes = [f"{g}/{n}" if g else n for g, n in zip(groups, names, strict=True)]
    dataset = ImageDataset(images=images, targets=targets, classes=classes, groups=groups)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.stem + f".{os.getpid()}.tmp.npz")
        meta = json.dumps({"classes": classes, "groups": groups})
        np.savez(tmp, images=images.numpy(), targets=targets.numpy(), meta=np.array(meta))
        tmp.replace(cache)
    return dataset
