"""`maml-serve train` and `maml-serve evaluate`: the command line of the few-shot core."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fewshot.devices import resolve_device

if TYPE_CHECKING:
    from fewshot.data import ImageDataset
    from fewshot.initialization import Initialization

# torch and the core load inside the handlers, so `maml-serve --help` stays fast.
REPORT_SHAPES = ((5, 1), (5, 5), (20, 1), (20, 5))


def add_subcommands(sub: Any) -> None:
    """Register `train`, `evaluate`, `calibrate` and `pretrain` on an argparse subparsers object."""
    _add_train(sub)
    _add_evaluate(sub)
    _add_calibrate(sub)
    from fewshot.pretrain_cli import add_pretrain_subcommand

    add_pretrain_subcommand(sub)


def _add_train(sub: Any) -> None:
    """`maml-serve train`. Long because it declares every option of a run; nothing in it branches."""
    train = sub.add_parser(
        "train", help="meta-train an initialization (MAML) from an image dataset"
    )
    train.add_argument(
        "--data",
        required=True,
        help="dataset folder or zip (Omniglot layout or one folder per class)",
    )
    train.add_argument(
        "--out", default="runs/train", help="run folder (resumes if it holds a checkpoint)"
    )
    train.add_argument(
        "--holdout-groups", type=int, default=5, help="groups (alphabets) held out for validation"
    )
    train.add_argument(
        "--init", help="start from this initialization folder instead of from scratch"
    )
    train.add_argument("--iterations", type=int, default=10_000)
    train.add_argument(
        "--max-minutes", type=float, help="wall-clock budget; schedules follow whichever ends first"
    )
    train.add_argument(
        "--meta-batch", type=int, default=16, help="tasks per meta-batch at the smallest way count"
    )
    train.add_argument("--ways", type=int, nargs=2, default=(5, 20), metavar=("MIN", "MAX"))
    train.add_argument("--shots", type=int, nargs=2, default=(1, 5), metavar=("MIN", "MAX"))
    train.add_argument("--queries", type=int, default=5)
    train.add_argument("--steps", type=int, default=5, help="inner steps")
    train.add_argument("--step-size", type=float, default=0.1, help="initial inner step size")
    train.add_argument(
        "--no-lslr", action="store_true", help="keep step sizes fixed (no MAML++ LSLR)"
    )
    train.add_argument(
        "--inner-temperature",
        type=float,
        help="multiplier on the logits in the inner loop's support loss (default: the start's)",
    )
    train.add_argument(
        "--inner-label-smoothing", type=float, help="label smoothing of the support loss"
    )
    train.add_argument(
        "--inner-shift-views",
        type=int,
        help="also fit 4 copies of the support shifted by this many pixels (0: off)",
    )
    train.add_argument(
        "--softplus-steps", action="store_true", help="keep step sizes positive via softplus"
    )
    train.add_argument(
        "--reset-step-sizes",
        action="store_true",
        help="start the learned step sizes at --step-size instead of the start's",
    )
    train.add_argument(
        "--step-size-lr-factor",
        type=float,
        default=1.0,
        help="outer learning rate of the learned step sizes relative to --lr",
    )
    train.add_argument(
        "--head-step-size", type=float, help="with --reset-step-sizes: the head's starting size"
    )
    train.add_argument("--first-order", action="store_true", help="first-order MAML throughout")
    train.add_argument(
        "--first-order-fraction",
        type=float,
        default=0.5,
        help="share of the run before second order",
    )
    train.add_argument("--msl", action="store_true", help="MAML++ multi-step loss")
    train.add_argument("--mode", choices=("full", "head"), default="full")
    train.add_argument("--lr", type=float, default=1e-3, help="outer Adam learning rate")
    train.add_argument("--no-cosine", action="store_true")
    train.add_argument("--no-rotations", action="store_true")
    train.add_argument("--shift", type=int, default=0, help="random translation in pixels (0: off)")
    train.add_argument(
        "--within-group-fraction",
        type=float,
        default=0.0,
        help="share of meta-iterations with all classes from one group (alphabet)",
    )
    train.add_argument("--pooling", choices=("stride", "maxpool"), default="stride")
    train.add_argument("--val-every", type=int, default=500)
    train.add_argument("--val-episodes", type=int, default=200)
    train.add_argument(
        "--report-episodes", type=int, default=400, help="episodes per shape in the final report"
    )
    train.add_argument(
        "--calibration-episodes",
        type=int,
        default=40,
        help='tasks per shape to calibrate the "unknown" score on the validation groups (0: off)',
    )
    train.add_argument("--checkpoint-minutes", type=float, default=2.0)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto", help="auto, cpu or cuda")
    train.add_argument("--version", help="version name recorded in the initialization")
    train.set_defaults(handler=run_train)


def _add_evaluate(sub: Any) -> None:
    ev = sub.add_parser("evaluate", help="mean accuracy of an initialization over sampled episodes")
    ev.add_argument("--data", required=True, help="dataset folder or zip")
    ev.add_argument("--ways", type=int, required=True)
    ev.add_argument("--shots", type=int, required=True)
    ev.add_argument("--queries", type=int, default=5)
    ev.add_argument("--episodes", type=int, default=200)
    ev.add_argument("--init", help="initialization folder (default: the shipped one)")
    ev.add_argument("--mode", choices=("full", "head"), help="default: the initialization's own")
    ev.add_argument("--steps", type=int, help="inner steps (default: the initialization's)")
    ev.add_argument(
        "--within-group", action="store_true", help="draw each task's classes from one group"
    )
    ev.add_argument("--groups", nargs="*", help="only these groups (e.g. the validation alphabets)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ev.set_defaults(handler=run_evaluate)


def _add_calibrate(sub: Any) -> None:
    cal = sub.add_parser(
        "calibrate", help='calibrate the "unknown" score of an initialization on held-out groups'
    )
    cal.add_argument("--data", required=True, help="dataset folder or zip")
    cal.add_argument("--init", help="initialization folder (default: the shipped one)")
    cal.add_argument(
        "--groups", nargs="*", help="held-out groups (default: the init's validation_groups)"
    )
    cal.add_argument("--episodes", type=int, default=60, help="tasks per shot count and way count")
    cal.add_argument("--report-episodes", type=int, default=50, help="tasks per reported shape")
    cal.add_argument(
        "--threshold",
        type=float,
        default=0.01,
        help="default p-value threshold (0: 'unknown' only where a request or task asks)",
    )
    cal.add_argument(
        "--report-threshold",
        type=float,
        help="the report's threshold (default: --threshold, or 0.01 where that is 0)",
    )
    cal.add_argument(
        "--no-norm-check",
        dest="norm_check",
        action="store_false",
        help="score by prototype distance alone (default: with the pre-normalisation norm check)",
    )
    cal.add_argument(
        "--norm-share",
        type=float,
        help="of the threshold, to the norm check (default: fewshot.unknown.NORM_SHARE, 0.2)",
    )
    cal.add_argument("--out", help="write the calibrated initialization here (default: in place)")
    cal.add_argument(
        "--version",
        help="record the result as this new version (with its card); default: keep the version",
    )
    cal.set_defaults(handler=run_calibrate)


def report(
    init: Initialization, val: ImageDataset, episodes: int, device: str, seed: int = 2024
) -> dict[str, Any]:
    """Accuracy with 95% CI on the four standard Omniglot shapes (those the data allows)."""
    from fewshot.evaluate import evaluate_shapes

    results = evaluate_shapes(init, val, REPORT_SHAPES, episodes=episodes, seed=seed, device=device)
    return {f"{w}-way {k}-shot": r.to_dict() for (w, k), r in results.items()}


def run_train(args: argparse.Namespace) -> int:
    """Meta-train, report validation accuracy, and write the initialization folder."""
    from fewshot.card import write_model_card
    from fewshot.config import MetaTrainConfig, ModelConfig
    from fewshot.data import load_dataset, split_groups
    from fewshot.errors import FewShotError
    from fewshot.initialization import Initialization
    from fewshot.openset import unknown_report
    from fewshot.training import MetaTrainer
    from fewshot.unknown import calibration_of

    device = resolve_device(args.device)
    model = ModelConfig(pooling=args.pooling)
    data = load_dataset(args.data, model)
    train, val = split_groups(data, args.holdout_groups, seed=args.seed)
    cfg = MetaTrainConfig(
        iterations=args.iterations,
        meta_batch=args.meta_batch,
        ways=tuple(args.ways),
        shots=tuple(args.shots),
        queries=args.queries,
        inner_steps=args.steps,
        inner_step_size=args.step_size,
        learn_step_sizes=not args.no_lslr,
        inner_temperature=args.inner_temperature,
        inner_label_smoothing=args.inner_label_smoothing,
        inner_shift_views=args.inner_shift_views,
        step_size_transform="softplus" if args.softplus_steps else None,
        reset_step_sizes=args.reset_step_sizes,
        head_step_size=args.head_step_size,
        step_size_lr_factor=args.step_size_lr_factor,
        first_order_fraction=args.first_order_fraction,
        second_order=not args.first_order,
        multi_step_loss=args.msl,
        adapt_mode=args.mode,
        outer_lr=args.lr,
        cosine_annealing=not args.no_cosine,
        rotations=not args.no_rotations,
        shift=args.shift,
        within_group_fraction=args.within_group_fraction,
        seed=args.seed,
        val_every=args.val_every,
        val_episodes=args.val_episodes,
        checkpoint_every_s=args.checkpoint_minutes * 60,
        unknown_calibration_episodes=args.calibration_episodes,
        max_seconds=args.max_minutes * 60 if args.max_minutes else None,
        model=model,
    )
    start = Initialization.load(args.init) if args.init else None
    trainer = MetaTrainer(cfg, train, val, args.out, start=start, device=device)
    result = trainer.run()
    if result.initialization is None or result.path is None:
        return 1
    init = result.initialization
    init.metadata.update(
        {
            "version": args.version or Path(args.out).name,
            "command": "maml-serve " + shlex.join(sys.argv[1:]),
            "data": str(args.data),
            "validation_groups": val.group_names,
            "training_groups": train.group_names,
            "metrics": report(init, val, args.report_episodes, device),
        }
    )
    calibration = calibration_of(init)
    if calibration is not None:
        try:
            calibration.details["report"] = unknown_report(
                init, val, calibration, episodes=max(10, args.report_episodes // 10)
            )
        except (FewShotError, ValueError) as exc:  # a shape the validation data cannot supply
            calibration.details["report_skipped"] = str(exc)
        init.metadata["unknown"] = calibration.to_dict()
    init.metadata.pop("curve", None)
    init.save(result.path)
    write_model_card(result.path, init.metadata)
    print(json.dumps({"path": str(result.path), "metrics": init.metadata["metrics"]}, indent=2))
    return 0


def _advance(bar: Any, n: int) -> None:
    bar.update(n)


def run_evaluate(args: argparse.Namespace) -> int:
    """Print accuracy and 95% CI over sampled episodes, at the served steps and at 0 steps."""
    from tqdm import tqdm

    from fewshot.data import load_dataset
    from fewshot.errors import FewShotError
    from fewshot.evaluate import evaluate
    from fewshot.initialization import Initialization, shipped_initialization_path
    from fewshot.promotion import trained_groups

    device = resolve_device(args.device)
    try:
        init = Initialization.load(args.init or shipped_initialization_path())
        data = load_dataset(args.data, init.config)
        if args.groups:
            unknown = sorted(set(args.groups) - set(data.group_names))
            if unknown:
                raise FewShotError(
                    f"unknown group(s) {', '.join(unknown)}; the data has: "
                    + ", ".join(data.group_names)
                )
            data = data.subset_groups(args.groups)
        overlap = sorted(set(data.group_names) & set(trained_groups(init.metadata, data)))
        if overlap:
            print(
                f"warning: {init.version} was meta-trained on {len(overlap)} of these groups "
                f"({', '.join(overlap)}); its accuracy on them is not a held-out estimate",
                file=sys.stderr,
            )
        with tqdm(
            total=args.episodes, desc="evaluate", unit="episode", disable=args.no_progress
        ) as bar:
            result = evaluate(
                init.to(device),
                data,
                ways=args.ways,
                shots=args.shots,
                queries=args.queries,
                episodes=args.episodes,
                mode=args.mode,
                steps=args.steps,
                seed=args.seed,
                within_group=args.within_group,
                device=device,
                on_progress=lambda n: _advance(bar, n),
            )
    except (FewShotError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        steps_text = (
            f"{result.steps} steps"
            if result.chosen_steps_mean is None
            else f"steps chosen per task, mean {result.chosen_steps_mean:.1f}"
        )
        line = (
            f"{result.ways}-way {result.shots}-shot ({result.mode}, {steps_text}): "
            f"{100 * result.accuracy:.2f}% ± {100 * result.ci95:.2f} over {result.episodes} episodes"
        )
        if result.steps > 0 and result.accuracy_0_steps is not None:
            line += (
                f"; 0 steps: {100 * result.accuracy_0_steps:.2f}% ± {100 * (result.ci95_0_steps or 0):.2f}"
                f"; adaptation gain {100 * (result.adaptation_gain or 0):+.2f}"
                f" ± {100 * (result.adaptation_gain_ci95 or 0):.2f} points (paired)"
            )
        print(line)
    return 0


def _calibrate_command(args: argparse.Namespace, folder: Path, groups: list[str]) -> str:
    """The calibrate command line that reproduces this calibration, for the model card."""
    words = ["maml-serve", "calibrate", "--init", str(folder), "--data", args.data]
    words += ["--groups", *groups] if args.groups else []
    words += ["--episodes", str(args.episodes), "--threshold", str(args.threshold)]
    words += ["--report-episodes", str(args.report_episodes)]
    if args.report_threshold is not None:
        words += ["--report-threshold", str(args.report_threshold)]
    if args.norm_share is not None:
        words += ["--norm-share", str(args.norm_share)]
    words += [] if args.norm_check else ["--no-norm-check"]
    return shlex.join([*words, "--version", args.version])


def run_calibrate(args: argparse.Namespace) -> int:
    """Calibrate the unknown score on held-out groups; store it (and its report) in the metadata."""
    from fewshot.card import write_model_card
    from fewshot.data import load_dataset
    from fewshot.errors import FewShotError
    from fewshot.evaluate import head_embeddings_and_norms
    from fewshot.initialization import Initialization, shipped_initialization_path
    from fewshot.openset import calibrate_unknown, unknown_report
    from fewshot.promotion import overlapping_groups
    from fewshot.unknown import DEFAULT_THRESHOLD, METADATA_KEY, NORM_SHARE

    folder = Path(args.init) if args.init else shipped_initialization_path()
    if args.version and not args.out:
        print(
            "error: --version writes a new initialization: give it an --out folder", file=sys.stderr
        )
        return 2
    try:
        init = Initialization.load(folder)
        data = load_dataset(args.data, init.config)
        groups = args.groups or init.metadata.get("validation_groups")
        if not groups and len(data.group_names) == 1:
            # A held-out set of one group or none (mini-ImageNet's val zip: "val"): all of it.
            groups = data.group_names
        if not groups:
            raise FewShotError(
                "no --groups given and the initialization records no validation_groups"
            )
        unknown = sorted(set(groups) - set(data.group_names))
        if unknown:
            raise FewShotError(
                f"unknown group(s) {', '.join(unknown)}; the data has: {', '.join(data.group_names)}"
            )
        overlap = overlapping_groups(init.metadata, groups, data)
        if overlap:
            raise FewShotError(f"{init.version} was meta-trained on {', '.join(overlap)}")
        held = data.subset_groups(groups)
        # Head mode adapts no backbone layer: each image is embedded once for every task.
        embedded, norms = (
            head_embeddings_and_norms(init, held)
            if init.config.default_mode == "head"
            else (None, None)
        )
        calibration = calibrate_unknown(
            init, held, episodes=args.episodes, threshold=args.threshold, embedded=embedded,
            norm_check=args.norm_check, norms=norms,
            norm_share=NORM_SHARE if args.norm_share is None else args.norm_share,
        )  # fmt: skip
        shown = args.report_threshold
        if shown is None:
            shown = args.threshold or DEFAULT_THRESHOLD
        report = unknown_report(
            init, held, calibration, episodes=args.report_episodes, embedded=embedded,
            norms=norms, threshold=shown,
        )  # fmt: skip
        calibration.details = {
            **calibration.details,
            "groups": sorted(g for g in groups if g),
            "report": report,
        }
    except (FewShotError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    init.metadata[METADATA_KEY] = calibration.to_dict()
    out = Path(args.out) if args.out else folder
    if args.version and args.version != init.version:
        # Another calibration answers differently: a new version, never the old name.
        init.metadata["calibrated_from"] = init.version
        init.metadata["version"] = args.version
        init.metadata["calibration_command"] = _calibrate_command(args, folder, groups)
        init.save(out)
        for name in ("curve.png", "curve.json"):
            if (folder / name).is_file() and folder != out:
                shutil.copyfile(folder / name, out / name)
        write_model_card(out, init.metadata)
    else:
        init.save(out)
    print(json.dumps(calibration.details, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m fewshot.cli` (the same commands as `maml-serve`)."""
    parser = argparse.ArgumentParser(prog="fewshot")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
