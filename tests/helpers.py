"""Plain helpers shared by the service tests (fixtures live in conftest.py)."""

from __future__ import annotations

import io
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from app.core.config import Settings
from app.core.runtime import Runtime
from app.keys import service as keys


def shipped_init_dir() -> Path | None:
    """The committed, meta-trained initialization, when it exists."""
    import fewshot

    folder = fewshot.shipped_initialization_path()
    return folder if (folder / "weights.safetensors").is_file() else None


def make_settings(data_dir: Path, init_dir: Path, **overrides: Any) -> Settings:
    """Embedded settings in a private folder."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "initialization_path": init_dir,
        "database_url": None,
        "broker_url": None,
    }
    values.update(overrides)
    return Settings(**values)


def runtime_of(client: TestClient) -> Runtime:
    """The runtime inside a started app."""
    runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    return runtime


def operator_key(client: TestClient, tenant: str = "ops") -> dict[str, str]:
    """Authorization headers for a new operator key (the platform's scope) of `tenant`."""
    runtime = runtime_of(client)
    with runtime.sessions() as session:
        _, key = keys.create_api_key(
            session=session,
            tenant=keys.get_or_create_tenant(session=session, name=tenant),
            admin=False,
            operator=True,
            pepper=runtime.settings.api_key_pepper.get_secret_value(),
        )
        session.commit()
    return {"Authorization": f"Bearer {key}"}


def create_key(client: TestClient, tenant: str, admin: bool = False) -> dict[str, str]:
    """Authorization headers for a new key of `tenant`."""
    runtime = runtime_of(client)
    with runtime.sessions() as session:
        row = keys.get_or_create_tenant(session=session, name=tenant)
        _, key = keys.create_api_key(
            session=session,
            tenant=row,
            admin=admin,
            pepper=runtime.settings.api_key_pepper.get_secret_value(),
        )
        session.commit()
    return {"Authorization": f"Bearer {key}"}


def png(seed: int, size: tuple[int, int] = (28, 28), mode: str = "L") -> bytes:
    """A distinct random PNG per seed."""
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    array = (rng.random((size[1], size[0], channels)) > 0.5).astype(np.uint8) * 255
    image = Image.fromarray(array[..., 0] if channels == 1 else array, mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A distinct random colour JPEG per seed."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def support_files(
    labels: list[str], seed: int = 0
) -> tuple[list[tuple[str, tuple[str, bytes, str]]], dict[str, Any]]:
    """Multipart `files` and `data` for a support set with one random PNG per label."""
    files = [
        ("images", (f"{i}.png", png(seed * 1000 + i), "image/png")) for i in range(len(labels))
    ]
    return files, {"labels": labels}


def query_files(count: int, seed: int = 99) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart `files` with `count` random PNG queries."""
    return [("images", (f"q{i}.png", png(seed * 1000 + i), "image/png")) for i in range(count)]


def create_ready_task(
    client: TestClient, headers: dict[str, str], labels: list[str] | None = None
) -> dict[str, Any]:
    """POST a random support set with ?wait and return the ready task body."""
    files, data = support_files(labels or ["a", "b", "c"])
    response = client.post("/v1/tasks?wait=30", headers=headers, files=files, data=data)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    assert body["status"] == "ready"
    return body


@dataclass
class Omniglot:
    """Episodes drawn from the Omniglot background zip: support and query PNG bytes with labels."""

    archive: zipfile.ZipFile
    characters: list[list[str]]

    def episode(
        self, rng: random.Random, ways: int, shots: int, queries: int
    ) -> tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]]:
        """N-way K-shot: `shots` support and `queries` query drawings per sampled character."""
        support: list[tuple[bytes, str]] = []
        query: list[tuple[bytes, str]] = []
        for index, drawings in enumerate(rng.sample(self.characters, ways)):
            label = f"class-{index}"
            picked = rng.sample(drawings, shots + queries)
            support += [(self.archive.read(name), label) for name in picked[:shots]]
            query += [(self.archive.read(name), label) for name in picked[shots:]]
        return support, query


PHOTO_VERSION = "tiny-photos-1"


def tiny_photo_config() -> Any:
    """A small colour configuration of the photo recipe's shape (flatten read-out, unit features)."""
    import fewshot

    return fewshot.ModelConfig(
        domain="photos", in_channels=3, image_size=16, width=8, pooling="maxpool",
        readout="flatten", final_relu=False, feature_norm="l2", resize="center_crop",
        invert=False, inner_steps=2, mirror_average=True, default_mode="head",
        step_candidates=(0, 2),
    )  # fmt: skip


def make_photo_init(folder: Path) -> Path:
    """Write a small random colour initialization in the "photos" domain to `folder`."""
    import fewshot

    init = fewshot.Initialization.random(tiny_photo_config(), seed=1)
    init.metadata.update({"version": PHOTO_VERSION})
    init.save(folder)
    return folder


def colour_jpeg(seed: int, size: tuple[int, int] = (60, 40)) -> bytes:
    """A random RGB JPEG of a non-square size."""
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "JPEG")
    return out.getvalue()
