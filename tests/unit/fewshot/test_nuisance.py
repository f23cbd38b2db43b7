"""The nuisance-whitened head: its algebra, its limits, and that it discounts shift directions."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

import fewshot
from fewshot.evaluate import prototype_read_out
from fewshot.head import head_logits, prototype_head
from fewshot.nuisance import initial_head, nuisance_head, support_offsets
from tests.fewshot_helpers import TINY, random_images, tiny_init


def _task(seed: int, ways: int = 3, shots: int = 2, copies: int = 5, dim: int = 7):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(ways * shots, dim, generator=generator, dtype=torch.float64)
    y = torch.arange(ways).repeat_interleave(shots)
    views = torch.cat(
        [features]
        + [features + 0.3 * torch.randn(features.shape, generator=generator, dtype=torch.float64)]
        * (copies - 1)
    )
    return features, F.one_hot(y, ways).to(features.dtype), views, y


def test_woodbury_solution_equals_the_direct_inverse() -> None:
    features, onehot, views, _ = _task(0)
    offsets = support_offsets(features, views, onehot)
    weight, bias = nuisance_head(features, onehot, offsets, 0.6)
    dim = features.shape[1]
    scatter = dim * offsets.T @ offsets / offsets.pow(2).sum()
    precision = torch.linalg.inv(0.6 * torch.eye(dim, dtype=features.dtype) + 0.4 * scatter)
    prototypes = (onehot.T @ features) / onehot.sum(0).unsqueeze(1)
    torch.testing.assert_close(weight, 2 * prototypes @ precision)
    torch.testing.assert_close(bias, -((prototypes @ precision) * prototypes).sum(1))
    # The logits are minus the Mahalanobis distance, up to a per-row constant.
    query = torch.randn(4, dim, dtype=features.dtype, generator=torch.Generator().manual_seed(9))
    diff = query.unsqueeze(1) - prototypes
    mahalanobis = torch.einsum("qnd,de,qne->qn", diff, precision, diff)
    logits = query @ weight.T + bias
    torch.testing.assert_close(logits + mahalanobis, (logits + mahalanobis)[:, :1].expand(4, 3))


def test_offsets_hold_every_shift_and_the_corrected_class_residuals() -> None:
    features, onehot, views, y = _task(1, shots=2)
    offsets = support_offsets(features, views, onehot)
    count = features.shape[0]
    assert offsets.shape == (5 * count, features.shape[1])
    torch.testing.assert_close(offsets[:count], views[count : 2 * count] - features)
    prototypes = (onehot.T @ features) / 2
    # Two shots: each image's residual from its class mean, times sqrt(2 / 1).
    torch.testing.assert_close(offsets[4 * count :], (features - prototypes[y]) * 2**0.5)
    one_shot = support_offsets(features[::2], views.view(5, count, -1)[:, ::2].flatten(0, 1),
                               onehot[::2])  # fmt: skip
    assert float(one_shot[4 * (count // 2) :].abs().max()) == 0.0


def test_full_shrinkage_or_no_scatter_is_the_prototype_head() -> None:
    features, onehot, views, _ = _task(2)
    expected = prototype_head(features, onehot)
    for head in (
        initial_head(features, onehot, views, 1.0),
        initial_head(features, onehot, None, 0.5),
        nuisance_head(
            features, onehot, torch.zeros(8, features.shape[1], dtype=features.dtype), 0.5
        ),
    ):
        torch.testing.assert_close(head[0], expected[0])
        torch.testing.assert_close(head[1], expected[1])


def test_a_query_moved_along_a_shift_direction_keeps_its_class() -> None:
    # Class 0 at the origin, class 1 at (0.5, 0.5): shifts move embeddings along the 2nd axis.
    features = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    onehot = torch.eye(2, dtype=torch.float64)
    along = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    views = torch.cat([features] + [features + s * along for s in (0.8, -0.8, 0.5, -0.5)])
    query = torch.tensor([[0.0, 0.9, 0.0]], dtype=torch.float64)  # class 0, shifted
    scale = torch.zeros(())
    plain = head_logits(query, *prototype_head(features, onehot), scale)
    whitened = head_logits(query, *initial_head(features, onehot, views, 0.5), scale)
    assert int(plain.argmax()) == 1  # the nearest prototype in plain distance is the wrong one
    assert int(whitened.argmax()) == 0


def test_tasks_stack_and_vmap() -> None:
    tasks = [_task(seed) for seed in (3, 4, 5)]
    features, onehot, views = (torch.stack([t[i] for t in tasks]) for i in range(3))
    batched = initial_head(features, onehot, views, 0.7)
    mapped = torch.func.vmap(lambda f, o, v: initial_head(f, o, v, 0.7))(features, onehot, views)
    for t, (f, o, v, _) in enumerate(tasks):
        one = initial_head(f, o, v, 0.7)
        for got in (batched, mapped):
            torch.testing.assert_close(got[0][t], one[0])
            torch.testing.assert_close(got[1][t], one[1])


def test_served_whitening_changes_answers_and_the_baseline_stays_the_prototypes() -> None:
    config = replace(TINY, inner_shift_views=1, default_mode="head", inner_steps=0)
    whitened_config = replace(config, nuisance_shrinkage=0.5)
    init = tiny_init(whitened_config)
    support = random_images(6, whitened_config, seed=7)
    labels = ["a", "b", "c", "a", "b", "c"]
    queries = random_images(40, whitened_config, seed=8)
    whitened = fewshot.adapt(init, support, labels).predict_proba(queries)
    plain_init = prototype_read_out(init)
    assert plain_init.config.nuisance_shrinkage == 1.0
    assert prototype_read_out(tiny_init(config)).config == config
    plain = fewshot.adapt(plain_init, support, labels).predict_proba(queries)
    assert not torch.allclose(whitened, plain, atol=1e-4)
    reference = fewshot.adapt(tiny_init(config), support, labels).predict_proba(queries)
    torch.testing.assert_close(plain, reference)


def test_almost_no_shrinkage_on_a_rank_deficient_scatter_stays_finite() -> None:
    features, onehot, views, _ = _task(6)  # 30 offsets in 7 dimensions, but 1e-6 of identity
    weight, bias = initial_head(features, onehot, views, 1e-6)
    assert torch.isfinite(weight).all() and torch.isfinite(bias).all()
