"""The local-folder artifact store (the embedded default): every key is a file under one root.

Every write goes to a temporary name in the same folder, is fsynced and renamed into place, and
the folders whose entries changed are fsynced, so readers never see half a file and a committed
row never names a file a crash lost.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

from app.core.storage import StoredObject, corrupt, is_temporary, sha256_bytes, sha256_file


class LocalArtifactStore:
    """Files addressed by relative keys ("tasks/<id>/support/<sha256>.png") under a root folder."""

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
        tmp = _temporary(path)
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
        fsync_dirs([path.parent, *changed])
        return sha256_bytes(data)

    def put_many(self, items: Mapping[str, bytes]) -> None:
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
                tmp = _temporary(path)
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

    def put_file(self, key: str, path: Path, sha256: str | None = None) -> str:
        """Copy a file under `key` atomically and durably (a hard link when it can); its sha256."""
        target = self.path(key)
        changed = make_parents(target)
        tmp = _temporary(target)
        try:
            try:
                os.link(path, tmp)
            except OSError:
                # Another file system (or one without links): copy the bytes.
                shutil.copyfile(path, tmp)
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
            tmp.replace(target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dirs([target.parent, *changed])
        return sha256 if sha256 is not None else sha256_file(target)

    def put_tree(self, prefix: str, folder: Path) -> None:
        """Copy a folder in under `prefix`, durably; a prefix that exists already is kept."""
        target = self.path(prefix)
        changed = make_parents(target)
        if target.exists():
            return
        tmp = _temporary(target)
        shutil.copytree(folder, tmp)
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

    def read_bytes(self, key: str, sha256: str | None = None) -> bytes:
        """Read a key, checking its sha256 when one is given."""
        data = self.path(key).read_bytes()
        if sha256 is not None and sha256_bytes(data) != sha256:
            raise corrupt(key)
        return data

    def local_file(self, key: str, sha256: str) -> Path:
        """The key's own path, after checking its sha256."""
        path = self.path(key)
        if sha256_file(path) != sha256:
            raise corrupt(key)
        return path

    def local_tree(self, prefix: str, expected: Mapping[str, str] | None = None) -> Path:
        """The prefix's own folder, after checking the files named in `expected`."""
        folder = self.path(prefix)
        if not folder.is_dir():
            raise FileNotFoundError(f"no stored folder {prefix!r}")
        for name, sha256 in (expected or {}).items():
            self.local_file(f"{prefix}/{name}", sha256)
        return folder

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

    def iter_objects(self, prefix: str) -> Iterator[StoredObject]:
        """Every file under `prefix` (writes in progress left out), in key order."""
        base = self.root if prefix in ("", "/") else self.path(prefix.rstrip("/"))
        if base.is_file():
            yield _object(self.root, base)
            return
        for folder, dirs, files in os.walk(base):
            dirs[:] = sorted(d for d in dirs if not is_temporary(d))
            for name in sorted(files):
                if not is_temporary(name):
                    yield _object(self.root, Path(folder) / name)


def _object(root: Path, path: Path) -> StoredObject:
    info = path.stat()
    modified = datetime.fromtimestamp(info.st_mtime, UTC)
    return StoredObject(path.relative_to(root).as_posix(), info.st_size, modified)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


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
    """fsync each folder once, in order."""
    # A rename or a new folder is durable only once the folder holding its entry is fsynced:
    # without it a crash can lose a file whose row was committed (PostgreSQL fsyncs commits).
    for folder in dict.fromkeys(folders):
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
