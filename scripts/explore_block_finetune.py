"""Measure what fine-tuning the last conv block (with the head) adds over the served head steps.

    python scripts/explore_block_finetune.py --init fewshot/shipped/photos-conv4 \
        --data ../shared/data/miniimagenet/miniimagenet-val.zip --shots 20 --episodes 40 \
        --block-lrs 0.02 0.1 --checks 10 25 50

Not a serving mode: an offline measurement for issue 19's 20-shot gain target. Per episode it
reports, on the same seeded episodes, the 0-step prototype read-out, the served adaptation
(`fewshot.fast.adapt_fast`, steps chosen per task) and SGD on the last conv block's weights and
the linear head (the prototype head's start, Triantafillou et al. 2020; a partial fine-tune as in
Chen et al. 2019). The trunk below that block runs once per image view: its maps are cached.
Prints the running mean accuracies and the paired gains over 0 steps with their 95% intervals.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from fewshot.backbone import Conv4, shared_module
from fewshot.data import load_dataset
from fewshot.episodes import EpisodeSampler
from fewshot.fast import adapt_fast
from fewshot.head import head_logits
from fewshot.initialization import Initialization
from fewshot.inner import HEAD_SCALE
from fewshot.nuisance import initial_head


def last_conv_index(module: Conv4) -> int:
    """Index in `module.blocks` of the last Conv2d: where the fine-tuned tail starts."""
    return max(i for i, layer in enumerate(module.blocks) if isinstance(layer, nn.Conv2d))


def run_layers(
    module: Conv4, params: Mapping[str, Tensor], x: Tensor, start: int, stop: int
) -> Tensor:
    """Layers [start, stop) of `module.blocks` on maps x with `params` (folded norms only)."""
    for index in range(start, stop):
        layer = module.blocks[index]
        if isinstance(layer, nn.Conv2d):
            prefix = f"blocks.{index}."
            x = F.conv2d(
                x, params[prefix + "weight"], params[prefix + "bias"], layer.stride, layer.padding
            )
        elif isinstance(layer, nn.GroupNorm | nn.BatchNorm2d):
            raise ValueError("fold the norms (fewshot.backbone.fold_batch_norm) first")
        else:
            x = layer(x)
    return x


def trunk_maps(module: Conv4, params: Mapping[str, Tensor], images: Tensor) -> Tensor:
    """Maps [V * B, C', h, w] of every view of images [B, C, H, W] below the last conv."""
    return run_layers(module, params, module._views(images), 0, last_conv_index(module))


def tail_embeddings(
    module: Conv4, params: Mapping[str, Tensor], maps: Tensor, count: int, per_view: bool = False
) -> Tensor:
    """Embeddings from trunk maps: [B, D] averaged over views as served, or [V * B, D] per view."""
    out = run_layers(module, params, maps, last_conv_index(module), len(module.blocks))
    out = out.flatten(1) if module.readout == "flatten" else out.mean(dim=(-2, -1))
    if module.feature_norm == "l2":
        out = F.normalize(out, dim=-1)
    if per_view or module.view_count == 1:
        return out
    out = out.reshape(module.view_count, count, -1).mean(dim=0)
    return F.normalize(out, dim=-1) if module.feature_norm == "l2" else out


def block_finetune_accuracies(
    init: Initialization,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    ways: int,
    block_lr: float,
    checks: Sequence[int],
    per_view: bool = False,
) -> dict[int, float]:
    """Query accuracy after each step count in `checks` of SGD on the last conv block and head.

    The loss is the served head's: per-class cross-entropy at the inner temperature, on the
    support's view-averaged embeddings (or on each view as its own example with `per_view`);
    the head steps at config.inner_step_size, the block at `block_lr`. 0 in `checks` is the
    prototype read-out.
    """
    config = init.config
    module = shared_module(config)
    params = dict(init.params)
    name_w, name_b = (f"blocks.{last_conv_index(module)}.{p}" for p in ("weight", "bias"))
    with torch.no_grad():
        support_maps = trunk_maps(module, params, support_x)
        query_maps = trunk_maps(module, params, query_x)
        features = tail_embeddings(module, params, support_maps, support_x.shape[0])
        weight, bias = initial_head(
            features, F.one_hot(support_y, ways).to(features.dtype), None, 1.0
        )
    leaves = [params[name_w], params[name_b], weight, bias]
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    rates = [block_lr, block_lr, config.inner_step_size, config.inner_step_size]
    targets = support_y.repeat(module.view_count) if per_view else support_y
    out: dict[int, float] = {}
    for step in range(max(checks) + 1):
        if step in checks:
            with torch.no_grad():
                tuned = {**params, name_w: leaves[0], name_b: leaves[1]}
                query = tail_embeddings(module, tuned, query_maps, query_x.shape[0])
                logits = head_logits(query, leaves[2], leaves[3], params[HEAD_SCALE])
                out[step] = float((logits.argmax(dim=1) == query_y).float().mean())
        if step == max(checks):
            break
        tuned = {**params, name_w: leaves[0], name_b: leaves[1]}
        support = tail_embeddings(module, tuned, support_maps, support_x.shape[0], per_view)
        logits = head_logits(support, leaves[2], leaves[3], params[HEAD_SCALE])
        loss = F.cross_entropy(logits * config.inner_temperature, targets)
        if config.inner_loss_per_class:
            loss = loss * ways
        grads = torch.autograd.grad(loss, leaves)
        with torch.no_grad():
            for leaf, grad, rate in zip(leaves, grads, rates, strict=True):
                leaf.sub_(rate * grad)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print one JSON line of running results every 10 episodes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", required=True)
    parser.add_argument("--data", required=True, help="validation classes: a folder or zip")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=20)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--block-lrs", type=float, nargs="+", default=[0.02])
    parser.add_argument("--checks", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--per-view", action="store_true", help="each view is its own example")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    init = Initialization.load(args.init)
    sampler = EpisodeSampler(load_dataset(args.data, init.config))
    rng = np.random.default_rng(args.seed)
    scores: dict[str, list[float]] = {"0 steps": [], "served": []}
    for episode in tqdm(range(args.episodes), file=sys.stderr):
        batch = sampler.sample(rng, 1, args.ways, args.shots, args.queries)
        sx, sy = batch.support_x[0], batch.support_y[0]
        qx, qy = batch.query_x[0], batch.query_y[0]
        model = adapt_fast(init, sx, [str(int(v)) for v in sy])
        truth = [str(int(t)) for t in qy]
        right = [a == t for a, t in zip(model.predict(qx), truth, strict=True)]
        scores["served"].append(float(np.mean(right)))
        for lr in args.block_lrs:
            accuracies = block_finetune_accuracies(
                init, sx, sy, qx, qy, args.ways, lr, [0, *args.checks], args.per_view
            )
            if lr == args.block_lrs[0]:
                scores["0 steps"].append(accuracies[0])
            for step in args.checks:
                scores.setdefault(f"block lr {lr}, {step} steps", []).append(accuracies[step])
        if (episode + 1) % 10 == 0 or episode + 1 == args.episodes:
            print(json.dumps(summary(scores, episode + 1)), flush=True)
    return 0


def summary(scores: Mapping[str, list[float]], episodes: int) -> dict[str, Any]:
    """Mean accuracy (%) per method and its paired gain over 0 steps (%, 95% half-width)."""
    zero = np.asarray(scores["0 steps"])
    out: dict[str, Any] = {"episodes": episodes}
    for name, values in scores.items():
        diff = np.asarray(values) - zero
        half = 196.0 * float(diff.std(ddof=1)) / np.sqrt(diff.size) if diff.size > 1 else 0.0
        out[name] = {"accuracy": round(100 * float(np.mean(values)), 2)}
        if name != "0 steps":
            out[name]["gain"] = [round(100 * float(diff.mean()), 2), round(half, 2)]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
