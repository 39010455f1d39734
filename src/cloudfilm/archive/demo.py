"""Demo and benchmark data made from real images.

``cloudfilm demo`` gives a few real sample studies to demo patients with Chinese names
(new UIDs, so the originals can still be imported beside them). ``--large-ct N``
synthesises an N-image CT from the real 134-slice CT by linear interpolation along z.

The sample files come from the shared data folder when it exists (``CLOUDFILM_SAMPLE_DATA`` when
set, else ``../shared/data`` next to the working directory or the source tree) and otherwise from
the few small files shipped in ``tests/data``.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from cloudfilm.archive.ingest import Archive, IngestResult
from cloudfilm.audit.service import Actor

_SOURCE_TREE = Path(__file__).resolve().parents[3]
CT_134 = "ct/pancreas_ct_cb_001_axial_134"


def sample_data_dir() -> Path | None:
    """The shared sample-data folder, or ``None`` when this machine has none."""
    configured = os.environ.get("CLOUDFILM_SAMPLE_DATA")
    candidates = (
        [configured]
        if configured
        else ["../shared/data", str(_SOURCE_TREE.parent / "shared" / "data")]
    )
    for candidate in candidates:
        if candidate and (Path(candidate) / "MANIFEST.md").is_file():
            return Path(candidate).resolve()
    return None


def bundled_data_dir() -> Path:
    return _SOURCE_TREE / "tests" / "data"


def demo_uid(*parts: object) -> str:
    """A stable UID under 2.25 (PS3.5 B.2) derived from ``parts``: reruns give the same UIDs."""
    name = "cloudfilm-demo:" + ":".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


@dataclass(frozen=True, slots=True)
class DemoPatient:
    patient_id: str
    name: str
    """Alphabetic=Ideographic groups, e.g. ``Zhang^Wei=张^伟``."""
    sex: str
    birth_date: str
    charset: str
    accession: str
    study_description: str
    sources: tuple[str, ...]
    """Paths relative to the sample folder (files or folders)."""
    department: str = ""
    """The requesting department (Requesting Service), what clinicians' data scopes match."""


DEMO_PATIENTS = (
    DemoPatient(
        "CF0001",
        "Zhang^Wei=张^伟",
        "M",
        "19650312",
        "ISO_IR 192",
        "A2026110001",
        "上腹部CT平扫",
        (CT_134,),
        department="消化内科",
    ),
    DemoPatient(
        "CF0002",
        "Wang^Fang=王^芳",
        "F",
        "19781105",
        "GB18030",
        "A2026110002",
        "头部CT（体模）",
        ("study_multiseries/ct_philips_head_phantom",),
        department="神经内科",
    ),
    DemoPatient(
        "CF0003",
        "Li^Na=李^娜",
        "F",
        "19900221",
        "ISO_IR 192",
        "A2026110003",
        "头颅MR功能成像",
        ("mr/ge_epi_fmri_150img",),
        department="神经内科",
    ),
    DemoPatient(
        "CF0004",
        "Liu^Yang=刘^洋",
        "M",
        "19581130",
        "GB18030",
        "A2026110004",
        "胸部正位片",
        ("radiograph/dx_fujifilm_small.dcm",),
        department="呼吸内科",
    ),
    DemoPatient(
        "CF0005",
        "Chen^Jing=陈^静",
        "F",
        "19850707",
        "ISO_IR 192",
        "A2026110005",
        "静息十二导联心电图",
        ("waveform/ecg_12lead.dcm",),
        department="心内科",
    ),
    DemoPatient(
        "CF0006",
        "Zhao^Lei=赵^磊",
        "M",
        "20010918",
        "ISO_IR 192",
        "A2026110006",
        "腹部超声",
        ("color/us_rgb_nema_us1_uncompressed.dcm", "multiframe/us_palette_rle_10f.dcm"),
        department="消化内科",
    ),
)

#: Bundled fallbacks (tests/data) when the shared sample folder is absent.
BUNDLED_SOURCES = {
    "CF0001": ("ct_small.dcm",),
    "CF0003": ("mr_small.dcm",),
}


def _files(root: Path, relative: str) -> Iterator[Path]:
    path = root / relative
    if path.is_dir():
        yield from sorted(p for p in path.rglob("*") if p.is_file())
    elif path.is_file():
        yield path


def relabel(ds: Dataset, patient: DemoPatient, institution: str = "云胶片示范医院") -> Dataset:
    """Give ``ds`` to ``patient``: demographics in Chinese, new stable UIDs."""
    ds.SpecificCharacterSet = patient.charset
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientSex = patient.sex
    ds.PatientBirthDate = patient.birth_date
    ds.AccessionNumber = patient.accession
    ds.StudyDescription = patient.study_description
    ds.InstitutionName = institution
    ds.ReferringPhysicianName = "Sun^Min=孙^敏"
    if patient.department:
        ds.RequestingService = patient.department
    ds.StudyInstanceUID = demo_uid(patient.patient_id, "study")
    ds.SeriesInstanceUID = demo_uid(patient.patient_id, ds.SeriesInstanceUID)
    ds.SOPInstanceUID = demo_uid(patient.patient_id, ds.SOPInstanceUID)
    if "FrameOfReferenceUID" in ds:
        ds.FrameOfReferenceUID = demo_uid(patient.patient_id, ds.FrameOfReferenceUID)
    if getattr(ds, "file_meta", None) is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def load_demo(
    archive: Archive, *, on_result: Callable[[IngestResult], None] | None = None
) -> list[IngestResult]:
    """Ingest the demo patients' studies (idempotent: a rerun finds duplicates)."""
    shared = sample_data_dir()
    actor = Actor.cli("cloudfilm demo")
    results = []
    for patient in DEMO_PATIENTS:
        if shared is not None:
            root, sources = shared, patient.sources
        else:
            root, sources = bundled_data_dir(), BUNDLED_SOURCES.get(patient.patient_id, ())
        for relative in sources:
            for path in _files(root, relative):
                ds = relabel(dcmread(path), patient)
                result = archive.ingest(encode(ds), actor=actor)
                results.append(result)
                if on_result is not None:
                    on_result(result)
    return results


def synthesize_large_ct(
    source_dir: Path,
    count: int,
    *,
    patient_id: str = "CF1000",
    name: str = "Zhou^Ming=周^明",
) -> Iterator[Dataset]:
    """Yield ``count`` CT slices interpolated along z from the slices in ``source_dir``.

    The result spans the same z range as the source with uniform spacing; pixel values
    are linear interpolations of the two neighbouring source slices (stored values,
    so the source's rescale slope/intercept still apply). All UIDs are new and stable.
    """
    import numpy as np

    if count < 2:
        raise ValueError("a synthetic CT needs at least 2 slices")
    slices = [dcmread(p) for p in sorted(source_dir.glob("*.dcm"))]
    if len(slices) < 2:
        raise ValueError(f"{source_dir} holds fewer than 2 CT slices")
    slices.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    z = np.array([float(d.ImagePositionPatient[2]) for d in slices])
    volume = np.stack([d.pixel_array for d in slices])
    dtype = volume.dtype
    targets = np.linspace(z[0], z[-1], count)
    spacing = float(targets[1] - targets[0])
    study_uid = demo_uid(patient_id, "large-ct", count, "study")
    series_uid = demo_uid(patient_id, "large-ct", count, "series")
    frame_uid = demo_uid(patient_id, "large-ct", count, "frame")
    limits = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    for k, zk in enumerate(targets):
        i = int(min(max(np.searchsorted(z, zk, side="right") - 1, 0), len(z) - 2))
        w = (zk - z[i]) / (z[i + 1] - z[i])
        mixed = (1.0 - w) * volume[i].astype(np.float32) + w * volume[i + 1].astype(np.float32)
        if limits is not None:
            mixed = np.clip(np.rint(mixed), limits.min, limits.max)
        pixels = mixed.astype(dtype)
        ds = slices[i if w < 0.5 else i + 1].copy()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = name
        ds.PatientID = patient_id
        ds.AccessionNumber = f"L{count:05d}"
        ds.StudyDescription = f"合成CT {count}层（由134层真实CT插值）"
        ds.SeriesDescription = f"Synthetic {count}-slice CT, z-interpolated"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SOPInstanceUID = demo_uid(patient_id, "large-ct", count, k)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        position = list(ds.ImagePositionPatient)
        position[2] = round(float(zk), 4)
        ds.ImagePositionPatient = position
        if "SliceLocation" in ds:
            ds.SliceLocation = round(float(zk), 4)
        ds.SliceThickness = round(spacing, 4)
        ds.SpacingBetweenSlices = round(spacing, 4)
        ds.PixelData = pixels.tobytes()
        yield ds
