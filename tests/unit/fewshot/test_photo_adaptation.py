"""The shipped photo initializations on real photos: adaptation changes predictions, never for the worse.

Uses 6 of mini-ImageNet's 16 validation classes (60 photos each), read from the shared zip.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.data_paths import MINIIMAGENET_VAL_ZIP

CLASSES = 6
PER_CLASS = 60


@pytest.fixture(scope="module")
def photos() -> Iterator[dict[str, list[Image.Image]]]:
    """A few validation classes' photos, or a skip saying what is missing."""
    import fewshot
    from fewshot.initialization import shipped_photo_initialization_path

    if not (shipped_photo_initialization_path() / "weights.safetensors").is_file():
        pytest.skip("no shipped photo initialization (fewshot/shipped/photos-conv4)")
    if not MINIIMAGENET_VAL_ZIP.is_file():
        pytest.skip(
            f"mini-ImageNet val zip not found at {MINIIMAGENET_VAL_ZIP} "
            "(set MAML_SERVE_MINIIMAGENET_VAL_ZIP)"
        )
    assert fewshot
    by_class: dict[str, list[Image.Image]] = {}
    with zipfile.ZipFile(MINIIMAGENET_VAL_ZIP) as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".jpg"))
        for name in names:
            wnid = name.split("/")[-2]
            if wnid not in by_class and len(by_class) == CLASSES:
                continue
            images = by_class.setdefault(wnid, [])
            if len(images) < PER_CLASS:
                images.append(Image.open(io.BytesIO(archive.read(name))).convert("RGB"))
    yield by_class


def _episodes(
    photos: dict[str, list[Image.Image]], shots: int, episodes: int, queries: int = 10
) -> Iterator[tuple[list[Image.Image], list[str], list[Image.Image], list[str]]]:
    rng = np.random.default_rng(7)
    classes = sorted(photos)
    for _ in range(episodes):
        picked = rng.choice(len(classes), 5, replace=False)
        sx, sy, qx, qy = [], [], [], []
        for c in picked:
            order = rng.permutation(PER_CLASS)
            images = photos[classes[c]]
            sx += [images[i] for i in order[:shots]]
            sy += [classes[c]] * shots
            qx += [images[i] for i in order[shots : shots + queries]]
            qy += [classes[c]] * queries
        yield sx, sy, qx, qy


def _photo_folders() -> list[Path]:
    from fewshot.initialization import shipped_initialization_paths

    return [
        p
        for p in shipped_initialization_paths()
        if (p / "config.json").is_file()
        and json.loads((p / "config.json").read_text())["model"].get("domain") == "photos"
    ]


@pytest.mark.parametrize("folder", _photo_folders(), ids=lambda p: p.name)
def test_served_adaptation_changes_photo_predictions_and_is_not_worse(
    photos: dict[str, list[Image.Image]], folder: Path
) -> None:
    import fewshot
    from fewshot.backbone import shared_module
    from fewshot.fast import adapt_fast
    from fewshot.inner import embed_with_norms

    init = fewshot.Initialization.load(folder)
    # 84-px, width-128 trunks cost ~15x a 42-px, width-64 one per view: fewer episodes there.
    episodes = 8 if init.config.image_size <= 42 else 3
    served, zero, steps_taken, changed, count = [], [], [], 0, 0
    for sx, sy, qx, qy in _episodes(photos, shots=20, episodes=episodes):
        support = fewshot.preprocess_images(sx, init.config)
        queries = fewshot.preprocess_images(qx, init.config)
        # As served: the initialization's default mode, steps chosen from the support set.
        adapted = adapt_fast(init, support, sy)
        plain = adapt_fast(init, support, sy, steps=0)
        most = adapt_fast(init, support, sy, steps=max(init.config.step_candidates))
        # Head mode shares the initialization's trunk: the queries are embedded once for all three.
        assert adapted.backbone_shared and plain.backbone_shared and most.backbone_shared
        features, norms = embed_with_norms(shared_module(init.config), plain.params, queries)
        labels = {
            name: model.scores_of_features(features, 0.0, norms).labels
            for name, model in (("served", adapted), ("plain", plain), ("most", most))
        }
        # The shortcut answers what the served path does.
        assert labels["served"][:4] == adapted.predict(queries[:4])
        changed += sum(a != b for a, b in zip(labels["most"], labels["plain"], strict=True))
        count += len(qy)
        served.append(np.mean([a == b for a, b in zip(labels["served"], qy, strict=True)]))
        zero.append(np.mean([a == b for a, b in zip(labels["plain"], qy, strict=True)]))
        steps_taken.append(adapted.steps)
    # The steps move the head: some query's label changes when they run.
    assert changed > 0, f"adaptation's steps changed no prediction on {count} photo queries"
    # Chosen per task, they never cost more than noise on these queries (2 points).
    assert np.mean(served) >= np.mean(zero) - 0.02, (np.mean(served), np.mean(zero), steps_taken)
    # And well above chance (20%) on classes never trained on.
    assert np.mean(served) > 0.5
