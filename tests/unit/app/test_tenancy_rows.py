"""Issue rows on races and retries: one adaptation at a time per task, idempotency keys, and
predictions racing a DELETE."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from app.adaptations import service as adaptations
from app.jobs import state
from app.models import Job, Task
from app.tasks import service as tasks
from tests.helpers import create_key, create_ready_task, query_files, runtime_of, support_files
from tests.unit.app.test_tenancy_routes import add_private_version


def _count(client: TestClient, model: Any, *where: Any) -> int:
    with runtime_of(client).sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def test_the_database_refuses_a_second_adaptation_in_progress(
    client: TestClient, auth: dict[str, str]
) -> None:
    task = create_ready_task(client, auth)
    runtime = runtime_of(client)
    with runtime.sessions() as session:
        row = session.get(Task, uuid.UUID(task["id"]))
        assert row is not None

        def job() -> Job:
            return state.new_job(
                kind="adapt",
                settings=runtime.settings,
                tenant_id=row.tenant_id,
                task_id=row.id,
                initialization_id=row.initialization_id,
            )

        session.add(job())
        session.commit()
        session.add(job())
        with pytest.raises(IntegrityError):
            session.commit()


def test_concurrent_readaptations_accept_one(
    client: TestClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    task = create_ready_task(client, auth)
    # Jobs stay queued (nothing runs them), so every request but one must be refused, and the
    # check before the insert is passed by several at once without the unique index.
    dispatcher = client.app.state.dispatcher  # type: ignore[attr-defined]
    monkeypatch.setattr(dispatcher, "submit", lambda *args: None)
    monkeypatch.setattr("app.adaptations.service.select", _slow_select(select))
    start = threading.Barrier(8)

    def readapt(_: int) -> tuple[int, str]:
        start.wait()
        response = client.post(f"/v1/tasks/{task['id']}/adaptations", headers=auth)
        return response.status_code, response.json().get("code", "")

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(readapt, range(8)))
    assert sorted(answers).count((202, "")) == 1, answers
    assert all(a == (409, "adaptation_in_progress") for a in answers if a[0] != 202), answers
    pending = (Job.task_id == uuid.UUID(task["id"]), Job.state == "queued")
    assert _count(client, Job, *pending) == 1


def _slow_select(select_: Any) -> Any:
    """select() for the in-progress check, which then waits a little: requests overlap there."""
    barrier_time = 0.2

    def slow(*args: Any, **kwargs: Any) -> Any:
        statement = select_(*args, **kwargs)
        if args and args[0] is Job.id:
            threading.Event().wait(barrier_time)
        return statement

    return slow


def test_an_empty_idempotency_key_is_refused(client: TestClient, auth: dict[str, str]) -> None:
    files, data = support_files(["a", "b"])
    response = client.post(
        "/v1/tasks", headers={**auth, "Idempotency-Key": ""}, files=files, data=data
    )
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_idempotency_key"
    assert _count(client, Task) == 0


def test_an_identical_retry_after_a_promotion_is_replayed(
    client: TestClient, auth: dict[str, str]
) -> None:
    admin = create_key(client, "acme", admin=True)
    files, data = support_files(["a", "b"])
    headers = {**auth, "Idempotency-Key": "retry-1"}
    first = client.post("/v1/tasks?wait=30", headers=headers, files=files, data=data)
    assert first.status_code == 201, first.text
    add_private_version(client, "acme", "acme-v2", "acme-data")
    promoted = client.post("/v1/admin/initializations/acme-v2/promote", headers=admin)
    assert promoted.json()["active_version"] == "acme-v2"
    again = client.post("/v1/tasks", headers=headers, files=files, data=data)
    assert again.status_code in (200, 201, 202), again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["initialization_version"] == "tiny-test-1"
    assert _count(client, Task) == 1
    # A new request (another key) adapts from the promoted version.
    other = client.post("/v1/tasks?wait=30", headers=auth, files=files, data=data)
    assert other.json()["initialization_version"] == "acme-v2"


def test_a_prediction_racing_a_delete_is_a_404(
    client: TestClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    task = create_ready_task(client, auth)
    runtime = runtime_of(client)
    original = adaptations.current_adapted_model

    def deleted_meanwhile(*, session: Any, task_id: uuid.UUID) -> Any:
        # The DELETE commits after the request read the task, before it reads the model.
        with runtime.sessions() as other:
            row = other.get(Task, task_id)
            assert row is not None
            tasks.delete_task(session=other, runtime=runtime, task=row)
        return original(session=session, task_id=task_id)

    monkeypatch.setattr(adaptations, "current_adapted_model", deleted_meanwhile)
    response = client.post(
        f"/v1/tasks/{task['id']}/predictions", headers=auth, files=query_files(1)
    )
    assert response.status_code == 404, response.text
    assert response.json()["code"] == "not_found"
    assert "Retry-After" not in response.headers


def test_predictions_racing_a_delete_never_say_not_adapted_yet(
    client: TestClient, auth: dict[str, str]
) -> None:
    task = create_ready_task(client, auth)
    start = threading.Barrier(13)

    def predict(_: int) -> int:
        start.wait()
        response = client.post(
            f"/v1/tasks/{task['id']}/predictions", headers=auth, files=query_files(1)
        )
        assert response.status_code in (200, 404), response.text
        return int(response.status_code)

    def delete() -> int:
        start.wait()
        return int(client.delete(f"/v1/tasks/{task['id']}", headers=auth).status_code)

    with ThreadPoolExecutor(13) as pool:
        deleted = pool.submit(delete)
        answers = list(pool.map(predict, range(12)))
    assert deleted.result() == 204
    assert set(answers) <= {200, 404}
