"""Centring embeddings on the training classes' mean, folded into the last convolution.

SimpleShot (Wang et al. 2019, "SimpleShot: revisiting nearest-neighbor classification for
few-shot learning") subtracts the base classes' mean feature before L2-normalising ("CL2N"):
cosine prototypes then measure directions away from what every training image shares. Here
the mean is taken per channel of the last convolution's output; when nothing but max-pooling
and the read-out follow that convolution, subtracting a per-channel constant there is exactly
a change of its bias, so a centred backbone is an ordinary Conv4 (no new parameter, nothing
changes in serving). Measured on mini-ImageNet's validation classes (issue 19): +1.2 points
at 5-way 1-shot, +0.3 at 5-shot.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from fewshot.backbone import Conv4
from fewshot.initialization import Initialization


def last_conv_name(module: Conv4) -> str:
    """The parameter prefix of the last convolution, checked to be followed by no ReLU or norm."""
    layers = list(module.blocks)
    index = max(i for i, layer in enumerate(layers) if isinstance(layer, nn.Conv2d))
    after = layers[index + 1 :]
    if any(not isinstance(layer, nn.MaxPool2d) for layer in after):
        raise ValueError(
            "centring folds into the last convolution's bias only when max-pooling alone follows "
            "it (norm 'none' after folding BatchNorm, final_relu off)"
        )
    return f"blocks.{index}."


@torch.no_grad()
def channel_means(module: Conv4, images: Tensor, chunk: int = 512) -> Tensor:
    """Mean [C] over images, positions (and mirror views) of the last convolution's output.

    images: uint8 [n, C_in, H, W] at the backbone's input size.
    """
    module.eval()
    total = torch.zeros(())
    sums: Tensor | None = None
    prefix = last_conv_name(module)
    index = int(prefix.split(".")[1])
    body = nn.Sequential(*list(module.blocks)[: index + 1])
    for part in torch.split(images, chunk):
        x = module._views(part.float().div_(255.0))
        maps = body(x)  # [B, C, h, w]
        s = maps.sum(dim=(0, 2, 3))
        sums = s if sums is None else sums + s
        total = total + maps.shape[0] * maps.shape[2] * maps.shape[3]
    if sums is None:
        raise ValueError("channel_means needs at least one image")
    return sums / total


def centred(init: Initialization, images: Tensor) -> Initialization:
    """A copy of `init` whose embeddings are centred on the mean of `images` (training classes).

    Adds -mean to the last convolution's bias; config, step sizes and metadata are kept.
    """
    module = Conv4(init.config)
    module.load_state_dict({k: v for k, v in init.params.items() if not k.startswith("head.")})
    prefix = last_conv_name(module)
    mean = channel_means(module, images)
    params = {k: v.detach().clone() for k, v in init.params.items()}
    params[prefix + "bias"] = params[prefix + "bias"] - mean
    metadata = dict(init.metadata)
    metadata["centring"] = {"channels": int(mean.numel()), "images": int(images.shape[0])}
    return dataclasses.replace(init, params=params, metadata=metadata)
