"""fewshot: the framework-free MAML core of maml-serve (backbone, inner loop, meta-training, data)."""

from fewshot.adapted import AdaptedModel, adapt
from fewshot.config import MetaTrainConfig, ModelConfig
from fewshot.errors import CheckpointError, DatasetError, EpisodeError, FewShotError
from fewshot.images import decode_image, preprocess_images
from fewshot.initialization import Initialization, shipped_initialization_path

__all__ = [
    "AdaptedModel",
    "CheckpointError",
    "DatasetError",
    "EpisodeError",
    "FewShotError",
    "Initialization",
    "MetaTrainConfig",
    "ModelConfig",
    "adapt",
    "decode_image",
    "preprocess_images",
    "shipped_initialization_path",
]
