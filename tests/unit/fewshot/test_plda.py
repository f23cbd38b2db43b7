"""fewshot.plda: the two-covariance likelihood ratio, its storage, and the "plda" unknown score."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from fewshot.adapted import AdaptedModel
from fewshot.config import ModelConfig
from fewshot.errors import CheckpointError
from fewshot.fast import adapt_fast
from fewshot.initialization import Initialization
from fewshot.plda import PLDA, PREFIX, fit_plda
from fewshot.unknown import UnknownCalibration, familiarity, plda_of, raw_scores


def gaussian_classes(
    classes: int, per_class: int, dim: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Data drawn from the two-covariance model: (features [n, dim], targets [n], B, W)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    b_cov = 4.0 * a @ a.T + 0.5 * torch.eye(dim, dtype=torch.float64)
    c = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    w_cov = c @ c.T + 0.2 * torch.eye(dim, dtype=torch.float64)
    y = torch.randn(classes, dim, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(b_cov).T
    e = torch.randn(classes * per_class, dim, generator=g, dtype=torch.float64)
    targets = torch.arange(classes).repeat_interleave(per_class)
    features = 3.0 + y[targets] + e @ torch.linalg.cholesky(w_cov).T
    return features, targets, b_cov, w_cov


def true_model(b_cov: torch.Tensor, w_cov: torch.Tensor, mean: float = 0.0) -> PLDA:
    """The PLDA of known covariances, diagonalised as fit_plda does."""
    w_values, w_vectors = torch.linalg.eigh(w_cov)
    whiten = w_vectors @ torch.diag(w_values.rsqrt()) @ w_vectors.T
    psi, rotation = torch.linalg.eigh(whiten @ b_cov @ whiten)
    centre = torch.full((len(b_cov),), mean, dtype=torch.float64)
    return PLDA(mean=centre, projection=whiten @ rotation, psi=psi)


def joint_llr(
    q: torch.Tensor, support: torch.Tensor, b_cov: torch.Tensor, w_cov: torch.Tensor
) -> float:
    """log p(q, support | one class) - log p(q) - log p(support | one class), by the joint
    Gaussian of all the images (the textbook form, no diagonal basis)."""
    n, d = support.shape
    stacked = torch.cat([q.unsqueeze(0), support]).reshape(-1)
    k = n + 1
    same = torch.kron(torch.ones(k, k, dtype=torch.float64), b_cov) + torch.kron(
        torch.eye(k, dtype=torch.float64), w_cov
    )
    apart_support = torch.kron(torch.ones(n, n, dtype=torch.float64), b_cov) + torch.kron(
        torch.eye(n, dtype=torch.float64), w_cov
    )
    zero = torch.zeros(d, n * d, dtype=torch.float64)
    apart = torch.cat(
        [torch.cat([b_cov + w_cov, zero], 1), torch.cat([zero.T, apart_support], 1)], 0
    )

    def log_density(cov: torch.Tensor) -> float:
        dist = torch.distributions.MultivariateNormal(
            torch.zeros(len(cov), dtype=torch.float64), cov
        )
        return float(dist.log_prob(stacked))

    return log_density(same) - log_density(apart)


def test_the_ratio_equals_the_joint_gaussian_one_for_one_and_several_shots() -> None:
    # Known B and W: a PLDA built from them directly must give the textbook ratio, whose
    # support-only terms cancel between classes (the ratio of p(q | class) to p(q)).
    d = 6
    _, _, b_cov, w_cov = gaussian_classes(3, 2, d)
    model = true_model(b_cov, w_cov)
    g = torch.Generator().manual_seed(1)
    for shots in (1, 3):
        support = torch.randn(shots, d, generator=g, dtype=torch.float64)
        q = torch.randn(d, generator=g, dtype=torch.float64)
        got = float(
            model.scores(q.unsqueeze(0), support.mean(0, keepdim=True), torch.tensor([shots]))
        )
        # p(q | support, same) / p(q) = p(q, support | same) / (p(q) p(support | same)).
        assert got == pytest.approx(joint_llr(q, support, b_cov, w_cov), abs=1e-4)


def test_fit_recovers_the_generating_model() -> None:
    everything, labels, b_cov, w_cov = gaussian_classes(450, 8, 5, seed=2)
    train = labels < 400
    features, targets = everything[train], labels[train]
    model = fit_plda(features, targets, dim=5)
    # Two images of each of 50 classes the fit never saw: every pair's ratio as the true model's.
    first, second = everything[~train].view(50, 8, 5)[:, :2].unbind(1)
    fitted = model.scores(first, second, torch.ones(50)).double()
    truth = true_model(b_cov, w_cov, mean=3.0).scores(first, second, torch.ones(50)).double()
    correlation = torch.corrcoef(torch.stack([fitted.reshape(-1), truth.reshape(-1)]))[0, 1]
    assert float(correlation) > 0.98
    # Same class (the diagonal) scores above different classes.
    same = fitted.diagonal().unsqueeze(1)
    assert float((same > fitted).float().sum() / (50 * 49)) > 0.85
    # Projected training classes are whitened within.
    z = model.project(features)
    means = torch.stack([z[targets == c].mean(0) for c in range(400)])
    residual = z - means[targets]
    within = residual.T @ residual / (len(z) - 400)  # the pooled estimate, 400 means removed
    assert torch.allclose(within, torch.eye(5, dtype=torch.float64), atol=0.05)


def test_more_shots_make_a_matching_query_more_certain() -> None:
    features, targets, _, _ = gaussian_classes(300, 10, 4, seed=4)
    model = fit_plda(features, targets, dim=4)
    q, support = features[targets == 0][:1], features[targets == 0][1:]
    one = model.scores(q, support[:1], torch.tensor([1]))
    many = model.scores(q, support.mean(0, keepdim=True), torch.tensor([len(support)]))
    assert float(many) > float(one)


def test_fit_rejects_what_cannot_be_estimated() -> None:
    features = torch.randn(10, 4)
    with pytest.raises(ValueError, match="2 images"):
        fit_plda(features, torch.arange(10), dim=2)
    with pytest.raises(ValueError, match="dim"):
        fit_plda(features, torch.arange(5).repeat(2), dim=9)


def test_tensors_round_trip_and_bad_shapes_are_refused() -> None:
    features, targets, _, _ = gaussian_classes(50, 4, 6, seed=5)
    model = fit_plda(features, targets, dim=3)
    tensors = model.to_tensors()
    assert set(tensors) == {PREFIX + "mean", PREFIX + "projection", PREFIX + "psi"}
    again = PLDA.from_tensors(tensors)
    assert again is not None and torch.allclose(again.psi, model.psi.float().double())
    assert PLDA.from_tensors({}) is None
    with pytest.raises(ValueError, match="missing"):
        PLDA.from_tensors({PREFIX + "mean": tensors[PREFIX + "mean"]})
    with pytest.raises(ValueError, match="shapes"):
        PLDA.from_tensors({**tensors, PREFIX + "psi": torch.ones(7)})


def plda_initialization(tmp_path: Path) -> Initialization:
    """A tiny head-mode initialization scoring "unknown" by a PLDA fitted on random embeddings."""
    config = ModelConfig(width=8, image_size=14, default_mode="head", unknown_distance="plda")
    init = Initialization.random(config, seed=0)
    features, targets, _, _ = gaussian_classes(40, 4, config.feature_dim, seed=6)
    init.unknown_tensors = fit_plda(features, targets, dim=8).to_tensors()
    init.metadata["unknown"] = UnknownCalibration({(2, 1): [-1e9, 0.0, 1e9]}).to_dict()
    init.save(tmp_path / "init")
    return Initialization.load(tmp_path / "init")


def test_initialization_stores_the_model_beside_the_weights(tmp_path: Path) -> None:
    init = plda_initialization(tmp_path)
    assert set(init.unknown_tensors) == {PREFIX + "mean", PREFIX + "projection", PREFIX + "psi"}
    assert not any(name.startswith("unknown.") for name in init.params)
    assert plda_of(init) is not None and plda_of(init) is plda_of(init)
    # A model for embeddings of another size is refused at load.
    broken = dataclasses.replace(
        init, unknown_tensors=fit_plda(*gaussian_classes(20, 3, 5)[:2], 2).to_tensors()
    )
    broken.save(tmp_path / "broken")
    with pytest.raises(CheckpointError, match="PLDA"):
        Initialization.load(tmp_path / "broken")


def test_served_scores_are_the_largest_ratio_and_survive_saving(tmp_path: Path) -> None:
    init = plda_initialization(tmp_path)
    c = init.config
    x = torch.rand(6, c.in_channels, 14, 14, generator=torch.Generator().manual_seed(0))
    model = adapt_fast(init, x[:3], ["a", "b", "b"])
    assert model.plda is not None and model.prototypes is not None
    scores = model.predict_scores(x[3:])
    module = init.module()
    with torch.no_grad():
        features = module.forward_with(init.params, x[3:])
        ratios = model.plda.scores(features, model.prototypes, torch.tensor([1, 2]))
    assert torch.allclose(scores.raw, ratios.max(dim=1).values, atol=1e-4)
    # Not the distance it replaces.
    distance, _ = raw_scores(features, model.prototypes, relative=False)
    assert not torch.allclose(scores.raw, distance, atol=1e-2)
    # Head-only files take the model from the initialization; full files carry their own.
    model.save(tmp_path / "head.safetensors", with_calibration=False, with_backbone=False)
    model.save(tmp_path / "full.safetensors")
    for loaded in (
        AdaptedModel.load(tmp_path / "head.safetensors", init),
        AdaptedModel.load(tmp_path / "full.safetensors"),
    ):
        assert torch.allclose(loaded.predict_scores(x[3:]).raw, scores.raw, atol=1e-5)


def test_without_a_model_the_plda_setting_falls_back_to_the_distance() -> None:
    features, prototypes = torch.randn(4, 8), torch.randn(3, 8)
    got, nearest = familiarity(features, prototypes, torch.ones(3), "plda", None)
    expected, expected_nearest = raw_scores(features, prototypes, relative=False)
    assert torch.equal(got, expected) and torch.equal(nearest, expected_nearest)
