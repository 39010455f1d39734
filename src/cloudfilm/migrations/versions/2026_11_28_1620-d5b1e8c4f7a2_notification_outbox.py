"""notification outbox

``notification``: the SMS and WeChat outbox (recipient sealed with a blind index,
variables and text sealed, state, attempts, lease, provider message id, delivery
receipt, subject, dedupe key). The built-in system administrator role gets the new
``notify:read`` permission (the console's message list), as ``BUILTIN_ROLES`` now grants
it; other edits of a security administrator are kept.

Revision ID: d5b1e8c4f7a2
Revises: a3c5e7f9b1d2
Create Date: 2026-11-28 16:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "d5b1e8c4f7a2"
down_revision: str | None = "a3c5e7f9b1d2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ROLE = sa.table(
    "role",
    sa.column("id", sa.Integer()),
    sa.column("code", sa.String()),
    sa.column("builtin", sa.Boolean()),
    sa.column("permissions", sa.JSON()),
)
_GRANT = ("sysadmin", "notify:read")


def _grant(add: bool) -> None:
    conn = op.get_bind()
    code, permission = _GRANT
    rows = conn.execute(
        sa.select(_ROLE.c.id, _ROLE.c.permissions).where(
            _ROLE.c.code == code, _ROLE.c.builtin.is_(True)
        )
    )
    for role_id, permissions in list(rows):
        current = list(permissions or [])
        changed = [p for p in current if p != permission]
        if add:
            changed.append(permission)
        if changed != current:
            conn.execute(sa.update(_ROLE).where(_ROLE.c.id == role_id).values(permissions=changed))


def upgrade() -> None:
    op.create_table(
        "notification",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("driver", sa.String(length=16), nullable=False),
        sa.Column("template", sa.String(length=64), nullable=False),
        sa.Column("recipient", sa.String(length=512), nullable=False),
        sa.Column("recipient_index", sa.String(length=64), nullable=False),
        sa.Column("variables", sa.Text(), nullable=False),
        sa.Column("rendered", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(length=512), nullable=True),
        sa.Column("provider_message_id", sa.String(length=128), nullable=True),
        sa.Column("receipt_status", sa.String(length=64), nullable=True),
        sa.Column("receipt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("object_type", sa.String(length=32), nullable=False),
        sa.Column("object_id", sa.String(length=128), nullable=False),
        sa.Column("dedupe_key", sa.String(length=191), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notification")),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_notification_dedupe_key")),
    )
    op.create_index(
        "ix_notification_state_not_before", "notification", ["state", "not_before"], unique=False
    )
    op.create_index(
        "ix_notification_recipient_index_created_at",
        "notification",
        ["recipient_index", "created_at"],
        unique=False,
    )
    op.create_index(
        "ix_notification_provider_message_id",
        "notification",
        ["provider_message_id"],
        unique=False,
    )
    _grant(add=True)


def downgrade() -> None:
    _grant(add=False)
    op.drop_index("ix_notification_provider_message_id", table_name="notification")
    op.drop_index("ix_notification_recipient_index_created_at", table_name="notification")
    op.drop_index("ix_notification_state_not_before", table_name="notification")
    op.drop_table("notification")
