"""AsyncClient: the maml-serve API from asyncio code (client.py is the same, synchronous)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, BinaryIO

import httpx

from maml_serve._core import (
    DEFAULT_TIMEOUT,
    LONG_POLL_SECONDS,
    Call,
    ImageInput,
    RetryPolicy,
    SupportSet,
    api_error,
    checked_json,
    create_task_call,
    dataset_upload_call,
    default_headers,
    list_params,
    parse_retry_after,
    predict_call,
    should_retry,
)
from maml_serve.errors import AdaptationFailed, TransportError, WaitTimeout
from maml_serve.types import (
    ApiKey,
    Dataset,
    Initialization,
    Job,
    MetaTraining,
    PredictionResult,
    Promotion,
    Task,
    TaskPage,
)


class AsyncClient:
    """An asyncio client of the maml-serve HTTP API (`async with AsyncClient(url, key) as c:`)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        # Job waits are held by the server, each for less than the read timeout.
        self._long_poll = min(LONG_POLL_SECONDS, max(0.0, timeout - 5.0))
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=default_headers(api_key or os.environ.get("MAML_SERVE_API_KEY")),
            timeout=timeout,
            transport=transport,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def send(self, call: Call) -> Any:
        """Send a request, retrying 429, 503 and 409 `not_adapted_yet` as the policy allows."""
        slept = 0.0
        attempt = 0
        while True:
            try:
                response = await self._http.request(call.method, call.path, **call.request_kwargs())
            except httpx.TransportError as exc:
                raise TransportError(f"{call.method} {call.path}: {exc}") from exc
            if attempt < self.retry.max_retries and should_retry(call, response):
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                delay = self.retry.delay(attempt, retry_after)
                if slept + delay <= self.retry.max_total_delay:
                    await asyncio.sleep(delay)
                    slept += delay
                    attempt += 1
                    continue
            return checked_json(response)

    # --- service ------------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """GET /healthz (liveness)."""
        body: dict[str, Any] = await self.send(Call("GET", "/healthz"))
        return body

    # --- tasks --------------------------------------------------------------------------------

    async def create_task(
        self,
        support: SupportSet,
        labels: Sequence[str] | None = None,
        *,
        name: str | None = None,
        mode: str | None = None,
        steps: int | None = None,
        wait: float | None = None,
        idempotency_key: str | None = None,
        unknown_threshold: float | None = None,
        initialization: str | None = None,
    ) -> Task:
        """Create a task from {label: images}, [(image, label)] or images plus labels.

        Images are paths, bytes, binary files or PIL images. With `wait` (seconds) it returns once
        the task is ready, raising AdaptationFailed or WaitTimeout otherwise. `unknown_threshold`
        (0..1) sets the task's default threshold below which predictions say "unknown".
        `initialization` names the version to adapt from (`list_initializations()` lists them, with
        each one's domain, e.g. "photos"); default: the tenant's default.
        """
        started = time.monotonic()
        call = create_task_call(
            support,
            labels,
            name=name,
            mode=mode,
            steps=steps,
            wait=wait,
            idempotency_key=idempotency_key,
            unknown_threshold=unknown_threshold,
            initialization=initialization,
        )
        task = Task.from_json(await self.send(call))
        if wait is None:
            return task
        remaining = max(0.0, wait - (time.monotonic() - started))
        return await self._until_ready(task, remaining)

    async def wait_for_task(
        self, task_id: str, timeout: float = 60.0, interval: float = 0.25
    ) -> Task:
        """Wait until a task is ready; AdaptationFailed if it failed, WaitTimeout if too slow."""
        return await self._until_ready(await self.get_task(task_id), timeout, interval)

    async def _until_ready(self, task: Task, timeout: float, interval: float = 0.25) -> Task:
        deadline = time.monotonic() + timeout
        ended: set[str] = set()
        while True:
            if task.status == "ready":
                return task
            if task.status == "failed":
                raise AdaptationFailed(
                    409,
                    task.error_code or "adaptation_failed",
                    task.error_message or "the task's adaptation failed",
                    body=task.raw,
                )
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"task {task.id} still {task.status} after {timeout:g} s")
            job_id = task.job_id
            if job_id is None or job_id in ended:
                await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            elif (await self._await_job(job_id, deadline, interval)).finished:
                # Its task is read once more; should it still be adapting, it is not waited on
                # again (that answer would come at once).
                ended.add(job_id)
            task = await self.get_task(task.id)

    async def get_task(self, task_id: str) -> Task:
        """One task."""
        return Task.from_json(await self.send(Call("GET", f"/v1/tasks/{task_id}")))

    async def list_tasks(self, *, limit: int | None = None, cursor: str | None = None) -> TaskPage:
        """One page of tasks, newest first."""
        body = await self.send(Call("GET", "/v1/tasks", params=list_params(limit, cursor)))
        return TaskPage(
            items=[Task.from_json(t) for t in body["items"]], next_cursor=body.get("next_cursor")
        )

    async def iter_tasks(self, *, page_size: int | None = None) -> AsyncIterator[Task]:
        """Every task, following the cursor."""
        cursor: str | None = None
        while True:
            page = await self.list_tasks(limit=page_size, cursor=cursor)
            for task in page.items:
                yield task
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def delete_task(self, task_id: str) -> None:
        """Delete a task with its images, weights and predictions."""
        await self.send(Call("DELETE", f"/v1/tasks/{task_id}"))

    async def predict(
        self,
        task_id: str,
        images: Sequence[ImageInput],
        *,
        top_k: int | None = None,
        unknown_threshold: float | None = None,
    ) -> PredictionResult:
        """Predict labels for query images (retried while the task is still adapting).

        An image whose calibrated score is below `unknown_threshold` (0..1; 0: never) is labelled
        "unknown"; default: the task's threshold, else the initialization's calibrated one.
        """
        call = predict_call(task_id, images, top_k, unknown_threshold)
        return PredictionResult.from_json(await self.send(call))

    async def readapt(
        self,
        task_id: str,
        *,
        initialization_version: str | None = None,
        mode: str | None = None,
        steps: int | None = None,
    ) -> Job:
        """Re-adapt a task (e.g. from a newly promoted version) as a new adapted model."""
        body = {
            k: v
            for k, v in {
                "initialization_version": initialization_version,
                "mode": mode,
                "steps": steps,
            }.items()
            if v is not None
        }
        call = Call("POST", f"/v1/tasks/{task_id}/adaptations", json=body)
        return Job.from_json(await self.send(call))

    # --- jobs ---------------------------------------------------------------------------------

    async def get_job(self, job_id: str, *, wait: float | None = None) -> Job:
        """A job's state, progress, attempts and error; with `wait` (s), once it ends or then."""
        held = round(wait or 0.0, 3)
        params = {"wait": held} if held > 0 else {}
        return Job.from_json(await self.send(Call("GET", f"/v1/jobs/{job_id}", params=params)))

    async def wait_for_job(self, job_id: str, timeout: float = 60.0, interval: float = 0.25) -> Job:
        """Wait until a job finishes (any terminal state); WaitTimeout if it takes too long."""
        job = await self._await_job(job_id, time.monotonic() + timeout, interval)
        if not job.finished:
            raise WaitTimeout(f"job {job_id} still {job.state} after {timeout:g} s")
        return job

    async def _await_job(self, job_id: str, deadline: float, interval: float) -> Job:
        # The server holds each GET until the job ends or the asked wait passes; the job as last
        # seen comes back at the deadline.
        while True:
            asked = min(max(0.0, deadline - time.monotonic()), self._long_poll)
            sent = time.monotonic()
            job = await self.get_job(job_id, wait=asked)
            if job.finished or time.monotonic() >= deadline:
                return job
            if time.monotonic() - sent < max(asked / 2, interval):
                # The server held it for less than asked (its own bound is lower): no busy loop.
                await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))

    # --- initializations ----------------------------------------------------------------------

    async def list_initializations(self) -> list[Initialization]:
        """Every initialization version, with its metrics and whether it is active."""
        body = await self.send(Call("GET", "/v1/initializations"))
        return [Initialization.from_json(i) for i in body["items"]]

    async def get_initialization(self, version: str) -> Initialization:
        """One initialization version."""
        call = Call("GET", f"/v1/initializations/{version}")
        return Initialization.from_json(await self.send(call))

    # --- admin: datasets ----------------------------------------------------------------------

    async def upload_dataset(
        self,
        archive: str | os.PathLike[str] | bytes | BinaryIO,
        name: str,
        *,
        min_classes: int | None = None,
    ) -> Dataset:
        """Upload a dataset zip (one folder per class, optionally grouped); admin."""
        call = dataset_upload_call(archive, name, min_classes)
        return Dataset.from_json(await self.send(call))

    async def register_omniglot(self, name: str | None = None) -> Dataset:
        """Register the Omniglot zip the server is configured with; admin."""
        call = Call(
            "POST", "/v1/admin/datasets/omniglot", json={} if name is None else {"name": name}
        )
        call.retry_unavailable = False
        return Dataset.from_json(await self.send(call))

    async def list_datasets(self) -> list[Dataset]:
        """Datasets, newest first; admin."""
        body = await self.send(Call("GET", "/v1/admin/datasets"))
        return [Dataset.from_json(d) for d in body["items"]]

    async def get_dataset(self, dataset_id: str) -> Dataset:
        """One dataset; admin."""
        return Dataset.from_json(await self.send(Call("GET", f"/v1/admin/datasets/{dataset_id}")))

    async def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset (409 while a run reads it); admin."""
        await self.send(Call("DELETE", f"/v1/admin/datasets/{dataset_id}"))

    # --- admin: meta-training -----------------------------------------------------------------

    async def start_meta_training(
        self,
        dataset_id: str,
        *,
        start: str = "scratch",
        algorithm: Mapping[str, Any] | None = None,
        auto_promote: bool = False,
        **options: Any,
    ) -> MetaTraining:
        """Start a meta-training run (options: validation_episodes, max_seconds, ...); admin."""
        body: dict[str, Any] = {
            "dataset_id": dataset_id,
            "start": start,
            "auto_promote": auto_promote,
            **options,
        }
        if algorithm is not None:
            body["algorithm"] = dict(algorithm)
        call = Call("POST", "/v1/admin/meta-trainings", json=body, retry_unavailable=False)
        return MetaTraining.from_json(await self.send(call))

    async def list_meta_trainings(self) -> list[MetaTraining]:
        """The latest runs, newest first; admin."""
        body = await self.send(Call("GET", "/v1/admin/meta-trainings"))
        return [MetaTraining.from_json(m) for m in body["items"]]

    async def get_meta_training(self, run_id: str) -> MetaTraining:
        """A run's state, progress, curve and result; admin."""
        call = Call("GET", f"/v1/admin/meta-trainings/{run_id}")
        return MetaTraining.from_json(await self.send(call))

    async def meta_training_curve_png(self, run_id: str) -> bytes:
        """The run's curve as a PNG; admin."""
        try:
            response = await self._http.get(f"/v1/admin/meta-trainings/{run_id}/curve.png")
        except httpx.TransportError as exc:
            raise TransportError(str(exc)) from exc
        if response.status_code >= 400:
            raise api_error(response)
        return response.content

    async def cancel_meta_training(self, run_id: str) -> MetaTraining:
        """Stop a run at its next checkpoint; admin."""
        call = Call("POST", f"/v1/admin/meta-trainings/{run_id}/cancel")
        return MetaTraining.from_json(await self.send(call))

    async def wait_for_meta_training(
        self, run_id: str, timeout: float = 3600.0, interval: float = 2.0
    ) -> MetaTraining:
        """Wait until a run finishes; WaitTimeout if it takes too long; admin."""
        # A run is a job: the server holds the wait on /v1/jobs, then the run is read once.
        job = await self._await_job(run_id, time.monotonic() + timeout, interval)
        run = await self.get_meta_training(run_id)
        if not (job.finished and run.finished):
            raise WaitTimeout(f"meta-training {run_id} still {run.state} after {timeout:g} s")
        return run

    # --- admin: versions in service -----------------------------------------------------------

    async def promote(self, version: str, *, scope: str | None = None) -> Promotion:
        """Make a version your tenant's default (scope="global": everyone's, operator keys); admin."""
        params = {"scope": scope} if scope is not None else {}
        call = Call("POST", f"/v1/admin/initializations/{version}/promote", params=params)
        return Promotion.from_json(await self.send(call))

    async def rollback(self, *, scope: str | None = None) -> Promotion:
        """Return to the previously active version (scope="global" as for promote); admin."""
        params = {"scope": scope} if scope is not None else {}
        call = Call("POST", "/v1/admin/initializations/rollback", params=params)
        return Promotion.from_json(await self.send(call))

    async def list_promotions(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The audit trail of active-version changes, newest first; admin."""
        params = {"limit": limit} if limit is not None else {}
        body = await self.send(Call("GET", "/v1/admin/promotions", params=params))
        items: list[dict[str, Any]] = body["items"]
        return items

    # --- admin: API keys ----------------------------------------------------------------------

    async def list_keys(self) -> list[ApiKey]:
        """Your tenant's keys (revoked and expired ones too), newest first; admin."""
        body = await self.send(Call("GET", "/v1/admin/keys"))
        return [ApiKey.from_json(k) for k in body["items"]]

    async def create_key(
        self, *, name: str | None = None, admin: bool = False, expires_at: datetime | None = None
    ) -> ApiKey:
        """A new key for your tenant; its `key` is shown only in this answer; admin."""
        body: dict[str, Any] = {"admin": admin}
        if name is not None:
            body["name"] = name
        if expires_at is not None:
            body["expires_at"] = expires_at.isoformat()
        call = Call("POST", "/v1/admin/keys", json=body, retry_unavailable=False)
        return ApiKey.from_json(await self.send(call))

    async def revoke_key(self, key_id: str) -> ApiKey:
        """Revoke a key of your tenant at once; admin."""
        return ApiKey.from_json(await self.send(Call("POST", f"/v1/admin/keys/{key_id}/revoke")))

    async def rotate_key(self, key_id: str, *, grace_seconds: int = 0) -> ApiKey:
        """A new key in place of this one; the old one ends now or after `grace_seconds`; admin."""
        call = Call(
            "POST",
            f"/v1/admin/keys/{key_id}/rotate",
            json={"grace_seconds": grace_seconds},
            retry_unavailable=False,
        )
        return ApiKey.from_json(await self.send(call))
