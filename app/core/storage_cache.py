"""Local copies of remote artifacts: a folder under the data dir, bounded in bytes.

Files are kept by sha256 (a key's content is checked against it before it is used), folders by
their key prefix. Each copy is fetched to a temporary name and renamed into place, so processes
sharing the folder never read half a copy; the least recently used copies go first when the
folder holds more than its budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from app.core.storage import is_temporary, sha256_file

log = logging.getLogger(__name__)


class LocalCopies:
    """Verified local copies of remote files and folders, at most `max_bytes` of them."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def file(self, sha256: str, fetch: Callable[[Path], None]) -> Path | None:
        """The copy of the content with this sha256, fetched with `fetch(path)` when missing;
        None when what was fetched does not match (nothing is kept then)."""
        path = self.root / "files" / sha256[:2] / sha256
        if path.is_file():
            if sha256_file(path) == sha256:
                _touch(path)
                return path
            # A local copy that rotted: fetch it again.
            log.warning("local copy %s failed its check; fetching it again", path)
            path.unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            fetch(tmp)
            if sha256_file(tmp) != sha256:
                return None
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        self.trim(keep=path)
        return path

    def tree(self, prefix: str, fetch: Callable[[Path], None]) -> Path:
        """The copy of the folder at a key prefix, fetched with `fetch(folder)` when missing."""
        name = hashlib.sha256(prefix.encode()).hexdigest()[:32]
        folder = self.root / "trees" / name
        if folder.is_dir():
            _touch(folder)
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.mkdir()
            fetch(tmp)
            try:
                tmp.replace(folder)
            except OSError:
                # Another process put the same copy in place first.
                if not folder.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.trim(keep=folder)
        return folder

    def forget_tree(self, prefix: str) -> None:
        """Drop the copy of a folder (it failed a check)."""
        name = hashlib.sha256(prefix.encode()).hexdigest()[:32]
        shutil.rmtree(self.root / "trees" / name, ignore_errors=True)

    def trim(self, keep: Path | None = None) -> None:
        """Delete the least recently used copies until the folder is within its budget."""
        entries = self._entries()
        total = sum(size for _, _, size in entries)
        for _, path, size in sorted(entries, key=lambda entry: entry[0]):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            total -= size

    @property
    def size_bytes(self) -> int:
        """Bytes held by the copies now."""
        return sum(size for _, _, size in self._entries())

    def _entries(self) -> list[tuple[float, Path, int]]:
        """(last use, path, bytes) of every file copy and folder copy."""
        paths = _children(self.root / "files", depth=2) + _children(self.root / "trees", depth=1)
        found = []
        for path in paths:
            # Another process may evict a copy while this one looks: it then counts nothing.
            try:
                used = path.stat().st_mtime
                files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
                size = sum(f.stat().st_size for f in files)
            except FileNotFoundError:
                continue
            found.append((used, path, size))
        return found


def _children(folder: Path, depth: int) -> list[Path]:
    level = [folder]
    for _ in range(depth):
        below = []
        for parent in level:
            try:
                below += [c for c in parent.iterdir() if not is_temporary(c.name)]
            except (FileNotFoundError, NotADirectoryError):
                continue
        level = below
    return level


def _touch(path: Path) -> None:
    # The last use, for the eviction order (atime is often not kept).
    with contextlib.suppress(FileNotFoundError):
        os.utime(path)
