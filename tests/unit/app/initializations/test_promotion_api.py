"""Auto-promotion through the admin API: fixed validation groups, paired comparison, refusals."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.main import create_app
from app.meta_training import handler
from app.models import Initialization
from fewshot import promotion as fp
from tests.admin_data import class_images, tiny_run, upload, wait_run
from tests.helpers import create_key, make_settings, runtime_of


@pytest.fixture
def admin(client: TestClient) -> dict[str, str]:
    """Headers with an admin key of tenant "acme"."""
    return create_key(client, "acme", admin=True)


def grouped_zip(groups: Sequence[str], classes: int, images: int = 6) -> bytes:
    """group/class/image.png for each named group, `classes` generated classes each."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for g, group in enumerate(groups):
            for c in range(classes):
                for i, data in enumerate(class_images(7_000 + g * 100 + c, images)):
                    archive.writestr(f"{group}/class{c}/{i}.png", data)
    return buffer.getvalue()


def forced(difference: float, ci95: float = 0.002) -> Any:
    """A stand-in for the paired scoring that reports `difference` on every shape it is given."""

    def paired(
        candidate: Any,
        active: Any,
        val: Any,
        active_val: Any,
        shapes: Any,
        episodes: int,
        device: Any,
    ) -> fp.PromotionVerdict:
        assert active_val is val and episodes >= fp.MIN_EPISODES
        comparisons = [
            fp.ShapeComparison(
                ways=w,
                shots=k,
                within_group=within,
                episodes=episodes,
                candidate=0.9 + difference,
                active=0.9,
                difference=difference,
                ci95=ci95,
                margin=fp.DEFAULT_MARGIN,
            )
            for w, k, within in shapes
        ]
        return fp.verdict(comparisons, shapes, validation_groups=val.group_names)

    return paired


def _run(client: TestClient, admin: dict[str, str], dataset_id: str, **extra: Any) -> Any:
    body = tiny_run(dataset_id, **extra)
    started = client.post("/v1/admin/meta-trainings", headers=admin, json=body)
    assert started.status_code == 202, started.text
    run = wait_run(client, admin, started.json()["id"], timeout=240)
    assert run["state"] == "succeeded", run
    return run


def _default_version(client: TestClient, headers: dict[str, str]) -> str:
    listed = client.get("/v1/initializations", headers=headers).json()
    return str(listed["active_version"])


@pytest.fixture(scope="module")
def wide_zip() -> bytes:
    """4 groups of 20 classes: the held-out group can supply 20-way episodes."""
    return grouped_zip([f"script{g}" for g in range(4)], classes=20)


def test_validation_groups_are_fixed_at_registration(
    client: TestClient, admin: dict[str, str], wide_zip: bytes
) -> None:
    names = [f"script{g}" for g in range(4)]
    first = upload(client, admin, wide_zip, "wide-a").json()
    again = upload(client, admin, wide_zip, "wide-b").json()
    assert first["validation_groups"] == fp.choose_validation_groups(names)
    assert again["validation_groups"] == first["validation_groups"]
    assert first["details"]["validation_by"] == "group"
    assert first["details"]["validation_classes"] == 20 * len(first["validation_groups"])
    flat = io.BytesIO()
    with zipfile.ZipFile(flat, "w") as archive:
        for c in range(10):
            for i, data in enumerate(class_images(c, 2)):
                archive.writestr(f"c{c}/{i}.png", data)
    shown = upload(client, admin, flat.getvalue(), "flat").json()
    assert shown["details"]["validation_by"] == "class"
    assert shown["validation_groups"] == fp.choose_validation_groups([f"c{c}" for c in range(10)])


def test_a_not_worse_version_is_promoted_and_the_comparison_is_stored(
    client: TestClient,
    admin: dict[str, str],
    wide_zip: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The new version alone is scored for real in the end-to-end test.
    monkeypatch.setattr(handler, "_score", lambda *args: {})
    monkeypatch.setattr(handler, "_paired", forced(0.0))
    dataset = upload(client, admin, wide_zip, "wide").json()
    held = dataset["validation_groups"]
    run = _run(client, admin, dataset["id"], auto_promote=True)
    promotion = run["result"]["promotion"]
    assert run["result"]["promoted"] is True, promotion
    assert promotion["promote"] is True and promotion["baseline_version"] == "tiny-test-1"
    assert promotion["validation_groups"] == held and promotion["episodes"] >= 400
    assert [c["name"] for c in promotion["comparisons"]] == ["5-way 1-shot", "20-way 1-shot"]
    version = run["result"]["initialization_version"]
    assert _default_version(client, admin) == version
    latest = client.get("/v1/admin/promotions", headers=admin).json()["items"][0]
    assert (latest["action"], latest["version"], latest["actor"]) == (
        "auto_promote",
        version,
        f"job:{run['id']}",
    )
    shown = client.get(f"/v1/initializations/{version}", headers=admin).json()
    assert shown["metrics"]["promotion"]["comparisons"] == promotion["comparisons"]
    assert shown["metrics"]["validation_groups"] == held
    assert not set(shown["metrics"]["training_groups"]) & set(held)
    runtime = runtime_of(client)
    with runtime.sessions() as session:
        row = session.scalar(select(Initialization).where(Initialization.version == version))
        assert row is not None
        folder = runtime.store.path(row.artifact_key)
    init = runtime.models.initialization(row)
    assert init.metadata["validation_groups"] == held
    assert sorted(init.metadata["training_groups"]) == sorted(
        {f"script{g}" for g in range(4)} - set(held)
    )
    card = (folder / "README.md").read_text()
    assert "Promotion comparison against tiny-test-1" in card and "| 20-way 1-shot |" in card


def test_a_worse_version_is_not_promoted(
    client: TestClient,
    admin: dict[str, str],
    wide_zip: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The new version alone is scored for real in the end-to-end test.
    monkeypatch.setattr(handler, "_score", lambda *args: {})
    monkeypatch.setattr(handler, "_paired", forced(-0.02))
    dataset = upload(client, admin, wide_zip, "wide").json()
    run = _run(client, admin, dataset["id"], auto_promote=True)
    assert run["result"]["promoted"] is False
    reasons = run["result"]["promotion"]["reasons"]
    assert any("5-way 1-shot" in r and "worse beyond" in r for r in reasons), reasons
    assert _default_version(client, admin) == "tiny-test-1"
    assert run["result"]["metrics"]["comparison"]["5w1s"]["not_worse"] is False


def test_a_missing_shape_refuses_promotion_end_to_end(
    client: TestClient, admin: dict[str, str]
) -> None:
    # Real scoring: the held-out group has 8 classes, too few for 20-way episodes.
    data = grouped_zip([f"script{g}" for g in range(4)], classes=8)
    dataset = upload(client, admin, data, "narrow").json()
    run = _run(client, admin, dataset["id"], auto_promote=True, validation_episodes=2)
    promotion = run["result"]["promotion"]
    assert run["result"]["promoted"] is False
    assert "20-way 1-shot: the validation data cannot supply this shape" in promotion["reasons"]
    (five,) = promotion["comparisons"]
    assert (five["name"], five["episodes"]) == ("5-way 1-shot", 400)
    assert 0 <= five["candidate"] <= 1 and 0 <= five["active"] <= 1
    assert five["difference"] == pytest.approx(five["candidate"] - five["active"], abs=1e-9)
    assert _default_version(client, admin) == "tiny-test-1"
    version = run["result"]["initialization_version"]
    shown = client.get(f"/v1/initializations/{version}", headers=admin).json()
    assert shown["metrics"]["promotion"]["reasons"] == promotion["reasons"]
    assert shown["metrics"]["validation"]["5w1s"]["accuracy"] == pytest.approx(
        five["candidate"], abs=1e-4
    )
    runtime = runtime_of(client)
    with runtime.sessions() as session:
        row = session.scalar(select(Initialization).where(Initialization.version == version))
        assert row is not None
        card = (runtime.store.path(row.artifact_key) / "README.md").read_text()
    assert "| 5w1s |" in card and "20-way 1-shot: the validation data cannot supply" in card


def test_validation_groups_in_a_versions_training_refuse_promotion(
    client: TestClient,
    admin: dict[str, str],
    wide_zip: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = [f"script{g}" for g in range(4)]
    first = upload(client, admin, wide_zip, "wide").json()
    baseline = _run(client, admin, first["id"])["result"]["initialization_version"]
    promoted = client.post(f"/v1/admin/initializations/{baseline}/promote", headers=admin)
    assert promoted.status_code == 200, promoted.text
    # The same scripts without the first dataset's held-out one: whatever this dataset holds
    # out, the baseline was trained on it.
    rest = [n for n in names if n not in first["validation_groups"]]
    second = upload(client, admin, grouped_zip(rest, classes=20), "rest").json()
    assert set(second["validation_groups"]) <= set(rest)
    # The new version alone is scored for real in the end-to-end test.
    monkeypatch.setattr(handler, "_score", lambda *args: {})
    monkeypatch.setattr(handler, "_paired", forced(0.05))
    run = _run(client, admin, second["id"], auto_promote=True)
    assert run["result"]["promoted"] is False
    reasons = run["result"]["promotion"]["reasons"]
    assert any("overlap" in r and second["validation_groups"][0] in r for r in reasons), reasons
    assert _default_version(client, admin) == baseline


def test_omniglot_registration_fixes_the_held_out_alphabets(
    tmp_path: Path, tiny_init_dir: Path
) -> None:
    # Laid out like images_background.zip: one wrapper folder, then alphabet/character/image.
    alphabets = ["Greek", "Latin", "Korean", "Bengali", "Tifinagh", "Gujarati"]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for a, alphabet in enumerate(alphabets):
            for c in range(4):
                for i, data in enumerate(class_images(a * 10 + c, 2)):
                    archive.writestr(f"images_background/{alphabet}/char{c}/{i}.png", data)
    source = tmp_path / "background.zip"
    source.write_bytes(buffer.getvalue())
    settings = make_settings(tmp_path / "state", tiny_init_dir, omniglot_path=source)
    with TestClient(create_app(settings)) as client:
        admin = create_key(client, "acme", admin=True)
        response = client.post("/v1/admin/datasets/omniglot", headers=admin, json={})
        assert response.status_code == 201, response.text
        shown = response.json()
    held = fp.choose_validation_groups(alphabets)
    assert shown["validation_groups"] == held and set(held) <= set(alphabets)
    assert shown["details"]["validation_classes"] == 4 * len(held)
