"""Adaptation and meta-training speed of the fewshot core against naive baselines in the same run.

Adaptation: 5-way 1-shot with the shipped initialization's config (its steps and learned step
sizes), full (MAML) and head-only (ANIL) modes, one task at a time and vmapped over many tasks,
against deepcopy of an nn.Module Conv4 + prototype head + torch.optim.SGD steps.
Meta-training: one outer update (vmapped query_logits + backward, as MetaTrainer.meta_step
does), first and second order, against a plain per-task torch.autograd loop at the same
meta-batch. Images are random (speed does not depend on content). Medians after a warm-up.

    .venv/bin/python benchmarks/bench_adapt.py [--repeats 5] [--device cpu] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

import fewshot
from app.core.allocator import jemalloc_loaded, use_configured
from fewshot.backbone import Conv4
from fewshot.batched import adapt_many
from fewshot.config import AdaptMode, MetaTrainConfig
from fewshot.data import ImageDataset
from fewshot.fast import adapt_fast
from fewshot.head import prototype_head
from fewshot.inner import HEAD_BIAS, HEAD_SCALE, HEAD_WEIGHT, adapt_params, adapted_names, logits
from fewshot.training import MetaTrainer
from fewshot.vmapped import query_logits

WAYS, SHOTS, QUERIES = 5, 1, 5


def median_seconds(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median wall time of `fn` over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class NaiveClassifier(nn.Module):
    """What a first implementation would write: a Conv4 module plus a linear head."""

    def __init__(self, backbone: Conv4, log_scale: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(cast(nn.Conv2d, backbone.blocks[0]).out_channels, WAYS)
        self.log_scale = log_scale

    def forward(self, x: Tensor) -> Tensor:
        """Scaled logits."""
        scores: Tensor = self.head(self.backbone(x))
        return float(np.exp(self.log_scale)) * scores


def naive_adapt(
    model: NaiveClassifier, x: Tensor, y: Tensor, steps: int, lr: float, mode: AdaptMode
) -> NaiveClassifier:
    """deepcopy, prototype head, then torch.optim.SGD steps (on the head alone in head mode)."""
    task = copy.deepcopy(model)
    with torch.no_grad():
        features = task.backbone(x)
        weight, bias = prototype_head(features, F.one_hot(y, WAYS).to(x.dtype))
        task.head.weight.copy_(weight)
        task.head.bias.copy_(bias)
    params = task.parameters() if mode == "full" else task.head.parameters()
    optimizer = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        scale = float(np.exp(task.log_scale))
        out = task(x) if mode == "full" else scale * task.head(features)
        F.cross_entropy(out, y).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return task


def bench_adaptation(
    init: fewshot.Initialization, tasks: int, repeats: int, device: torch.device
) -> list[dict[str, Any]]:
    """ms per task for our paths and the naive baseline, per mode."""
    config = init.config
    steps, lr = config.inner_steps, config.inner_step_size
    module = init.module().to(device)
    meta = {k: v.to(device) for k, v in init.params.items()}
    sizes = {k: v.to(device) for k, v in init.step_sizes.items()}
    gen = torch.Generator().manual_seed(0)
    shape = (config.in_channels, config.image_size, config.image_size)
    support_x = torch.rand((tasks, WAYS * SHOTS, *shape), generator=gen).to(device)
    support_y = torch.arange(WAYS, device=device).repeat_interleave(SHOTS).expand(tasks, -1)
    labels = [f"class {k}" for k in support_y[0].tolist()]
    naive = NaiveClassifier(copy.deepcopy(module), float(init.params[HEAD_SCALE])).to(device)
    naive.backbone.load_state_dict({k: v for k, v in meta.items() if not k.startswith("head.")})
    singles = min(tasks, 8)
    init_on_device = init.to(device)
    rows = []
    for mode in ("full", "head"):

        def one(sx: Tensor, sy: Tensor, mode: AdaptMode = mode) -> dict[str, Tensor]:
            return adapt_params(
                module, meta, sizes, sx, sy, WAYS,
                steps=steps, default_step_size=lr, mode=mode, first_order=True,
            )  # fmt: skip

        def public_api(mode: AdaptMode = mode) -> None:
            for t in range(singles):
                fewshot.adapt(init_on_device, support_x[t], labels, mode=mode)

        def fast(mode: AdaptMode = mode) -> None:
            for t in range(singles):
                adapt_fast(init_on_device, support_x[t], labels, mode=mode)

        def many(mode: AdaptMode = mode) -> None:
            adapt_many(init_on_device, [(x, labels) for x in support_x], mode=mode)

        def single(one: Callable[..., dict[str, Tensor]] = one) -> None:
            with torch.no_grad():
                for t in range(singles):
                    one(support_x[t], support_y[t])

        def batched(one: Callable[..., dict[str, Tensor]] = one, mode: AdaptMode = mode) -> None:
            names = adapted_names(meta, mode)

            def adapted_only(sx: Tensor, sy: Tensor) -> dict[str, Tensor]:
                fast = one(sx, sy)
                return {name: fast[name] for name in names}

            with torch.no_grad():
                vmap(adapted_only)(support_x, support_y)

        def baseline(mode: AdaptMode = mode) -> None:
            for t in range(singles):
                naive_adapt(naive, support_x[t], support_y[t], steps, lr, mode)

        base = median_seconds(baseline, repeats, device) / singles
        for path, fn, count in (
            ("single task, fewshot.adapt", public_api, singles),
            ("single task, fewshot.fast.adapt_fast", fast, singles),
            ("single task, adapt_params", single, singles),
            (f"vmap over {tasks} tasks, adapt_params", batched, tasks),
            (f"{tasks} tasks, fewshot.batched.adapt_many", many, tasks),
        ):
            ours = median_seconds(fn, repeats, device) / count
            rows.append({"mode": mode, "path": path, "ours": ours, "baseline": base})
    return rows


def per_task_loop_step(
    module: nn.Module,
    meta: dict[str, Tensor],
    sizes: dict[str, Tensor],
    batch: Any,
    steps: int,
    second_order: bool,
) -> None:
    """Meta-gradient of a meta-batch one task at a time with torch.autograd.grad, accumulated."""
    backbone = [n for n in meta if not n.startswith("head.")]
    names = [*backbone, HEAD_WEIGHT, HEAD_BIAS]
    tasks = batch.support_x.shape[0]
    for t in range(tasks):
        sx, sy = batch.support_x[t], batch.support_y[t]
        features = functional_call(module, {n: meta[n] for n in backbone}, (sx,))
        weight, bias = prototype_head(features, F.one_hot(sy, WAYS).to(sx.dtype))
        # Clones make the head a parameter of its own, as in the vmapped inner loop.
        fast = {n: meta[n].clone() for n in backbone}
        fast.update({HEAD_WEIGHT: weight, HEAD_BIAS: bias, HEAD_SCALE: meta[HEAD_SCALE]})
        for step in range(steps):
            loss = F.cross_entropy(logits(module, fast, sx), sy)
            grads = torch.autograd.grad(
                loss, [fast[n] for n in names], create_graph=second_order, retain_graph=True
            )
            for name, g in zip(names, grads, strict=True):
                fast[name] = fast[name] - sizes[name][step] * g
        query = F.cross_entropy(logits(module, fast, batch.query_x[t]), batch.query_y[t])
        (query / tasks).backward()


def bench_meta_training(
    init: fewshot.Initialization, meta_batch: int, repeats: int, device: torch.device
) -> list[dict[str, Any]]:
    """Tasks per second of one outer update: vmapped (ours), per-task loop, MetaTrainer.meta_step."""
    config = init.config
    rng = np.random.default_rng(0)
    images = (rng.random((40 * 10, 1, config.image_size, config.image_size)) * 255).astype(np.uint8)
    dataset = ImageDataset(
        images=torch.from_numpy(images),
        targets=torch.arange(40).repeat_interleave(10),
        classes=[f"c{i}" for i in range(40)],
        groups=["g"] * 40,
    )
    rows = []
    for second_order in (False, True):
        cfg = MetaTrainConfig(
            iterations=10**6, meta_batch=meta_batch, ways=(WAYS, WAYS), shots=(SHOTS, SHOTS),
            queries=QUERIES, inner_steps=config.inner_steps, inner_step_size=config.inner_step_size,
            second_order=second_order, first_order_fraction=0.0, rotations=False,
            cosine_annealing=False, model=config,
        )  # fmt: skip
        # The run folder stays empty: only run() writes checkpoints, and it is never called.
        with tempfile.TemporaryDirectory(prefix="bench-adapt-") as scratch:
            trainer = MetaTrainer(cfg, dataset, None, scratch, start=init, device=device)
            batch = trainer.train_sampler.sample(rng, meta_batch, WAYS, SHOTS, QUERIES)
            rows.append(_outer_update_rates(trainer, batch, second_order, repeats, device))
    return rows


def _outer_update_rates(
    trainer: MetaTrainer, batch: Any, second_order: bool, repeats: int, device: torch.device
) -> dict[str, Any]:
    """Tasks/s of the vmapped update, the per-task loop and MetaTrainer.meta_step."""
    cfg, meta, sizes = trainer.cfg, trainer.params, trainer.step_sizes
    tasks = batch.support_x.shape[0]

    def ours() -> None:
        out = query_logits(
            trainer.module, meta, sizes, batch.support_x, batch.support_y, batch.query_x, WAYS,
            steps=cfg.inner_steps, default_step_size=cfg.inner_step_size,
            first_order=not second_order,
        )  # fmt: skip
        loss = F.cross_entropy(out.flatten(0, 1), batch.query_y.flatten())
        loss.backward()  # type: ignore[no-untyped-call]
        _clear(meta, sizes)

    def loop() -> None:
        per_task_loop_step(trainer.module, meta, sizes, batch, cfg.inner_steps, second_order)
        _clear(meta, sizes)

    def meta_step() -> None:
        trainer.meta_step(np.random.default_rng(1))

    return {
        "order": "second" if second_order else "first",
        "ours": tasks / median_seconds(ours, repeats, device),
        "loop": tasks / median_seconds(loop, repeats, device),
        "meta_step": tasks / median_seconds(meta_step, repeats, device),
    }


def _clear(*groups: dict[str, Tensor]) -> None:
    """Drop accumulated gradients between timed runs."""
    for group in groups:
        for value in group.values():
            value.grad = None


def main() -> None:
    """Run both benchmarks and print Markdown tables."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per measurement (median)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--tasks", type=int, default=32, help="tasks in the vmapped adaptation")
    parser.add_argument("--meta-batch", type=int, default=32, help="tasks per outer update")
    parser.add_argument("--skip-meta", action="store_true", help="adaptation only")
    parser.add_argument(
        "--allocator",
        choices=["auto", "jemalloc", "system"],
        default=os.environ.get("MAML_SERVE_ALLOCATOR", "auto"),
        help="memory allocator, as MAML_SERVE_ALLOCATOR (default: auto, as the service)",
    )
    args = parser.parse_args()
    # The allocator the service runs with (this may start the script again with it); the
    # servers it starts inherit the choice.
    os.environ["MAML_SERVE_ALLOCATOR"] = args.allocator
    use_configured(args.allocator)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    init = fewshot.Initialization.load(fewshot.shipped_initialization_path())
    c = init.config
    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
        f"allocator {'jemalloc' if jemalloc_loaded() else 'system'}; "
        f"shipped {init.version}: Conv4 width {c.width}, {c.image_size}x{c.image_size}, "
        f"{c.pooling}, {c.inner_steps} inner steps; {WAYS}-way {SHOTS}-shot; "
        f"median of {args.repeats} after a warm-up\n"
    )
    print("| mode | path | ours (ms/task) | naive deepcopy + SGD (ms/task) | speed-up |")
    print("|---|---|---|---|---|")
    for row in bench_adaptation(init, args.tasks, args.repeats, device):
        print(
            f"| {row['mode']} | {row['path']} | {1e3 * row['ours']:.1f} | "
            f"{1e3 * row['baseline']:.1f} | {row['baseline'] / row['ours']:.2f}x |"
        )
    if args.skip_meta:
        return
    print(
        f"\nMeta-training, {args.meta_batch} tasks per outer update, {QUERIES} queries per class:\n"
    )
    print(
        "| order | vmapped outer update (tasks/s) | per-task autograd loop (tasks/s) | speed-up "
        "| MetaTrainer.meta_step incl. sampling + Adam (tasks/s) |"
    )
    print("|---|---|---|---|---|")
    for row in bench_meta_training(init, args.meta_batch, args.repeats, device):
        print(
            f"| {row['order']} | {row['ours']:.1f} | {row['loop']:.1f} | "
            f"{row['ours'] / row['loop']:.2f}x | {row['meta_step']:.1f} |"
        )


if __name__ == "__main__":
    main()
