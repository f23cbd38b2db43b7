"""Multi-view images embedded a few per pass (fewshot.backbone.ACTIVATIONS_PER_PASS): one served
adaptation of each shipped multi-view initialization at several budgets of first-layer
activations a pass, interleaved in one run, as ratios against 2048 views a pass (what predict
used before). Random images (speed does not depend on content); medians of interleaved repeats,
so machine noise hits every budget alike.

    .venv/bin/python benchmarks/bench_views.py [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fewshot.backbone as backbone
from fewshot.fast import adapt_fast
from fewshot.initialization import Initialization, shipped_initialization_paths

BUDGETS = (300_000, 1_000_000, 3_000_000, 10_000_000)  # first-layer floats a pass
DEFAULT = backbone.ACTIVATIONS_PER_PASS


def main() -> None:
    """Print a markdown table: initialization, task, ms per budget, ratio to 2048 views a pass."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = " | ".join(f"{b / 1e6:g}M floats" for b in BUDGETS)
    default = f"{DEFAULT / 1e6:g}M"
    print(f"| initialization | task | 2048 views | {header} | {default} (default) vs 2048 views |")
    print("|---|---|---|" + "---|" * (len(BUDGETS) + 1))
    for path in shipped_initialization_paths():
        init = Initialization.load(path)
        config = init.config
        module = init.module()
        if module.view_count == 1:
            continue  # one view: embedded in one pass whatever the budget
        legacy = 2048 * module.view_count * module.first_map_size
        budgets = (legacy, *BUDGETS)
        for ways, shots in ((5, 1), (5, 5), (5, 20)):
            generator = torch.Generator().manual_seed(0)
            shape = (ways * shots, config.in_channels, config.image_size, config.image_size)
            x = torch.rand(shape, generator=generator)
            labels = [str(i // shots) for i in range(ways * shots)]
            times: dict[int, list[float]] = {b: [] for b in budgets}
            for _ in range(args.repeats):
                for budget in budgets:
                    backbone.ACTIVATIONS_PER_PASS = budget
                    start = time.perf_counter()
                    adapt_fast(init, x, labels)
                    times[budget].append(time.perf_counter() - start)
            ms = {b: 1000 * statistics.median(v[1:]) for b, v in times.items()}
            cells = " | ".join(f"{ms[b]:.0f} ms" for b in budgets)
            print(
                f"| {init.version} | {ways}-way {shots}-shot | {cells} | "
                f"{ms[legacy] / ms[DEFAULT]:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
