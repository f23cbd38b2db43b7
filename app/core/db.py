"""Engine and session factory for PostgreSQL or the embedded SQLite file."""

from __future__ import annotations

from functools import cache
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the API read while the in-process executor writes; the timeout waits out writers.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    # In WAL mode NORMAL never corrupts the file; a power cut may lose the last commits only.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(settings: Settings) -> Engine:
    """An engine for the configured database; creates the data folder for SQLite."""
    url = settings.sqlalchemy_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 10},
            # One connection for every thread that may use one: none waits for the pool.
            pool_size=settings.pool_size,
            max_overflow=0,
            pool_timeout=settings.database_pool_timeout_seconds,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_engine(
        url,
        pool_pre_ping=True,
        pool_size=settings.pool_size,
        max_overflow=0,
        pool_timeout=settings.database_pool_timeout_seconds,
        connect_args={
            "connect_timeout": settings.database_connect_timeout_seconds,
            "options": f"-c statement_timeout={int(settings.database_statement_timeout_seconds * 1000)}",
        },
    )
    if url.startswith("postgresql+psycopg"):
        io_timeout = settings.database_statement_timeout_seconds + 1.0

        def connect(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
            return _connection_class(io_timeout).connect(*cargs, **cparams)

        event.listen(engine, "do_connect", connect)
    return engine


@cache
def _connection_class(io_timeout: float) -> Any:
    """A psycopg connection that gives up on a server silent for `io_timeout` seconds.

    statement_timeout is enforced by the server, so a frozen (SIGSTOPped) or unreachable one
    never sends it; the kernel still acknowledges its TCP traffic, so keepalives never fire
    either. This closes the connection instead, and the driver raises OperationalError.
    """
    import psycopg
    from psycopg import errors

    class DeadlineConnection(psycopg.Connection[Any]):
        def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
            try:
                return super().wait(gen, interval=interval, timeout=timeout or io_timeout)
            except errors._WaitTimeout:
                self.pgconn.finish()
                raise psycopg.OperationalError(
                    f"the database did not answer within {io_timeout:g} s; connection closed"
                ) from None

    return DeadlineConnection


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (responses are built after commit)."""
    return sessionmaker(engine, expire_on_commit=False)
