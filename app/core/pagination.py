"""Keyset pagination with opaque cursors, newest first."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from app.core.errors import InvalidRequest
from app.models import (
    Prediction,
    Task,
)

T = TypeVar("T", Task, Prediction)


@dataclass(frozen=True)
class Page:
    """One page of rows and the cursor of the next, if any."""

    items: list[Any]
    next_cursor: str | None


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    """An opaque cursor pointing just after a row in (created_at, id) descending order."""
    raw = json.dumps({"t": created_at.isoformat(), "id": str(row_id)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The (created_at, id) a cursor points after; 422 for a cursor this service did not make."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        # A cursor edited by hand may hold any JSON: each field must be a string.
        if not isinstance(data, dict) or not all(
            isinstance(data.get(name), str) for name in ("t", "id")
        ):
            raise ValueError("cursor fields of the wrong type")
        at = datetime.fromisoformat(data["t"])
        if at.tzinfo is None:
            # Cursors carry aware UTC timestamps; the timestamp columns refuse naive ones.
            raise ValueError("naive timestamp")
        return at.astimezone(UTC), uuid.UUID(data["id"])
    except (
        binascii.Error,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        OverflowError,
        RecursionError,
    ):
        raise InvalidRequest(
            "cursor is not valid; pass the next_cursor of a previous page", code="invalid_cursor"
        ) from None


def paginate(
    *, session: Session, query: Select[T], model: type[T], limit: int, cursor: str | None
) -> Page:
    """Keyset pagination, newest first, stable under inserts."""
    if cursor is not None:
        at, after_id = decode_cursor(cursor)
        query = query.where(
            or_(model.created_at < at, and_(model.created_at == at, model.id < after_id))
        )
    rows = list(
        session.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1))
    )
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None
    return Page(items=rows, next_cursor=next_cursor)
