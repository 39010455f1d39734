"""Import DICOM from folders, files, DICOMDIR file-sets and ZIP archives.

Every object goes through :meth:`Archive.ingest`; this module only finds the objects and
keeps the tally. A ZIP member is read with a size cap, so an archive that lies about its
sizes (a "zip bomb") cannot exhaust memory.
"""

from __future__ import annotations

import multiprocessing
import os
import zipfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cloudfilm.archive.ingest import Archive, IngestResult, IngestStatus
from cloudfilm.audit.service import Actor
from cloudfilm.config import Settings

_DICOMDIR_NAMES = {"DICOMDIR"}
_SKIP_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}


@dataclass(frozen=True, slots=True)
class Candidate:
    """One object to import: a file, or a member of a ZIP archive (picklable)."""

    path: str
    member: str | None
    size: int

    @property
    def label(self) -> str:
        return f"{self.path}!{self.member}" if self.member else self.path

    def read(self, max_bytes: int) -> bytes:
        """At most ``max_bytes + 1`` bytes, whatever a ZIP header claims (it may lie)."""
        if self.member is None:
            with open(self.path, "rb") as fh:
                return fh.read(max_bytes + 1)
        with zipfile.ZipFile(self.path) as archive, archive.open(self.member) as fh:
            return fh.read(max_bytes + 1)


@dataclass(slots=True)
class ImportSummary:
    imported: int = 0
    replaced: int = 0
    duplicates: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) for every object that was refused."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) for files that are not objects to store (DICOMDIR, ...)."""
    studies: set[str] = field(default_factory=set)
    bytes_read: int = 0

    @property
    def total(self) -> int:
        return self.imported + self.replaced + self.duplicates + len(self.rejected)

    def add(self, label: str, result: IngestResult, size: int) -> None:
        self.bytes_read += size
        if result.status is IngestStatus.STORED:
            self.imported += 1
        elif result.status is IngestStatus.REPLACED:
            self.replaced += 1
        elif result.status is IngestStatus.DUPLICATE:
            self.duplicates += 1
        else:
            self.rejected.append((label, result.reason or "rejected"))
        if result.study_instance_uid and result.ok:
            self.studies.add(result.study_instance_uid)

    def reasons(self) -> Counter[str]:
        return Counter(reason for _, reason in self.rejected)


def find_candidates(paths: Iterable[Path], skipped: list[tuple[str, str]]) -> Iterator[Candidate]:
    """Every file under ``paths`` (folders recursively, ZIPs opened, DICOMDIRs followed)."""
    seen: set[Path] = set()
    for path in paths:
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for name in sorted(filenames):
                    yield from _from_file(Path(dirpath) / name, skipped, seen)
        elif path.exists():
            if path.name.upper() in _DICOMDIR_NAMES:
                yield from _from_dicomdir(path, skipped, seen)
            else:
                yield from _from_file(path, skipped, seen)
        else:
            skipped.append((str(path), "no such file or folder"))


def _from_file(path: Path, skipped: list[tuple[str, str]], seen: set[Path]) -> Iterator[Candidate]:
    resolved = path.resolve()
    if resolved in seen or path.name in _SKIP_NAMES or path.is_symlink() and path.is_dir():
        return
    seen.add(resolved)
    if path.name.upper() in _DICOMDIR_NAMES:
        skipped.append((str(path), "DICOMDIR: the index of a file-set; its files are imported"))
        return
    if zipfile.is_zipfile(path) and path.suffix.lower() in (".zip", ""):
        yield from _from_zip(path, skipped)
        return
    yield Candidate(str(path), None, path.stat().st_size)


def _from_dicomdir(
    path: Path, skipped: list[tuple[str, str]], seen: set[Path]
) -> Iterator[Candidate]:
    from pydicom import dcmread
    from pydicom.fileset import FileSet

    try:
        fileset = FileSet(dcmread(path))
    except Exception as exc:  # noqa: BLE001 - a broken DICOMDIR: import its folder instead
        skipped.append((str(path), f"DICOMDIR unreadable ({exc}); importing its folder"))
        yield from find_candidates([path.parent], skipped)
        return
    for instance in fileset:
        yield from _from_file(Path(instance.path), skipped, seen)


def _from_zip(path: Path, skipped: list[tuple[str, str]]) -> Iterator[Candidate]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        skipped.append((str(path), f"damaged ZIP archive: {exc}"))
        return
    with archive:
        for info in archive.infolist():
            if info.is_dir() or Path(info.filename).name in _SKIP_NAMES:
                continue
            if Path(info.filename).name.upper() in _DICOMDIR_NAMES:
                label = f"{path}!{info.filename}"
                skipped.append((label, "DICOMDIR: the index of a file-set; its files are imported"))
                continue
            yield Candidate(str(path), info.filename, info.file_size)


def import_paths(
    archive: Archive,
    paths: Iterable[Path],
    *,
    actor: Actor,
    processes: int = 1,
    on_result: Callable[[Candidate, IngestResult], None] | None = None,
) -> ImportSummary:
    """Import everything under ``paths``; return the tally.

    With ``processes > 1`` objects are parsed and stored by that many worker processes,
    each with its own connection to the index (parsing DICOM is CPU-bound Python).
    """
    summary = ImportSummary()
    candidates = find_candidates(paths, summary.skipped)
    if processes <= 1:
        for candidate in candidates:
            _drain(candidate, _ingest(archive, actor, candidate), summary, on_result)
        return summary
    # Not "fork": a forked child keeps none of the parent's threads, and the S3 client's
    # runtime (obstore on tokio) started in this process would deadlock in it.
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(
        max_workers=processes,
        mp_context=context,
        initializer=_worker_init,
        initargs=(archive.settings, actor),
    ) as pool:
        pending: deque[tuple[Candidate, Future[IngestResult]]] = deque()
        for candidate in candidates:
            pending.append((candidate, pool.submit(_worker_ingest, candidate)))
            if len(pending) >= processes * 8:  # bounded look-ahead: flat memory on big trees
                done, future = pending.popleft()
                _drain(done, future.result(), summary, on_result)
        while pending:
            done, future = pending.popleft()
            _drain(done, future.result(), summary, on_result)
    return summary


def _ingest(archive: Archive, actor: Actor, candidate: Candidate) -> IngestResult:
    try:
        data = candidate.read(archive.limits.max_object_bytes)
    except (OSError, zipfile.BadZipFile, RuntimeError, EOFError) as exc:
        return IngestResult(IngestStatus.REJECTED, reason=f"cannot read: {exc}")
    file_actor = Actor(actor.type, actor.id, source=candidate.label[-255:], role=actor.role)
    return archive.ingest(data, actor=file_actor)


_worker: tuple[Archive, Actor] | None = None


def _worker_init(settings: Settings, actor: Actor) -> None:
    global _worker
    _worker = (Archive(settings), actor)


def _worker_ingest(candidate: Candidate) -> IngestResult:
    assert _worker is not None, "worker not initialised"
    return _ingest(_worker[0], _worker[1], candidate)


def _drain(
    candidate: Candidate,
    result: IngestResult,
    summary: ImportSummary,
    on_result: Callable[[Candidate, IngestResult], None] | None,
) -> None:
    summary.add(candidate.label, result, candidate.size)
    if on_result is not None:
        on_result(candidate, result)


__all__ = ["Candidate", "ImportSummary", "find_candidates", "import_paths"]
