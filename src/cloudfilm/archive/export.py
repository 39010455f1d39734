"""A study as a ZIP: the stored DICOM files in a DICOMDIR file-set (PS3.10, PS3.3 F).

The ZIP is streamed as it is written (``zipfile`` on an unseekable sink), so nothing the
size of the study is held in memory. The DICOMDIR is made by pydicom's ``FileSet`` from
the instances' headers; the image files themselves are the stored objects, byte for byte.
Where an object lacks an attribute that a directory record must carry (a study without
Study Date, say) the *record* gets a stand-in value; the image file is not changed.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet

from cloudfilm.storage import StorageBackend

#: Directory-record attributes of Type 1 (PS3.3 F.5) and the stand-ins used when missing.
_RECORD_FALLBACKS = {
    "PatientID": "UNKNOWN",
    "StudyDate": "19000101",
    "StudyTime": "000000",
    "StudyID": "1",
    "Modality": "OT",
    "SeriesNumber": "1",
}


class _Sink(io.RawIOBase):
    """Collects what zipfile writes; the generator hands it out chunk by chunk."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.buffer.extend(data)
        return len(data)

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


def _record_header(blob: bytes, position: int) -> Dataset:
    ds = dcmread(io.BytesIO(blob), stop_before_pixels=True)
    for keyword, value in _RECORD_FALLBACKS.items():
        if not str(ds.get(keyword, "") or "").strip():
            setattr(ds, keyword, value)
    if not str(ds.get("InstanceNumber", "") or "").strip():
        ds.InstanceNumber = position
    return ds


def study_zip(storage: StorageBackend, objects: list[tuple[str, str]]) -> Iterator[bytes]:
    """Chunks of a ZIP holding ``objects`` — (SOP Instance UID, storage key) pairs — and
    their DICOMDIR."""
    with tempfile.TemporaryDirectory(prefix="cloudfilm-zip-") as tmp:
        fileset = FileSet()
        fileset.ID = "CLOUDFILM"
        keys: dict[str, str] = {}
        for position, (uid, key) in enumerate(objects, start=1):
            fileset.add(_record_header(storage.read(key), position))
            keys[uid] = key
        fileset.write(tmp)
        sink = _Sink()
        with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.write(Path(tmp) / "DICOMDIR", "DICOMDIR")
            yield sink.take()
            for instance in fileset:
                name = Path(instance.path).relative_to(tmp).as_posix()
                with archive.open(name, "w", force_zip64=True) as member:
                    with storage.open(keys[instance.SOPInstanceUID]) as source:
                        while chunk := source.read(1024 * 1024):
                            member.write(chunk)
                            yield sink.take()
                yield sink.take()
        yield sink.take()
