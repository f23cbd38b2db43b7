"""The Conv4 backbone of MAML (Finn et al. 2017) with per-image normalisation."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C._functorch import is_batchedtensor

from fewshot.config import ModelConfig


def resize_matrix(size: int, crop: int) -> Tensor:
    """[size, crop] matrix M with M @ v the bilinear resize of a length-`crop` signal to `size`."""
    eye = torch.eye(crop).view(crop, 1, crop)
    rows = F.interpolate(eye, size=size, mode="linear", align_corners=False)  # [crop, 1, size]
    return rows.view(crop, size).T.contiguous()


# First-layer activations (floats) per pass when an image is read as several views: a few MB of
# maps stay in cache, so a pass of a few images beats one of thousands of views (2-3x for 9-view
# handwriting and 12-view photos: benchmarks/bench_views.py), and memory stays bounded.
ACTIVATIONS_PER_PASS = 1_000_000

# Inference on a CPU runs the convolutions on channels-last (NHWC) maps: ~1.8x faster for the
# 3-channel photo trunk, level for handwriting (benchmarks/bench_memory_format.py).
CHANNELS_LAST_ON_CPU = True


def serving_layout(x: Tensor) -> Tensor:
    """Maps [B, C, H, W] in the layout the convolutions run fastest in: channels-last on a CPU
    without autograd, unchanged otherwise (training keeps its layout, and under vmap a memory
    format cannot be asked for)."""
    if (
        not CHANNELS_LAST_ON_CPU
        or x.device.type != "cpu"
        or x.dim() != 4
        or torch.is_grad_enabled()
        or is_batchedtensor(x)
    ):
        return x
    return x.contiguous(memory_format=torch.channels_last)


def shifted_copies(x: Tensor, radius: int) -> list[Tensor]:
    """Images [..., H, W] shifted by every offset (dy, dx) in [-radius, radius]^2 other than
    (0, 0), row-major, with zero fill: (2r + 1)^2 - 1 tensors [..., H, W] (vmap-safe slices)."""
    height, width = x.shape[-2], x.shape[-1]
    padded = F.pad(x, (radius, radius, radius, radius))
    offsets = range(-radius, radius + 1)
    return [
        padded[..., radius + dy : radius + dy + height, radius + dx : radius + dx + width]
        for dy in offsets
        for dx in offsets
        if (dy, dx) != (0, 0)
    ]


def five_crops(x: Tensor, fraction: float) -> list[Tensor]:
    """The centre and four corner crops of images [..., H, W] (`fraction` of each side),
    each resized back to [..., H, W] by separable bilinear interpolation (vmap-safe matmuls)."""
    height, width = x.shape[-2], x.shape[-1]
    ch, cw = round(height * fraction), round(width * fraction)
    rh = resize_matrix(height, ch).to(x.dtype)
    rw = resize_matrix(width, cw).to(x.dtype)
    oh, ow = height - ch, width - cw
    corners = [(oh // 2, ow // 2), (0, 0), (0, ow), (oh, 0), (oh, ow)]
    return [rh @ x[..., a : a + ch, b : b + cw] @ rw.T for a, b in corners]


class Conv4(nn.Module):
    """Four [conv3x3, GroupNorm, ReLU, downsample] blocks, then a read-out (mean or flatten).

    Input [B, C, H, W] (C = config.in_channels); output [B, config.feature_dim] embeddings,
    unit-length with config.feature_norm == "l2".
    GroupNorm replaces MAML's batch-statistics BatchNorm so a prediction never depends on
    the other images in its batch, and so second-order gradients under vmap stay exact.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = config.in_channels
        stride = 2 if config.pooling == "stride" else 1
        self.stride = stride
        self.readout = config.readout
        self.feature_norm = config.feature_norm
        self.mirror_average = config.mirror_average
        self.crop_views = config.crop_views
        self.view_shift = config.view_shift
        self.image_size, self.width = config.image_size, config.width
        for block in range(config.depth):
            layers.append(nn.Conv2d(channels, config.width, 3, stride=stride, padding=1))
            if config.norm == "group":
                layers.append(nn.GroupNorm(config.norm_groups, config.width))
            elif config.norm == "batch":
                layers.append(nn.BatchNorm2d(config.width))
            if config.final_relu or block < config.depth - 1:
                layers.append(nn.ReLU())
            if config.pooling == "maxpool":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            channels = config.width
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Embed images [B, C, H, W] into [B, config.feature_dim]."""
        return self._read_out(self.blocks(self._views(x)))[0]

    @property
    def first_map_size(self) -> int:
        """Floats in one view's first feature map (width x side^2, before any pooling)."""
        side = self.image_size if self.stride == 1 else (self.image_size + 1) // 2
        return self.width * side * side

    @property
    def view_count(self) -> int:
        """How many views of each image are embedded and averaged (1: the image alone)."""
        shifts = (2 * self.view_shift + 1) ** 2
        return shifts * (6 if self.crop_views > 0 else 1) * (2 if self.mirror_average else 1)

    def _views(self, x: Tensor) -> Tensor:
        # Images [B, C, H, W] -> their views stacked view-major: [V * B, C, H, W].
        views = [x]
        if self.view_shift > 0:
            views += shifted_copies(x, self.view_shift)
        if self.crop_views > 0:
            views += [c for v in views for c in five_crops(v, self.crop_views)]
        if self.mirror_average:
            views += [v.flip(-1) for v in views]
        return torch.cat(views, dim=-4) if len(views) > 1 else x

    def _read_out(self, maps: Tensor) -> tuple[Tensor, Tensor]:
        # (embeddings [B, D], their norms before any normalisation [B], averaged over views)
        out = maps.flatten(-3) if self.readout == "flatten" else maps.mean(dim=(-2, -1))
        norms = out.norm(dim=-1)
        if self.feature_norm == "l2":
            out = F.normalize(out, dim=-1)
        if self.view_count > 1:
            # The mean of an image's views' embeddings: a function of that one image, so
            # predictions stay independent of the rest of the batch.
            out = out.reshape(*out.shape[:-2], self.view_count, -1, out.shape[-1]).mean(dim=-3)
            norms = norms.reshape(*norms.shape[:-1], self.view_count, -1).mean(dim=-2)
            if self.feature_norm == "l2":
                out = F.normalize(out, dim=-1)
        return out, norms

    def forward_with(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """forward() with `params` (same names) in place of the module's own weights.

        Plain torch.nn.functional calls: the same result as torch.func.functional_call without
        swapping the module's parameters on every call, which dominates small-task adaptation.
        Works under torch.func.grad and vmap.
        """
        return self.forward_with_norms(params, x)[0]

    def forward_with_norms(self, params: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        """forward_with's embeddings [B, D] and their norms [B] before normalisation (the mean
        over an image's views): how strongly the trunk responds, which the unit-length
        embedding hides (fewshot.unknown's familiarity check reads it)."""
        per_pass = max(1, ACTIVATIONS_PER_PASS // (self.view_count * self.first_map_size))
        if self.view_count > 1 and x.shape[0] > per_pass:
            parts = [self._forward_views(params, p) for p in torch.split(x, per_pass)]
            return torch.cat([f for f, _ in parts]), torch.cat([n for _, n in parts])
        return self._forward_views(params, x)

    def _forward_views(self, params: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        x = serving_layout(self._views(x))
        for index, layer in enumerate(self.blocks):
            prefix = f"blocks.{index}."
            if isinstance(layer, nn.Conv2d):
                x = F.conv2d(
                    x,
                    params[prefix + "weight"],
                    params[prefix + "bias"],
                    layer.stride,
                    layer.padding,
                )
            elif isinstance(layer, nn.GroupNorm):
                x = F.group_norm(
                    x,
                    layer.num_groups,
                    params[prefix + "weight"],
                    params[prefix + "bias"],
                    layer.eps,
                )
            elif isinstance(layer, nn.BatchNorm2d):
                raise ValueError(
                    "batch-statistics BatchNorm is for pre-training only; fold it "
                    "(fewshot.backbone.fold_batch_norm) before adapting or serving"
                )
            else:
                x = layer(x)
        return self._read_out(x)


def fold_batch_norm(
    state: Mapping[str, Tensor], config: ModelConfig
) -> tuple[dict[str, Tensor], ModelConfig]:
    """Fold a BatchNorm Conv4's frozen statistics into its convolutions: a norm-free Conv4.

    In eval mode BatchNorm is the affine map y = (x - mean) * g / sqrt(var + eps) + b per
    channel, so conv then BN equals one conv with weights w * s and bias (c - mean) * s + b,
    s = g / sqrt(var + eps): the same outputs, and each image's independent of its batch.
    Returns the parameters under the names of Conv4(config with norm "none") and that config.
    """
    folded_config = dataclasses.replace(config, norm="none")
    source = Conv4(config)
    target_names = [n for n, _ in Conv4(folded_config).named_parameters()]
    params: list[Tensor] = []
    layers = list(source.blocks)
    for index, layer in enumerate(layers):
        if not isinstance(layer, nn.Conv2d):
            continue
        weight, bias = state[f"blocks.{index}.weight"], state[f"blocks.{index}.bias"]
        norm = layers[index + 1]
        if isinstance(norm, nn.BatchNorm2d):
            p = f"blocks.{index + 1}."
            scale = state[p + "weight"] / torch.sqrt(state[p + "running_var"] + norm.eps)
            weight = weight * scale.view(-1, 1, 1, 1)
            bias = (bias - state[p + "running_mean"]) * scale + state[p + "bias"]
        params += [weight.detach().clone(), bias.detach().clone()]
    return dict(zip(target_names, params, strict=True)), folded_config


def init_backbone_params(config: ModelConfig, seed: int) -> dict[str, Tensor]:
    """Fresh backbone parameters: Kaiming-normal convolutions, zero biases, unit norms."""
    generator = torch.Generator().manual_seed(seed)
    module = Conv4(config)
    params: dict[str, Tensor] = {}
    for name, value in module.named_parameters():
        if value.dim() == 4:
            fan_in = value.shape[1] * value.shape[2] * value.shape[3]
            std = (2.0 / fan_in) ** 0.5
            params[name] = torch.randn(value.shape, generator=generator) * std
        elif name.endswith("bias"):
            params[name] = torch.zeros(value.shape)
        else:
            params[name] = torch.ones(value.shape)
    return params


_local = threading.local()


def shared_module(config: ModelConfig) -> Conv4:
    """A Conv4 for functional calls, built once per config and thread.

    functional_call swaps the module's parameters while it runs, so threads must not share one.
    """
    cache: dict[ModelConfig, Conv4] = _local.__dict__.setdefault("modules", {})
    module = cache.get(config)
    if module is None:
        module = cache[config] = Conv4(config)
    return module
