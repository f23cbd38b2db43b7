"""fewshot: the framework-free MAML core of maml-serve (backbone, inner loop, meta-training, data)."""

from fewshot.adapted import AdaptedModel, PredictionScores, adapt
from fewshot.config import MetaTrainConfig, ModelConfig
from fewshot.diagnostics import ConfusablePair, SupportDiagnostics, diagnose_support
from fewshot.errors import CheckpointError, DatasetError, EpisodeError, FewShotError
from fewshot.images import decode_image, preprocess_images
from fewshot.initialization import (
    Initialization,
    shipped_initialization_path,
    shipped_initialization_paths,
)
from fewshot.openset import calibrate_unknown, unknown_report
from fewshot.promotion import (
    PromotionVerdict,
    ShapeComparison,
    choose_validation_groups,
    compare_initializations,
    overlapping_groups,
    paired_difference,
    trained_groups,
    verdict,
)
from fewshot.stepchoice import chooses_steps
from fewshot.unknown import UNKNOWN_LABEL, UnknownCalibration, calibration_of

__all__ = [
    "UNKNOWN_LABEL",
    "AdaptedModel",
    "CheckpointError",
    "ConfusablePair",
    "DatasetError",
    "EpisodeError",
    "FewShotError",
    "Initialization",
    "MetaTrainConfig",
    "ModelConfig",
    "PredictionScores",
    "PromotionVerdict",
    "ShapeComparison",
    "SupportDiagnostics",
    "UnknownCalibration",
    "adapt",
    "calibrate_unknown",
    "calibration_of",
    "choose_validation_groups",
    "chooses_steps",
    "compare_initializations",
    "decode_image",
    "diagnose_support",
    "overlapping_groups",
    "paired_difference",
    "preprocess_images",
    "shipped_initialization_path",
    "shipped_initialization_paths",
    "trained_groups",
    "unknown_report",
    "verdict",
]
