"""webservice nonce

``webservice_nonce``: the nonces of the query WebService's encrypted requests, kept until
their timestamp leaves the accepted window, so that every server process refuses a replay.

Revision ID: b4f8e2a6c913
Revises: c7e1a4b93d02
Create Date: 2026-11-28 15:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b4f8e2a6c913"
down_revision: str | None = "c7e1a4b93d02"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "webservice_nonce",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("nonce", sa.String(length=32), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webservice_nonce")),
        sa.UniqueConstraint("client_id", "nonce", name=op.f("uq_webservice_nonce_client_id")),
    )
    op.create_index(
        op.f("ix_webservice_nonce_expires_at"), "webservice_nonce", ["expires_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_webservice_nonce_expires_at"), table_name="webservice_nonce")
    op.drop_table("webservice_nonce")
