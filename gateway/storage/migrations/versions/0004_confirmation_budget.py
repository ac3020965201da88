"""mailing-list registry: per-account budget of confirmation mails

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row per (account, window): the primary key is the only index needed
    # (the reservation updates by it; the outbox reads the exhausted accounts of
    # the current window, a handful of rows).
    op.create_table(
        "confirmation_budget",
        sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("window_start", sa.Float, primary_key=True),
        sa.Column("sent", sa.Integer, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("confirmation_budget")
