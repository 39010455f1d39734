"""original sizes for lossless compression at ingest

Per instance: the transfer syntax, size and checksum as received, next to the stored ones;
per series and study: the total size as received. Existing rows were stored as received,
so their original values are their stored ones. Columns are added with a server default
(no table rebuild on SQLite) and then filled from the stored values.

Revision ID: 7c1f0e2b9a44
Revises: 9b7e4c1d2a60
Create Date: 2026-11-28 11:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7c1f0e2b9a44"
down_revision: str | None = "9b7e4c1d2a60"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("study", "series"):
        op.add_column(
            table,
            sa.Column("original_total_bytes", sa.BigInteger(), nullable=False, server_default="0"),
        )
        op.execute(f"UPDATE {table} SET original_total_bytes = total_bytes")
    op.add_column(
        "instance",
        sa.Column(
            "original_transfer_syntax_uid", sa.String(length=64), nullable=False, server_default=""
        ),
    )
    op.add_column(
        "instance", sa.Column("original_bytes", sa.BigInteger(), nullable=False, server_default="0")
    )
    op.add_column(
        "instance",
        sa.Column("original_checksum", sa.String(length=80), nullable=False, server_default=""),
    )
    op.execute(
        "UPDATE instance SET original_transfer_syntax_uid = transfer_syntax_uid, "
        "original_bytes = byte_size, original_checksum = checksum"
    )


def downgrade() -> None:
    for column in ("original_checksum", "original_bytes", "original_transfer_syntax_uid"):
        with op.batch_alter_table("instance") as batch:
            batch.drop_column(column)
    for table in ("series", "study"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("original_total_bytes")
