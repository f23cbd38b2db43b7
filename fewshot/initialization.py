"""Meta-learned initializations: parameters, learned step sizes and config, stored as safetensors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from fewshot.backbone import Conv4, init_backbone_params
from fewshot.config import ModelConfig
from fewshot.errors import CheckpointError
from fewshot.inner import HEAD_BIAS, HEAD_SCALE, HEAD_WEIGHT
from fewshot.plda import PLDA

FORMAT = "maml-serve/initialization/v1"
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
_STEP_PREFIX = "step_size."
_UNKNOWN_PREFIX = "unknown."


SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"


def shipped_initialization_path() -> Path:
    """The Omniglot initialization committed with the package (the service's default domain)."""
    return SHIPPED_DIR / "omniglot-conv4"


def shipped_photo_initialization_path() -> Path:
    """The photo (mini-ImageNet) initialization a new installation serves by default."""
    return SHIPPED_DIR / "photos-conv4"


def shipped_initialization_paths() -> list[Path]:
    """Every shipped initialization folder, the default domain's first, then by name.

    A domain's first folder in this order becomes its active version on a new installation.
    """
    others = sorted(
        p for p in SHIPPED_DIR.iterdir() if p.is_dir() and p != shipped_initialization_path()
    )
    return [shipped_initialization_path(), *others]


@dataclass
class Initialization:
    """Meta-parameters of the backbone and head temperature, plus per-layer, per-step step sizes."""

    config: ModelConfig
    params: dict[str, Tensor]
    step_sizes: dict[str, Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    # Tensors of the "unknown" score fitted to these weights (fewshot.plda: names start with
    # "unknown."); stored beside the weights, never passed to the backbone.
    unknown_tensors: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def random(cls, config: ModelConfig | None = None, seed: int = 0) -> Initialization:
        """A fresh, untrained initialization (the start of meta-training from scratch)."""
        config = config or ModelConfig()
        params = init_backbone_params(config, seed)
        # Unit temperature (plain squared distances, as in Prototypical Networks) learned
        # fastest in short trials; smaller ones slowed early meta-training.
        params[HEAD_SCALE] = torch.tensor(0.0)
        names = [*[n for n in params if not n.startswith("head.")], HEAD_WEIGHT, HEAD_BIAS]
        step_sizes = {n: torch.full((config.inner_steps,), config.inner_step_size) for n in names}
        return cls(config=config, params=params, step_sizes=step_sizes, metadata={})

    @property
    def version(self) -> str:
        """The version name recorded in the metadata, or "unversioned"."""
        return str(self.metadata.get("version", "unversioned"))

    def module(self) -> Conv4:
        """A Conv4 used only as a function of the parameter dicts (its own weights are unused)."""
        return Conv4(self.config)

    def to(self, device: str | torch.device) -> Initialization:
        """A copy with every tensor on `device`."""
        return Initialization(
            config=self.config,
            params={k: v.to(device) for k, v in self.params.items()},
            step_sizes={k: v.to(device) for k, v in self.step_sizes.items()},
            metadata=dict(self.metadata),
            unknown_tensors={k: v.to(device) for k, v in self.unknown_tensors.items()},
        )

    def save(self, folder: str | Path) -> Path:
        """Write weights.safetensors and config.json into `folder` (created if needed)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.params.items()}
        tensors.update(
            {_STEP_PREFIX + k: v.detach().cpu().contiguous() for k, v in self.step_sizes.items()}
        )
        tensors.update({k: v.detach().cpu().contiguous() for k, v in self.unknown_tensors.items()})
        tmp = folder / (WEIGHTS_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        tmp.replace(folder / WEIGHTS_FILE)
        document = {"format": FORMAT, "model": self.config.to_dict(), "metadata": self.metadata}
        tmp_config = folder / (CONFIG_FILE + ".tmp")
        tmp_config.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        tmp_config.replace(folder / CONFIG_FILE)
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> Initialization:
        """Read an initialization folder; checks names and shapes against the config (no pickle)."""
        folder = Path(folder)
        try:
            document = json.loads((folder / CONFIG_FILE).read_text())
            tensors = load_file(str(folder / WEIGHTS_FILE), device=str(device))
        except (OSError, json.JSONDecodeError, SafetensorError) as exc:
            raise CheckpointError(f"cannot read initialization at {folder}: {exc}") from exc
        if document.get("format") != FORMAT:
            raise CheckpointError(
                f"{folder / CONFIG_FILE}: unknown format {document.get('format')!r}"
            )
        config = ModelConfig.from_dict(document.get("model", {}))
        unknown = {k: v for k, v in tensors.items() if k.startswith(_UNKNOWN_PREFIX)}
        params = {
            k: v for k, v in tensors.items() if not k.startswith(_STEP_PREFIX) and k not in unknown
        }
        step_sizes = {
            k[len(_STEP_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_STEP_PREFIX)
        }
        expected = {name: tuple(p.shape) for name, p in Conv4(config).named_parameters()}
        expected[HEAD_SCALE] = ()
        got = {name: tuple(t.shape) for name, t in params.items()}
        if got != expected:
            missing = sorted(set(expected) - set(got))
            extra = sorted(set(got) - set(expected))
            raise CheckpointError(
                f"{folder / WEIGHTS_FILE} does not match its config: missing {missing}, unexpected {extra}"
                if missing or extra
                else f"{folder / WEIGHTS_FILE}: tensor shapes do not match its config"
            )
        try:
            plda = PLDA.from_tensors(unknown)
        except ValueError as exc:
            raise CheckpointError(f"{folder / WEIGHTS_FILE}: {exc}") from exc
        if plda is not None and plda.mean.shape[0] != config.feature_dim:
            raise CheckpointError(
                f"{folder / WEIGHTS_FILE}: the PLDA model is for {plda.mean.shape[0]}-d "
                f"embeddings, the backbone makes {config.feature_dim}-d ones"
            )
        return cls(
            config=config,
            params=params,
            step_sizes=step_sizes,
            metadata=document.get("metadata", {}),
            unknown_tensors=unknown,
        )
