"""Two initialization versions side by side: served adaptation and 32-image predictions, timed
interleaved in one run (medians of repeats), as ratios against the baseline, with the adapted
model's bytes. Random images (speed does not depend on content).

    git archive 201294b fewshot/shipped/omniglot-conv4 | tar -x -C /tmp/v4
    .venv/bin/python benchmarks/bench_versions.py --baseline /tmp/v4/fewshot/shipped/omniglot-conv4 \\
        --candidate fewshot/shipped/omniglot-conv4 [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from fewshot.adapted import AdaptedModel
from fewshot.fast import adapt_fast
from fewshot.initialization import Initialization

SHAPES = ((5, 1), (5, 5), (20, 1), (20, 5))
QUERIES = 32


def random_images(init: Initialization, count: int, seed: int) -> torch.Tensor:
    """Images [count, C, H, W] in [0, 1] of the initialization's input shape, seeded."""
    size = init.config.image_size
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((count, init.config.in_channels, size, size), generator=generator)


def _adapt(init: Initialization, ways: int, shots: int) -> Callable[[], AdaptedModel]:
    x = random_images(init, ways * shots, seed=ways * 100 + shots)
    labels = [str(k) for k in range(ways) for _ in range(shots)]
    return lambda: adapt_fast(init, x, labels)


def _predict(model: AdaptedModel, x: torch.Tensor) -> Callable[[], object]:
    return lambda: model.predict_scores(x)


def _time_into(run: Callable[[], object], timings: list[float]) -> None:
    start = time.perf_counter()
    run()
    timings.append(1000 * (time.perf_counter() - start))


def main() -> None:
    """Print a markdown table: task, baseline ms, candidate ms, candidate / baseline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="initialization folder")
    parser.add_argument("--candidate", required=True, help="initialization folder")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    inits = [Initialization.load(args.baseline), Initialization.load(args.candidate)]
    names = [init.version for init in inits]
    print(f"| work | {names[0]} | {names[1]} | {names[1]} / {names[0]} |")
    print("|---|---|---|---|")
    rows: list[tuple[str, list[Callable[[], object]]]] = []
    for ways, shots in SHAPES:
        rows.append(
            (f"adapt {ways}-way {shots}-shot", [_adapt(init, ways, shots) for init in inits])
        )
    models = [_adapt(init, 5, 5)() for init in inits]
    queries = [random_images(init, QUERIES, seed=7) for init in inits]
    rows.append(
        (
            f"predict {QUERIES} images (5-way)",
            [_predict(m, q) for m, q in zip(models, queries, strict=True)],
        )
    )
    for name, runs in rows:
        timings: list[list[float]] = [[], []]
        for run in runs:
            run()  # warm-up: caches, allocator
        for _ in range(args.repeats):
            for index, run in enumerate(runs):  # interleaved: noise hits both alike
                _time_into(run, timings[index])
        base, cand = (statistics.median(t) for t in timings)
        print(f"| {name} | {base:.1f} ms | {cand:.1f} ms | {cand / base:.2f}x |")
    for ways in (5, 20):
        sizes = [_adapt(init, ways, 1)().nbytes / 1024 for init in inits]
        print(f"| adapted model, {ways} ways | {sizes[0]:.0f} KiB | {sizes[1]:.0f} KiB "
              f"| {sizes[1] / sizes[0]:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
