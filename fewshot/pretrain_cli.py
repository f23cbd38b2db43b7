"""`maml-serve pretrain`: supervised pre-training of a backbone (fewshot.pretrain), resumable."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_pretrain_subcommand(sub: Any) -> None:
    """Register `pretrain` on an argparse subparsers object."""
    pre = sub.add_parser(
        "pretrain",
        help="pre-train a backbone as an all-classes cosine classifier (resumes its run folder)",
    )
    pre.add_argument("--data", required=True, help="training classes: folder or zip")
    pre.add_argument("--val-data", help="validation classes: folder or zip (or --val-groups)")
    pre.add_argument("--out", default="runs/pretrain", help="run folder (resumes its checkpoint)")
    pre.add_argument("--epochs", type=int, default=40)
    pre.add_argument("--batch-size", type=int, default=128)
    pre.add_argument("--lr", type=float, default=0.05)
    pre.add_argument("--weight-decay", type=float, default=5e-4)
    pre.add_argument("--label-smoothing", type=float, default=0.1)
    pre.add_argument("--jitter", type=float, default=0.4, help="colour jitter strength (0: off)")
    pre.add_argument("--crop-area", type=float, nargs=2, default=(0.3, 1.0), metavar=("MIN", "MAX"))
    pre.add_argument("--channels", type=int, default=3, help="1: greyscale, 3: RGB")
    pre.add_argument("--image-size", type=int, default=42)
    pre.add_argument("--width", type=int, default=64)
    pre.add_argument("--norm-groups", type=int, default=8)
    pre.add_argument(
        "--norm",
        choices=("group", "batch"),
        default="group",
        help="batch: BatchNorm while pre-training, folded into the convolutions for serving",
    )
    pre.add_argument("--pooling", choices=("stride", "maxpool"), default="maxpool")
    pre.add_argument("--readout", choices=("mean", "flatten"), default="flatten")
    pre.add_argument("--invert", action="store_true", help="invert images (dark strokes on white)")
    pre.add_argument("--max-minutes", type=float, help="stop after this long (resume later)")
    pre.add_argument("--val-episodes", type=int, default=300)
    pre.add_argument("--val-ways", type=int, default=5)
    pre.add_argument(
        "--val-within-group", action="store_true", help="validation episodes within one group"
    )
    pre.add_argument(
        "--augmentation",
        choices=("photo", "handwriting"),
        default="photo",
        help="photo: crops, flips, colour; handwriting: affine warps and stroke width",
    )
    pre.add_argument(
        "--rotation-classes", action="store_true", help="90-degree turns of a class are new classes"
    )
    pre.add_argument(
        "--val-groups", nargs="+", help="with one --data: hold out these groups for validation"
    )
    pre.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: autocast forward passes (about 2x faster on CPUs with AMX or AVX512-BF16)",
    )
    pre.add_argument(
        "--crop-aspect", type=float, nargs=2, default=(3 / 4, 4 / 3), metavar=("MIN", "MAX")
    )
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when present)")
    pre.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    pre.set_defaults(handler=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    """Pre-train (or resume) and print each epoch's validation accuracy as JSON lines."""
    import torch
    from tqdm import tqdm

    from fewshot.config import ModelConfig
    from fewshot.data import load_dataset
    from fewshot.devices import bf16_emulation_warning, resolve_device
    from fewshot.pretrain import PretrainConfig, Pretrainer

    device = resolve_device(args.device)
    warning = bf16_emulation_warning(args.precision, device, "--precision")
    if warning:
        print(f"pretrain: {warning}", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ModelConfig(
        in_channels=args.channels, image_size=args.image_size, width=args.width,
        norm_groups=args.norm_groups, norm=args.norm, pooling=args.pooling, readout=args.readout,
        invert=args.invert, final_relu=False, feature_norm="l2",
        inner_steps=0, inner_step_size=0.0,
    )  # fmt: skip
    cfg = PretrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
        jitter=args.jitter, crop_area=tuple(args.crop_area), val_episodes=args.val_episodes,
        seed=args.seed, model=model, val_ways=args.val_ways,
        val_within_group=args.val_within_group, augmentation=args.augmentation,
        rotation_classes=args.rotation_classes, precision=args.precision,
        crop_aspect=tuple(args.crop_aspect), device=device,
        max_seconds=args.max_minutes * 60 if args.max_minutes else None,
    )  # fmt: skip
    train = load_dataset(args.data, model)
    if args.val_groups:
        val = train.subset_groups(args.val_groups)
        train = train.subset_groups([g for g in train.group_names if g not in args.val_groups])
    elif args.val_data:
        val = load_dataset(args.val_data, model)
    else:
        raise SystemExit("pretrain: give --val-data or --val-groups")
    trainer = Pretrainer(train, val, cfg, args.out)
    bar = tqdm(total=cfg.epochs, initial=trainer.epoch, unit="epoch", desc="pretrain")
    inner = tqdm(leave=False, unit="step")

    def on_step(i: int, n: int, loss: float) -> None:
        inner.total = n
        inner.n = i
        inner.set_postfix(loss=f"{loss:.3f}", refresh=i % 20 == 0)

    def on_epoch(point: dict[str, Any]) -> None:
        bar.update(1)
        bar.set_postfix({k: f"{point[k]:.3f}" for k in cfg.score_keys})
        print(json.dumps(point), flush=True)

    done = trainer.run(on_epoch=on_epoch, on_step=on_step)
    inner.close()
    bar.close()
    print(json.dumps({"done": done, "best": trainer.best}), flush=True)
    return 0
