"""Lossless codec benchmark (issue 5): ratio and encode/decode MB/s per codec and modality.

Run from the repository root::

    .venv/bin/python bench/codecs.py                  # table in Markdown
    .venv/bin/python bench/codecs.py --json bench/results/codecs.json

For every uncompressed image (Implicit/Explicit VR Little Endian, Deflated) with 8- or
16-bit pixel data in the sample data (``CLOUDFILM_SAMPLE_DATA``, else ``../shared/data``),
grouped by Modality (0008,0060):

* the DICOM codecs through pydicom, with the encoders the archive uses at ingest
  (JPEG-LS lossless: pyjpegls/CharLS; JPEG 2000 lossless: pylibjpeg-openjpeg without the
  colour transform; RLE lossless: pylibjpeg-rle), every result decoded again and compared
  with the original array (a mismatch is counted, and would be a bug);
* zlib (level 6) and zstd (level 3, the library's default, and 19) on the raw pixel bytes,
  as general-purpose baselines.

Ratio = raw pixel bytes / compressed pixel bytes (headers excluded); MB/s = raw pixel
megabytes (10^6) per second of one thread. HTJ2K (OpenJPH through imagecodecs) encodes
grey-scale images only; colour ones count as refused (see ``cloudfilm.storage.codecs``).
Without sample data the benchmark says why and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import zstandard
from pydicom import dcmread
from pydicom.encaps import generate_fragmented_frames
from pydicom.uid import UID, HTJ2KLossless, JPEG2000Lossless, JPEGLSLossless, RLELossless

from cloudfilm.storage import codecs

ROOT = Path(__file__).resolve().parents[1]
#: The codecs the archive encodes, through the archive's own encoder entry point.
CODECS: list[tuple[str, UID]] = [
    ("JPEG-LS lossless", JPEGLSLossless),
    ("JPEG 2000 lossless", JPEG2000Lossless),
    ("RLE lossless", RLELossless),
    ("HTJ2K lossless", HTJ2KLossless),
]


def sample_dir() -> Path | None:
    for candidate in (os.environ.get("CLOUDFILM_SAMPLE_DATA"), ROOT.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def images(root: Path) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(root.rglob("*")):
        if not path.is_file() or "malformed" in path.parts or path.suffix not in ("", ".dcm"):
            continue
        try:
            ds = dcmread(path, stop_before_pixels=True)
            syntax = ds.file_meta.TransferSyntaxUID
        except Exception:  # noqa: BLE001 - not a Part-10 file: not a sample for this
            continue
        if syntax not in codecs.UNCOMPRESSED or ds.get("BitsAllocated") not in (8, 16):
            continue
        if ds.get("SamplesPerPixel", 1) not in (1, 3) or "Rows" not in ds:
            continue
        groups[str(ds.get("Modality", "") or "?")].append(path)
    return groups


def measure(paths: list[Path]) -> dict[str, dict[str, float]]:
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    zstd3, zstd19 = zstandard.ZstdCompressor(level=3), zstandard.ZstdCompressor(level=19)
    unzstd = zstandard.ZstdDecompressor()
    for path in paths:
        try:
            original = dcmread(path)
            arr = original.pixel_array
        except Exception:  # noqa: BLE001 - a sample pydicom cannot decode: skipped
            continue
        raw = arr.tobytes()
        for name, uid in CODECS:
            if uid == HTJ2KLossless and not codecs.htj2k_available():
                continue
            ds = dcmread(path)
            start = time.perf_counter()
            try:
                codecs.encode_dataset(ds, uid, arr)
            except Exception:  # noqa: BLE001 - e.g. JPEG 2000 refuses 10 × 10, HTJ2K colour
                totals[name]["failed"] += 1
                continue
            encoded = time.perf_counter() - start
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            size = sum(
                len(f)
                for fr in generate_fragmented_frames(ds.PixelData, number_of_frames=frames)
                for f in fr
            )
            start = time.perf_counter()
            decoded = ds.pixel_array
            decoding = time.perf_counter() - start
            row = totals[name]
            row["raw"] += len(raw)
            row["compressed"] += size
            row["encode_s"] += encoded
            row["decode_s"] += decoding
            row["mismatch"] += 0 if np.array_equal(decoded, arr) else 1
        for name, compress, decompress in (
            ("zlib 6", lambda b: zlib.compress(b, 6), zlib.decompress),
            ("zstd 3", zstd3.compress, unzstd.decompress),
            ("zstd 19", zstd19.compress, unzstd.decompress),
        ):
            start = time.perf_counter()
            packed = compress(raw)
            encoded = time.perf_counter() - start
            start = time.perf_counter()
            decompress(packed)
            row = totals[name]
            row["decode_s"] += time.perf_counter() - start
            row["raw"] += len(raw)
            row["compressed"] += len(packed)
            row["encode_s"] += encoded
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    root = sample_dir()
    if root is None:
        print("no sample data (CLOUDFILM_SAMPLE_DATA or ../shared/data): skipped")
        return 0
    results: dict[str, Any] = {}
    print("| modality | images | raw MB | codec | ratio | encode MB/s | decode MB/s | bit-exact |")
    print("|---|---:|---:|---|---:|---:|---:|---|")
    for modality, paths in sorted(images(root).items()):
        totals = measure(paths)
        results[modality] = {"images": len(paths), **{k: dict(v) for k, v in totals.items()}}
        for name, row in totals.items():
            if not row["raw"]:
                continue
            mb = row["raw"] / 1e6
            exact = (
                "—"
                if name.startswith(("zlib", "zstd"))
                else ("yes" if not row["mismatch"] else f"{int(row['mismatch'])} differ")
            )
            if row.get("failed"):
                exact += f" ({int(row['failed'])} refused)"
            print(
                f"| {modality} | {len(paths)} | {mb:.1f} | {name} | "
                f"{row['raw'] / row['compressed']:.2f} | {mb / row['encode_s']:.0f} | "
                f"{mb / row['decode_s']:.0f} | {exact} |"
            )
    print(f"\nHTJ2K lossless: {'available' if codecs.htj2k_available() else 'no encoder'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
