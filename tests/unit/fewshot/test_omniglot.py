"""On the shared Omniglot background zip (skipped when absent): the loader and the shipped initialization."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import fewshot
from fewshot.data import ImageDataset, load_dataset
from fewshot.evaluate import evaluate_head_cached, head_embeddings_and_norms
from tests.data_paths import OMNIGLOT_ZIP


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pytest.MonkeyPatch]:
    """One private cache for this module: the zip is decoded once (~7 s), then read back."""
    if not OMNIGLOT_ZIP.is_file():
        pytest.skip(f"Omniglot zip not found at {OMNIGLOT_ZIP} (set MAML_SERVE_OMNIGLOT_ZIP)")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEWSHOT_CACHE_DIR", str(tmp_path_factory.mktemp("omniglot-cache")))
        yield patch


@pytest.fixture(scope="module")
def shipped() -> fewshot.Initialization:
    """The committed initialization."""
    return fewshot.Initialization.load(fewshot.shipped_initialization_path())


@pytest.fixture(scope="module")
def omniglot(cache: pytest.MonkeyPatch, shipped: fewshot.Initialization) -> ImageDataset:
    """The background set at the shipped initialization's preprocessing."""
    return load_dataset(OMNIGLOT_ZIP, shipped.config)


@pytest.fixture(scope="module")
def validation(omniglot: ImageDataset, shipped: fewshot.Initialization) -> ImageDataset:
    """The shipped initialization's held-out alphabets."""
    return omniglot.subset_groups(shipped.metadata["validation_groups"])


@pytest.fixture(scope="module")
def embedded(
    validation: ImageDataset, shipped: fewshot.Initialization
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every held-out image (and its shifted copies) embedded once, with its norm: the served
    computation on cached embeddings equals serving (tests/unit/fewshot/test_evaluate_cached.py)."""
    return head_embeddings_and_norms(shipped, validation)


def test_loader_reads_the_official_zip(
    omniglot: ImageDataset, shipped: fewshot.Initialization
) -> None:
    assert len(omniglot.classes) == 964
    assert len(omniglot.group_names) == 30
    assert len(omniglot) == 19280
    size = shipped.config.image_size
    assert omniglot.images.shape == (19280, 1, size, size)
    assert torch.bincount(omniglot.targets).tolist() == [20] * 964
    assert {"Latin", "Greek", "Japanese_(hiragana)"} <= set(omniglot.group_names)
    assert omniglot.classes[0].startswith(omniglot.groups[0] + "/character")
    # Inverted: strokes bright on a dark background (most pixels dark, corners empty).
    sample = omniglot.images[::97].float()
    assert float((sample > 127).float().mean()) < 0.25
    assert float(sample[:, :, 0, 0].mean()) < 5
    assert float(sample.amax(dim=(1, 2, 3)).min()) > 150
    # The second load comes from the cache, identical.
    again = load_dataset(OMNIGLOT_ZIP, shipped.config)
    assert torch.equal(again.images, omniglot.images) and again.classes == omniglot.classes


def test_shipped_initialization_is_more_accurate_with_more_shots(
    validation: ImageDataset,
    shipped: fewshot.Initialization,
    embedded: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """5-way on the held-out validation alphabets, as served: 5 shots beat 1 (more examples
    never hurt)."""
    assert len(validation.classes) > 100
    results = {}
    for shots in (1, 5):
        results[shots] = evaluate_head_cached(
            shipped, validation, ways=5, shots=shots, queries=2, episodes=100, seed=0,
            embedded=embedded[0],
        )  # fmt: skip
    assert results[1].accuracy > 0.9, results[1]
    assert results[5].accuracy > results[1].accuracy, results


def test_served_adaptation_beats_the_prototypes_within_one_alphabet(
    validation: ImageDataset,
    shipped: fewshot.Initialization,
    embedded: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """20-way 1-shot within one held-out alphabet, paired: the served head (whitened on the
    shifted views, then its steps) beats the prototype read-out (+1.9 points measured)."""
    result = evaluate_head_cached(
        shipped, validation, ways=20, shots=1, queries=5, episodes=100, seed=3,
        within_group=True, embedded=embedded[0],
    )  # fmt: skip
    assert result.adaptation_gain is not None and result.adaptation_gain_ci95 is not None
    assert result.adaptation_gain > 0.008, result
    assert result.adaptation_gain - result.adaptation_gain_ci95 > 0.0, result


def test_the_default_unknown_threshold_flags_no_more_genuine_queries_than_calibrated(
    validation: ImageDataset,
    shipped: fewshot.Initialization,
    embedded: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """Fresh held-out 5- and 20-way tasks, random and within one alphabet (Lake's runs): at the
    shipped default threshold at most ~1% of genuine queries are answered "unknown" (the
    calibrated share plus sampling error), while blank and noise images still are."""
    from fewshot.openset import open_set_scores
    from fewshot.unknown import calibration_of

    calibration = calibration_of(shipped)
    assert calibration is not None and calibration.threshold <= 0.01
    for ways, shots, within in ((5, 1, False), (20, 1, False), (5, 5, False), (20, 1, True)):
        found = open_set_scores(
            shipped, validation, ways=ways, shots=shots, episodes=24, queries=5, seed=99,
            within_group=within, embedded=embedded[0], norms=embedded[1],
        )  # fmt: skip
        p = found.p_values(calibration, "in_task", ways)  # with the norm check where calibrated
        flagged = float((p < calibration.threshold).float().mean())
        # 1% expected; the bound allows 3 binomial standard errors on >= 600 queries.
        bound = calibration.threshold + 3 * (calibration.threshold / len(p)) ** 0.5
        assert flagged <= bound, f"{ways}-way {shots}-shot: {flagged:.3%} of genuine flagged"
        for odd in ("blank", "noise"):
            q = found.p_values(calibration, odd, ways)
            assert float((q < calibration.threshold).float().mean()) == 1.0, odd
