"""The inner loop against a hand-written reference, finite differences, and its edge cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import fewshot
from fewshot.backbone import Conv4
from fewshot.config import AdaptMode, ModelConfig
from fewshot.head import prototype_head
from fewshot.inner import adapt_params, embed, logits
from fewshot.vmapped import query_logits
from tests.fewshot_helpers import (
    TINY,
    random_images,
    reference_adapt,
    reference_embed,
    reference_logits,
    tiny_init,
)

WAYS = 3
LABELS = torch.tensor([0, 1, 2, 0, 2, 2])  # unbalanced on purpose: 2, 1 and 3 shots


def _leaves(init: fewshot.Initialization) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Meta-parameters and step sizes as fresh leaves that require grad."""
    meta = {k: v.detach().clone().requires_grad_(True) for k, v in init.params.items()}
    sizes = {k: v.detach().clone().requires_grad_(True) for k, v in init.step_sizes.items()}
    return meta, sizes


def test_reference_backbone_matches_module() -> None:
    """The reference forward is a faithful Conv4 (else the comparisons below prove nothing)."""
    init = tiny_init()
    module = Conv4(TINY).double()
    module.load_state_dict({k: v for k, v in init.params.items() if not k.startswith("head.")})
    x = random_images(5)
    torch.testing.assert_close(reference_embed(init.params, x, TINY), module(x))
    torch.testing.assert_close(embed(module, init.params, x), module(x))


@pytest.mark.parametrize("mode", ["full", "head"])
@pytest.mark.parametrize("first_order", [False, True])
def test_adaptation_and_meta_gradient_equal_hand_written_loop(
    mode: AdaptMode, first_order: bool
) -> None:
    init = tiny_init()
    support_x, query_x = random_images(6, seed=1), random_images(5, seed=2)
    query_y = torch.tensor([0, 1, 2, 1, 0])

    meta, sizes = _leaves(init)
    fast = adapt_params(
        Conv4(TINY), meta, sizes, support_x, LABELS, WAYS,
        steps=3, default_step_size=0.1, mode=mode, first_order=first_order,
    )  # fmt: skip
    loss = F.cross_entropy(logits(Conv4(TINY), fast, query_x), query_y)
    grads = torch.autograd.grad(loss, [*meta.values(), *sizes.values()], allow_unused=True)

    ref_meta, ref_sizes = _leaves(init)
    ref_fast = reference_adapt(
        ref_meta,
        ref_sizes,
        support_x,
        LABELS,
        WAYS,
        TINY,
        steps=3,
        mode=mode,
        first_order=first_order,
    )
    ref_loss = F.cross_entropy(
        reference_logits(ref_fast, reference_embed(ref_fast, query_x, TINY)), query_y
    )
    ref_grads = torch.autograd.grad(
        ref_loss, [*ref_meta.values(), *ref_sizes.values()], allow_unused=True
    )

    assert set(fast) == set(ref_fast)
    for name in fast:
        torch.testing.assert_close(fast[name], ref_fast[name], atol=1e-5, rtol=0)
    changed = fast["blocks.0.weight"] if mode == "full" else fast["head.weight"]
    unchanged = (
        init.params["blocks.0.weight"] if mode == "full" else 2 * _prototypes(init, support_x)
    )
    assert (changed - unchanged).abs().max() > 1e-3, "the inner loop must actually move the weights"
    names = [*meta, *(f"step_size.{k}" for k in sizes)]
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        if want is None:
            assert got is None or torch.count_nonzero(got) == 0, name
            continue
        assert got is not None, name
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("mode", ["full", "head"])
def test_serving_path_equals_hand_written_loop(mode: AdaptMode) -> None:
    """adapt_params(differentiable=False), which fewshot.adapt uses, takes the same steps."""
    init = tiny_init()
    support_x = random_images(6, seed=1)
    fast = adapt_params(
        Conv4(TINY), init.params, init.step_sizes, support_x, LABELS, WAYS,
        steps=3, default_step_size=0.1, mode=mode, differentiable=False,
    )  # fmt: skip
    meta, sizes = _leaves(init)
    ref_fast = reference_adapt(
        meta, sizes, support_x, LABELS, WAYS, TINY, steps=3, mode=mode, first_order=True
    )
    assert set(fast) == set(ref_fast)
    for name in fast:
        assert not fast[name].requires_grad, name
        torch.testing.assert_close(fast[name], ref_fast[name].detach(), atol=1e-5, rtol=0)
    moved = fast["blocks.0.weight"] if mode == "full" else fast["head.weight"]
    start = init.params["blocks.0.weight"] if mode == "full" else 2 * _prototypes(init, support_x)
    assert (moved - start).abs().max() > 1e-3, "the inner loop must actually move the weights"


def _prototypes(init: fewshot.Initialization, support_x: Tensor) -> Tensor:
    """Class means of the reference embeddings."""
    features = reference_embed(init.params, support_x, TINY)
    return torch.stack([features[LABELS.eq(k)].mean(dim=0) for k in range(WAYS)])


@pytest.mark.parametrize("first_order", [False, True])
def test_vmapped_tasks_equal_per_task_reference(first_order: bool) -> None:
    """query_logits (vmap over tasks, as meta-training uses) gives the per-task reference's gradients."""
    init = tiny_init()
    tasks = 3
    support_x = random_images(tasks * 6, seed=3).view(tasks, 6, 1, 12, 12)
    support_y = LABELS.expand(tasks, -1)
    query_x = random_images(tasks * 4, seed=4).view(tasks, 4, 1, 12, 12)
    query_y = torch.tensor([[0, 1, 2, 2]] * tasks)

    meta, sizes = _leaves(init)
    out = query_logits(
        Conv4(TINY), meta, sizes, support_x, support_y, query_x, WAYS,
        steps=2, default_step_size=0.1, first_order=first_order,
    )  # fmt: skip
    loss = F.cross_entropy(out.flatten(0, 1), query_y.flatten())
    grads = torch.autograd.grad(loss, [*meta.values(), *sizes.values()])

    ref_meta, ref_sizes = _leaves(init)
    ref_out = []
    for t in range(tasks):
        fast = reference_adapt(
            ref_meta,
            ref_sizes,
            support_x[t],
            support_y[t],
            WAYS,
            TINY,
            steps=2,
            first_order=first_order,
        )
        ref_out.append(reference_logits(fast, reference_embed(fast, query_x[t], TINY)))
    ref_loss = F.cross_entropy(torch.cat(ref_out), query_y.flatten())
    ref_grads = torch.autograd.grad(
        ref_loss, [*ref_meta.values(), *ref_sizes.values()], allow_unused=True
    )

    torch.testing.assert_close(out, torch.stack(ref_out), atol=1e-5, rtol=0)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(
            got, torch.zeros_like(got) if want is None else want, atol=1e-5, rtol=0
        )


def test_second_order_meta_gradient_matches_finite_differences() -> None:
    config = ModelConfig(width=4, image_size=8, depth=2, inner_steps=2, inner_step_size=0.3)
    init = tiny_init(config, seed=5)
    module = Conv4(config)
    support_x, query_x = random_images(4, config, seed=6), random_images(4, config, seed=7)
    support_y, query_y = torch.tensor([0, 1, 0, 1]), torch.tensor([1, 0, 0, 1])
    names = list(init.params)
    step_names = ["blocks.0.weight", "head.weight"]

    def query_loss(*tensors: Tensor, first_order: bool = False) -> Tensor:
        meta = dict(zip(names, tensors[: len(names)], strict=True))
        sizes = {**init.step_sizes, **dict(zip(step_names, tensors[len(names) :], strict=True))}
        fast = adapt_params(
            module, meta, sizes, support_x, support_y, 2,
            steps=2, default_step_size=0.3, first_order=first_order,
        )  # fmt: skip
        return F.cross_entropy(logits(module, fast, query_x), query_y)

    inputs = tuple(
        t.detach().clone().requires_grad_(True)
        for t in [*init.params.values(), *(init.step_sizes[n] for n in step_names)]
    )
    assert torch.autograd.gradcheck(query_loss, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)

    # First order drops the second-derivative terms, so it must differ: the check above can fail.
    exact = torch.autograd.grad(query_loss(*inputs), inputs)
    approx = torch.autograd.grad(query_loss(*inputs, first_order=True), inputs)
    gap = max(float((a - b).abs().max()) for a, b in zip(exact, approx, strict=True))
    assert gap > 1e-3


@pytest.mark.parametrize(("steps", "step_size"), [(0, None), (5, 0.0)])
@pytest.mark.parametrize("mode", ["full", "head"])
def test_no_steps_or_zero_step_size_keeps_the_initialization(
    steps: int, step_size: float | None, mode: AdaptMode
) -> None:
    init = tiny_init(dtype=torch.float32)
    support_x = random_images(6, seed=8, dtype=torch.float32)
    labels = ["a", "b", "c", "a", "c", "c"]
    model = fewshot.adapt(init, support_x, labels, mode=mode, steps=steps, step_size=step_size)
    for name, value in init.params.items():
        assert torch.equal(model.params[name], value), name
    features = embed(Conv4(TINY), init.params, support_x)
    weight, bias = prototype_head(features, F.one_hot(LABELS, WAYS).float())
    torch.testing.assert_close(model.params["head.weight"], weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.params["head.bias"], bias, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        model.params["head.weight"], 2 * _prototypes(init, support_x).float(), atol=1e-5, rtol=0
    )


def test_head_mode_adapts_only_the_head() -> None:
    init = tiny_init(dtype=torch.float32)
    support_x = random_images(6, seed=8, dtype=torch.float32)
    model = fewshot.adapt(init, support_x, ["a", "b", "c", "a", "c", "c"], mode="head", steps=3)
    for name, value in init.params.items():
        assert torch.equal(model.params[name], value), name
    prototypes = 2 * _prototypes(init, support_x).float()
    assert (model.params["head.weight"] - prototypes).abs().max() > 1e-4


def test_same_seed_same_weights_and_predictions() -> None:
    first, second = (
        fewshot.Initialization.random(TINY, seed=7),
        fewshot.Initialization.random(TINY, seed=7),
    )
    other = fewshot.Initialization.random(TINY, seed=8)
    for name in first.params:
        assert torch.equal(first.params[name], second.params[name]), name
    assert not torch.equal(first.params["blocks.0.weight"], other.params["blocks.0.weight"])

    support_x = random_images(6, seed=9, dtype=torch.float32)
    query_x = random_images(10, seed=10, dtype=torch.float32)
    labels = ["x", "y", "z", "x", "y", "z"]
    a, b = fewshot.adapt(first, support_x, labels), fewshot.adapt(second, support_x, labels)
    for name in a.params:
        assert torch.equal(a.params[name], b.params[name]), name
    assert torch.equal(a.predict_proba(query_x), b.predict_proba(query_x))
    assert a.predict(query_x) == b.predict(query_x)
