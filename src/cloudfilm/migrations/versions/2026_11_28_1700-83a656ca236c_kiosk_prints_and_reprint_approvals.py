"""kiosk: prints and reprint approvals; kiosk:approve for the built-in operator role

``kiosk_print``: one row per print a kiosk confirmed (report, the PDF document printed, the
kiosk client, time); the print count of a report version is its number of rows.
``kiosk_reprint_approval``: one row per reprint a staff member allowed.

Data migration: the built-in role ``operator`` (技师/操作员) of an existing database gets
``kiosk:approve``, as ``BUILTIN_ROLES`` now grants it (``seed_builtin_roles`` only creates
missing roles). ``kiosk:print`` goes to no role: it is a kiosk client's scope.

Revision ID: 83a656ca236c
Revises: e7a9c3f5b2d4
Create Date: 2026-11-28 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "83a656ca236c"
down_revision: str | None = "e7a9c3f5b2d4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_GRANTS = {"operator": "kiosk:approve"}
_ROLE = sa.table(
    "role",
    sa.column("id", sa.Integer()),
    sa.column("code", sa.String()),
    sa.column("builtin", sa.Boolean()),
    sa.column("permissions", sa.JSON()),
)


def _grant(add: bool) -> None:
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(_ROLE.c.id, _ROLE.c.code, _ROLE.c.permissions).where(
            _ROLE.c.code.in_(list(_GRANTS)), _ROLE.c.builtin.is_(True)
        )
    )
    for role_id, code, permissions in list(rows):
        current = list(permissions or [])
        changed = [p for p in current if p != _GRANTS[code]]
        if add:
            changed.append(_GRANTS[code])
        if changed != current:
            conn.execute(sa.update(_ROLE).where(_ROLE.c.id == role_id).values(permissions=changed))


def upgrade() -> None:
    op.create_table(
        "kiosk_print",
        sa.Column("id", _ID, nullable=False),
        sa.Column("report_id", _ID, nullable=False),
        sa.Column("document_id", _ID, nullable=False),
        sa.Column("kiosk_client_id", _ID, nullable=True),
        sa.Column("kiosk", sa.String(length=64), nullable=False),
        sa.Column("printed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["report_id"],
            ["report.id"],
            name=op.f("fk_kiosk_print_report_id_report"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["document_id"],
            ["document.id"],
            name=op.f("fk_kiosk_print_document_id_document"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["kiosk_client_id"],
            ["api_client.id"],
            name=op.f("fk_kiosk_print_kiosk_client_id_api_client"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_kiosk_print")),
    )
    op.create_index(
        "ix_kiosk_print_report_id_document_id", "kiosk_print", ["report_id", "document_id"]
    )
    op.create_index(op.f("ix_kiosk_print_document_id"), "kiosk_print", ["document_id"])
    op.create_index(op.f("ix_kiosk_print_kiosk_client_id"), "kiosk_print", ["kiosk_client_id"])
    op.create_index(op.f("ix_kiosk_print_printed_at"), "kiosk_print", ["printed_at"])
    op.create_table(
        "kiosk_reprint_approval",
        sa.Column("id", _ID, nullable=False),
        sa.Column("report_id", _ID, nullable=False),
        sa.Column("document_id", _ID, nullable=False),
        sa.Column("approved_by", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.Column("approved_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["report_id"],
            ["report.id"],
            name=op.f("fk_kiosk_reprint_approval_report_id_report"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["document_id"],
            ["document.id"],
            name=op.f("fk_kiosk_reprint_approval_document_id_document"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_kiosk_reprint_approval")),
    )
    op.create_index(
        op.f("ix_kiosk_reprint_approval_report_id"), "kiosk_reprint_approval", ["report_id"]
    )
    op.create_index(
        op.f("ix_kiosk_reprint_approval_document_id"), "kiosk_reprint_approval", ["document_id"]
    )
    _grant(add=True)


def downgrade() -> None:
    _grant(add=False)
    op.drop_index(
        op.f("ix_kiosk_reprint_approval_document_id"), table_name="kiosk_reprint_approval"
    )
    op.drop_index(op.f("ix_kiosk_reprint_approval_report_id"), table_name="kiosk_reprint_approval")
    op.drop_table("kiosk_reprint_approval")
    op.drop_index(op.f("ix_kiosk_print_printed_at"), table_name="kiosk_print")
    op.drop_index(op.f("ix_kiosk_print_kiosk_client_id"), table_name="kiosk_print")
    op.drop_index(op.f("ix_kiosk_print_document_id"), table_name="kiosk_print")
    op.drop_index("ix_kiosk_print_report_id_document_id", table_name="kiosk_print")
    op.drop_table("kiosk_print")
