"""The shipped photo initialization on real photos: adaptation changes predictions, never for the worse.

Uses 6 of mini-ImageNet's 16 validation classes (60 photos each), read from the shared zip.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator

import numpy as np
import pytest
import torch
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


def _accuracy(model: object, x: torch.Tensor, truth: list[str]) -> tuple[list[str], float]:
    labels: list[str] = model.predict(x)  # type: ignore[attr-defined]
    return labels, float(np.mean([a == b for a, b in zip(labels, truth, strict=True)]))


def test_served_adaptation_changes_photo_predictions_and_is_not_worse(
    photos: dict[str, list[Image.Image]],
) -> None:
    import fewshot
    from fewshot.fast import adapt_fast
    from fewshot.initialization import shipped_photo_initialization_path

    init = fewshot.Initialization.load(shipped_photo_initialization_path())
    served, zero, steps_taken, changed = [], [], [], 0
    for sx, sy, qx, qy in _episodes(photos, shots=20, episodes=8):
        support = fewshot.preprocess_images(sx, init.config)
        queries = fewshot.preprocess_images(qx, init.config)
        # As served: the initialization's default mode, steps chosen from the support set.
        adapted = adapt_fast(init, support, sy)
        plain = adapt_fast(init, support, sy, steps=0)
        most = adapt_fast(init, support, sy, steps=max(init.config.step_candidates))
        _, acc = _accuracy(adapted, queries, qy)
        labels_plain, acc0 = _accuracy(plain, queries, qy)
        labels_most, _ = _accuracy(most, queries, qy)
        changed += sum(a != b for a, b in zip(labels_most, labels_plain, strict=True))
        served.append(acc)
        zero.append(acc0)
        steps_taken.append(adapted.steps)
    # The steps move the head: some query's label changes when they run.
    assert changed > 0, "adaptation's steps changed no prediction on 400 photo queries"
    # Chosen per task, they never cost more than noise on these 400 queries (2 points).
    assert np.mean(served) >= np.mean(zero) - 0.02, (np.mean(served), np.mean(zero), steps_taken)
    # And well above chance (20%) on classes never trained on.
    assert np.mean(served) > 0.5
