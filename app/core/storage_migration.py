"""Copying a local artifact folder into an S3 bucket, every object read back and checked.

Run once when a deployment moves from the local backend to S3 (`maml-serve storage
migrate-to-s3`), with the services stopped or before they switch. Idempotent: an object already
in the bucket with the same size and recorded sha256 is not sent again, and a second run copies
nothing. Every object, copied now or found there, is read back and its size and sha256 compared
with the local file's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from app.core.storage import sha256_file
from app.core.storage_local import LocalArtifactStore
from app.core.storage_s3 import S3ArtifactStore

log = logging.getLogger(__name__)


@dataclass
class MigrationReport:
    """What a migration found, copied and checked."""

    objects: int = 0
    bytes: int = 0
    copied: int = 0
    already_there: int = 0
    verified: int = 0
    failed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready summary."""
        return {
            "objects": self.objects,
            "bytes": self.bytes,
            "copied": self.copied,
            "already_there": self.already_there,
            "verified": self.verified,
            "failed": self.failed,
        }


def migrate_to_s3(source: LocalArtifactStore, target: S3ArtifactStore) -> MigrationReport:
    """Copy every object of `source` that `target` lacks (or holds differently); verify all."""
    report = MigrationReport()
    for item in source.iter_objects(""):
        path = source.path(item.key)
        sha256 = sha256_file(path)
        report.objects += 1
        report.bytes += item.size
        if target.head(item.key) == (item.size, sha256):
            report.already_there += 1
        else:
            target.put_file(item.key, path, sha256)
            report.copied += 1
        if target.digest(item.key) == (item.size, sha256):
            report.verified += 1
        else:
            log.error("migrated object %s does not match the local file when read back", item.key)
            report.failed.append(item.key)
    return report
