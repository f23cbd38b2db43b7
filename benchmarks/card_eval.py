"""The model-card figures of an initialization on its held-out validation groups, in one JSON.

Per shape (5w1s, 5w5s, 20w1s, 20w5s; and Lake et al. 2015's within-alphabet 20-way 1-shot with
one query per class): accuracy at the served inner steps and at 0 steps on the SAME seeded
episodes, their paired difference, 95% intervals. Optionally the unknown-detection report at the
calibrated default threshold (needs a calibrated initialization: `fewshot.cli calibrate`).

    .venv/bin/python benchmarks/card_eval.py --init fewshot/shipped/omniglot-conv4 \\
        --data ../shared/data/omniglot/images_background.zip --episodes 1000 --out card.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fewshot.data import load_dataset
from fewshot.evaluate import CARD_SHAPES, evaluate, shape_name
from fewshot.initialization import Initialization
from fewshot.openset import unknown_report
from fewshot.unknown import calibration_of


def main() -> int:
    """Evaluate, print and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--unknown-episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    init = Initialization.load(args.init)
    groups = init.metadata["validation_groups"]
    data = load_dataset(args.data, init.config).subset_groups(groups)
    out: dict[str, object] = {"version": init.version, "groups": groups, "shapes": {}}
    shapes: dict[str, object] = {}
    for ways, shots, within, queries in CARD_SHAPES:
        name = shape_name(ways, shots, within)
        start = time.perf_counter()
        with tqdm(total=args.episodes, desc=name, file=sys.stderr) as bar:
            result = evaluate(
                init, data, ways=ways, shots=shots, queries=queries, episodes=args.episodes,
                seed=args.seed, within_group=within, on_progress=bar.update,
            )  # fmt: skip
        shapes[name] = {**result.to_dict(), "wall_s": round(time.perf_counter() - start, 1)}
        print(json.dumps({name: shapes[name]}), flush=True)
        out["shapes"] = shapes
        Path(args.out).write_text(json.dumps(out, indent=1))
    calibration = calibration_of(init)
    if calibration is not None and args.unknown_episodes > 0:
        out["unknown"] = unknown_report(init, data, calibration, episodes=args.unknown_episodes)
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
