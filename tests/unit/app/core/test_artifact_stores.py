"""Both artifact stores, the local folder and S3 (a real SeaweedFS server), behave alike."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fastapi.testclient import TestClient

from app.core.errors import StorageUnavailable
from app.core.storage import ArtifactCorrupt, ArtifactStore, sha256_bytes, sha256_file
from app.core.storage_cache import LocalCopies
from app.core.storage_local import LocalArtifactStore
from app.core.storage_migration import migrate_to_s3
from app.core.storage_s3 import S3ArtifactStore, s3_client
from app.core.storage_sweep import sweep_orphans
from app.models import utcnow
from tests.helpers import create_ready_task, make_settings, runtime_of
from tests.seaweedfs import SeaweedFS, aws_environment

T = TypeVar("T")


def s3_store(
    server: SeaweedFS, cache: Path, *, page_size: int = 1000, cache_bytes: int = 1 << 30
) -> S3ArtifactStore:
    """An S3 store under a prefix of its own, configured as the service configures it."""
    settings = make_settings(
        cache.parent / "data",
        cache.parent,
        artifact_backend="s3",
        s3_bucket=server.bucket,
        s3_endpoint_url=server.endpoint,
        s3_region="us-east-1",
    )
    return S3ArtifactStore(
        s3_client(settings),
        server.bucket,
        LocalCopies(cache, cache_bytes),
        prefix=f"test-{uuid.uuid4().hex[:10]}",
        page_size=page_size,
    )


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test server's credentials in the environment, where the service reads them."""
    for name, value in aws_environment().items():
        monkeypatch.setenv(name, value)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    """Each backend in turn, empty."""
    if request.param == "local":
        (tmp_path / "store").mkdir()
        return LocalArtifactStore(tmp_path / "store")
    request.getfixturevalue("aws_env")
    return s3_store(request.getfixturevalue("s3_server"), tmp_path / "cache", page_size=7)


def recovered(attempt: Callable[[], T], timeout: float = 30) -> T:
    """The first result of `attempt` once the store serves again (StorageUnavailable until then)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return attempt()
        except StorageUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def tamper(store: ArtifactStore, key: str, data: bytes) -> None:
    """Replace a stored object's bytes behind the store's back."""
    if isinstance(store, LocalArtifactStore):
        store.path(key).write_bytes(data)
    else:
        assert isinstance(store, S3ArtifactStore)
        store.client.put_object(Bucket=store.bucket, Key=store.prefix + key, Body=data)


def test_bytes_round_trip_with_the_digest_checked(store: ArtifactStore) -> None:
    sha = store.put_bytes("tasks/a/models/m.safetensors", b"weights")
    assert sha == sha256_bytes(b"weights")
    assert store.read_bytes("tasks/a/models/m.safetensors", sha) == b"weights"
    assert store.exists("tasks/a/models/m.safetensors") and store.exists("tasks/a")
    assert not store.exists("tasks/b")
    # put_bytes replaces (an adapt job run again writes its key again).
    store.put_bytes("tasks/a/models/m.safetensors", b"again")
    assert store.read_bytes("tasks/a/models/m.safetensors") == b"again"
    with pytest.raises(ArtifactCorrupt):
        store.read_bytes("tasks/a/models/m.safetensors", sha)
    with pytest.raises(FileNotFoundError):
        store.read_bytes("tasks/a/missing.png")
    with pytest.raises(ValueError, match="escapes"):
        store.read_bytes("tasks/../../etc/passwd")


def test_a_corrupted_object_is_refused_on_every_read(store: ArtifactStore) -> None:
    data = b"support image" * 100
    sha = sha256_bytes(data)
    store.put_many({f"tasks/t/support/{sha}.png": data})
    tamper(store, f"tasks/t/support/{sha}.png", b"tampered")
    with pytest.raises(ArtifactCorrupt) as caught:
        store.read_bytes(f"tasks/t/support/{sha}.png", sha)
    assert caught.value.status == 409 and "tasks/" not in caught.value.detail
    with pytest.raises(ArtifactCorrupt):
        store.local_file(f"tasks/t/support/{sha}.png", sha)


def test_content_addressed_writes_never_replace_what_is_there(
    s3_server: SeaweedFS, aws_env: None, tmp_path: Path
) -> None:
    store = s3_store(s3_server, tmp_path / "cache")
    store.put_many({"tasks/t/support/x.png": b"first"})
    # If-None-Match: * answered 412 by the server: the key keeps its first bytes, no error.
    store.put_many({"tasks/t/support/x.png": b"second", "tasks/t/support/y.png": b"new"})
    assert store.read_bytes("tasks/t/support/x.png") == b"first"
    assert store.read_bytes("tasks/t/support/y.png") == b"new"
    assert store.head("tasks/t/support/y.png") == (3, sha256_bytes(b"new"))


def test_large_files_go_up_whole_and_come_back_as_checked_local_copies(
    store: ArtifactStore, tmp_path: Path
) -> None:
    source = tmp_path / "dataset.zip"
    # Over the 16 MiB multipart threshold: the S3 store uploads it in parts.
    source.write_bytes(os.urandom(17 * 1024 * 1024 + 5))
    sha = store.put_file("datasets/d/dataset.zip", source)
    assert sha == sha256_file(source)
    local = store.local_file("datasets/d/dataset.zip", sha)
    assert local.read_bytes() == source.read_bytes()
    assert store.local_file("datasets/d/dataset.zip", sha) == local
    with pytest.raises(ArtifactCorrupt):
        store.local_file("datasets/d/dataset.zip", "0" * 64)


def test_local_copies_are_kept_and_reused(
    s3_server: SeaweedFS, aws_env: None, tmp_path: Path
) -> None:
    store = s3_store(s3_server, tmp_path / "cache")
    sha = store.put_bytes("tasks/t/models/a.safetensors", b"model bytes")
    first = store.local_file("tasks/t/models/a.safetensors", sha)
    assert first.is_relative_to(tmp_path / "cache") and first.name == sha

    def no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("downloaded again")

    store.client.download_file = no_download
    assert store.local_file("tasks/t/models/a.safetensors", sha) == first
    # A local copy that rotted is noticed and fetched again.
    first.write_bytes(b"rotten")
    del store.client.download_file
    assert store.local_file("tasks/t/models/a.safetensors", sha).read_bytes() == b"model bytes"


def test_the_copies_folder_stays_within_its_budget(tmp_path: Path) -> None:
    copies = LocalCopies(tmp_path / "cache", max_bytes=2500)
    paths = []
    for index in range(4):
        data = bytes([index]) * 1000
        paths.append(copies.file(sha256_bytes(data), lambda target, d=data: target.write_bytes(d)))
        time.sleep(0.01)  # distinct modification times: the eviction order
    assert [p is not None and p.exists() for p in paths] == [False, False, True, True]
    assert copies.size_bytes == 2000
    # What was fetched must match the digest asked for; nothing is kept otherwise.
    assert copies.file("0" * 64, lambda target: target.write_bytes(b"other")) is None
    assert copies.size_bytes == 2000


def test_folders_go_in_once_and_come_back_checked(store: ArtifactStore, tmp_path: Path) -> None:
    folder = tmp_path / "init"
    (folder / "inner").mkdir(parents=True)
    (folder / "weights.safetensors").write_bytes(b"w" * 100)
    (folder / "inner" / "config.json").write_bytes(b"{}")
    store.put_tree("initializations/v1", folder)
    # A second registration of the same version keeps what is stored.
    (folder / "weights.safetensors").write_bytes(b"changed")
    store.put_tree("initializations/v1", folder)
    sha = sha256_bytes(b"w" * 100)
    local = store.local_tree("initializations/v1", {"weights.safetensors": sha})
    assert (local / "weights.safetensors").read_bytes() == b"w" * 100
    assert (local / "inner" / "config.json").read_bytes() == b"{}"
    with pytest.raises(ArtifactCorrupt):
        store.local_tree("initializations/v1", {"weights.safetensors": "0" * 64})
    with pytest.raises(FileNotFoundError):
        store.local_tree("initializations/none")


def test_delete_tree_removes_every_page_and_nothing_beside(store: ArtifactStore) -> None:
    # The S3 store lists 7 keys a page here: 25 objects take four pages.
    store.put_many({f"tasks/x/support/{i:02d}.png": b"i" for i in range(25)})
    store.put_bytes("tasks/xy/models/keep.safetensors", b"beside")
    listed = [item.key for item in store.iter_objects("tasks/x")]
    assert listed == [f"tasks/x/support/{i:02d}.png" for i in range(25)]
    assert all(item.size == 1 for item in store.iter_objects("tasks/x"))
    store.delete_tree("tasks/x")
    assert list(store.iter_objects("tasks/x")) == []
    assert [item.key for item in store.iter_objects("tasks")] == [
        "tasks/xy/models/keep.safetensors"
    ]
    store.delete_tree("tasks/never-there")


def test_the_sweep_reclaims_orphans_past_the_grace_period_only(
    store: ArtifactStore, client: TestClient, auth: dict[str, str]
) -> None:
    live = create_ready_task(client, auth)["id"]
    orphan, dataset = uuid.uuid4(), uuid.uuid4()
    store.put_bytes(f"tasks/{live}/models/m.safetensors", b"live")
    store.put_many({f"tasks/{orphan}/support/a.png": b"a", f"tasks/{orphan}/support/b.png": b"b"})
    store.put_bytes(f"datasets/{dataset}/dataset.zip", b"zip")
    store.put_bytes("tasks/not-an-id/x.png", b"?")
    sessions = runtime_of(client).sessions

    # Just written: a create may be in flight, so nothing is swept yet.
    recent = sweep_orphans(store, sessions, grace=timedelta(hours=1))
    assert recent.deleted == [] and len(recent.too_recent) == 2
    later = utcnow() + timedelta(hours=2)
    dry = sweep_orphans(store, sessions, grace=timedelta(hours=1), dry_run=True, now=later)
    assert sorted(dry.orphans) == sorted([f"tasks/{orphan}", f"datasets/{dataset}"])
    assert dry.deleted == [] and dry.objects == 3 and dry.bytes == 5
    assert store.exists(f"tasks/{orphan}")

    swept = sweep_orphans(store, sessions, grace=timedelta(hours=1), now=later)
    assert sorted(swept.deleted) == sorted(dry.orphans) and swept.checked == 4
    assert not store.exists(f"tasks/{orphan}") and not store.exists(f"datasets/{dataset}")
    assert store.exists(f"tasks/{live}/models/m.safetensors")
    assert store.exists("tasks/not-an-id/x.png")


def test_an_unreachable_server_is_a_503_within_seconds_and_then_recovers(
    s3_server: SeaweedFS, aws_env: None, tmp_path: Path
) -> None:
    store = s3_store(s3_server, tmp_path / "cache")
    sha = store.put_bytes("tasks/t/models/m.safetensors", b"weights")
    s3_server.stop()
    try:
        for attempt in (
            lambda: store.read_bytes("tasks/t/models/m.safetensors", sha),
            lambda: store.local_file("tasks/t/models/m.safetensors", sha),
            lambda: store.put_bytes("tasks/t/models/n.safetensors", b"more"),
            lambda: store.put_many({"tasks/t/support/a.png": b"a"}),
            lambda: store.delete_tree("tasks/t"),
        ):
            started = time.monotonic()
            with pytest.raises(StorageUnavailable) as caught:
                attempt()
            assert time.monotonic() - started < 15
            error = caught.value
            assert error.status == 503 and error.code == "storage_unavailable"
            assert error.headers["Retry-After"] == "5"
            for secret in (s3_server.bucket, s3_server.endpoint, "127.0.0.1", "tasks/"):
                assert secret not in error.detail
    finally:
        s3_server.start()
    assert recovered(lambda: store.read_bytes("tasks/t/models/m.safetensors", sha)) == b"weights"


def test_a_frozen_server_is_a_503_too_not_a_hang(
    s3_server: SeaweedFS, aws_env: None, tmp_path: Path
) -> None:
    store = s3_store(s3_server, tmp_path / "cache")
    sha = store.put_bytes("tasks/t/models/m.safetensors", b"weights")
    settings = make_settings(
        tmp_path / "data",
        tmp_path,
        artifact_backend="s3",
        s3_bucket=s3_server.bucket,
        s3_endpoint_url=s3_server.endpoint,
        s3_connect_timeout_seconds=1,
        s3_read_timeout_seconds=1,
    )
    quick = S3ArtifactStore(
        s3_client(settings), s3_server.bucket, store.copies, prefix=store.prefix
    )
    assert s3_server.process is not None
    # Stopped, not gone: connections are accepted and never answered.
    s3_server.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            quick.read_bytes("tasks/t/models/m.safetensors", sha)
        # Three attempts of a one-second read, and the backoff between them.
        assert time.monotonic() - started < 10
    finally:
        s3_server.process.send_signal(signal.SIGCONT)
    assert recovered(lambda: quick.read_bytes("tasks/t/models/m.safetensors", sha)) == b"weights"


def test_migration_copies_a_local_store_verifies_it_and_is_idempotent(
    s3_server: SeaweedFS, aws_env: None, tmp_path: Path
) -> None:
    local = LocalArtifactStore(tmp_path / "artifacts")
    local.root.mkdir()
    local.put_many({"tasks/t/support/a.png": b"a" * 10, "tasks/t/support/b.png": b"b"})
    local.put_bytes("tasks/t/models/m.safetensors", b"weights")
    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "weights.safetensors").write_bytes(b"w" * 1000)
    local.put_tree("initializations/v1", tmp_path / "init")
    # A write a crash left half done is no object: it is not copied.
    (local.root / "tasks/t/support/.c.png.0123.tmp").write_bytes(b"partial")
    target = s3_store(s3_server, tmp_path / "cache")

    first = migrate_to_s3(local, target)
    assert first.to_dict() == {
        "objects": 4, "bytes": 1018, "copied": 4, "already_there": 0, "verified": 4, "failed": []
    }  # fmt: skip
    for item in local.iter_objects(""):
        assert target.read_bytes(item.key) == local.path(item.key).read_bytes()
    assert {i.key for i in target.iter_objects("")} == {i.key for i in local.iter_objects("")}

    second = migrate_to_s3(local, target)
    assert (second.copied, second.already_there, second.verified) == (0, 4, 4)
    # An object that differs in the bucket is copied again.
    tamper(target, "tasks/t/models/m.safetensors", b"other")
    third = migrate_to_s3(local, target)
    assert (third.copied, third.already_there, third.verified) == (1, 3, 4)
    assert target.read_bytes("tasks/t/models/m.safetensors") == b"weights"


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_init_dir: Path) -> Iterator[Path]:
    """MAML_SERVE_ settings for the CLI in a private data folder; get_settings reads them."""
    from app.core.config import get_settings

    monkeypatch.setenv("MAML_SERVE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MAML_SERVE_INITIALIZATION_PATH", str(tiny_init_dir))
    get_settings.cache_clear()
    yield tmp_path / "data"
    get_settings.cache_clear()


def test_the_storage_commands(
    s3_server: SeaweedFS,
    aws_env: None,
    cli_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    from app.cli import main
    from app.core.config import get_settings

    local = LocalArtifactStore(cli_env / "artifacts")
    local.root.mkdir(parents=True)
    orphan = uuid.uuid4()
    local.put_bytes(f"tasks/{orphan}/models/m.safetensors", b"m")
    assert main(["storage", "sweep", "--dry-run", "--grace", "1s", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped_recent_prefixes"] == [f"tasks/{orphan}"]
    time.sleep(1.1)
    assert main(["storage", "sweep", "--dry-run", "--grace", "1s", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["orphan_prefixes"] == [f"tasks/{orphan}"] and report["deleted_prefixes"] == []
    assert local.exists(f"tasks/{orphan}")

    prefix = f"cli-{uuid.uuid4().hex[:8]}"
    for name, value in s3_server.settings_env(prefix).items():
        monkeypatch.setenv(name, value)
    # Migrated before the services switch to the S3 backend.
    monkeypatch.setenv("MAML_SERVE_ARTIFACT_BACKEND", "local")
    get_settings.cache_clear()
    assert main(["storage", "migrate-to-s3", "--json"]) == 0
    copied = json.loads(capsys.readouterr().out)
    assert copied["copied"] == copied["verified"] == 1 and copied["failed"] == []
    assert main(["storage", "migrate-to-s3", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["copied"] == 0 and again["already_there"] == again["verified"] == 1

    # The same sweep against the bucket, now the configured backend.
    monkeypatch.setenv("MAML_SERVE_ARTIFACT_BACKEND", "s3")
    get_settings.cache_clear()
    time.sleep(1.1)  # the copies are as old as the migration: the grace period starts again
    assert main(["storage", "sweep", "--grace", "1s", "--json"]) == 0
    swept = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert swept["deleted_prefixes"] == [f"tasks/{orphan}"]
    client = s3_server.client()
    listed = client.list_objects_v2(Bucket=s3_server.bucket, Prefix=f"{prefix}/tasks/")
    assert listed.get("KeyCount", 0) == 0


@pytest.fixture
def s3_client_app(
    s3_server: SeaweedFS,
    aws_env: None,
    tmp_path: Path,
    tiny_init_dir: Path,
) -> Iterator[TestClient]:
    """The embedded app (SQLite, in-process jobs) with its artifacts in the S3 bucket."""
    settings = make_settings(
        tmp_path / "data",
        tiny_init_dir,
        artifact_backend="s3",
        s3_bucket=s3_server.bucket,
        s3_prefix=f"app-{uuid.uuid4().hex[:8]}",
        s3_endpoint_url=s3_server.endpoint,
        # Every support image is stored as an object, none in its row.
        support_inline_max_bytes=0,
    )
    from app.main import create_app

    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_the_api_answers_503_with_retry_after_while_s3_is_down(
    s3_client_app: TestClient, s3_server: SeaweedFS
) -> None:
    from tests.helpers import create_key, query_files, support_files

    client = s3_client_app
    headers = create_key(client, "acme")
    task = create_ready_task(client, headers)
    deleted = create_ready_task(client, headers, ["x", "y"])
    runtime = runtime_of(client)
    store = runtime.store
    assert not (runtime.settings.data_dir / "artifacts").exists()
    assert store.exists(f"tasks/{deleted['id']}/support")
    # Only what the memory cache does not hold needs the store.
    runtime.models.forget([uuid.UUID(task["adapted_model"]["id"])])
    s3_server.stop()
    try:
        files, data = support_files(["a", "b"], seed=5)
        created = client.post("/v1/tasks", headers=headers, files=files, data=data)
        predicted = client.post(
            f"/v1/tasks/{task['id']}/predictions", headers=headers, files=query_files(2)
        )
        for response in (created, predicted):
            assert response.status_code == 503, response.text
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.headers["Retry-After"] == "5"
            body = response.json()
            assert body["code"] == "storage_unavailable"
            assert s3_server.bucket not in body["detail"] and "127.0.0.1" not in body["detail"]
        # The row goes; its objects wait for the sweep.
        gone = client.delete(f"/v1/tasks/{deleted['id']}", headers=headers)
        assert gone.status_code == 204
    finally:
        s3_server.start()

    def predict() -> Any:
        answer = client.post(
            f"/v1/tasks/{task['id']}/predictions", headers=headers, files=query_files(2)
        )
        if answer.status_code == 503:
            raise StorageUnavailable()
        return answer

    predicted = recovered(predict)
    assert predicted.status_code == 200, predicted.text
    assert store.exists(f"tasks/{deleted['id']}/support")
    later = utcnow() + timedelta(hours=2)
    swept = sweep_orphans(store, runtime.sessions, grace=timedelta(hours=1), now=later)
    assert f"tasks/{deleted['id']}" in swept.deleted
    assert not store.exists(f"tasks/{deleted['id']}")
    assert client.delete(f"/v1/tasks/{task['id']}", headers=headers).status_code == 204
    assert not store.exists(f"tasks/{task['id']}")
