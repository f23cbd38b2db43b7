"""Package a pre-training run as the shipped photo initialization, evaluated, with its model card.

    python scripts/build_photo_initialization.py --run runs/photo-pretrain \
        --train-data ../shared/data/miniimagenet/miniimagenet-train.zip \
        --val-data ../shared/data/miniimagenet/miniimagenet-val.zip \
        --out fewshot/shipped/photos-conv4

Takes the run's best epoch (on the validation classes), optionally runs the Meta-Baseline stage,
sets the serving recipe (mirror-averaged embeddings, centre-crop, head steps chosen per task),
scores 5-way 1/5/20-shot on the validation classes as served and at 0 steps (same episodes),
times one adaptation per shape, and writes weights, config, curve and README (model card).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fewshot.card import write_model_card
from fewshot.centering import centred
from fewshot.data import load_dataset
from fewshot.devices import bf16_emulation_warning, resolve_device
from fewshot.evaluate import evaluate_head_cached, head_embeddings_and_norms
from fewshot.fast import adapt_fast
from fewshot.initialization import Initialization
from fewshot.inner import HEAD_BIAS, HEAD_WEIGHT
from fewshot.metastage import MetaStageConfig, meta_stage
from fewshot.openset import calibrate_unknown, unknown_report
from fewshot.pretrain import PretrainConfig, best_initialization
from fewshot.unknown import NORM_SHARE

SHAPES = ((5, 1), (5, 5), (5, 20))
TARGETS = {"5-way 1-shot": 0.50, "5-way 5-shot": 0.68}


def serving_recipe(
    init: Initialization,
    head_step_size: float,
    candidates: list[int],
    temperature: float,
    crop_views: float = 0.0,
) -> None:
    """Photos: mirror- (and crop-) averaged embeddings, centre-crop, the head adapted with chosen steps."""
    init.config = dataclasses.replace(
        init.config,
        domain="photos",
        resize="center_crop",
        mirror_average=True,
        crop_views=crop_views,
        default_mode="head",
        step_candidates=tuple(candidates),
        inner_steps=max(candidates),
        inner_step_size=head_step_size,
        # Softer support logits keep the head's gradients alive where prototypes already fit.
        inner_temperature=temperature,
    )
    steps = init.config.inner_steps
    init.step_sizes = {
        name: torch.full((steps,), head_step_size if name in (HEAD_WEIGHT, HEAD_BIAS) else 0.0)
        for name in init.step_sizes
    }


def plot(curve: list[dict[str, Any]], meta: list[dict[str, Any]], path: Path) -> None:
    """Pre-training loss and validation accuracy per epoch, and the meta stage's per episode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if meta else 2, figsize=(15 if meta else 10, 4))
    left, middle = axes[0], axes[1]
    epochs = [p["epoch"] for p in curve]
    left.plot(epochs, [p["loss"] for p in curve], label="train loss (label-smoothed CE)")
    left.set_xlabel("pre-training epoch")
    left.legend()
    for key in ("val_5w1s", "val_5w5s"):
        middle.plot(epochs, [100 * p[key] for p in curve], marker=".", label=f"{key} (prototypes)")
    middle.set_xlabel("pre-training epoch")
    middle.set_ylabel("% on 16 validation classes")
    middle.legend()
    if meta:
        right = axes[2]
        episodes = [p["episode"] for p in meta]
        for key in ("val_5w1s", "val_5w5s"):
            right.plot(episodes, [100 * p[key] for p in meta], marker=".", label=f"{key} snapshot")
            averaged = [p for p in meta if f"average_{key}" in p]
            if averaged:
                right.plot(
                    [p["episode"] for p in averaged],
                    [100 * p[f"average_{key}"] for p in averaged],
                    marker="o",
                    label=f"{key} weight average",
                )
        right.set_xlabel("meta-stage episode (prototypes, mirror views)")
        right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def continued(folder: str) -> tuple[Initialization, dict[str, Any], dict[str, Any]]:
    """A built photo initialization ready for more meta stage, its pre-training record and its own.

    The served crop views are switched off for training (the builder sets them again after).
    """
    init = Initialization.load(folder)
    meta = init.metadata
    curves = json.loads((Path(folder) / "curve.json").read_text())
    pre = {
        **meta["pretraining"],
        "curve": curves["pretraining"],
        "minutes": meta["wall_time_s"] / 60,
    }
    parent = {
        "version": meta["version"],
        "command": meta["command"],
        "meta_stage": meta["meta_stage"],
        "curve": curves["meta_stage"],
    }
    init.config = dataclasses.replace(init.config, crop_views=0.0)
    init.metadata = {}
    return init, pre, parent


def timing(init: Initialization, data: Any, shots: int, repeats: int = 20) -> dict[str, float]:
    """Median seconds of one served adaptation (adapt_fast) and the adapted model's bytes."""
    times = []
    model = None
    for r in range(repeats):
        idx = torch.cat(
            [torch.nonzero(data.targets == c).flatten()[r : r + shots] for c in range(5)]
        )
        x = data.images[idx].float().div(255.0)
        labels = [str(int(v)) for v in data.targets[idx]]
        start = time.perf_counter()
        model = adapt_fast(init, x, labels)  # the served default: the init's mode and steps
        times.append(time.perf_counter() - start)
    assert model is not None
    times.sort()
    return {"adapt_ms_p50": 1000 * times[len(times) // 2], "model_bytes": float(model.nbytes)}


def main() -> int:
    """Build, evaluate and write the photo initialization."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--run", help="pre-training run folder")
    start.add_argument(
        "--from-init",
        help="continue the meta stage from this built photo initialization (its pre-training and "
        "meta-stage record carry over)",
    )
    parser.add_argument("--train-data", required=True)
    parser.add_argument("--val-data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--version", default="photos-conv4-v1")
    parser.add_argument("--meta-episodes", type=int, default=0, help="Meta-Baseline episodes")
    parser.add_argument("--head-step-size", type=float, default=0.1)
    parser.add_argument("--candidates", type=int, nargs="+", default=[0, 10, 25, 50, 100])
    parser.add_argument("--inner-temperature", type=float, default=0.5)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--pretrain-command", default="", help="recorded in the card")
    parser.add_argument(
        "--crop-views",
        type=float,
        default=0.0,
        help="serve five crops of this side fraction beside each image (applied after the meta stage)",
    )
    parser.add_argument(
        "--steps-min-shots", type=int, default=0, help="tasks with fewer shots keep 0 steps"
    )
    parser.add_argument(
        "--per-class-loss", action="store_true", help="head steps on the per-class support loss"
    )
    parser.add_argument("--meta-dir", help="the meta stage's folder (default: the run folder)")
    parser.add_argument("--meta-seed", type=int, default=0, help="the meta stage's episode seed")
    parser.add_argument(
        "--val-every",
        type=int,
        default=250,
        help="validate the meta stage every N episodes (the weights do not depend on it)",
    )
    parser.add_argument("--device", default="cpu", help="the meta stage's: cpu, cuda or auto")
    parser.add_argument(
        "--average-every",
        type=int,
        default=0,
        help="serve the mean of the meta stage's weights taken every N episodes (0: best snapshot)",
    )
    parser.add_argument(
        "--shift-views",
        type=int,
        default=0,
        help="head steps also fit the support shifted by this many pixels (0: the support alone)",
    )
    parser.add_argument(
        "--unknown-episodes", type=int, default=60, help="'unknown' calibration tasks per shape"
    )
    parser.add_argument(
        "--norm-share", type=float, default=NORM_SHARE, help="of the threshold, to the norm check"
    )
    parser.add_argument(
        "--center",
        action="store_true",
        help="centre embeddings on the training classes' mean (before and after the meta stage)",
    )
    parser.add_argument(
        "--meta-shots",
        type=int,
        nargs="+",
        default=[1, 5],
        help="the meta stage's shots a class, one drawn per episode",
    )
    parser.add_argument(
        "--meta-inner-steps",
        type=int,
        default=0,
        help="train through this many served head steps (learned sizes) in episodes of at least "
        "--steps-min-shots shots; must be the largest of --candidates (0: prototypes alone)",
    )
    parser.add_argument(
        "--meta-step-lr-factor",
        type=float,
        default=1.0,
        help="the learned head step sizes' learning rate, as a multiple of the stage's",
    )
    parser.add_argument(
        "--meta-frozen-blocks",
        type=int,
        default=0,
        help="the meta stage keeps this many first blocks as pre-trained (weights and statistics)",
    )
    parser.add_argument(
        "--meta-precision",
        choices=("fp32", "bf16"),
        default=None,
        help="the meta stage's forward passes (default: the pre-training run's last setting); "
        "bf16 pays only where the CPU does it natively",
    )
    args = parser.parse_args()
    if args.meta_inner_steps and args.meta_inner_steps != max(args.candidates):
        parser.error("--meta-inner-steps must equal the largest of --candidates")

    parent: dict[str, Any] | None = None
    if args.from_init:
        init, pre, parent = continued(args.from_init)
        if not args.meta_dir:
            parser.error("--from-init needs --meta-dir for the meta stage's checkpoints")
    else:
        init = best_initialization(args.run)
        pre = init.metadata.pop("pretraining")
    if not 0 <= args.meta_frozen_blocks <= init.config.depth:
        parser.error(f"--meta-frozen-blocks must be 0 to the backbone's {init.config.depth} blocks")
    serving_recipe(init, args.head_step_size, args.candidates, args.inner_temperature)
    val = load_dataset(args.val_data, init.config)
    meta_info: dict[str, Any] | None = None
    meta_minutes = 0.0
    train = load_dataset(args.train_data, init.config)
    # Every 6th training image (100 per class) pins the mean to well under its noise.
    sample = train.images[::6]
    if args.center:
        init = centred(init, sample)
    head_recipe = {
        "steps_min_shots": args.steps_min_shots,
        "inner_loss_per_class": args.per_class_loss,
        "inner_shift_views": args.shift_views,
    }
    if args.meta_inner_steps:
        # The stage trains through the very steps that serve (crop views stay off until after).
        init.config = dataclasses.replace(init.config, **head_recipe)
    if args.meta_episodes > 0:
        started = time.monotonic()
        cfg = MetaStageConfig(
            episodes=args.meta_episodes,
            shots=tuple(args.meta_shots),
            seed=args.meta_seed,
            average_every=args.average_every,
            val_every=args.val_every,
            device=resolve_device(args.device),
            inner_steps=args.meta_inner_steps,
            inner_step_size=args.head_step_size,
            steps_min_shots=args.steps_min_shots,
            step_size_lr_factor=args.meta_step_lr_factor,
            frozen_blocks=args.meta_frozen_blocks,
        )
        augment = PretrainConfig.from_dict(pre["config"])
        if args.meta_precision:
            augment = dataclasses.replace(augment, precision=args.meta_precision)
        warning = bf16_emulation_warning(augment.precision, cfg.device, "--meta-precision")
        if warning:
            print(f"meta stage: {warning}", file=sys.stderr)
        init = meta_stage(
            init, train, val, cfg, augment,
            args.meta_dir or args.run,
            on_validate=lambda p: print(json.dumps(p), flush=True),
        )  # fmt: skip
        meta_info = init.metadata.pop("meta_stage")
        meta_info["precision"] = augment.precision
        # The stage's own clock spans every session it was resumed in; this one's only the last.
        meta_minutes = float(meta_info.get("minutes", (time.monotonic() - started) / 60))
        if args.center:
            # The stage moves the mean a little: centre its result again.
            init = centred(init, sample)
    init.config = dataclasses.replace(init.config, crop_views=args.crop_views, **head_recipe)
    metrics: dict[str, Any] = {}
    # Head mode: each image embedded once (exact; 12 views an image make per-episode passes slow).
    embedded, norms = head_embeddings_and_norms(init, val)
    for ways, shots in SHAPES:
        result = evaluate_head_cached(
            init, val, ways=ways, shots=shots, queries=15, episodes=args.episodes, seed=shots,
            embedded=embedded,
        )  # fmt: skip
        metrics[f"{ways}-way {shots}-shot"] = result.to_dict()
        print(json.dumps({f"{ways}w{shots}s": result.to_dict()}), flush=True)
    # 5-way only: a calibration task needs twice its ways in classes (16 here).
    calibration = calibrate_unknown(
        init, val, ways=(5,), episodes=args.unknown_episodes, embedded=embedded, norms=norms,
        norm_share=args.norm_share,
    )  # fmt: skip
    calibration.details["report"] = unknown_report(
        init, val, calibration, shapes=[(w, k) for w, k in SHAPES], episodes=100,
        embedded=embedded, norms=norms,
    )  # fmt: skip
    del embedded
    print(json.dumps({"unknown": calibration.details["report"]}), flush=True)
    timings = {f"5-way {k}-shot": timing(init, val, k) for _, k in SHAPES}
    out = Path(args.out)
    centring = init.metadata.get("centring")
    minutes = pre["minutes"] + meta_minutes
    # The commands that built the starting point come first, so the card's command rebuilds it.
    earlier = [parent["command"]] if parent is not None else [args.pretrain_command]
    stage_note = (
        f"{args.meta_episodes} episodes ({meta_minutes:.0f} min"
        + (f", weights averaged every {args.average_every}" if args.average_every else "")
        + ")"
        if meta_info
        else "none"
    )
    if parent is not None:
        stage_note = f"{parent['version']}'s, then " + stage_note
    init.metadata = {
        "version": args.version,
        "domain": "photos",
        "command": " && ".join([*earlier, shlex.join(["python", *sys.argv])]),
        "data": "mini-ImageNet (Ravi & Larochelle split): trained on the 64 train classes, "
        "chosen and scored on the 16 validation classes (the 20 test classes never seen)",
        "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}",
        "wall_time_s": round(60 * minutes),
        "note": f"pre-training: best of {len(pre['curve'])} epochs at epoch {pre['best']['epoch']}; "
        f"meta stage: {stage_note}; {minutes:.0f} min of training in all",
        "metrics": metrics,
        "targets": TARGETS,
        "timings": timings,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "pretraining": {"config": pre["config"], "best": pre["best"]},
        "meta_stage": meta_info,
        "centring": centring,
        "unknown": calibration.to_dict(),
    }
    if parent is not None:
        init.metadata["parent_version"] = parent["version"]
        init.metadata["parent_meta_stage"] = parent["meta_stage"]
    init.save(out)
    meta_curve = (meta_info or {}).get("curve", [])
    if parent is not None:
        # The parent's stage up to the weights it kept, then this continuation.
        kept = int(parent["meta_stage"]["best"]["episode"])
        before = [p for p in parent["curve"] if p["episode"] <= kept]
        meta_curve = before + [{**p, "episode": kept + p["episode"]} for p in meta_curve]
    curve = {"pretraining": pre["curve"], "meta_stage": meta_curve}
    (out / "curve.json").write_text(json.dumps(curve, indent=1))
    plot(curve["pretraining"], curve["meta_stage"], out / "curve.png")
    write_model_card(out, init.metadata)
    print(json.dumps({"written": str(out), "metrics": metrics, "timings": timings}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
