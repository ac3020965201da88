"""mailing-list registry: API keys, lists, senders, subscribers, suppressions

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("label", sa.String(128), nullable=False, server_default=""),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "mailing_lists",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("list_id", sa.String(255), nullable=False),
        sa.Column("confirm_from", sa.String(320), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("account_id", "name", name="uq_mailing_lists_name"),
        sa.UniqueConstraint("account_id", "list_id", name="uq_mailing_lists_list_id"),
    )
    op.create_table(
        "list_senders",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("list_id", sa.String(16), sa.ForeignKey("mailing_lists.id", ondelete="CASCADE"), nullable=False),
        sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("pattern", sa.String(320), nullable=False),
        sa.UniqueConstraint("account_id", "pattern", name="uq_list_senders"),
    )
    op.create_table(
        "list_subscribers",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("list_id", sa.String(16), sa.ForeignKey("mailing_lists.id", ondelete="CASCADE"), nullable=False),
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("address_hash", sa.String(24), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("nonce", sa.String(16), nullable=False),
        sa.Column("source", sa.String(255), nullable=False, server_default=""),
        sa.Column("requested_at", sa.Float, nullable=False),
        sa.Column("requested_ip", sa.String(64), nullable=False, server_default=""),
        sa.Column("requested_ua", sa.String(512), nullable=False, server_default=""),
        sa.Column("confirmed_at", sa.Float, nullable=True),
        sa.Column("confirmed_ip", sa.String(64), nullable=False, server_default=""),
        sa.Column("confirmed_ua", sa.String(512), nullable=False, server_default=""),
        sa.Column("confirm_status", sa.String(16), nullable=False, server_default=""),
        sa.Column("confirm_sent_at", sa.Float, nullable=True),
        sa.Column("confirm_mails", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("list_id", "address_hash", name="uq_list_subscribers_hash"),
        sa.UniqueConstraint("list_id", "address", name="uq_list_subscribers_address"),
    )
    op.create_index("ix_list_subscribers_status", "list_subscribers", ["list_id", "status", "id"])
    op.create_index("ix_list_subscribers_outbox", "list_subscribers", ["confirm_status", "confirm_sent_at"])
    op.create_table(
        "list_suppressions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("list_id", sa.String(16), sa.ForeignKey("mailing_lists.id", ondelete="CASCADE"), nullable=False),
        sa.Column("address_hash", sa.String(24), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("reoptin_at", sa.Float, nullable=True),
        sa.UniqueConstraint("list_id", "address_hash", name="uq_list_suppressions"),
    )
    state = op.create_table(
        "registry_state",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.bulk_insert(state, [{"id": 1, "version": 0}])


def downgrade() -> None:
    op.drop_table("registry_state")
    op.drop_table("list_suppressions")
    op.drop_index("ix_list_subscribers_outbox", table_name="list_subscribers")
    op.drop_index("ix_list_subscribers_status", table_name="list_subscribers")
    op.drop_table("list_subscribers")
    op.drop_table("list_senders")
    op.drop_table("mailing_lists")
    op.drop_table("api_keys")
