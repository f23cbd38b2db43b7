"""Where the tests look for the shared data: the Omniglot background zip, mini-ImageNet val."""

from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


def _find_omniglot_zip() -> Path:
    """$MAML_SERVE_OMNIGLOT_ZIP, else the shared data folder beside the checkout or at /work/shared."""
    if "MAML_SERVE_OMNIGLOT_ZIP" in os.environ:
        return Path(os.environ["MAML_SERVE_OMNIGLOT_ZIP"])
    candidates = [
        _REPO.parent / "shared/data/omniglot/images_background.zip",
        Path("/work/shared/data/omniglot/images_background.zip"),
    ]
    return next((path for path in candidates if path.exists()), candidates[0])


OMNIGLOT_ZIP = _find_omniglot_zip()


def _find_miniimagenet_val_zip() -> Path:
    """$MAML_SERVE_MINIIMAGENET_VAL_ZIP, else the shared data folder beside the checkout."""
    if "MAML_SERVE_MINIIMAGENET_VAL_ZIP" in os.environ:
        return Path(os.environ["MAML_SERVE_MINIIMAGENET_VAL_ZIP"])
    candidates = [
        _REPO.parent / "shared/data/miniimagenet/miniimagenet-val.zip",
        Path("/work/shared/data/miniimagenet/miniimagenet-val.zip"),
    ]
    return next((path for path in candidates if path.exists()), candidates[0])


MINIIMAGENET_VAL_ZIP = _find_miniimagenet_val_zip()
