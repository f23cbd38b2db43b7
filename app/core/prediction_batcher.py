"""Dynamic batching of predictions: concurrent requests, for any adapted models, share passes.

Request threads hand (model, images) to the batching threads (`workers`, one per core by
default) and wait. A free batching thread starts a batch at once; once started, a batch collects
requests for at most `wait_seconds` or until it holds `max_images` images. With `adaptive`, it
waits only while requests announced with `expect` (still reading and decoding their images) have
not arrived, so a lone request is never held for company that is not coming. It then runs
`fewshot.batched.predict_many_scores` (head-only models of one initialization share backbone
passes of `chunk` images). Every image is processed on its own,
so a request's probabilities do not depend on the others in its batch. A batch that fails is
retried one request at a time, so each request gets its own answer. Threads exit after a while
without requests and start again on the next one. With `max_wait_seconds`, a request that would
wait longer than that behind the images already in the line (at the seconds an image has taken
lately) is refused with PredictionsBusy (503) instead of joining it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import Histogram

from app.core import ml
from app.core.errors import PredictionsBusy
from app.core.threads import use_threads

if TYPE_CHECKING:
    from torch import Tensor


log = logging.getLogger(__name__)

BATCH_IMAGES = Histogram(
    "maml_serve_predict_batch_images",
    "Query images per batched prediction pass",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)
BATCH_REQUESTS = Histogram(
    "maml_serve_predict_batch_requests",
    "Prediction requests per batched prediction pass",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)

# A batching thread with nothing to do for this long exits (a new one starts on demand).
IDLE_EXIT_SECONDS = 30.0


@dataclass
class _Request:
    model: ml.AdaptedModel
    images: Tensor
    threshold: float | None = None
    done: Future[ml.PredictionScores] = field(default_factory=Future)


@dataclass(eq=False)
class Expected:
    """A request announced before it reads its images: a started batch may wait for it."""

    batcher: PredictionBatcher
    arrived: bool = False

    def withdraw(self) -> None:
        """Stop being waited for (the request ended, predicted or not); idempotent."""
        self.batcher.arrive(self)


class PredictionBatcher:
    """One batching thread per process (per model cache); `predict_proba` blocks until done."""

    def __init__(
        self,
        *,
        wait_seconds: float,
        max_images: int,
        threads: int,
        workers: int = 1,
        chunk: int = 32,
        adaptive: bool = False,
        max_wait_seconds: float = 0.0,
    ) -> None:
        self.wait_seconds = wait_seconds
        self.max_images = max_images
        self.threads = threads
        self.workers = workers
        self.chunk = chunk
        self.adaptive = adaptive
        self.max_wait_seconds = max_wait_seconds
        # Images in the line or in a running batch, and the recent seconds an image took (a
        # moving average over batches; None until the first one ends).
        self._pending_images = 0
        self._seconds_per_image: float | None = None
        # Requests announced with `expect` that have not arrived in the line yet.
        self._coming = 0
        self._line: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._running: set[threading.Thread] = set()
        self._idle = 0
        self._closed = False

    @property
    def _thread(self) -> threading.Thread | None:
        """A running batching thread, or None (for tests)."""
        with self._cond:
            return next(iter(self._running), None)

    def predict_proba(self, model: ml.AdaptedModel, images: Tensor) -> Tensor:
        """Class probabilities [B, N] of `model` on `images`, computed in a shared batch."""
        return self.predict_scores(model, images).probabilities

    def expect(self) -> Expected:
        """Announce a request that will arrive soon; withdraw it if it never does."""
        with self._cond:
            self._coming += 1
        return Expected(self)

    def arrive(self, expected: Expected) -> None:
        """An announced request is no longer on its way (see `Expected.withdraw`)."""
        with self._cond:
            self._arrived(expected)
            self._cond.notify_all()

    def _arrived(self, expected: Expected) -> None:
        if not expected.arrived:
            expected.arrived = True
            self._coming -= 1

    def predict_scores(
        self,
        model: ml.AdaptedModel,
        images: Tensor,
        threshold: float | None = None,
        expected: Expected | None = None,
    ) -> ml.PredictionScores:
        """`model.predict_scores(images, threshold)`, computed in a shared batch."""
        request = _Request(model, images, threshold)
        with self._cond:
            if expected is not None:
                self._arrived(expected)
            if self._closed:
                return model.predict_scores(images, threshold)
            self._refuse_if_busy()
            self._line.append(request)
            self._pending_images += images.shape[0]
            if self._idle == 0 and len(self._running) < self.workers:
                thread = threading.Thread(
                    target=self._loop, name="maml-serve-predict-batcher", daemon=True
                )
                self._running.add(thread)
                thread.start()
            self._cond.notify()
        return request.done.result()

    def waiting_seconds(self) -> float:
        """The estimated seconds before a new request's batch would start (0 when unknown)."""
        with self._cond:
            return self._waiting_seconds()

    def _waiting_seconds(self) -> float:
        if self._seconds_per_image is None:
            return 0.0
        return self._pending_images * self._seconds_per_image / max(1, self.workers)

    def _refuse_if_busy(self) -> None:
        """Raise PredictionsBusy when the line would hold a new request past max_wait_seconds."""
        if self.max_wait_seconds <= 0 or not self._pending_images:
            return
        wait = self._waiting_seconds()
        if wait > self.max_wait_seconds:
            # A batch may be waiting for this request's arrival: let it go without it.
            self._cond.notify_all()
            raise PredictionsBusy(
                f"this API process has about {wait:.0f} s of predictions waiting, more than the "
                f"{self.max_wait_seconds:g} s a request may wait; retry after the Retry-After delay",
                retry_after=max(1, min(60, math.ceil(wait - self.max_wait_seconds))),
            )

    def close(self) -> None:
        """Stop the thread after the requests already waiting."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _take(self) -> list[_Request] | None:
        """The next batch, or None when the thread should exit."""
        with self._cond:
            if not self._line and not self._closed:
                self._idle += 1
                self._cond.wait(IDLE_EXIT_SECONDS)
                self._idle -= 1
            if not self._line:
                self._running.discard(threading.current_thread())
                return None
            batch = [self._line.popleft()]
            size = batch[0].images.shape[0]
            deadline = time.monotonic() + self.wait_seconds
            while size < self.max_images:
                if self._line:
                    nxt = self._line[0]
                    if size + nxt.images.shape[0] > self.max_images:
                        break
                    batch.append(self._line.popleft())
                    size += nxt.images.shape[0]
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._closed or (self.adaptive and self._coming <= 0):
                    break
                self._cond.wait(left)
            return batch

    def _loop(self) -> None:
        use_threads(self.threads)
        while True:
            batch = self._take()
            if batch is None:
                return
            images = sum(r.images.shape[0] for r in batch)
            started = time.monotonic()
            try:
                self._run(batch)
            finally:
                self._finished(images, time.monotonic() - started)

    def _finished(self, images: int, seconds: float) -> None:
        """A batch of `images` ended after `seconds`: out of the line, into the moving average."""
        with self._cond:
            self._pending_images -= images
            if images:
                now = seconds / images
                old = self._seconds_per_image
                self._seconds_per_image = now if old is None else 0.7 * old + 0.3 * now

    def _run(self, batch: list[_Request]) -> None:

        BATCH_REQUESTS.observe(len(batch))
        BATCH_IMAGES.observe(sum(r.images.shape[0] for r in batch))
        try:
            results = ml.predict_many_scores(
                [r.model for r in batch],
                [r.images for r in batch],
                [r.threshold for r in batch],
                chunk=self.chunk,
            )
        except Exception as exc:
            if len(batch) == 1:
                batch[0].done.set_exception(exc)
                return
            log.warning("a batch of %d predictions failed; retrying one by one", len(batch))
            for request in batch:
                self._run([request])
            return
        for request, result in zip(batch, results, strict=True):
            request.done.set_result(result)
