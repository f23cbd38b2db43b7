"""Device names for training commands: "auto" means cuda when present."""

from __future__ import annotations


def resolve_device(name: str) -> str:
    """A torch device name: "auto" is cuda when present, else cpu; others pass through."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name
