"""Pre-training pieces: BatchNorm folded for serving, augmentation shapes, a resumable epoch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fewshot.backbone import Conv4, fold_batch_norm
from fewshot.config import ModelConfig
from fewshot.data import ImageDataset
from fewshot.pretrain import PretrainConfig, Pretrainer, augment, best_initialization

PHOTO = ModelConfig(
    in_channels=3, image_size=16, width=8, pooling="maxpool", readout="flatten",
    final_relu=False, feature_norm="l2", invert=False,
)  # fmt: skip


def test_folded_batch_norm_gives_the_same_embeddings_per_image() -> None:
    config = ModelConfig(**{**PHOTO.to_dict(), "norm": "batch"})
    torch.manual_seed(0)
    net = Conv4(config)
    net.train()
    for _ in range(3):  # running statistics away from their start
        net(torch.rand(32, 3, 16, 16) * 2)
    net.eval()
    params, folded = fold_batch_norm(net.state_dict(), config)
    assert folded.norm == "none"
    x = torch.rand(5, 3, 16, 16)
    plain = Conv4(folded)
    expected = net(x)
    assert torch.allclose(plain.forward_with(params, x), expected, atol=1e-5)
    # Each image alone gives what it gives in the batch.
    assert torch.allclose(plain.forward_with(params, x[2:3]), expected[2:3], atol=1e-5)


def test_augment_crops_to_the_input_size_in_range() -> None:
    cfg = PretrainConfig(model=PHOTO)
    images = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8)
    out = augment(images, cfg, torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 16, 16) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def _tiny_data(classes: int, per_class: int, seed: int) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (classes * per_class, 3, 16, 16), dtype=torch.uint8, generator=g)
    targets = torch.arange(classes).repeat_interleave(per_class)
    return ImageDataset(images, targets, [f"c{i}" for i in range(classes)], [""] * classes)


def test_a_run_resumes_where_it_stopped_and_exports_a_folded_initialization(
    tmp_path: Path,
) -> None:
    model = ModelConfig(**{**PHOTO.to_dict(), "norm": "batch"})
    cfg = PretrainConfig(model=model, epochs=2, batch_size=16, val_episodes=5, val_queries=2)
    train, val = _tiny_data(6, 16, 0), _tiny_data(5, 8, 1)
    first = Pretrainer(train, val, cfg, tmp_path)
    first.cfg.max_seconds = 0.0  # stops before its first epoch
    assert first.run() is False and first.epoch == 0
    first.cfg.max_seconds = None
    first.cfg.epochs = 1
    assert first.run() is True and first.epoch == 1
    again = Pretrainer(
        train,
        val,
        PretrainConfig(model=model, epochs=2, batch_size=16, val_episodes=5, val_queries=2),
        tmp_path,
    )
    assert again.epoch == 1  # resumed from the checkpoint
    assert again.run() is True and len(again.curve) == 2
    init = best_initialization(tmp_path)
    assert init.config.norm == "none"
    features = init.module().forward_with(init.params, torch.rand(2, 3, 16, 16))
    assert features.shape == (2, model.feature_dim)


def test_bf16_training_runs_in_autocast_and_keeps_float32_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = ModelConfig(**{**PHOTO.to_dict(), "norm": "batch"})
    cfg = PretrainConfig(
        model=model, epochs=1, batch_size=16, val_episodes=5, val_queries=2, precision="bf16"
    )
    trainer = Pretrainer(_tiny_data(6, 16, 0), _tiny_data(5, 8, 1), cfg, tmp_path)
    seen: list[torch.dtype] = []
    classify = trainer.classifier.forward

    def spy(features: torch.Tensor) -> torch.Tensor:
        logits = classify(features)
        seen.append(logits.dtype)
        return logits

    monkeypatch.setattr(trainer.classifier, "forward", spy)
    before = {k: v.clone() for k, v in trainer.backbone.state_dict().items()}
    loss = trainer.train_epoch()
    assert seen and all(d == torch.bfloat16 for d in seen), seen
    assert math.isfinite(loss)
    after = trainer.backbone.state_dict()
    assert all(v.dtype in (torch.float32, torch.int64) for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert PretrainConfig.from_dict(cfg.to_dict()).precision == "bf16"


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu sse2 avx2 fma", False),
        ("fpu avx512f avx512_bf16", True),
        ("fpu amx_bf16 amx_tile", True),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path, flags: str, native: bool) -> None:
    from fewshot.devices import cpu_has_native_bf16

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\n")
    assert cpu_has_native_bf16(str(cpuinfo)) is native
    (tmp_path / "bare").write_text("processor\t: 0\n")
    assert cpu_has_native_bf16(str(tmp_path / "bare")) is None
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is None


def test_pretrain_warns_when_bf16_would_be_emulated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fewshot.devices
    from fewshot.cli import main

    monkeypatch.setattr(fewshot.devices, "cpu_has_native_bf16", lambda: False)
    # No data: the command stops after the check, at loading.
    with pytest.raises((SystemExit, FileNotFoundError, ValueError)):
        main(["pretrain", "--data", str(tmp_path / "none.zip"), "--val-data", str(tmp_path / "none.zip"),
              "--out", str(tmp_path / "run"), "--precision", "bf16"])  # fmt: skip
    assert "no native bf16" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("precision", "device", "native", "warned"),
    [
        ("bf16", "cpu", False, True),
        ("bf16", "cpu", True, False),
        ("bf16", "cpu", None, False),
        ("bf16", "cuda", False, False),
        ("fp32", "cpu", False, False),
    ],
)
def test_bf16_emulation_warning_names_the_flag_only_where_bf16_is_emulated(
    monkeypatch: pytest.MonkeyPatch, precision: str, device: str, native: bool | None, warned: bool
) -> None:
    import fewshot.devices

    monkeypatch.setattr(fewshot.devices, "cpu_has_native_bf16", lambda: native)
    warning = fewshot.devices.bf16_emulation_warning(precision, device, "--meta-precision")
    assert (warning is not None) is warned
    if warning:
        assert "--meta-precision fp32" in warning and "no native bf16" in warning
