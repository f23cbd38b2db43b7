"""'None of these': the calibrated familiarity score and the unknown decision."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import fewshot
from fewshot.unknown import (
    DEFAULT_THRESHOLD,
    NORM_POINTS,
    NORM_SHARE,
    UnknownCalibration,
    class_prototypes,
    raw_scores,
)
from tests.data_paths import OMNIGLOT_ZIP
from tests.fewshot_helpers import TINY, random_images, synthetic_dataset, tiny_init


def _float_init() -> fewshot.Initialization:
    return tiny_init(dtype=torch.float32)


def _calibrated(init: fewshot.Initialization) -> fewshot.Initialization:
    data = synthetic_dataset(size=TINY.image_size)
    calibration = fewshot.calibrate_unknown(init, data, shots=(1, 2), ways=(3,), episodes=4)
    return dataclasses.replace(init, metadata={**init.metadata, "unknown": calibration.to_dict()})


def test_raw_score_is_minus_nearest_distance_over_prototype_spread() -> None:
    prototypes = torch.tensor([[0.0, 0.0], [3.0, 4.0]])  # spread (mean distance) 5
    features = torch.tensor([[0.0, 1.0], [3.0, 4.0], [30.0, 40.0]])
    raw, nearest = raw_scores(features, prototypes)
    assert torch.allclose(raw, torch.tensor([-0.2, 0.0, -9.0]))
    assert nearest.tolist() == [0, 1, 1]
    labels = torch.tensor([0, 0, 1])
    feats = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 5.0]])
    assert torch.equal(class_prototypes(feats, labels, 2), torch.tensor([[2.0, 0.0], [5.0, 5.0]]))


def test_absolute_raw_score_ignores_how_alike_the_tasks_classes_are() -> None:
    features = torch.tensor([[0.0, -1.0], [3.0, 4.0]])
    far_apart = torch.tensor([[0.0, 0.0], [30.0, 40.0]])
    alike = torch.tensor([[0.0, 0.0], [0.3, 0.4]])
    raw_far, _ = raw_scores(features, far_apart, relative=False)
    raw_alike, nearest = raw_scores(features, alike, relative=False)
    assert torch.allclose(raw_far, torch.tensor([-1.0, -5.0]))
    assert torch.allclose(raw_alike, torch.tensor([-1.0, -4.5]))
    assert nearest.tolist() == [0, 1]
    relative, _ = raw_scores(features[:1], alike)
    assert torch.allclose(relative, torch.tensor([-2.0])), "the relative score divides by 0.5"


def test_models_score_with_their_configs_distance() -> None:
    from fewshot.backbone import shared_module
    from fewshot.inner import embed

    init = _float_init()
    config = dataclasses.replace(init.config, unknown_distance="absolute")
    absolute = dataclasses.replace(init, config=config)
    support = random_images(6, init.config, seed=1, dtype=torch.float32)
    labels = ["a", "a", "b", "b", "c", "c"]
    queries = random_images(4, init.config, seed=2, dtype=torch.float32)
    model = fewshot.adapt(absolute, support, labels, steps=0)
    assert model.prototypes is not None
    features = embed(shared_module(config), model.params, queries)
    want = -torch.cdist(features.double(), model.prototypes.double()).min(dim=1).values
    assert torch.allclose(model.predict_scores(queries).raw, want.float(), atol=1e-5)
    relative = fewshot.adapt(init, support, labels, steps=0).predict_scores(queries).raw
    assert not torch.allclose(relative, want.float(), atol=1e-5)


def test_p_values_are_ranks_among_in_task_scores_per_shot_count() -> None:
    calibration = UnknownCalibration(
        {(5, 1): [-3.0, -2.0, -1.0], (5, 5): [-0.5, -0.4, -0.3], (20, 1): [-9.0, -8.0, -7.0]}
    )
    raw = torch.tensor([-10.0, -1.5, 0.0, -1.5, -0.45])
    shots = torch.tensor([1, 1, 1, 7, 5])  # 7 shots use the 5-shot table
    assert calibration.p_values(raw, shots).tolist() == pytest.approx([0.25, 0.75, 1.0, 0.25, 0.5])
    # 3 ways use the smallest calibrated way count (5); 30 ways the 20-way tables.
    assert calibration.p_values(raw[:1], shots[:1], 3).tolist() == pytest.approx([0.25])
    assert calibration.p_values(torch.tensor([-8.5]), shots[:1], 30).tolist() == [0.5]
    again = UnknownCalibration.from_dict(calibration.to_dict())
    assert (
        again.scores_by_shape == calibration.scores_by_shape
        and again.threshold == DEFAULT_THRESHOLD == 0.01
    )


def test_a_compressed_table_with_its_size_gives_the_full_tables_p_values() -> None:
    """Cut to 401 quantiles, 1,500 scores still give (rank + 1) / (n + 1) among all 1,500 (to
    the interpolation's error), where counting table points made small p-values about half as
    likely: the default threshold's share acted at the 0.5% quantile instead of the 0.8%."""
    scores = sorted(torch.randn(1500, generator=torch.Generator().manual_seed(0)).tolist())
    full = UnknownCalibration({(5, 1): scores})
    compressed = full.compressed()
    assert len(compressed.table(5, 1)) == 401 and compressed.sizes == {(5, 1): 1500}
    probes = torch.tensor([scores[i] + 1e-6 for i in (0, 4, 9, 14, 40, 700, 1498)] + [-9.0, 9.0])
    ones = torch.ones(len(probes), dtype=torch.long)
    want = full.p_values(probes, ones)
    got = compressed.p_values(probes, ones)
    assert torch.allclose(got, want, atol=1.5 / 1501), (got, want)
    assert got[-2].item() == pytest.approx(1 / 1501) and got[-1].item() == 1.0
    again = UnknownCalibration.from_dict(compressed.to_dict())
    assert again.sizes == {(5, 1): 1500}
    assert torch.allclose(again.p_values(probes, ones), got, atol=1.5 / 1501), "scores rounded"
    # Without sizes (calibrations stored before them) ranks count table points, as they did.
    older = dataclasses.replace(compressed, sizes=None)
    counted = older.p_values(probes, ones)
    assert counted[2].item() == pytest.approx(4 / 402) and want[2].item() == pytest.approx(
        11 / 1501
    )
    flagged_share = (counted[:7] < 0.008).sum().item(), (got[:7] < 0.008).sum().item()
    assert flagged_share == (2, 3), "probes at ranks 1, 5 and 10 lie below the 0.8% quantile"
    with pytest.raises(ValueError, match="more scores"):
        UnknownCalibration.from_dict({**compressed.to_dict(), "sizes": {"5x1": 10}})


def test_a_calibration_spends_its_own_norm_share_of_the_threshold() -> None:
    calibration = UnknownCalibration(
        {(5, 1): [-3.0, -2.0, -1.0]}, norms=[float(v) for v in range(1, 40)], norm_share=0.1
    )
    raw = torch.full((2,), -1.5)  # distance p-value 0.75
    norms = torch.tensor([0.5, 20.0])  # norm p-values 0.05 and 1
    ones = torch.ones(2, dtype=torch.long)
    assert calibration.p_values(raw, ones, 5, norms).tolist() == pytest.approx([0.5, 0.75 / 0.9])
    again = UnknownCalibration.from_dict(calibration.to_dict())
    assert again.norm_share == 0.1
    default = UnknownCalibration.from_dict({**calibration.to_dict(), "norm_share": 0.2})
    assert default.p_values(raw, ones, 5, norms).tolist() == pytest.approx([0.25, 0.75 / 0.8])
    with pytest.raises(ValueError, match="norm share"):
        UnknownCalibration.from_dict({**calibration.to_dict(), "norm_share": 1.0})
    with pytest.raises(ValueError, match="norm share"):
        dataclasses.replace(calibration, norm_share=0.0)


def test_norm_p_values_are_two_sided_ranks_combined_by_weighted_bonferroni() -> None:
    calibration = UnknownCalibration({(5, 1): [-3.0, -2.0, -1.0]}, norms=[1.0, 2.0, 3.0, 4.0])
    norms = torch.tensor([0.5, 1.0, 2.5, 4.0, 9.0])
    # 2 (rank on the nearer side + 1) / (n + 1), at most 1.
    assert calibration.norm_p_values(norms).tolist() == pytest.approx([0.4, 0.8, 1.0, 0.8, 0.4])
    raw = torch.full((5,), -1.5)  # distance p-value 0.75
    # min(1, p_distance / (1 - w), p_norm / w): here the distance's term, 0.75 / 0.8.
    combined = calibration.p_values(raw, torch.ones(5, dtype=torch.long), 5, norms)
    assert combined.tolist() == pytest.approx([0.9375] * 5)
    wide = dataclasses.replace(calibration, norms=[float(v) for v in range(1, 20)])
    outside = torch.tensor([0.5, 10.0, 30.0])  # norm p-values 0.1, 1, 0.1
    combined = wide.p_values(raw[:3], torch.ones(3, dtype=torch.long), 5, outside)
    assert combined.tolist() == pytest.approx([0.1 / NORM_SHARE, 0.9375, 0.1 / NORM_SHARE])
    # Without norms (older calibrations, or a caller that has none) the distance alone.
    assert calibration.p_values(raw, torch.ones(5, dtype=torch.long)).tolist() == [0.75] * 5
    again = UnknownCalibration.from_dict(calibration.to_dict())
    assert again.norms == calibration.norms
    assert UnknownCalibration.from_dict({**calibration.to_dict(), "norms": None}).norms is None
    with pytest.raises(ValueError):
        UnknownCalibration.from_dict({**calibration.to_dict(), "norms": []})


def test_a_compressed_norm_table_with_its_size_gives_the_full_tables_p_values() -> None:
    """20,000 held-out norms cut to NORM_POINTS quantiles still rank a norm among all 20,000 on
    both sides (to the interpolation's error); counting the 4,001 points instead made the norm
    check's p-values ~5x coarser, so it flagged fewer images than its share promises."""
    norms = sorted(torch.randn(20000, generator=torch.Generator().manual_seed(1)).add(10).tolist())
    full = UnknownCalibration({(5, 1): [-3.0, -2.0, -1.0]}, norms=norms)
    compressed = full.compressed()
    assert compressed.norms is not None and len(compressed.norms) == NORM_POINTS
    assert compressed.norm_size == 20000
    ranks = (0, 3, 9, 19, 99, 5000, 19900, 19980, 19990, 19996)
    probes = torch.tensor([norms[i] + 1e-6 for i in ranks] + [0.0, 10.0, 99.0])
    want, got = full.norm_p_values(probes), compressed.norm_p_values(probes)
    step = 2 * (20000 / (NORM_POINTS - 1) + 1) / 20001  # a table step (5 norms), two-sided
    assert torch.allclose(got, want, atol=step), (got, want)
    assert got[-3].item() == pytest.approx(2 / 20001, rel=1e-5) and got[-2].item() > 0.99
    again = UnknownCalibration.from_dict(compressed.to_dict())
    assert again.norm_size == 20000
    assert torch.allclose(again.norm_p_values(probes), got, atol=step), "norms rounded"
    # Without a size (calibrations stored before it) ranks count the table's points.
    counted = dataclasses.replace(compressed, norm_size=None).norm_p_values(probes)
    assert counted[-3].item() == pytest.approx(2 / (NORM_POINTS + 1), rel=1e-5)
    assert (counted[:3] > got[:3]).all(), "the lowest norms were ranked ~5x less extreme"
    with pytest.raises(ValueError, match="more norms"):
        UnknownCalibration.from_dict({**compressed.to_dict(), "norm_size": 10})


def test_the_norm_check_flags_images_outside_the_calibrated_norm_range() -> None:
    """A calibration whose norms span two of the three support images' (1200 points): at the
    default threshold a query is "unknown" exactly when its norm lies outside that range or its
    distance is below the distance's share of the threshold; the third support image, its own
    prototype, is flagged by its norm alone."""
    init = _calibrated(_float_init())
    support = random_images(3, TINY, dtype=torch.float32)
    model = fewshot.adapt(init, support, ["a", "b", "c"])
    assert model.unknown is not None
    support_norms = model.predict_scores(support).norms
    assert support_norms is not None
    order = support_norms.argsort()
    kept, odd = order[:2], int(order[2])
    span = sorted(support_norms[kept].tolist() * 600)
    model.unknown = dataclasses.replace(model.unknown, norms=span)
    queries = torch.cat([support, random_images(12, TINY, 9, dtype=torch.float32)])
    scores = model.predict_scores(queries)
    assert scores.norms is not None
    low, high = span[0], span[-1]
    outside = (scores.norms < low) | (scores.norms > high)
    distance_p = model.unknown.p_values(scores.raw, torch.ones(15, dtype=torch.long), 3)
    far = distance_p < DEFAULT_THRESHOLD * (1 - NORM_SHARE)
    assert scores.known.tolist() == (~(outside | far)).tolist()
    assert bool(scores.known[kept].all()) and not bool(scores.known[odd])
    assert bool(outside[3:].any()) and not bool(outside[3:].all()), "both sides exercised"


def test_predict_scores_flags_below_threshold_and_is_batch_independent() -> None:
    init = _calibrated(_float_init())
    support = random_images(3, TINY, dtype=torch.float32)
    model = fewshot.adapt(init, support, ["a", "b", "c"])
    assert model.unknown is not None and model.unknown_threshold == DEFAULT_THRESHOLD
    assert model.class_counts == [1, 1, 1] and model.prototypes is not None
    queries = torch.cat([support[:3], torch.zeros(1, 1, 12, 12), random_images(4, TINY, 9)])
    queries = queries.float()
    batch = model.predict_scores(queries)
    assert batch.probabilities.shape == (8, 3)
    assert torch.allclose(batch.probabilities, model.predict_proba(queries))
    for i in range(queries.shape[0]):
        alone = model.predict_scores(queries[i : i + 1])
        assert torch.allclose(alone.score, batch.score[i : i + 1])
        assert alone.labels == batch.labels[i : i + 1]
    # A 1-shot support image is its prototype: the most familiar distance there is (p-value 1);
    # its score is the norm check's alone (NORM_SHARE of the threshold).
    distance_p = model.unknown.p_values(batch.raw, torch.ones(8, dtype=torch.long), 3)
    assert distance_p[:3].tolist() == [1.0, 1.0, 1.0]
    assert batch.norms is not None
    norm_p = model.unknown.norm_p_values(batch.norms)
    want = torch.minimum(distance_p / (1 - NORM_SHARE), norm_p / NORM_SHARE).clamp(max=1.0)
    assert torch.allclose(batch.score, want)
    assert batch.raw[:3].abs().max() < 1e-5 and bool((batch.raw[3:] < 0).all())
    assert model.predict_scores(queries, threshold=0.0).labels.count("unknown") == 0
    assert model.predict_scores(queries, threshold=1.0).labels[3:] == ["unknown"] * 5
    high = model.predict_scores(queries, threshold=0.99)
    assert high.known.tolist() == (high.score >= 0.99).tolist()
    with pytest.raises(fewshot.EpisodeError):
        model.predict_scores(queries, threshold=1.5)


def test_uncalibrated_models_never_answer_unknown_by_default() -> None:
    model = fewshot.adapt(_float_init(), random_images(4, TINY, dtype=torch.float32), list("abab"))
    scores = model.predict_scores(random_images(3, TINY, 5, dtype=torch.float32))
    assert model.unknown is None and "unknown" not in scores.labels
    assert bool(torch.isnan(scores.score).all()) and bool(torch.isfinite(scores.raw).all())


def test_save_and_load_keep_prototypes_counts_and_calibration(tmp_path: Path) -> None:
    init = _calibrated(_float_init())
    model = fewshot.adapt(init, random_images(5, TINY, dtype=torch.float32), list("abcab"))
    loaded = fewshot.AdaptedModel.load(model.save(tmp_path / "m.safetensors"))
    assert loaded.class_counts == [2, 2, 1] and loaded.unknown is not None
    assert loaded.prototypes is not None and model.prototypes is not None
    assert torch.equal(loaded.prototypes, model.prototypes)
    queries = random_images(4, TINY, 3, dtype=torch.float32)
    assert torch.equal(loaded.predict_scores(queries).score, model.predict_scores(queries).score)
    # Files written before prototypes existed still load (prototypes fall back to the head).
    old = dataclasses.replace(model, prototypes=None, class_counts=None, unknown=None)
    assert fewshot.AdaptedModel.load(old.save(tmp_path / "old.safetensors")).prototypes is None


def test_models_of_one_initialization_share_one_parsed_calibration() -> None:
    init = _calibrated(_float_init())
    images = random_images(4, TINY, dtype=torch.float32)
    first = fewshot.adapt(init, images, list("abab"))
    second = fewshot.adapt(init, images, list("abba"), mode="head")
    assert first.unknown is not None and first.unknown is second.unknown
    # A new calibration (a new metadata entry) is parsed anew.
    init.metadata["unknown"] = dict(init.metadata["unknown"], threshold=0.2)
    third = fewshot.adapt(init, images, list("abab"))
    assert third.unknown is not None and third.unknown is not first.unknown
    assert third.unknown.threshold == 0.2


def test_a_model_saved_without_its_calibration_takes_the_initializations(tmp_path: Path) -> None:
    init = _calibrated(_float_init())
    model = fewshot.adapt(init, random_images(4, TINY, dtype=torch.float32), list("abab"))
    path = model.save(tmp_path / "m.safetensors", with_calibration=False)
    with_full = model.save(tmp_path / "full.safetensors")
    assert path.stat().st_size < with_full.stat().st_size
    assert fewshot.AdaptedModel.load(path).unknown is None
    loaded = fewshot.AdaptedModel.load(path, init)
    assert loaded.unknown == model.unknown
    queries = random_images(3, TINY, 5, dtype=torch.float32)
    assert torch.equal(loaded.predict_scores(queries).score, model.predict_scores(queries).score)


@pytest.mark.skipif(not OMNIGLOT_ZIP.is_file(), reason=f"Omniglot zip not found at {OMNIGLOT_ZIP}")
def test_shipped_initialization_flags_blank_and_noise_images() -> None:
    """The shipped calibration: a blank and a noise image are 'unknown', support images are not."""
    from fewshot.data import load_dataset

    init = fewshot.Initialization.load(fewshot.shipped_initialization_path())
    assert fewshot.calibration_of(init) is not None, "the shipped initialization is not calibrated"
    data = load_dataset(OMNIGLOT_ZIP, init.config).subset_groups(["Latin"])
    images = data.images[data.targets < 5].float() / 255
    labels = [str(int(t)) for t in data.targets[data.targets < 5]]
    support = torch.cat([images[i * 20 : i * 20 + 1] for i in range(5)])
    queries = torch.cat([images[i * 20 + 1 : i * 20 + 3] for i in range(5)])
    model = fewshot.adapt(init, support, [labels[i * 20] for i in range(5)])
    generator = torch.Generator().manual_seed(0)
    shape = (1, init.config.image_size, init.config.image_size)
    odd = torch.cat([torch.zeros(1, *shape), torch.rand((2, *shape), generator=generator)])
    scores = model.predict_scores(torch.cat([queries, odd]))
    assert scores.labels[-3:] == ["unknown"] * 3, scores.score[-3:]
    assert sum(label != "unknown" for label in scores.labels[:-3]) >= 8, scores.score
