"""API keys with a life cycle: admin routes and `maml-serve keys`, revocation at once, expiry,
rotation, last_used_at kept to the minute, never a hash shown."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app import cli
from app.core.config import get_settings
from app.keys import service as keys
from app.models import ApiKey, utcnow
from tests.helpers import create_key, runtime_of


@pytest.fixture
def admin(client: TestClient) -> dict[str, str]:
    """Headers with an admin key of tenant "acme"."""
    return create_key(client, "acme", admin=True)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _row(client: TestClient, key_id: str) -> ApiKey:
    with runtime_of(client).sessions() as session:
        row = session.get(ApiKey, uuid.UUID(key_id))
        assert row is not None
        session.expunge(row)
        return row


def test_admin_creates_lists_and_revokes_keys(client: TestClient, admin: dict[str, str]) -> None:
    created = client.post("/v1/admin/keys", headers=admin, json={"name": "ci"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["key"].startswith(body["prefix"]) and body["scopes"] == ["user"]
    assert client.get("/v1/tasks", headers=_bearer(body["key"])).status_code == 200
    listed = client.get("/v1/admin/keys", headers=admin)
    assert listed.status_code == 200
    items = {item["id"]: item for item in listed.json()["items"]}
    assert items[body["id"]]["state"] == "active" and items[body["id"]]["name"] == "ci"
    # Never the key itself nor its hash; the prefix only.
    assert body["key"] not in listed.text
    assert _row(client, body["id"]).key_hash not in listed.text
    assert all("key" not in item and "key_hash" not in item for item in items.values())

    revoked = client.post(f"/v1/admin/keys/{body['id']}/revoke", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
    # Effective at once: the very next request with it is refused.
    refused = client.get("/v1/tasks", headers=_bearer(body["key"]))
    assert refused.status_code == 401
    again = client.post(f"/v1/admin/keys/{body['id']}/revoke", headers=admin)
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]

    other = client.post("/v1/admin/keys", headers=admin, json={"admin": True}).json()
    assert other["scopes"] == ["user", "admin"]
    assert client.delete(f"/v1/admin/keys/{other['id']}", headers=admin).status_code == 204
    assert client.get("/v1/admin/keys", headers=_bearer(other["key"])).status_code == 401


def test_an_admin_cannot_create_or_take_over_an_operator_key(
    client: TestClient, admin: dict[str, str]
) -> None:
    refused = client.post("/v1/admin/keys", headers=admin, json={"operator": True})
    assert refused.status_code == 422
    runtime = runtime_of(client)
    with runtime.sessions() as session:
        row, _ = keys.create_api_key(
            session=session,
            tenant=keys.get_or_create_tenant(session=session, name="acme"),
            admin=False,
            operator=True,
            pepper=runtime.settings.api_key_pepper.get_secret_value(),
        )
        session.commit()
        operator_id = str(row.id)
    for method, path in [
        ("POST", f"/v1/admin/keys/{operator_id}/rotate"),
        ("POST", f"/v1/admin/keys/{operator_id}/revoke"),
        ("DELETE", f"/v1/admin/keys/{operator_id}"),
    ]:
        response = client.request(method, path, headers=admin)
        assert response.status_code == 403, (path, response.text)
    assert _row(client, operator_id).revoked_at is None


def test_rotation_replaces_a_key(client: TestClient, admin: dict[str, str]) -> None:
    old = client.post("/v1/admin/keys", headers=admin, json={"name": "svc"}).json()
    rotated = client.post(f"/v1/admin/keys/{old['id']}/rotate", headers=admin)
    assert rotated.status_code == 201, rotated.text
    new = rotated.json()
    assert (new["name"], new["scopes"]) == ("svc", old["scopes"]) and new["key"] != old["key"]
    assert client.get("/v1/tasks", headers=_bearer(old["key"])).status_code == 401
    assert client.get("/v1/tasks", headers=_bearer(new["key"])).status_code == 200
    # A revoked key cannot be rotated into a live one.
    dead = client.post(f"/v1/admin/keys/{old['id']}/rotate", headers=admin)
    assert (dead.status_code, dead.json()["code"]) == (409, "key_not_live")

    graced = client.post(
        f"/v1/admin/keys/{new['id']}/rotate", headers=admin, json={"grace_seconds": 3600}
    ).json()
    # The old key works until its grace period ends, then not.
    assert client.get("/v1/tasks", headers=_bearer(new["key"])).status_code == 200
    assert client.get("/v1/tasks", headers=_bearer(graced["key"])).status_code == 200
    ends = _row(client, new["id"]).expires_at
    assert ends is not None and timedelta(minutes=59) < ends - utcnow() <= timedelta(hours=1)
    _set(client, new["id"], expires_at=utcnow() - timedelta(seconds=1))
    assert client.get("/v1/tasks", headers=_bearer(new["key"])).status_code == 401
    listed = {i["id"]: i for i in client.get("/v1/admin/keys", headers=admin).json()["items"]}
    assert listed[new["id"]]["state"] == "expired"


def _set(client: TestClient, key_id: str, **values: Any) -> None:
    with runtime_of(client).sessions() as session:
        session.execute(update(ApiKey).where(ApiKey.id == uuid.UUID(key_id)).values(**values))
        session.commit()


def test_expiry(client: TestClient, admin: dict[str, str]) -> None:
    past = (utcnow() - timedelta(minutes=1)).isoformat()
    refused = client.post("/v1/admin/keys", headers=admin, json={"expires_at": past})
    assert (refused.status_code, refused.json()["code"]) == (422, "invalid_expiry")
    soon = (utcnow() + timedelta(hours=1)).isoformat()
    key = client.post("/v1/admin/keys", headers=admin, json={"expires_at": soon}).json()
    assert client.get("/v1/tasks", headers=_bearer(key["key"])).status_code == 200
    _set(client, key["id"], expires_at=utcnow() - timedelta(seconds=1))
    assert client.get("/v1/tasks", headers=_bearer(key["key"])).status_code == 401


def test_last_used_at_is_written_at_most_once_a_minute(
    client: TestClient, admin: dict[str, str]
) -> None:
    key = client.post("/v1/admin/keys", headers=admin, json={}).json()
    assert key["last_used_at"] is None
    client.get("/v1/tasks", headers=_bearer(key["key"]))
    first = _row(client, key["id"]).last_used_at
    assert first is not None and utcnow() - first < timedelta(seconds=30)
    client.get("/v1/tasks", headers=_bearer(key["key"]))
    assert _row(client, key["id"]).last_used_at == first
    # A minute later the next request writes it again.
    _set(client, key["id"], last_used_at=first - timedelta(minutes=2))
    client.get("/v1/tasks", headers=_bearer(key["key"]))
    assert _row(client, key["id"]).last_used_at > first  # type: ignore[operator]


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_keys_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MAML_SERVE_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    try:
        code, out, _ = _cli(
            capsys,
            "keys",
            "create",
            "--tenant",
            "ops",
            "--operator",
            "--expires-in",
            "2d",
            "--json",
        )
        assert code == 0
        created = json.loads(out)
        assert created["scopes"] == ["user", "admin", "operator"] and created["expires_at"]
        assert _cli(capsys, "keys", "create", "--tenant", "shop")[0] == 0

        code, out, _ = _cli(capsys, "keys", "list", "--json")
        listed = {item["id"]: item for item in json.loads(out)}
        assert code == 0 and listed[created["id"]]["tenant"] == "ops"
        assert created["key"] not in out and "hash" not in out
        code, out, _ = _cli(capsys, "keys", "list", "--tenant", "shop")
        assert code == 0 and len(out.strip().splitlines()) == 2 and "shop" in out

        code, out, err = _cli(capsys, "keys", "rotate", created["prefix"], "--json")
        rotated = json.loads(out)
        assert code == 0 and rotated["replaces"] == created["id"]
        code, _, _ = _cli(capsys, "keys", "revoke", rotated["id"])
        assert code == 0
        code, out, _ = _cli(capsys, "keys", "list", "--json")
        assert code == 0 and json.loads(out) and rotated["id"] not in out  # revoked: hidden
        code, out, _ = _cli(capsys, "keys", "list", "--all", "--json")
        states = {item["id"]: item["state"] for item in json.loads(out)}
        assert states[created["id"]] == states[rotated["id"]] == "revoked"
        code, _, err = _cli(capsys, "keys", "revoke", "msk_nothing")
        assert code == 1 and "no API key" in err

        runtime_settings = get_settings()
        from app.core.runtime import Runtime

        runtime = Runtime.build(runtime_settings)
        try:
            with runtime.sessions() as session:
                found = session.scalar(select(ApiKey).where(ApiKey.id == uuid.UUID(rotated["id"])))
                assert found is not None and found.revoked_at is not None
                assert (
                    keys.authenticate(
                        session=session,
                        key=rotated["key"],
                        pepper=runtime_settings.api_key_pepper.get_secret_value(),
                    )
                    is None
                )
        finally:
            runtime.close()
    finally:
        get_settings.cache_clear()
