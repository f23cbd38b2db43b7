"""Initializations loaded once per process, and adapted models in an LRU bounded in bytes."""

from __future__ import annotations

import logging
import os
import threading
import uuid
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING

from app.core import metrics, ml
from app.core.storage import ArtifactCorrupt, ArtifactStore
from app.core.threads import SERVING_DEFAULT, use_threads

if TYPE_CHECKING:
    from torch import Tensor

    from app import models
    from app.core.prediction_batcher import Expected, PredictionBatcher

log = logging.getLogger(__name__)


def default_device(requested: str | None) -> str:
    """The configured device, else "cuda" when torch sees a GPU, else "cpu"."""
    if requested:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# What a cached model costs beyond its own tensors: Python and C++ objects (parameter dict, tensor
# headers, labels, prototypes' wrapper). Measured: RSS grew ~19 KB per cached head-mode model whose
# own tensors are ~3 KB; without it a byte budget held ~6x more head models than it said.
MODEL_OVERHEAD_BYTES = 16 * 1024


def _cost(model: ml.AdaptedModel) -> int:
    return model.nbytes + MODEL_OVERHEAD_BYTES


class ModelCache:
    """Thread-safe caches by initialization version and adapted-model id; sha256 checked on load.

    `threads` is the intra-op thread count of every thread that adapts or predicts (see
    app.torch_threads); `use_serving_threads` applies it to the calling thread.
    """

    def __init__(
        self, store: ArtifactStore, max_bytes: int, device: str, threads: int = SERVING_DEFAULT
    ) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.device = device
        self.threads = threads
        self._lock = threading.Lock()
        self._inits: dict[str, ml.Initialization] = {}
        self._adapted: OrderedDict[uuid.UUID, ml.AdaptedModel] = OrderedDict()
        self._bytes = 0
        self._batcher: PredictionBatcher | None = None

    def initialization(self, row: models.Initialization) -> ml.Initialization:
        """The initialization of a row, read from the store on first use."""
        with self._lock:
            cached = self._inits.get(row.version)
        if cached is not None:
            metrics.CACHE_HITS.labels("initialization").inc()
            return cached
        metrics.CACHE_MISSES.labels("initialization").inc()
        try:
            folder = self.store.local_tree(
                row.artifact_key, expected={"weights.safetensors": row.sha256}
            )
            init = ml.Initialization.load(folder, device=self.device)
        except (ArtifactCorrupt, ml.CheckpointError) as exc:
            log.error("initialization %s is unreadable: %s", row.version, exc)
            # Nothing the caller can redo fixes it: the operator restores or rolls back.
            raise ArtifactCorrupt(
                "the initialization this task was adapted from failed its integrity check; "
                "try again later",
                status=503,
                headers={"Retry-After": "60"},
            ) from None
        init.metadata.setdefault("version", row.version)
        with self._lock:
            return self._inits.setdefault(row.version, init)

    def use_serving_threads(self) -> None:
        """Size torch's intra-op threads on the calling thread for adaptation and prediction."""
        use_threads(self.threads)

    def warm_up(self, init: ml.Initialization) -> None:
        """Run one tiny adaptation and prediction so the first real request pays no warm-up."""
        import torch

        self.use_serving_threads()
        config = init.config
        x = torch.rand((2, config.in_channels, config.image_size, config.image_size))
        ml.adapt(init, x, ["a", "b"], steps=1, device=self.device).predict_proba(x)

    def cached_adapted(self, model_id: uuid.UUID) -> ml.AdaptedModel | None:
        """The cached adapted model with this id (a hit, now most recently used), or None."""
        with self._lock:
            cached = self._adapted.get(model_id)
            if cached is not None:
                self._adapted.move_to_end(model_id)
        if cached is not None:
            metrics.CACHE_HITS.labels("adapted").inc()
        return cached

    def adapted(self, row: models.AdaptedModel, init: ml.Initialization) -> ml.AdaptedModel:
        """The adapted model of a row, cached or read (sha256-checked) from the store."""
        cached = self.cached_adapted(row.id)
        if cached is not None:
            return cached
        metrics.CACHE_MISSES.labels("adapted").inc()
        try:
            path = self.store.local_file(row.weights_key, row.sha256)
            model = ml.AdaptedModel.load(path, init, device=self.device)
        except (ArtifactCorrupt, ml.CheckpointError) as exc:
            # The file's name and the reader's message go to the log only.
            log.error("adapted model %s is unreadable: %s", row.id, exc)
            raise ArtifactCorrupt(
                "this task's adapted model failed its integrity check; adapt the task again "
                "(POST /v1/tasks/{id}/adaptations)"
            ) from None
        self.put_adapted(row.id, model)
        return model

    def put_adapted(self, model_id: uuid.UUID, model: ml.AdaptedModel) -> None:
        """Insert a model, evicting the least recently used ones beyond the byte budget."""
        size = _cost(model)
        if size > self.max_bytes:
            return
        with self._lock:
            previous = self._adapted.pop(model_id, None)
            if previous is not None:
                self._bytes -= _cost(previous)
            self._adapted[model_id] = model
            self._bytes += size
            while self._bytes > self.max_bytes and self._adapted:
                _, evicted = self._adapted.popitem(last=False)
                self._bytes -= _cost(evicted)
            metrics.CACHE_BYTES.set(self._bytes)

    def predict_proba(
        self,
        model: ml.AdaptedModel,
        x: Tensor,
        *,
        wait_seconds: float,
        max_images: int,
        chunk: int = 32,
        workers: int | None = None,
    ) -> Tensor:
        """Class probabilities of `model` on images `x` (predict_scores' probabilities)."""
        return self.predict_scores(
            model, x, wait_seconds=wait_seconds, max_images=max_images, chunk=chunk, workers=workers
        ).probabilities

    def predict_scores(
        self,
        model: ml.AdaptedModel,
        x: Tensor,
        threshold: float | None = None,
        *,
        wait_seconds: float,
        max_images: int,
        chunk: int = 32,
        workers: int | None = None,
        expected: Expected | None = None,
        max_wait_seconds: float = 0.0,
    ) -> ml.PredictionScores:
        """`model.predict_scores(x, threshold)`, batched with concurrent requests.

        `max_images` 0 predicts on the calling thread, alone; `workers` batching threads (None:
        one per CPU core) run batches in passes of `chunk` images. On a CPU, full-mode models
        are predicted on the calling thread too: their passes cannot be shared there (see
        fewshot.batched.predict_many), so a hand-off would only add a wait. `expected` is this
        request's announcement (`expect_prediction`), which it now fulfils. A batched request
        that would wait longer than `max_wait_seconds` (0: no bound) raises PredictionsBusy.
        """
        if max_images <= 0 or not self.batches(model.mode):
            if expected is not None:
                expected.withdraw()
            self.use_serving_threads()
            return model.predict_scores(x, threshold)
        batcher = self._batcher_for(wait_seconds, max_images, chunk, workers, max_wait_seconds)
        return batcher.predict_scores(model, x, threshold, expected)

    def batches(self, mode: str) -> bool:
        """True when queries of models adapted in `mode` can share passes with other requests'
        (head-only models anywhere, every model on a GPU; see fewshot.batched.predict_many)."""
        return mode == "head" or self.device != "cpu"

    def expect_prediction(
        self,
        *,
        wait_seconds: float,
        max_images: int,
        chunk: int = 32,
        workers: int | None = None,
        max_wait_seconds: float = 0.0,
    ) -> Expected | None:
        """Announce a batched prediction on its way (None when batching is off)."""
        if max_images <= 0:
            return None
        batcher = self._batcher_for(wait_seconds, max_images, chunk, workers, max_wait_seconds)
        return batcher.expect()

    def _batcher_for(
        self,
        wait_seconds: float,
        max_images: int,
        chunk: int,
        workers: int | None,
        max_wait_seconds: float = 0.0,
    ) -> PredictionBatcher:
        from app.core.prediction_batcher import PredictionBatcher

        with self._lock:
            batcher = self._batcher
            if batcher is None:
                batcher = self._batcher = PredictionBatcher(
                    wait_seconds=wait_seconds,
                    max_images=max_images,
                    threads=self.threads,
                    workers=workers or os.cpu_count() or 1,
                    chunk=chunk,
                    adaptive=True,
                )
                # The batching thread holds the batcher, not the cache: stop it with the cache.
                weakref.finalize(self, batcher.close)
            batcher.wait_seconds, batcher.max_images = wait_seconds, max_images
            batcher.chunk, batcher.max_wait_seconds = chunk, max_wait_seconds
        return batcher

    def forget(self, model_ids: list[uuid.UUID]) -> None:
        """Drop models (their task was deleted)."""
        with self._lock:
            for model_id in model_ids:
                evicted = self._adapted.pop(model_id, None)
                if evicted is not None:
                    self._bytes -= _cost(evicted)
            metrics.CACHE_BYTES.set(self._bytes)

    @property
    def cached_bytes(self) -> int:
        """Bytes currently held by adapted models."""
        return self._bytes
