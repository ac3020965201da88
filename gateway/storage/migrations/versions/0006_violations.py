"""violations: the policy breaches checks detect, per account and identity (P-STRIKE)

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "violations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("account", sa.String(128), nullable=False, server_default=""),
        sa.Column("identity", sa.String(255), nullable=True),
        sa.Column("rule", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("class", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text, nullable=False, server_default=""),
        sa.Column("trace_id", sa.String(64), nullable=True),
        sa.Column("client_ip", sa.String(64), nullable=False, server_default=""),
        sa.Column("evidence", sa.Text, nullable=False, server_default="{}"),
        sa.Column("node", sa.String(255), nullable=False, server_default=""),
    )
    op.create_index("ix_violations_account_at", "violations", ["account", "at"])
    op.create_index("ix_violations_trace_id", "violations", ["trace_id"])


def downgrade() -> None:
    op.drop_index("ix_violations_trace_id", "violations")
    op.drop_index("ix_violations_account_at", "violations")
    op.drop_table("violations")
