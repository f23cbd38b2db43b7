"""The ML core's serving API: everything the service (`app`) uses, and nothing private.

Load an initialization, adapt it to a support set (one task, or many sharing passes), predict
with calibrated "unknown" scores, diagnose a support set, read datasets, evaluate and compare
versions on paired episodes, meta-train, and write model cards. The service imports this module
alone (through `app.core.ml`), so fewshot's internals can move without touching the service.
"""

from __future__ import annotations

from fewshot.adapted import AdaptedModel, PredictionScores, adapt
from fewshot.batched import adapt_many, embed_supports, predict_many_scores
from fewshot.card import render_model_card
from fewshot.cli import add_subcommands
from fewshot.config import AdaptMode, MetaTrainConfig, ModelConfig
from fewshot.data import ImageDataset, dataset_classes, load_dataset, scan_dataset
from fewshot.diagnostics import SupportDiagnostics, diagnose_embeddings
from fewshot.errors import CheckpointError, DatasetError, EpisodeError, FewShotError
from fewshot.evaluate import episode_scores, evaluate_shapes
from fewshot.fast import adapt_fast, adapt_fast_with_embeddings
from fewshot.images import preprocess_images
from fewshot.initialization import Initialization, shipped_initialization_paths
from fewshot.promotion import (
    DEFAULT_MARGIN,
    MIN_EPISODES,
    PromotionVerdict,
    ShapeComparison,
    choose_validation_groups,
    compare_initializations,
    overlapping_groups,
    paired_difference,
    verdict,
)
from fewshot.stepchoice import chooses_steps
from fewshot.training import MetaTrainer, Progress, plot_curve

__all__ = [
    "DEFAULT_MARGIN",
    "MIN_EPISODES",
    "AdaptMode",
    "AdaptedModel",
    "CheckpointError",
    "DatasetError",
    "EpisodeError",
    "FewShotError",
    "ImageDataset",
    "Initialization",
    "MetaTrainConfig",
    "MetaTrainer",
    "ModelConfig",
    "PredictionScores",
    "Progress",
    "PromotionVerdict",
    "ShapeComparison",
    "SupportDiagnostics",
    "adapt",
    "adapt_fast",
    "adapt_fast_with_embeddings",
    "adapt_many",
    "add_subcommands",
    "choose_validation_groups",
    "chooses_steps",
    "compare_initializations",
    "dataset_classes",
    "diagnose_embeddings",
    "embed_supports",
    "episode_scores",
    "evaluate_shapes",
    "load_dataset",
    "overlapping_groups",
    "paired_difference",
    "plot_curve",
    "predict_many_scores",
    "preprocess_images",
    "render_model_card",
    "scan_dataset",
    "shipped_initialization_paths",
    "verdict",
]
