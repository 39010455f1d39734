"""sysadmin may manage storage

Data migration: the built-in ``sysadmin`` role of an existing database gets the new
``storage:manage`` permission (acknowledge storage alarms). ``seed_builtin_roles`` only
creates missing roles, so roles created before this revision need it added here. A
security administrator who removed the role's permissions keeps the rest of their edits.

Revision ID: 9b7e4c1d2a60
Revises: 5dfe2f63ebcd
Create Date: 2026-11-28 10:55:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "9b7e4c1d2a60"
down_revision: str | None = "5dfe2f63ebcd"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PERMISSION = "storage:manage"
_ROLE = sa.table(
    "role",
    sa.column("id", sa.Integer()),
    sa.column("code", sa.String()),
    sa.column("permissions", sa.JSON()),
)


def _change(add: bool) -> None:
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(_ROLE.c.id, _ROLE.c.permissions).where(_ROLE.c.code == "sysadmin")
    )
    for role_id, permissions in list(rows):
        current = list(permissions or [])
        if add and PERMISSION not in current:
            current.append(PERMISSION)
        elif not add and PERMISSION in current:
            current.remove(PERMISSION)
        else:
            continue
        conn.execute(sa.update(_ROLE).where(_ROLE.c.id == role_id).values(permissions=current))


def upgrade() -> None:
    _change(add=True)


def downgrade() -> None:
    _change(add=False)
