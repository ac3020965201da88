"""accounts: permission to forward mail (SRS), per account or per identity

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN: NOT NULL with a constant default works on SQLite and
    # PostgreSQL alike (no batch copy of the accounts table, whose children
    # reference it ON DELETE CASCADE).
    op.add_column("accounts", sa.Column("allow_forwarding", sa.Boolean, nullable=False,
                                        server_default=sa.false()))
    op.create_table(
        "account_forwarders",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("account_id", "address", name="uq_account_forwarders"),
    )


def downgrade() -> None:
    op.drop_table("account_forwarders")
    op.drop_column("accounts", "allow_forwarding")
