"""The artifact store: what every backend offers, the keys it is addressed by, shared helpers.

Two backends implement `ArtifactStore`: a local folder (app.core.storage_local, the embedded
default) and S3-compatible object storage (app.core.storage_s3); app.core.runtime builds the one
the settings name. Keys are relative, "/"-separated names ("tasks/<id>/support/<sha256>.png");
content-addressed (sha256 in the key) where the content never changes. Every read that knows a
digest checks it (ArtifactCorrupt, 409, when it does not match), and a write is visible only once
it is complete.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from app.core.errors import ProblemError, StorageUnavailable

log = logging.getLogger(__name__)


class ArtifactCorrupt(ProblemError):
    """A stored file whose sha256 no longer matches the one recorded, or that cannot be read.

    409: the request cannot succeed until the artifact is made again (a task is adapted again);
    the detail never names the file, which is logged instead.
    """

    status = 409
    code = "artifact_corrupt"


CORRUPT = "a stored file this request needs failed its integrity check"


def corrupt(key: str) -> ArtifactCorrupt:
    """The error for a key whose content does not match its recorded sha256 (the key is logged)."""
    log.error("stored artifact %s does not match its recorded sha256", key)
    return ArtifactCorrupt(CORRUPT)


@dataclass(frozen=True)
class StoredObject:
    """One stored object as a listing shows it."""

    key: str
    size: int
    modified: datetime


class ArtifactStore(Protocol):
    """What the service needs from an artifact store, whatever holds the bytes."""

    def put_bytes(self, key: str, data: bytes) -> str:
        """Write `data` under `key` (replacing what was there), visible once complete; its sha256."""
        ...

    def put_many(self, items: Mapping[str, bytes]) -> None:
        """Write content-addressed keys (an existing key already holds the same bytes)."""
        ...

    def put_file(self, key: str, path: Path, sha256: str | None = None) -> str:
        """Copy a (large) local file under `key`, visible once complete; its sha256."""
        ...

    def put_tree(self, prefix: str, folder: Path) -> None:
        """Copy a local folder under `prefix`; files already there are kept (never overwritten)."""
        ...

    def read_bytes(self, key: str, sha256: str | None = None) -> bytes:
        """The bytes of a key, checked against `sha256` when one is given."""
        ...

    def local_file(self, key: str, sha256: str) -> Path:
        """A local path holding the key's bytes, checked against `sha256` (a copy for remote stores)."""
        ...

    def local_tree(self, prefix: str, expected: Mapping[str, str] | None = None) -> Path:
        """A local folder with every object under `prefix`; `expected` maps names in it to sha256s."""
        ...

    def exists(self, key: str) -> bool:
        """True when the key (or a prefix with objects under it) exists."""
        ...

    def delete_tree(self, prefix: str) -> None:
        """Delete every object under `prefix` (and the key itself); missing is fine."""
        ...

    def iter_objects(self, prefix: str) -> Iterator[StoredObject]:
        """Every object under `prefix`, with its size and last change."""
        ...


def delete_owned(store: ArtifactStore, prefix: str) -> None:
    """Delete the objects of a row that is gone (or never committed); while the store is
    unavailable they are left, logged, for `maml-serve storage sweep` to reclaim."""
    try:
        store.delete_tree(prefix)
    except StorageUnavailable:
        log.warning("artifact store unavailable: %s left for the orphan sweep", prefix)


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def task_prefix(task_id: uuid.UUID) -> str:
    """Folder of everything a task stores (removed with the task)."""
    return f"tasks/{task_id}"


def support_image_key(task_id: uuid.UUID, sha256: str, fmt: str) -> str:
    """Content-addressed key of one support image inside its task's folder."""
    return f"{task_prefix(task_id)}/support/{sha256}.{fmt}"


def adapted_weights_key(task_id: uuid.UUID, job_id: uuid.UUID) -> str:
    """Key of the weights an adapt job writes (one per job, so a rerun overwrites, never adds)."""
    return f"{task_prefix(task_id)}/models/{job_id}.safetensors"


def initialization_key(version: str) -> str:
    """Folder of one initialization version."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in version)
    return f"initializations/{safe}"


def dataset_prefix(dataset_id: uuid.UUID) -> str:
    """Folder of one meta-training dataset (removed with it)."""
    return f"datasets/{dataset_id}"


def dataset_key(dataset_id: uuid.UUID) -> str:
    """Key of a dataset's zip."""
    return f"{dataset_prefix(dataset_id)}/dataset.zip"


def is_temporary(name: str) -> bool:
    """True for the name of a write in progress (".<name>.<hex>.tmp"), never an object."""
    return name.startswith(".") and name.endswith(".tmp")
