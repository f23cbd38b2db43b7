"""Reclaiming orphans: stored objects of tasks and datasets whose row no longer exists.

A task or dataset is deleted row first, objects second; a crash between the two leaves objects
that nothing names. The sweep finds each `tasks/<id>/` and `datasets/<id>/` prefix whose id has no
row and deletes it, but only when its newest object is older than a grace period, so a create in
flight (objects written, row not committed yet) is never swept.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.core.storage import ArtifactStore
from app.models import Dataset, Task, utcnow

log = logging.getLogger(__name__)

# The prefixes swept, each with the table whose rows own them.
OWNED_AREAS: dict[str, type[Task] | type[Dataset]] = {"tasks": Task, "datasets": Dataset}
_CHUNK = 500


@dataclass
class _Prefix:
    objects: int = 0
    size: int = 0
    newest: datetime | None = None


@dataclass
class SweepReport:
    """What a sweep found and did."""

    checked: int = 0
    orphans: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    too_recent: list[str] = field(default_factory=list)
    objects: int = 0
    bytes: int = 0

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready summary."""
        return {
            "checked_prefixes": self.checked,
            "orphan_prefixes": self.orphans,
            "deleted_prefixes": self.deleted,
            "skipped_recent_prefixes": self.too_recent,
            "orphan_objects": self.objects,
            "orphan_bytes": self.bytes,
        }


def sweep_orphans(
    store: ArtifactStore,
    sessions: sessionmaker[Session],
    *,
    grace: timedelta,
    dry_run: bool = False,
    now: datetime | None = None,
) -> SweepReport:
    """Delete (or with dry_run only list) the orphan prefixes older than `grace`."""
    cutoff = (now or utcnow()) - grace
    report = SweepReport()
    for area, table in OWNED_AREAS.items():
        prefixes = _prefixes(store, area)
        report.checked += len(prefixes)
        with sessions() as session:
            alive = _existing(session, table, prefixes)
        for owner, seen in sorted(prefixes.items()):
            if owner in alive:
                continue
            prefix = f"{area}/{owner}"
            if seen.newest is not None and seen.newest > cutoff:
                report.too_recent.append(prefix)
                continue
            report.orphans.append(prefix)
            report.objects += seen.objects
            report.bytes += seen.size
            if not dry_run:
                store.delete_tree(prefix)
                report.deleted.append(prefix)
                log.info("swept orphan prefix %s (%d objects)", prefix, seen.objects)
    return report


def _prefixes(store: ArtifactStore, area: str) -> dict[str, _Prefix]:
    """The owners found under `area/` (the first key segment after it), with their objects."""
    found: dict[str, _Prefix] = {}
    for item in store.iter_objects(area):
        owner = item.key.split("/")[1]
        seen = found.setdefault(owner, _Prefix())
        seen.objects += 1
        seen.size += item.size
        if seen.newest is None or item.modified > seen.newest:
            seen.newest = item.modified
    return found


def _existing(
    session: Session, table: type[Task] | type[Dataset], owners: Iterable[str]
) -> set[str]:
    """The owners that still have a row; a name that is no id is kept (never swept)."""
    ids: dict[uuid.UUID, str] = {}
    kept: set[str] = set()
    for owner in owners:
        try:
            ids[uuid.UUID(owner)] = owner
        except ValueError:
            kept.add(owner)
    found = list(ids)
    for start in range(0, len(found), _CHUNK):
        chunk = found[start : start + _CHUNK]
        kept.update(ids[i] for i in session.scalars(select(table.id).where(table.id.in_(chunk))))
    return kept
