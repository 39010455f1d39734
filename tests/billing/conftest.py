"""Billing fixtures: an archive whose billing settings each test chooses (SQLite and
PostgreSQL, through the shared ``settings`` fixture) ."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from billing_helpers import MakeArchive

from cloudfilm import migrations
from cloudfilm.archive.ingest import Archive
from cloudfilm.config import BillingSettings, Settings
from cloudfilm.db import Database
from cloudfilm.storage import open_storage


@pytest.fixture
def make_archive(settings: Settings) -> Iterator[MakeArchive]:
    """``make_archive(**billing)``: an archive with ``BillingSettings(**billing)``."""
    opened: list[Archive] = []

    def make(**billing: Any) -> Archive:
        chosen = settings.model_copy(update={"billing": BillingSettings(**billing)})
        db = Database(chosen)
        if db.is_sqlite:
            migrations.upgrade(db.engine)
        archive = Archive(chosen, db=db, storage=open_storage(chosen))
        opened.append(archive)
        return archive

    yield make
    for archive in opened:
        archive.close()
