"""Alembic environment: runs on the connection the gateway hands over.

The gateway calls :func:`gateway.storage.db.migrate`, which opens an async
engine and runs these migrations inside ``run_sync`` with the connection in
``config.attributes["connection"]``. On PostgreSQL an advisory lock keeps
several gateways starting at once from migrating concurrently.
"""
from __future__ import annotations

from alembic import context

from gateway.storage.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7349210)")
    context.run_migrations()
