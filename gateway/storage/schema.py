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
    # migration 0005: may forward inbound mail of any mailbox of its domains (SRS)
    sa.Column("allow_forwarding", sa.Boolean, nullable=False, server_default=sa.false()),
)

# The mailboxes an account may forward from when not the whole account may (migration 0005).
account_forwarders = sa.Table(
    "account_forwarders", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    sa.Column("address", sa.String(320), nullable=False),                   # lower-case local@A-label
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("account_id", "address", name="uq_account_forwarders"),
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

# --- mailing-list registry (migration 0002) -----------------------------------------
api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),     # sha256 hex of the key
    sa.Column("label", sa.String(128), nullable=False, server_default=""),
    sa.Column("created_at", sa.Float, nullable=False),
)

mailing_lists = sa.Table(
    "mailing_lists", metadata,
    sa.Column("id", sa.String(16), primary_key=True),                       # random, 16 hex digits
    sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("list_id", sa.String(255), nullable=False),                   # RFC 2919 identifier
    sa.Column("confirm_from", sa.String(320), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("account_id", "name", name="uq_mailing_lists_name"),
    sa.UniqueConstraint("account_id", "list_id", name="uq_mailing_lists_list_id"),
)

list_senders = sa.Table(
    "list_senders", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("list_id", sa.String(16), sa.ForeignKey("mailing_lists.id", ondelete="CASCADE"), nullable=False),
    sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    sa.Column("pattern", sa.String(320), nullable=False),                   # address or VERP pattern
    sa.UniqueConstraint("account_id", "pattern", name="uq_list_senders"),
)

list_subscribers = sa.Table(
    "list_subscribers", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("list_id", sa.String(16), sa.ForeignKey("mailing_lists.id", ondelete="CASCADE"), nullable=False),
    sa.Column("address", sa.String(320), nullable=False),                   # normalized
    sa.Column("address_hash", sa.String(24), nullable=False),               # keyed hash (tokens, cache)
    sa.Column("status", sa.String(16), nullable=False),                     # pending | confirmed
    sa.Column("nonce", sa.String(16), nullable=False),                      # binds confirmation links
    sa.Column("source", sa.String(255), nullable=False, server_default=""),
    sa.Column("requested_at", sa.Float, nullable=False),
    sa.Column("requested_ip", sa.String(64), nullable=False, server_default=""),
    sa.Column("requested_ua", sa.String(512), nullable=False, server_default=""),
    sa.Column("confirmed_at", sa.Float, nullable=True),
    sa.Column("confirmed_ip", sa.String(64), nullable=False, server_default=""),
    sa.Column("confirmed_ua", sa.String(512), nullable=False, server_default=""),
    sa.Column("confirm_status", sa.String(16), nullable=False, server_default=""),  # queued|sending|sent|failed
    sa.Column("confirm_sent_at", sa.Float, nullable=True),
    sa.Column("confirm_mails", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("list_id", "address_hash", name="uq_list_subscribers_hash"),
    sa.UniqueConstraint("list_id", "address", name="uq_list_subscribers_address"),
    sa.Index("ix_list_subscribers_status", "list_id", "status", "id"),
    sa.Index("ix_list_subscribers_outbox", "confirm_status", "confirm_sent_at"),
)

list_suppressions = sa.Table(
    "list_suppressions", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("list_id", sa.String(16), sa.ForeignKey("mailing_lists.id", ondelete="CASCADE"), nullable=False),
    sa.Column("address_hash", sa.String(24), nullable=False),               # the only trace of the address
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("reoptin_at", sa.Float, nullable=True),                       # last fresh opt-in started
    sa.UniqueConstraint("list_id", "address_hash", name="uq_list_suppressions"),
)

registry_state = sa.Table(
    "registry_state", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False, server_default="0"),  # change counter (local mode)
)

# Confirmation mails sent per account and fixed window (migration 0004): the
# per-account budget of double opt-in mails, shared by every gateway on the database.
confirmation_budget = sa.Table(
    "confirmation_budget", metadata,
    sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("window_start", sa.Float, primary_key=True),                  # multiple of confirmation_window
    sa.Column("sent", sa.Integer, nullable=False, server_default="0"),
)

# --- operator block lists, P-BLOCK (migration 0003) ---------------------------------
block_entries = sa.Table(
    "block_entries", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),                       # ip | domain | hostname
    sa.Column("value", sa.String(255), nullable=False),                     # canonical form (blocklist.model)
    sa.Column("reason", sa.String(255), nullable=False, server_default=""),  # operator's note, never sent
    sa.Column("created_by", sa.String(128), nullable=False, server_default=""),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("kind", "value", name="uq_block_entries"),
)

block_version = sa.Table(
    "block_version", metadata,
    sa.Column("id", sa.Integer, primary_key=True),                          # a single row, id 1
    sa.Column("version", sa.BigInteger, nullable=False, server_default="0"),  # bumped by every change
)

# --- violations, P-STRIKE (migration 0006) --------------------------------------------
# One row per policy breach a check detected (a core.events.Violation), written by
# strikes/violations.py on every gateway into the shared storage. Append-only.
violations = sa.Table(
    "violations", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("at", sa.Float, nullable=False),                               # the gateway clock, epoch seconds
    sa.Column("account", sa.String(128), nullable=False, server_default=""),  # "" : no account (a client IP)
    sa.Column("identity", sa.String(255), nullable=True),
    sa.Column("rule", sa.String(32), nullable=False),                        # POLICY rule id: P-LOAD, P-UCE, ...
    sa.Column("kind", sa.String(32), nullable=False),                        # rate_storm, bulk, repeat, harvest
    sa.Column("class", sa.String(16), nullable=False),                       # negligence | deliberate
    sa.Column("detail", sa.Text, nullable=False, server_default=""),
    sa.Column("trace_id", sa.String(64), nullable=True),
    sa.Column("client_ip", sa.String(64), nullable=False, server_default=""),
    sa.Column("evidence", sa.Text, nullable=False, server_default="{}"),     # JSON: reply, session, envelope
    sa.Column("node", sa.String(255), nullable=False, server_default=""),    # the gateway that saw it
    sa.Index("ix_violations_account_at", "account", "at"),
    sa.Index("ix_violations_trace_id", "trace_id"),
)
