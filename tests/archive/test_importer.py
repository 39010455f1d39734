"""Importing folders, ZIP archives and DICOMDIR file-sets."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

from pydicom import dcmread
from pydicom.fileset import FileSet
from sqlalchemy import func, select

from cloudfilm.archive.importer import import_paths
from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.models import Instance
from cloudfilm.archive.parsing import IngestLimits
from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.service import Actor

from conftest import DATA, shared_data

ACTOR = Actor.cli("cloudfilm import")
BUNDLED = [
    "chr_gb18030.dcm",
    "chr_iso_ir_192.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
    "ct_small.dcm",
    "mr_small.dcm",
]


def _instances(archive: Archive) -> int:
    with archive.db.read_session() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def test_import__folder_zip_and_dicomdir(archive: Archive, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in BUNDLED[:2]:
        shutil.copy(DATA / name, folder / name)
    (folder / "notes.txt").write_text("not an image", encoding="utf-8")
    with zipfile.ZipFile(tmp_path / "exam.zip", "w") as zf:
        zf.write(DATA / BUNDLED[2], "a/b/one.dcm")
        zf.write(DATA / BUNDLED[0], "dup.dcm")  # same object as in the folder
    fileset = FileSet()
    for name in BUNDLED[3:]:
        ds = dcmread(DATA / name)
        for keyword, value in (
            ("StudyID", "1"),
            ("StudyDate", "20260101"),
            ("StudyTime", "080000"),
            ("SeriesNumber", 1),
            ("InstanceNumber", 1),
        ):
            if ds.get(keyword) in (None, ""):
                setattr(ds, keyword, value)
        fileset.add(ds)
    fileset.write(tmp_path / "cd")

    summary = import_paths(
        archive, [folder, tmp_path / "exam.zip", tmp_path / "cd" / "DICOMDIR"], actor=ACTOR
    )
    assert summary.imported == 5
    assert summary.duplicates == 1
    assert [(Path(p).name, "not DICOM" in r) for p, r in summary.rejected] == [("notes.txt", True)]
    assert _instances(archive) == 5
    with archive.db.read_session() as session:
        sources = set(session.scalars(select(AuditEvent.source)))
    assert f"{tmp_path / 'exam.zip'}!a/b/one.dcm" in sources


def test_import__zip_member_larger_than_limit(archive: Archive, tmp_path: Path) -> None:
    archive.limits = IngestLimits(max_object_bytes=1_000_000, max_frame_pixels=10**8)
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.dcm", b"\0" * 20_000_000)  # compresses to ~20 kB
    summary = import_paths(archive, [tmp_path / "bomb.zip"], actor=ACTOR)
    assert [reason for _, reason in summary.rejected] == [
        "object of 1000001 bytes exceeds the limit of 1000000 bytes "
        "(setting ingest.max_object_bytes)"
    ]
    assert _instances(archive) == 0


def test_import__worker_processes(archive: Archive, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in BUNDLED:
        shutil.copy(DATA / name, folder / name)
    summary = import_paths(archive, [folder], actor=ACTOR, processes=2)
    assert (summary.imported, summary.duplicates, len(summary.rejected)) == (5, 0, 0)
    assert _instances(archive) == 5


def test_import__whole_shared_tree(archive: Archive) -> None:
    """Every file of the shared sample tree is imported or rejected with a reason, and the
    summary agrees with the index."""
    root = shared_data()
    files = [Path(d) / f for d, _, names in os.walk(root) for f in names]
    summary = import_paths(archive, [root], actor=ACTOR)
    assert summary.total + len(summary.skipped) == len(files)
    assert summary.imported == _instances(archive)
    assert all(reason for _, reason in summary.rejected)
    rejected = {Path(p).name for p, _ in summary.rejected}
    assert "MANIFEST.md" in rejected
    assert {"ct_trunc_mid_pixeldata.dcm", "empty_0_bytes.dcm"} <= rejected
    assert summary.imported > 400
    with archive.db.read_session() as session:
        refused = session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.event_type == "instance-rejected")
        )
    assert refused == len(summary.rejected)
