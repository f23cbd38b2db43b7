"""maml_serve.Client and AsyncClient against a real `maml-serve serve` process."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from PIL import Image

from maml_serve import (
    AsyncClient,
    AuthenticationError,
    Client,
    InvalidRequest,
    NotFoundError,
    PermissionDenied,
)
from tests.admin_data import class_images, dataset_zip, tiny_run
from tests.live.server import LiveServer


def _images(seed: int, count: int = 2) -> list[bytes]:
    return class_images(seed, count)


def test_task_lifecycle_from_paths_pil_images_and_bytes(
    live_server: LiveServer, tmp_path: Path
) -> None:
    alpha, beta, gamma = _images(1), _images(2), _images(3)
    for i, data in enumerate(alpha):
        (tmp_path / f"alpha{i}.png").write_bytes(data)
    support = {
        "alpha": [tmp_path / "alpha0.png", str(tmp_path / "alpha1.png")],
        "beta": [Image.open(io.BytesIO(data)) for data in beta],
        "gamma": gamma,
    }
    with Client(live_server.url, live_server.user_key) as client:
        task = client.create_task(support, name="lifecycle", wait=30)
        assert task.ready and task.status == "ready"
        assert task.labels == ["alpha", "beta", "gamma"]
        assert task.counts == {"alpha": 2, "beta": 2, "gamma": 2}
        assert task.adapted_model is not None and task.adapted_model.support_accuracy > 0

        result = client.predict(task.id, [alpha[0], beta[1], gamma[0]], top_k=2)
        assert result.labels == ["alpha", "beta", "gamma"]
        first = result.predictions[0]
        assert len(first.top_k) == 2 and first.top_k[0][0] == "alpha"
        assert abs(sum(first.probabilities.values()) - 1) < 1e-4

        assert task.id in [t.id for t in client.iter_tasks(page_size=1)]
        assert client.get_task(task.id).name == "lifecycle"
        job = client.wait_for_job(task.job_id or "", timeout=10)
        assert job.state == "succeeded" and job.kind == "adapt"

        client.delete_task(task.id)
        with pytest.raises(NotFoundError) as caught:
            client.get_task(task.id)
        assert (caught.value.status, caught.value.code) == (404, "not_found")


def test_a_task_created_without_wait_is_predicted_once_adapted(live_server: LiveServer) -> None:
    # predict() retries 409 not_adapted_yet with the server's Retry-After until the task is ready.
    with Client(live_server.url, live_server.user_key) as client:
        task = client.create_task([(_images(4)[0], "x"), (_images(5)[0], "y")])
        result = client.predict(task.id, [_images(5)[0]])
        assert result.labels == ["y"]
        assert client.wait_for_task(task.id, timeout=30).ready


def test_problems_are_typed_errors(live_server: LiveServer) -> None:
    with (
        Client(live_server.url, "msk_not-a-key") as stranger,
        pytest.raises(AuthenticationError) as caught,
    ):
        stranger.list_tasks()
    assert caught.value.code == "invalid_api_key" and caught.value.status == 401

    with Client(live_server.url, live_server.user_key) as client:
        with pytest.raises(PermissionDenied) as denied:
            client.list_datasets()
        assert denied.value.code == "forbidden"
        with pytest.raises(InvalidRequest) as invalid:
            client.create_task({"a": [b"not an image"], "b": [_images(6)[0]]})
        assert invalid.value.status == 422 and invalid.value.code == "invalid_image"
        assert "image" in invalid.value.detail


def test_async_client(live_server: LiveServer) -> None:
    async def scenario() -> list[str]:
        async with AsyncClient(live_server.url, live_server.user_key) as client:
            task = await client.create_task(
                [_images(7)[0], _images(8)[0]], labels=["cat", "dog"], wait=30
            )
            result = await client.predict(task.id, [_images(8)[0], _images(7)[0]])
            listed = [t.id async for t in client.iter_tasks()]
            assert task.id in listed
            await client.delete_task(task.id)
            return result.labels

    assert asyncio.run(scenario()) == ["dog", "cat"]


def test_admin_dataset_meta_training_promote_and_rollback(live_server: LiveServer) -> None:
    with Client(live_server.url, live_server.admin_key) as admin:
        before = next(i for i in admin.list_initializations() if i.is_active).version
        dataset = admin.upload_dataset(dataset_zip(groups=4, classes=6, images=6), "generated")
        assert dataset.class_count == 24 and dataset.image_count == 144
        assert dataset.id in [d.id for d in admin.list_datasets()]

        body = tiny_run(dataset.id)
        del body["dataset_id"]
        run = admin.start_meta_training(dataset.id, **body)
        assert run.state in {"queued", "running"}
        run = admin.wait_for_meta_training(run.id, timeout=120, interval=0.2)
        assert run.state == "succeeded", run.raw
        assert run.progress == 1.0 and run.curve
        assert admin.meta_training_curve_png(run.id).startswith(b"\x89PNG")
        version = str((run.result or {})["initialization_version"])

        promoted = admin.promote(version)
        assert (promoted.active_version, promoted.previous_version) == (version, before)
        rolled = admin.rollback()
        assert (rolled.active_version, rolled.previous_version) == (before, version)
        assert [p["action"] for p in admin.list_promotions(limit=2)] == ["rollback", "promote"]

        admin.delete_dataset(dataset.id)
        with pytest.raises(NotFoundError):
            admin.get_dataset(dataset.id)


def test_admin_keys_create_use_and_revoke(live_server: LiveServer) -> None:
    with Client(live_server.url, live_server.admin_key) as admin:
        created = admin.create_key(name="from-the-client")
        assert created.key is not None and created.key.startswith("msk_")
        assert created.scopes == ["user"] and created.state == "active"
        listed = {k.id: k for k in admin.list_keys()}
        assert listed[created.id].name == "from-the-client" and listed[created.id].key is None
        with Client(live_server.url, created.key) as user:
            assert user.list_tasks().items == []
            assert admin.revoke_key(created.id).state == "revoked"
            with pytest.raises(AuthenticationError):
                user.list_tasks()
