"""Schemathesis over every operation, in process, with a user, an admin and an operator key.

A small example budget keeps it under a minute or two; the README's "Tenancy and keys" section
has the command for a longer run (MAML_SERVE_SCHEMATHESIS_EXAMPLES).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from app.keys import service as keys  # noqa: E402
from app.main import create_app  # noqa: E402
from tests.admin_data import dataset_zip  # noqa: E402
from tests.helpers import create_ready_task, make_settings, runtime_of  # noqa: E402
from tests.unit.app.test_tenancy_routes import MATRIX  # noqa: E402

EXAMPLES = int(os.environ.get("MAML_SERVE_SCHEMATHESIS_EXAMPLES", "4"))
# Every status answered is one the operation documents (and no other is documented needlessly:
# tests/test_openapi_docs.py).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, tiny_init_dir: Path) -> Iterator[TestClient]:
    """An embedded app, started, with limits that a fuzzer's request rate does not reach."""
    folder = tmp_path_factory.mktemp("fuzz")
    # A stand-in for the Omniglot zip, so registering it answers 201 or 409, not 503.
    omniglot = folder / "omniglot.zip"
    omniglot.write_bytes(dataset_zip(groups=1, classes=20, images=2))
    app = create_app(
        make_settings(
            folder / "data",
            tiny_init_dir,
            omniglot_path=omniglot,
            key_rate_per_second=10_000,
            key_rate_burst=10_000,
            max_failed_auth_per_minute=100_000,
        )
    )
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def key_headers(running: TestClient) -> dict[str, dict[str, str]]:
    """Authorization headers of a user, an admin and an operator key (tenants fuzz and ops)."""
    runtime = runtime_of(running)
    made: dict[str, dict[str, str]] = {}
    with runtime.sessions() as session:
        for who, tenant, scopes in [
            ("user", "fuzz", {}),
            ("admin", "fuzz", {"admin": True}),
            ("operator", "ops", {"operator": True}),
        ]:
            _, key = keys.create_api_key(
                session=session,
                tenant=keys.get_or_create_tenant(session=session, name=tenant),
                pepper=runtime.settings.api_key_pepper.get_secret_value(),
                admin=bool(scopes.get("admin")),
                operator=bool(scopes.get("operator")),
            )
            made[who] = {"Authorization": f"Bearer {key}"}
        session.commit()
    # A task, so the list routes return items the response schemas are checked against.
    create_ready_task(running, made["user"])
    return made


@pytest.fixture(scope="module")
def api_schema(running: TestClient) -> Any:
    """The OpenAPI document of the started app; calls go to it in process."""
    return schemathesis.openapi.from_asgi("/openapi.json", running.app)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize(("method", "path"), sorted(MATRIX))
def test_no_operation_answers_5xx_or_off_schema(
    api_schema: Any, key_headers: dict[str, dict[str, str]], method: str, path: str, mode: Any
) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        for headers in key_headers.values():
            # Copies: the call adds its own headers to the mapping it is given.
            response = case.call(headers=dict(headers))
            case.validate_response(response, checks=CHECKS, headers=dict(headers))

    try:
        run()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        pytest.skip("the operation has no input to make invalid")
