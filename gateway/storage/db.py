"""Database engine and schema migrations (SQLite embedded, PostgreSQL shared)."""
from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS = Path(__file__).parent / "migrations"


def create_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - driver callback
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


# Query arguments of SQLAlchemy's asyncpg dialect that asyncpg itself does not know
# (asyncpg would send unknown ones to the server as settings).
_SQLALCHEMY_ONLY_ARGS = ("prepared_statement_cache_size", "prepared_statement_name_func", "async_fallback")


def asyncpg_dsn(url: str | URL) -> str | None:
    """The libpq-style DSN asyncpg takes for a SQLAlchemy PostgreSQL URL
    (``postgresql+asyncpg://user:pw@host:5432/db`` -> ``postgresql://user:pw@host:5432/db``),
    or None for any other database. For the registry's read-only fast path."""
    u = make_url(url) if isinstance(url, str) else url
    if u.get_backend_name() != "postgresql":
        return None
    u = u.set(drivername="postgresql").difference_update_query(_SQLALCHEMY_ONLY_ARGS)
    return u.render_as_string(hide_password=False)


def _alembic_config(connection) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


async def migrate(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (idempotent; safe with several gateways)."""
    async with engine.begin() as conn:
        await conn.run_sync(lambda sync_conn: command.upgrade(_alembic_config(sync_conn), revision))
