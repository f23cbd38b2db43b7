"""The database's clock: the one time every host agrees on, which decides leases.

A lease written from a worker's own clock is wrong by as much as that clock is off: a worker
minutes behind writes leases that have already run out (its live jobs are re-sent and taken
over), and a worker minutes ahead judges the live leases of others as expired (and takes their
jobs). So app.jobs.state reads `now` here. With PostgreSQL that is the server's time, read once a
minute per database and carried forward on this process's monotonic clock: no transition pays
a round trip for it, and a step of the local wall clock (NTP, an operator, a VM resume) changes
nothing. The embedded SQLite file is on this host: its clock is the local one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from time import monotonic
from weakref import WeakKeyDictionary

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from app.models import utcnow

# How long one reading of the server's time is carried forward before it is read again.
REFRESH_SECONDS = 60.0


@dataclass(frozen=True)
class _Reading:
    """The server's time `at` this process's monotonic `monotonic`."""

    at: datetime
    monotonic: float


_readings: WeakKeyDictionary[Engine, _Reading] = WeakKeyDictionary()
_lock = threading.Lock()


def now(session: Session) -> datetime:
    """The database's current time (aware UTC); the local time for a local SQLite file."""
    engine = session.get_bind().engine
    if engine.dialect.name != "postgresql":
        return utcnow()
    with _lock:
        reading = _readings.get(engine)
    if reading is None or monotonic() - reading.monotonic > REFRESH_SECONDS:
        reading = _read(session)
        with _lock:
            _readings[engine] = reading
    return reading.at + timedelta(seconds=monotonic() - reading.monotonic)


def _read(session: Session) -> _Reading:
    """One reading of the server's time, placed at the middle of its round trip."""
    before = monotonic()
    # clock_timestamp(): the time now, not the start of the current transaction (now()).
    at = session.execute(select(func.clock_timestamp())).scalar_one()
    after = monotonic()
    if not isinstance(at, datetime):
        raise TypeError(f"the database's clock_timestamp() gave {at!r}")
    return _Reading(at=at.astimezone(UTC), monotonic=(before + after) / 2)


def forget() -> None:
    """Read the server's time again at the next call (tests)."""
    with _lock:
        _readings.clear()
