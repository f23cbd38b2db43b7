""" "None of these": a per-image familiarity score, calibrated so a threshold keeps a known share.

Raw score (per image, never depending on the other images of a batch): the distance from the
image's embedding [D] to its nearest class prototype c_k [N, D] (class means of the support
embeddings under the adapted backbone), negated (higher = more familiar); with
ModelConfig.unknown_distance "relative" (older initializations), divided by the mean distance
between two prototypes of the task. Open-set recognition by distance to class means follows
Bendale and Boult 2016 and Snell et al. 2017's metric. The calibration tables are per (ways,
shots), so the absolute distance needs no common scale; the relative one flagged 7-8% of genuine
queries in tasks drawn within one alphabet (close prototypes) against ~1% in random ones.
With "plda" (fewshot.plda, fitted on the training classes' embeddings and stored with the
initialization), the raw score is instead the largest log-likelihood ratio over the task's
classes that the query is of that class rather than of another: it weighs how drawings of one
character vary against how characters differ, and how many support images a class has.

Calibrated score: a conformal p-value (Vovk et al. 2005; Angelopoulos and Bates 2021): the share
of in-task validation queries (tasks of the nearest calibrated number of ways and shots) whose raw
score is at most this image's. A stored table is cut to evenly spaced quantiles; a calibration that
records its sample sizes reads an image's rank among the original scores off them by linear
interpolation (older ones count table points, which makes the threshold act at about half its
share: with 401 points from 1,500 scores, p < 0.008 needs a score below the 0.5% quantile).
With threshold t, about (1 - t) of genuine queries are kept; the default t = 0.01 keeps ~99%:
"unknown" by default only when an image is less familiar than all but 1% of genuine queries, so
a closed-set user loses little accuracy to it (a caller asks for a stricter t per request).

Norm check (calibrations that hold `norms`): the embedding's norm before normalisation (how
strongly the trunk responds to the image) has a narrow range over genuine images; a blank or
noise image can sit near a prototype on the unit sphere while its norm lies far outside that
range (the width-128 Omniglot trunk: characters 14.2-35.1, blank 13.8, noise 88-98). Its
two-sided conformal p-value is combined with the distance's by a weighted Bonferroni rule,
p = min(1, p_distance / (1 - w), p_norm / w) with w the calibration's norm_share (NORM_SHARE
unless chosen), so a threshold t still keeps at least (1 - t) of genuine queries: a share (1 - w)
of t is spent on distance, w on the norm.
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from fewshot.plda import PLDA

if TYPE_CHECKING:
    from fewshot.initialization import Initialization

UNKNOWN_LABEL = "unknown"
DEFAULT_THRESHOLD = 0.01
CALIBRATION_SHOTS = (1, 2, 3, 5, 10, 20)
METADATA_KEY = "unknown"
# The share of a threshold spent on the norm check (the rest on the prototype distance), for
# calibrations that do not record their own.
NORM_SHARE = 0.2
# At most this many held-out norms are stored (quantiles beyond it): enough to resolve the norm
# check's p-values at the default threshold (NORM_SHARE * 0.01 needs > 1,000 points).
NORM_POINTS = 4001


def class_prototypes(features: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """Class means [N, D] of support embeddings features [S, D] with labels [S] in 0..N-1."""
    onehot = torch.nn.functional.one_hot(labels, n_way).to(features.dtype)
    counts = onehot.sum(dim=0).clamp_min(1.0)
    return (onehot.transpose(0, 1) @ features) / counts.unsqueeze(1)


def raw_scores(
    features: Tensor, prototypes: Tensor, relative: bool = True
) -> tuple[Tensor, Tensor]:
    """Familiarity [B] (-nearest-prototype distance, divided by the mean inter-prototype distance
    when `relative`) and nearest [B].

    features: [B, D] query embeddings; prototypes: [N, D] with N >= 2. Per image: a query's
    score depends only on itself and the task. The absolute distance does not grow for genuine
    queries when a task's classes are alike (one alphabet), where the relative one does.
    """
    distances = torch.cdist(features.double(), prototypes.double())  # [B, N]
    nearest_distance, nearest = distances.min(dim=1)
    if not relative:
        return (-nearest_distance).float(), nearest
    n = prototypes.shape[0]
    between = torch.cdist(prototypes.double(), prototypes.double())
    off_diagonal = between[~torch.eye(n, dtype=torch.bool, device=between.device)]
    spread = off_diagonal.mean().clamp_min(1e-12)
    return (-nearest_distance / spread).float(), nearest


def familiarity(
    features: Tensor,
    prototypes: Tensor,
    counts: Tensor,
    distance: str,
    plda: PLDA | None = None,
) -> tuple[Tensor, Tensor]:
    """Raw familiarity [B] and the class it refers to [B] under ModelConfig.unknown_distance.

    features [B, D]; prototypes [N, D] (class means of counts [N] support images). "plda" needs
    `plda`; without one (e.g. weights trained after it was fitted) the absolute distance is
    used, by calibration and serving alike, so their tables stay comparable.
    """
    if distance == "plda" and plda is not None:
        ratios = plda.to(features.device).scores(features, prototypes, counts)
        best, nearest = ratios.max(dim=1)
        return best, nearest
    return raw_scores(features, prototypes, relative=distance == "relative")


def _shape_key(key: object) -> tuple[int, int]:
    """(ways, shots) of a stored "WxK" key."""
    ways, shots = (int(part) for part in str(key).split("x"))
    return ways, shots


def _nearest_below(keys: list[int], value: int) -> int:
    """The largest key <= value, else the smallest key."""
    return keys[max(0, bisect.bisect_right(keys, value) - 1)]


def _count_at_most(table: list[float], n: int, value: float) -> int:
    """How many of `n` sorted values are <= value, read off `table`, their evenly spaced
    quantiles (all of them when n == len(table)), by linear interpolation between points."""
    below = bisect.bisect_right(table, value)
    if n == len(table) or below == 0:
        return below
    if below == len(table):
        return n
    # Point j of the table is the values' quantile j / (P - 1), i.e. order statistic
    # j (n - 1) / (P - 1); the values at most `value` are those up to the interpolated one
    # (table[below - 1] <= value < table[below]).
    lo, hi = table[below - 1], table[below]
    position = below - 1 + (value - lo) / (hi - lo)
    return math.floor(position * (n - 1) / (len(table) - 1)) + 1


@dataclass
class UnknownCalibration:
    """Sorted in-task raw scores per calibrated (ways, shots), and the default p-value threshold."""

    scores_by_shape: dict[tuple[int, int], list[float]]
    threshold: float = DEFAULT_THRESHOLD
    details: dict[str, Any] = field(default_factory=dict)
    # Sorted pre-normalisation embedding norms of held-out genuine images (None: no norm check).
    norms: list[float] | None = None
    # In-task scores each table was cut from (None: ranks count table points, as older ones did).
    sizes: dict[tuple[int, int], int] | None = None
    norm_share: float = NORM_SHARE
    # Held-out norms the norm table was cut from (None: ranks count table points).
    norm_size: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.norm_share < 1:
            raise ValueError("an unknown-calibration norm share is not between 0 and 1")

    def table(self, ways: int, shots: int) -> list[float]:
        """The in-task scores of the calibrated way count and then shot count nearest below."""
        return self.scores_by_shape[self._shape(ways, shots)]

    def _shape(self, ways: int, shots: int) -> tuple[int, int]:
        way_keys = sorted({w for w, _ in self.scores_by_shape})
        w = _nearest_below(way_keys, ways)
        shot_keys = sorted(k for v, k in self.scores_by_shape if v == w)
        return (w, _nearest_below(shot_keys, shots))

    def _p_value(self, value: float, shape: tuple[int, int]) -> float:
        """(rank + 1) / (n + 1): the conformal p-value, never exactly 0."""
        table = self.scores_by_shape[shape]
        n = self.sizes.get(shape, len(table)) if self.sizes else len(table)
        return (_count_at_most(table, n, value) + 1) / (n + 1)

    def p_values(
        self, raw: Tensor, shots: Tensor, ways: int = 5, norms: Tensor | None = None
    ) -> Tensor:
        """Calibrated scores [B] in [0, 1] for raw scores [B] in a `ways`-way task whose nearest
        classes have `shots` [B] support images; with `norms` [B] (pre-normalisation embedding
        norms) and a calibration that holds norms, combined with the norm check."""
        out = torch.empty(raw.shape[0], dtype=torch.float32)
        for i, (value, count) in enumerate(zip(raw.tolist(), shots.tolist(), strict=True)):
            out[i] = self._p_value(value, self._shape(ways, int(count)))
        if self.norms is None or norms is None:
            return out
        w = self.norm_share
        return torch.minimum(
            torch.ones_like(out), torch.minimum(out / (1 - w), self.norm_p_values(norms) / w)
        )

    @functools.cached_property
    def _mirrored_norms(self) -> list[float]:
        # Negated and reversed once per calibration (which is parsed once per initialization),
        # not on every prediction batch.
        return [-v for v in reversed(self.norms or [])]

    def norm_p_values(self, norms: Tensor) -> Tensor:
        """Two-sided conformal p-values [B] of norms [B] among the calibrated ones (1 without)."""
        if self.norms is None:
            return torch.ones(norms.shape[0], dtype=torch.float32)
        table = self.norms
        n = self.norm_size or len(table)
        mirrored = self._mirrored_norms
        out = torch.empty(norms.shape[0], dtype=torch.float32)
        for i, value in enumerate(norms.tolist()):
            below = _count_at_most(table, n, value)
            above = _count_at_most(mirrored, n, -value)
            out[i] = min(1.0, 2 * (min(below, above) + 1) / (n + 1))
        return out

    def compressed(self, points: int = 401) -> UnknownCalibration:
        """The same calibration with each table cut to `points` evenly spaced quantiles."""
        tables = {
            shape: sorted(np.quantile(np.asarray(v), np.linspace(0, 1, points)).tolist())
            if len(v) > points
            else list(v)
            for shape, v in self.scores_by_shape.items()
        }
        norms, norm_size = self.norms, self.norm_size
        if norms is not None and len(norms) > NORM_POINTS:
            norm_size = norm_size or len(norms)
            norms = np.quantile(np.asarray(norms), np.linspace(0, 1, NORM_POINTS)).tolist()
        sizes = {shape: len(v) for shape, v in self.scores_by_shape.items()}
        if self.sizes:
            sizes = {shape: self.sizes.get(shape, n) for shape, n in sizes.items()}
        return UnknownCalibration(
            tables, self.threshold, dict(self.details), norms, sizes, self.norm_share, norm_size
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict stored in an initialization's metadata under "unknown"."""
        return {
            "score": "conformal p-value of -min prototype distance (ModelConfig.unknown_distance)"
            + (", with the pre-normalisation norm check" if self.norms is not None else ""),
            "threshold": self.threshold,
            "scores_by_shape": {
                f"{w}x{k}": [round(v, 5) for v in vs] for (w, k), vs in self.scores_by_shape.items()
            },
            **({"norms": [round(v, 4) for v in self.norms]} if self.norms is not None else {}),
            **({"norm_share": self.norm_share} if self.norms is not None else {}),
            **({"norm_size": self.norm_size} if self.norm_size and self.norms is not None else {}),
            **(
                {"sizes": {f"{w}x{k}": n for (w, k), n in self.sizes.items()}} if self.sizes else {}
            ),
            **({"details": self.details} if self.details else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnknownCalibration:
        """Inverse of to_dict."""
        table: dict[tuple[int, int], list[float]] = {}
        for key, values in data["scores_by_shape"].items():
            table[_shape_key(key)] = sorted(float(v) for v in values)
        if not table or any(not vs for vs in table.values()):
            raise ValueError("an unknown-calibration table is empty")
        norms = data.get("norms")
        if norms is not None and (not isinstance(norms, list) or not norms):
            raise ValueError("an unknown-calibration norm table is empty")
        sizes = None
        if "sizes" in data:
            sizes = {_shape_key(key): int(n) for key, n in data["sizes"].items()}
            if any(n < len(table.get(shape, [])) for shape, n in sizes.items()):
                raise ValueError("an unknown-calibration table holds more scores than its size")
        share = float(data.get("norm_share", NORM_SHARE))
        norm_size = int(data["norm_size"]) if data.get("norm_size") is not None else None
        if norm_size is not None and norms is not None and norm_size < len(norms):
            raise ValueError("an unknown-calibration norm table holds more norms than its size")
        return cls(
            scores_by_shape=table,
            threshold=float(data.get("threshold", DEFAULT_THRESHOLD)),
            details=dict(data.get("details", {})),
            norms=None if norms is None else sorted(float(v) for v in norms),
            sizes=sizes,
            norm_share=share,
            norm_size=norm_size,
        )


# The parsed calibration of each metadata entry, shared by every model adapted from it: a parse
# per model cost ~16 KB per cached model (more than a head-mode model's own tensors).
_PARSED: dict[int, tuple[dict[str, Any], UnknownCalibration | None]] = {}
_PARSED_LIMIT = 64


def calibration_of(init: Initialization) -> UnknownCalibration | None:
    """The calibration stored in an initialization's metadata, or None (not calibrated).

    Parsed once per metadata entry; models adapted from one initialization share the object.
    """
    data = init.metadata.get(METADATA_KEY)
    if not isinstance(data, dict):
        return None
    cached = _PARSED.get(id(data))
    # The entry itself is kept alongside, so its id cannot be reused by another dict meanwhile.
    if cached is not None and cached[0] is data:
        return cached[1]
    try:
        parsed: UnknownCalibration | None = UnknownCalibration.from_dict(data)
    except (KeyError, TypeError, ValueError):
        parsed = None
    if len(_PARSED) >= _PARSED_LIMIT:
        _PARSED.pop(next(iter(_PARSED)))
    _PARSED[id(data)] = (data, parsed)
    return parsed


_PLDAS: dict[int, tuple[dict[str, Tensor], PLDA | None]] = {}


def plda_of(init: Initialization) -> PLDA | None:
    """The PLDA model stored with an initialization (unknown_distance "plda"), or None.

    Parsed once per tensor dict, like calibration_of; Initialization.load checked its shapes.
    """
    tensors = init.unknown_tensors
    cached = _PLDAS.get(id(tensors))
    if cached is not None and cached[0] is tensors:
        return cached[1]
    model = PLDA.from_tensors(tensors)
    if len(_PLDAS) >= _PARSED_LIMIT:
        _PLDAS.pop(next(iter(_PLDAS)))
    _PLDAS[id(tensors)] = (tensors, model)
    return model
