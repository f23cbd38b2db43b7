"""Package an Omniglot pre-training run as the shipped handwriting initialization, with its card.

    python scripts/build_omniglot_initialization.py --run /work/runs/omni-pre \\
        --data ../shared/data/omniglot/images_background.zip \\
        --baseline fewshot/shipped/omniglot-conv4 --out fewshot/shipped/omniglot-conv4

Pretrain -> meta-train -> adapt: takes the run's best epoch (on the held-out alphabets), sets the
served inner loop (head steps from the prototypes on the support set and its shifted views,
per-class loss, learned step sizes), trains through that loop on within-alphabet and mixed
episodes (fewshot.metastage; resumable: the same command continues it), then scores the result
as served and at 0 steps on the same episodes, calibrates "unknown", compares it with the
baseline on the same episodes (fewshot.promotion's paired rule), and writes weights, config,
curve and model card.
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
from tqdm import tqdm

from fewshot.card import render_model_card
from fewshot.data import ImageDataset, load_dataset
from fewshot.devices import resolve_device
from fewshot.evaluate import (
    CARD_SHAPES,
    evaluate_head_cached,
    head_cached_scores,
    head_embeddings,
    head_embeddings_and_norms,
    shape_name,
)
from fewshot.fast import adapt_fast
from fewshot.initialization import Initialization
from fewshot.inner import HEAD_BIAS, HEAD_WEIGHT, raw_step_sizes
from fewshot.metastage import MetaStage, MetaStageConfig
from fewshot.openset import calibrate_unknown, fit_unknown_plda, unknown_report
from fewshot.pretrain import PretrainConfig, best_initialization
from fewshot.promotion import (
    DEFAULT_MARGIN,
    PromotionVerdict,
    ShapeComparison,
    overlapping_groups,
    paired_difference,
    verdict,
)
from fewshot.unknown import NORM_SHARE

BACKBONE_STEP = 1e-3
VALIDATION_GROUPS = ["Arcadian", "Cyrillic", "Early_Aramaic", "Latin", "Sanskrit"]

TARGETS = {
    "20-way 1-shot": 0.95,
    "20-way 1-shot within-alphabet": 0.90,
    "5-way 1-shot": 0.985,
    "20-way 5-shot": 0.985,
}


def serving_recipe(init: Initialization, args: argparse.Namespace) -> Initialization:
    """Handwriting: head steps on the support set and its shifted views, the same in training."""
    config = dataclasses.replace(
        init.config,
        domain="handwritten characters",
        default_mode="head",
        inner_steps=args.inner_steps,
        inner_step_size=args.step_size,
        inner_temperature=args.temperature,
        inner_label_smoothing=args.smoothing,
        inner_shift_views=args.shift_views,
        inner_loss_per_class=True,
        step_size_transform="softplus",
        step_candidates=(),
        support_fit_guard=True,
        view_shift=args.view_shift,
        unknown_distance=args.unknown_distance,
    )
    raw = raw_step_sizes(torch.full((args.inner_steps,), args.step_size), "softplus")
    # Served in head mode; a caller who asks for full adaptation moves the backbone only a
    # little (under the per-class loss a backbone step of the head's size would wreck it).
    tiny = raw_step_sizes(torch.full((args.inner_steps,), BACKBONE_STEP), "softplus")
    step_sizes = {
        name: (raw if name in (HEAD_WEIGHT, HEAD_BIAS) else tiny).clone()
        for name in [*init.step_sizes, HEAD_WEIGHT, HEAD_BIAS]
    }
    return Initialization(config, init.params, step_sizes, dict(init.metadata))


def compare_served(
    candidate: Initialization,
    active: Initialization,
    validation: ImageDataset,
    active_validation: ImageDataset,
    episodes: int,
    candidate_embedded: torch.Tensor | None = None,
) -> PromotionVerdict:
    """fewshot.promotion's paired rule on served head-mode accuracy, embeddings cached per image
    (the vmapped scorer re-embeds every view at every step: hours for 9-view handwriting)."""
    comparisons = []
    pairs = [(candidate, validation), (active, active_validation)]
    embedded = [
        candidate_embedded if candidate_embedded is not None else head_embeddings(*pairs[0]),
        head_embeddings(*pairs[1]),
    ]
    for ways, shots, within, _ in CARD_SHAPES:
        scores = [
            head_cached_scores(
                init, data, ways=ways, shots=shots, queries=5, episodes=episodes, seed=2024,
                within_group=within, embedded=cached,
            )[0]
            for (init, data), cached in zip(pairs, embedded, strict=True)
        ]  # fmt: skip
        difference, ci = paired_difference(scores[0], scores[1])
        comparisons.append(
            ShapeComparison(
                ways=ways, shots=shots, within_group=within, episodes=episodes,
                candidate=sum(scores[0]) / episodes, active=sum(scores[1]) / episodes,
                difference=difference, ci95=ci, margin=DEFAULT_MARGIN,
            )
        )  # fmt: skip
    groups = validation.group_names
    overlap = sorted(
        set(overlapping_groups(candidate.metadata, groups))
        | set(overlapping_groups(active.metadata, groups))
    )
    shapes = [(w, k, within) for w, k, within, _ in CARD_SHAPES]
    return verdict(
        comparisons, shapes, min_episodes=episodes, overlap=overlap, validation_groups=groups
    )


def timing(init: Initialization, data: ImageDataset, ways: int, shots: int) -> dict[str, float]:
    """Median milliseconds of one served adaptation (adapt_fast) and the adapted model's bytes."""
    times, model = [], None
    for r in range(15):
        idx = torch.cat(
            [
                torch.nonzero(data.targets == c).flatten()[r % 15 : r % 15 + shots]
                for c in range(ways)
            ]
        )
        x = data.images[idx].float().div(255.0)
        labels = [str(int(v)) for v in data.targets[idx]]
        start = time.perf_counter()
        model = adapt_fast(init, x, labels)
        times.append(time.perf_counter() - start)
    assert model is not None
    times.sort()
    return {"adapt_ms_p50": round(1000 * times[len(times) // 2], 2), "model_bytes": model.nbytes}


def plot(
    pre: list[dict[str, Any]], meta: list[dict[str, Any]], keys: tuple[str, str], path: Path
) -> None:
    """Pre-training loss and held-out accuracy per epoch, then the meta stage's, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not pre:  # meta-trained from an initialization: the stage's curve alone
        fig, right = plt.subplots(1, 1, figsize=(6, 4))
        _meta_panel(right, meta, keys)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 4))
    epochs = [p["epoch"] for p in pre]
    left.plot(epochs, [p["loss"] for p in pre])
    left.set_xlabel("pre-training epoch")
    left.set_ylabel("train loss (label-smoothed CE, 4 x 771 classes)")
    for key in keys:
        middle.plot(epochs, [100 * p[key] for p in pre], marker=".", label=key)
    middle.set_xlabel("pre-training epoch")
    middle.set_ylabel("% on held-out alphabets (prototypes)")
    middle.legend()
    _meta_panel(right, meta, keys)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _meta_panel(axes: Any, meta: list[dict[str, Any]], keys: tuple[str, str]) -> None:
    episodes = [p["episode"] for p in meta]
    for key in keys:
        axes.plot(episodes, [100 * p[key] for p in meta], marker="o", label=key)
    axes.set_xlabel("meta-stage episode")
    axes.set_ylabel("% on held-out alphabets (prototypes, 0 steps)")
    axes.legend()


def model_card(metadata: dict[str, Any], baseline: str) -> str:
    """The card: fewshot's (with adaptation timings), then the paired comparison with `baseline`."""
    card = render_model_card(metadata)
    verdict = metadata["promotion"]
    card += f"\n## Against {baseline} (same episodes, paired)\n\n"
    card += "| task | this version | baseline | difference |\n|---|---|---|---|\n"
    for c in verdict["comparisons"]:
        card += (
            f"| {shape_name(c['ways'], c['shots'], c['within_group'])} | "
            f"{100 * c['candidate']:.2f}% | {100 * c['active']:.2f}% | "
            f"{100 * c['difference']:+.2f} ± {100 * c['ci95']:.2f} |\n"
        )
    decision = "promote" if verdict["promote"] else "keep the baseline"
    card += f"\nVerdict: {decision} ({'; '.join(verdict['reasons'])})\n"
    return card + "\n![training curve](curve.png)\n"


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--run", help="pre-training run folder (maml-serve pretrain)")
    start.add_argument("--init", help="or an initialization folder to meta-train further")
    parser.add_argument("--work", help="the meta stage's folder (default: RUN/meta)")
    parser.add_argument("--data", required=True, help="the Omniglot background set (zip/folder)")
    parser.add_argument("--baseline", required=True, help="the version to beat (folder)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--version", default="omniglot-conv4-v4")
    parser.add_argument("--meta-episodes", type=int, default=3000)
    parser.add_argument(
        "--meta-minutes", type=float, help="stop the stage after this long (resume later)"
    )
    parser.add_argument("--meta-lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument(
        "--average-every",
        type=int,
        default=0,
        help="serve the mean of the meta stage's weights taken every N episodes (0: best snapshot)",
    )
    parser.add_argument(
        "--average-from", type=int, default=0, help="the first episode the average takes"
    )
    parser.add_argument("--meta-seed", type=int, default=0, help="the meta stage's episode seed")
    parser.add_argument("--meta-ways", type=int, default=20, help="classes per training episode")
    parser.add_argument("--val-every", type=int, default=250, help="validate every N episodes")
    parser.add_argument("--device", default="cpu", help="the meta stage's: cpu, cuda or auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    parser.add_argument("--step-lr-factor", type=float, default=1.0, help="step sizes' lr / lr")
    parser.add_argument("--augmentation", choices=("handwriting", "none"), default="handwriting")
    parser.add_argument("--within-fraction", type=float, default=0.5)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument(
        "--step-size", type=float, default=0.1, help="per-class loss: x N of a mean's"
    )
    parser.add_argument("--temperature", type=float, default=0.25)
    parser.add_argument("--smoothing", type=float, default=0.1)
    parser.add_argument("--shift-views", type=int, default=2)
    parser.add_argument(
        "--view-shift", type=int, default=0, help="test-time views: shifts up to this many px"
    )
    parser.add_argument(
        "--stage-view-shift",
        type=int,
        help="the meta stage's own views (default: --view-shift); serving takes --view-shift",
    )
    parser.add_argument(
        "--unknown-distance", choices=("relative", "absolute", "plda"), default="absolute",
        help="the unknown score's distance (ModelConfig.unknown_distance)",
    )  # fmt: skip
    parser.add_argument(
        "--plda-dim", type=int, default=128,
        help="with --unknown-distance plda: principal components the PLDA model keeps",
    )  # fmt: skip
    parser.add_argument(
        "--serve-shift-views",
        type=int,
        help="served head steps' shifted support views (default: --shift-views, the stage's)",
    )
    parser.add_argument(
        "--nuisance-shrinkage", type=float, default=1.0,
        help="served head starts as fewshot.nuisance's discriminant of the shifted support "
        "views, shrunk toward the prototypes by this weight (1: the prototype head)",
    )  # fmt: skip
    parser.add_argument("--episodes", type=int, default=1000, help="evaluation episodes per shape")
    parser.add_argument("--compare-episodes", type=int, default=400)
    parser.add_argument("--unknown-episodes", type=int, default=60, help="per calibrated shape")
    parser.add_argument(
        "--norm-share", type=float, default=NORM_SHARE, help="of the threshold, to the norm check"
    )
    parser.add_argument(
        "--report-episodes", type=int, default=100, help="unknown report, per shape"
    )
    parser.add_argument("--pretrain-command", default="", help="recorded in the card")
    return parser.parse_args()


def main() -> int:
    """Meta-train (or resume), evaluate, compare, calibrate and write the initialization."""
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = Initialization.load(args.baseline)  # before --out may overwrite it
    if args.run:
        init = serving_recipe(best_initialization(args.run), args)
        pretraining: dict[str, Any] = init.metadata.pop("pretraining")
        pre: dict[str, Any] | None = pretraining
        pre_cfg = PretrainConfig.from_dict(pretraining["config"])
        parent = None
    else:
        start = Initialization.load(args.init)
        parent = start.version
        init = serving_recipe(start, args)
        init.metadata = {}
        pre = None
        pre_cfg = PretrainConfig(
            model=init.config, augmentation=args.augmentation, val_ways=20, val_within_group=True
        )
    work = Path(args.work) if args.work else Path(args.run) / "meta"
    full = load_dataset(args.data, init.config)
    train_groups = [g for g in full.group_names if g not in VALIDATION_GROUPS]
    train, val = full.subset_groups(train_groups), full.subset_groups(VALIDATION_GROUPS)
    cfg = MetaStageConfig(
        episodes=args.meta_episodes, ways=args.meta_ways, shots=(1, 5), queries=5,
        lr=args.meta_lr, weight_decay=args.weight_decay, step_size_lr_factor=args.step_lr_factor,
        val_every=args.val_every, within_group_fraction=args.within_fraction, rotations=True,
        inner_steps=args.inner_steps, inner_step_size=args.step_size,
        average_every=args.average_every, average_from=args.average_from, seed=args.meta_seed,
        device=resolve_device(args.device),
        max_seconds=args.meta_minutes * 60 if args.meta_minutes else None,
    )  # fmt: skip
    if args.stage_view_shift is not None:
        # Views multiply the stage's compute; the served embedding takes its own below.
        init.config = dataclasses.replace(init.config, view_shift=args.stage_view_shift)
    stage = MetaStage(init, train, val, cfg, pre_cfg, work)
    bar = tqdm(total=cfg.episodes, initial=stage.episode, unit="episode", desc="meta stage")
    done = stage.run(
        on_validate=lambda p: print(json.dumps(p), flush=True),
        on_episode=lambda i, loss: bar.update(1),
    )
    bar.close()
    if not done:
        print("meta stage stopped at its time limit: run the same command to resume", flush=True)
        return 3
    init = stage.best_initialization()
    served_shift = args.shift_views if args.serve_shift_views is None else args.serve_shift_views
    # Each shifted support copy costs a support pass at adaptation time; serving may drop them.
    if args.nuisance_shrinkage < 1.0 and not served_shift:
        raise SystemExit("--nuisance-shrinkage below 1 needs shifted support views")
    init.config = dataclasses.replace(
        init.config,
        view_shift=args.view_shift,
        inner_shift_views=served_shift,
        nuisance_shrinkage=args.nuisance_shrinkage,
        unknown_distance=args.unknown_distance,
    )
    meta_info = init.metadata.pop("meta_stage")
    if args.unknown_distance == "plda":
        # Fitted on the training alphabets: calibration and the report read the held-out ones.
        init.unknown_tensors = fit_unknown_plda(init, train, args.plda_dim).to_tensors()

    metrics: dict[str, Any] = {}
    # Once: every shape's episodes, the comparison and the calibration read the same images.
    embedded, norms = head_embeddings_and_norms(init, val)
    for ways, shots, within, queries in CARD_SHAPES:
        name = shape_name(ways, shots, within)
        with tqdm(total=args.episodes, desc=name, file=sys.stderr) as progress:
            # Head mode: scored on embeddings cached per image, equal to serving (a test checks).
            result = evaluate_head_cached(
                init, val, ways=ways, shots=shots, queries=queries, episodes=args.episodes,
                seed=2024, within_group=within, on_progress=progress.update, embedded=embedded,
            )  # fmt: skip
        metrics[name] = result.to_dict()
        print(json.dumps({name: metrics[name]}), flush=True)

    baseline_val = load_dataset(args.data, baseline.config).subset_groups(VALIDATION_GROUPS)
    decision = compare_served(
        init, baseline, val, baseline_val, args.compare_episodes, candidate_embedded=embedded
    )
    print(json.dumps({"promotion": decision.to_dict()}), flush=True)

    calibration = calibrate_unknown(
        init, val, episodes=args.unknown_episodes, embedded=embedded, norms=norms,
        norm_share=args.norm_share,
    )  # fmt: skip
    calibration.details["groups"] = VALIDATION_GROUPS
    calibration.details["report"] = unknown_report(
        init, val, calibration, episodes=args.report_episodes, within_group_shapes=((20, 1),),
        embedded=embedded, norms=norms,
    )  # fmt: skip
    del embedded
    timings = {
        shape_name(w, k, False): timing(init, val, w, k)
        for w, k in ((5, 1), (5, 5), (20, 1), (20, 5))
    }
    minutes = (pre["minutes"] if pre else 0.0) + meta_info["minutes"]
    start_note = (
        f"pre-training: {len(pre['curve'])} epochs ({pre['minutes']:.0f} min), best at epoch "
        f"{pre['best']['epoch']}"
        if pre
        else f"started from {parent}"
    )
    init.metadata = {
        "version": args.version,
        "domain": "handwritten characters",
        "parent_version": parent,
        "command": " && ".join(
            c for c in (args.pretrain_command, shlex.join(["python", *sys.argv])) if c
        ),
        "data": "images_background.zip: the Omniglot background set (30 alphabets, 964 characters); "
        f"trained on {len(train_groups)} alphabets, chosen and scored on the 5 held out",
        "validation_groups": VALIDATION_GROUPS,
        "training_groups": train_groups,
        "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "wall_time_s": round(60 * minutes),
        "iterations": meta_info["best"]["episode"],
        "note": (
            f"Meta-train -> adapt; {start_note}; meta stage: "
            f"{cfg.episodes} episodes ({meta_info['minutes']:.0f} min), best at episode "
            f"{meta_info['best']['episode']}. Served: {args.inner_steps} head steps on the support set"
            + (
                f" and its {served_shift}-pixel shifted views, the loop trained through"
                if served_shift == args.shift_views
                else f" ({f'{served_shift}-pixel' if served_shift else 'no'} shifted views; the "
                f"stage trained through {args.shift_views}-pixel ones)"
            )
            + (
                "; the head starts as a discriminant that discounts the directions those views "
                f"move the embedding (shrinkage {args.nuisance_shrinkage})"
                if args.nuisance_shrinkage < 1.0
                else ""
            )
            + (
                f"; each image embedded as the mean of its {(2 * args.view_shift + 1) ** 2} "
                f"copies shifted by up to {args.view_shift} px."
                if args.view_shift
                else "."
            )
        ),
        "metrics": metrics,
        "targets": TARGETS,
        "timings": timings,
        "promotion": decision.to_dict(),
        "unknown": calibration.to_dict(),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "pretraining": (
            {"config": pre["config"], "best": pre["best"], "minutes": pre["minutes"]}
            if pre
            else None
        ),
        "meta_stage": {k: v for k, v in meta_info.items() if k != "curve"},
    }
    out = Path(args.out)
    init.save(out)
    curve = {"pretraining": pre["curve"] if pre else [], "meta_stage": meta_info["curve"]}
    (out / "curve.json").write_text(json.dumps(curve, indent=1))
    plot(curve["pretraining"], meta_info["curve"], pre_cfg.score_keys, out / "curve.png")
    card = model_card(init.metadata, baseline.version)
    (out / "README.md").write_text(card)
    print(json.dumps({"written": str(out), "promote": decision.promote}), flush=True)
    return 0 if decision.promote else 4


if __name__ == "__main__":
    raise SystemExit(main())
