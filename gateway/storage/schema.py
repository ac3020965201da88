"""Table definitions (SQLAlchemy Core), one code path for SQLite and PostgreSQL.

The schema itself is created and evolved by the Alembic migrations in
``migrations/``; these objects are what the queries are written against and
must match the latest migration.
"""
from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

accounts = sa.Table(
    "accounts", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(255), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, server_default="active"),
    sa.Column("contact", sa.String(320), nullable=False, server_default=""),
    sa.Column("allow_subdomains", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

account_networks = sa.Table(
    "account_networks", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    sa.Column("cidr", sa.String(64), nullable=False),
    sa.UniqueConstraint("account_id", "cidr", name="uq_account_networks"),
)

account_domains = sa.Table(
    "account_domains", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    sa.Column("domain", sa.String(255), nullable=False),        # lower-case A-label
    sa.Column("status", sa.String(16), nullable=False, server_default="pending"),  # pending|verified|approved
    sa.Column("token", sa.String(128), nullable=False, server_default=""),
    sa.Column("verified_at", sa.Float, nullable=True),
    sa.Column("note", sa.String(255), nullable=False, server_default=""),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("account_id", "domain", name="uq_account_domains"),
)
