"""integration clients

Revision ID: 326960660c70
Revises: 2ddb54a3a1ff
Create Date: 2026-11-28 08:20:22.175492
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "326960660c70"
down_revision: str | None = "2ddb54a3a1ff"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_client",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_client")),
        sa.UniqueConstraint("name", name=op.f("uq_api_client_name")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_client_token_hash")),
    )


def downgrade() -> None:
    op.drop_table("api_client")
