"""The objects one process shares: settings, database, artifact store and model cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.core import ml
from app.core.config import Settings
from app.core.db import make_engine, make_session_factory
from app.core.model_cache import ModelCache, default_device
from app.core.storage import ArtifactStore
from app.core.storage_local import LocalArtifactStore
from app.core.threads import serving_threads, torch_default


@dataclass
class Runtime:
    """Process-wide services, built once by the API or a worker."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: ArtifactStore
    models: ModelCache

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        """Connect to the database and open the artifact store (no queries or requests are run)."""
        if settings.torch_threads is not None:
            import torch

            torch_default()  # remembered before it is changed (meta-training falls back to it)
            torch.set_num_threads(settings.torch_threads)
        engine = make_engine(settings)
        store = open_store(settings)
        cache = ModelCache(
            store,
            settings.adapted_cache_bytes,
            default_device(settings.device),
            threads=serving_threads(settings.torch_threads),
        )
        return cls(settings, engine, make_session_factory(engine), store, cache)

    def initialization_folders(self) -> list[Path]:
        """The folders registered at start-up: the configured one, else every shipped domain's."""
        if self.settings.initialization_path is not None:
            return [self.settings.initialization_path, *self.settings.extra_initialization_paths]

        return [*ml.shipped_initialization_paths(), *self.settings.extra_initialization_paths]

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()


def open_store(settings: Settings) -> ArtifactStore:
    """The artifact store the settings name: the local folder, or the S3 bucket."""
    if settings.artifact_backend == "s3":
        # Imported here: the embedded default never loads boto3.
        from app.core.storage_s3 import S3ArtifactStore

        return S3ArtifactStore.from_settings(settings)
    settings.artifact_dir.mkdir(parents=True, exist_ok=True)
    return LocalArtifactStore(settings.artifact_dir)
