"""built-in roles get the patient index permissions

Data migration: the built-in roles of an existing database get the new ``patient:read``
(PIX/PDQ lookups: clinician, radiologist, operator, archivist, integration) and
``patient:merge`` (archivist, integration) permissions, as ``BUILTIN_ROLES`` now grants
them. ``seed_builtin_roles`` only creates missing roles, so roles created before this
revision need them added here; other edits of a security administrator are kept.

Revision ID: b71f3c9e2d58
Revises: e380c8549ff6
Create Date: 2026-11-28 13:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b71f3c9e2d58"
down_revision: str | None = "e380c8549ff6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GRANTS = {
    "clinician": ["patient:read"],
    "radiologist": ["patient:read"],
    "operator": ["patient:read"],
    "archivist": ["patient:read", "patient:merge"],
    "integration": ["patient:read", "patient:merge"],
}
_ROLE = sa.table(
    "role",
    sa.column("id", sa.Integer()),
    sa.column("code", sa.String()),
    sa.column("builtin", sa.Boolean()),
    sa.column("permissions", sa.JSON()),
)


def _change(add: bool) -> None:
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(_ROLE.c.id, _ROLE.c.code, _ROLE.c.permissions).where(
            _ROLE.c.code.in_(list(GRANTS)), _ROLE.c.builtin.is_(True)
        )
    )
    for role_id, code, permissions in list(rows):
        current = list(permissions or [])
        changed = list(current)
        for permission in GRANTS[code]:
            if add and permission not in changed:
                changed.append(permission)
            elif not add and permission in changed:
                changed.remove(permission)
        if changed != current:
            conn.execute(sa.update(_ROLE).where(_ROLE.c.id == role_id).values(permissions=changed))


def upgrade() -> None:
    _change(add=True)


def downgrade() -> None:
    _change(add=False)
