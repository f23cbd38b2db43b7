"""Channels-last maps for CPU inference (fewshot.backbone.CHANNELS_LAST_ON_CPU): one served
adaptation and one 32-image prediction of each shipped initialization, with and without, timed
interleaved in one run, as ratios against the contiguous (NCHW) layout. Random images (speed does
not depend on content); medians of interleaved repeats, so machine noise hits both alike.

    .venv/bin/python -m benchmarks.bench_memory_format [--repeats 11] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

import fewshot.backbone as backbone
from benchmarks.bench_versions import random_images
from fewshot.fast import adapt_fast
from fewshot.initialization import Initialization, shipped_initialization_paths

SHAPES = ((5, 1), (5, 5), (5, 20))
QUERIES = 32


def _interleaved(run: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds of `run` with channels-last off and on, alternating, first repeat dropped."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for on in (False, True):
            backbone.CHANNELS_LAST_ON_CPU = on
            start = time.perf_counter()
            run()
            times[on].append(time.perf_counter() - start)
    backbone.CHANNELS_LAST_ON_CPU = True
    return statistics.median(times[False][1:]), statistics.median(times[True][1:])


def main() -> None:
    """Print a markdown table: initialization, work, ms in NCHW, ms channels-last, speed-up."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| initialization | work | NCHW | channels-last | speed-up |")
    print("|---|---|---|---|---|")
    for path in shipped_initialization_paths():
        init = Initialization.load(path)
        for ways, shots in SHAPES:
            x = random_images(init, ways * shots, seed=shots)
            labels = [str(i // shots) for i in range(ways * shots)]
            before, after = _interleaved(partial(adapt_fast, init, x, labels), args.repeats)
            _row(init.version, f"adapt {ways}-way {shots}-shot", before, after)
        model = adapt_fast(init, random_images(init, 25, seed=1), [str(i // 5) for i in range(25)])
        queries = random_images(init, QUERIES, seed=2)
        before, after = _interleaved(partial(model.predict_scores, queries), args.repeats)
        _row(init.version, f"predict {QUERIES} images", before, after)


def _row(version: str, work: str, before: float, after: float) -> None:
    print(
        f"| {version} | {work} | {1000 * before:.0f} ms | {1000 * after:.0f} ms | "
        f"{before / after:.2f}x |",
        flush=True,
    )


if __name__ == "__main__":
    main()
