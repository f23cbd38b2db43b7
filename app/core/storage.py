"""The artifact store: images, adapted weights and initializations under one local folder."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path

from app.core.errors import ProblemError

log = logging.getLogger(__name__)


class ArtifactCorrupt(ProblemError):
    """A stored file whose sha256 no longer matches the one recorded, or that cannot be read.

    409: the request cannot succeed until the artifact is made again (a task is adapted again);
    the detail never names the file, which is logged instead.
    """

    status = 409
    code = "artifact_corrupt"


_CORRUPT = "a stored file this request needs failed its integrity check"


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


class ArtifactStore:
    """Files addressed by relative keys ("tasks/<id>/support/<sha256>.png") under a root folder.

    Every write goes to a temporary name in the same folder and is renamed into place, so readers
    never see half a file.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def path(self, key: str) -> Path:
        """The absolute path of a key; refuses keys that would leave the root."""
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"artifact key escapes the store: {key!r}")
        return path

    def put_bytes(self, key: str, data: bytes) -> str:
        """Write `data` atomically and durably under `key`; returns its sha256."""
        path = self.path(key)
        changed = make_parents(path)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
        fsync_dirs([path.parent, *changed])
        return sha256_bytes(data)

    def put_many(self, items: dict[str, bytes]) -> None:
        """Write several keys atomically each, like `put_bytes`, with the fsyncs batched.

        Every file goes to a temporary name first; all are written, then all are fsynced (one
        journal commit usually covers them), then each is renamed into place and the folders
        whose entries changed are fsynced once each. A failure before the renames touches no
        key; temporary files never stay behind.
        """
        staged: list[tuple[Path, Path]] = []
        handles = []
        changed: list[Path] = []
        try:
            for key, data in items.items():
                path = self.path(key)
                if not staged or staged[-1][1].parent != path.parent:
                    changed += make_parents(path)
                tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
                handle = tmp.open("wb")
                handles.append(handle)
                staged.append((tmp, path))
                handle.write(data)
                handle.flush()
            for handle in handles:
                os.fsync(handle.fileno())
        except BaseException:
            for handle in handles:
                handle.close()
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise
        for handle in handles:
            handle.close()
        try:
            for tmp, path in staged:
                tmp.replace(path)
        except BaseException:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise
        fsync_dirs([path.parent for _, path in staged] + changed)

    def read_bytes(self, key: str, sha256: str | None = None) -> bytes:
        """Read a key, checking its sha256 when one is given."""
        data = self.path(key).read_bytes()
        if sha256 is not None and sha256_bytes(data) != sha256:
            log.error("stored artifact %s does not match its recorded sha256", key)
            raise ArtifactCorrupt(_CORRUPT)
        return data

    def verify(self, key: str, sha256: str) -> Path:
        """The path of a key after checking its sha256."""
        path = self.path(key)
        if sha256_file(path) != sha256:
            log.error("stored artifact %s does not match its recorded sha256", key)
            raise ArtifactCorrupt(_CORRUPT)
        return path

    def exists(self, key: str) -> bool:
        """True when the key names an existing file or folder."""
        return self.path(key).exists()

    def delete_tree(self, prefix: str) -> None:
        """Remove a key prefix (a folder) and everything below it; missing is fine."""
        path = self.path(prefix)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink(missing_ok=True)

    def copy_tree_in(self, source: Path, prefix: str) -> None:
        """Copy a folder into the store under `prefix`, durably (used to register initializations)."""
        target = self.path(prefix)
        changed = make_parents(target)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        shutil.copytree(source, tmp)
        if target.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        _fsync_tree(tmp)
        try:
            tmp.replace(target)
        except OSError:
            # Another process put the same folder in place first.
            shutil.rmtree(tmp, ignore_errors=True)
            if not target.is_dir():
                raise
        fsync_dirs([target.parent, *changed])


def make_parents(path: Path) -> list[Path]:
    """Create the missing folders above `path`; the folders that gained an entry doing so."""
    missing = []
    folder = path.parent
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    return [created.parent for created in missing]


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    fsync_dirs([path for path in folder.rglob("*") if path.is_dir()] + [folder])


def fsync_dirs(folders: list[Path]) -> None:
    # A rename or a new folder is durable only once the folder holding its entry is fsynced:
    # without it a crash can lose a file whose row was committed (PostgreSQL fsyncs commits).
    for folder in dict.fromkeys(folders):
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


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
