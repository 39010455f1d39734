"""The command line as an operator uses it: serve --demo, import, demo --large-ct."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select

from cloudfilm.archive.demo import synthesize_large_ct
from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.models import Patient
from cloudfilm.config import Settings

from conftest import CT_134, DATA, free_port, shared_data


def _cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cloudfilm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _wait_http(url: str, process: subprocess.Popen[str], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(process.communicate()[1][-3000:])
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {seconds} s")


@pytest.mark.parametrize("sample_data", ["shared", "bundled"])
def test_serve_demo__starts_with_chinese_demo_patients(tmp_path: Path, sample_data: str) -> None:
    env = {}
    if sample_data == "bundled":
        env["CLOUDFILM_SAMPLE_DATA"] = str(tmp_path / "none")
    else:
        shared_data()
    http_port, dicom_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cloudfilm",
            "serve",
            "--demo",
            "--data-dir",
            str(tmp_path / "var"),
            "--http-port",
            str(http_port),
            "--dicom-port",
            str(dicom_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    base = f"http://127.0.0.1:{http_port}"
    try:
        _wait_http(f"{base}/healthz", process)
        assert httpx.get(f"{base}/readyz").json()["status"] == "ok"
        assert httpx.get(f"{base}/api/archive/summary").status_code == 401
        created = _cli("client", "create", "smoke", "--data-dir", str(tmp_path / "var"))
        assert created.returncode == 0, created.stderr
        granted = httpx.post(
            f"{base}/api/oauth/token",
            data={"grant_type": "client_credentials"},
            auth=("smoke", created.stdout.strip()),
        )
        assert granted.status_code == 200, granted.text
        auth = {"Authorization": f"Bearer {granted.json()['access_token']}"}
        # The report worker stores the demo reports' PDFs in their studies meanwhile:
        # compare the home page with the summary once the counts hold still.
        for _ in range(120):
            summary = httpx.get(f"{base}/api/archive/summary", headers=auth).json()
            home = httpx.get(base).text
            if summary == httpx.get(f"{base}/api/archive/summary", headers=auth).json():
                break
            time.sleep(0.5)
        assert "云胶片" in home and f"<b>{summary['instances']}</b>" in home
        assert httpx.get(f"{base}/api/docs").status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-3000:]
    assert f"http://127.0.0.1:{http_port}/" in stderr  # the banner says where to click
    # The first administrators' one-time passwords are printed once, never a default.
    for username in ("sysadmin", "secadmin", "auditadmin", "doctor"):
        assert re.search(rf"^\s+{username}\s+\S{{16}}\s", stderr, re.MULTILINE), stderr[-2000:]
    archive = Archive(Settings(data_dir=tmp_path / "var"))
    with archive.db.read_session() as session:
        names = set(session.scalars(select(Patient.patient_name_ideographic)))
    archive.close()
    if sample_data == "shared":
        assert summary["patients"] == 6 and summary["instances"] > 300
        assert {"张^伟", "王^芳", "李^娜", "刘^洋", "陈^静", "赵^磊"} == names
    else:
        # Two images, and the two demo reports' PDFs stored in their studies.
        assert summary["patients"] == 2 and summary["instances"] == 4
        assert {"张^伟", "李^娜"} == names


def test_import_cli__summary_lists_each_rejection(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "ct.dcm").write_bytes((DATA / "ct_small.dcm").read_bytes())
    (folder / "cut.dcm").write_bytes((DATA / "ct_small.dcm").read_bytes()[:5000])
    done = _cli("import", "--data-dir", str(tmp_path / "var"), "--quiet", str(folder))
    assert done.returncode == 1  # something was rejected
    assert "imported │ 1" in done.stdout.replace("已导入 ", "")
    assert f"{folder / 'cut.dcm'}: " in done.stdout
    again = _cli("import", "--data-dir", str(tmp_path / "var"), "-q", str(folder / "ct.dcm"))
    assert again.returncode == 0
    assert "duplicates │ 1" in again.stdout.replace("重复 ", "")


def test_demo_large_ct__interpolates_along_z(tmp_path: Path) -> None:
    source = shared_data("ct/pancreas_ct_cb_001_axial_134")
    slices = list(synthesize_large_ct(source, 20))
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in slices])
    assert len(slices) == 20
    assert z[0] == pytest.approx(85.91, abs=0.01) and z[-1] == pytest.approx(484.91, abs=0.01)
    assert np.allclose(np.diff(z), np.diff(z)[0])
    assert len({ds.SOPInstanceUID for ds in slices}) == 20
    assert len({ds.SeriesInstanceUID for ds in slices}) == 1
    first = sorted(
        CT_134.glob("*.dcm"),
        key=lambda p: float(dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]),
    )[0]
    assert np.array_equal(slices[0].pixel_array, dcmread(first).pixel_array)
    done = _cli("demo", "--large-ct", "12", "--output", str(tmp_path / "ct"))
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "ct").glob("*.dcm"))) == 12
    archive = Archive(Settings(data_dir=tmp_path / "var"))
    from cloudfilm import migrations

    migrations.upgrade(archive.db.engine)
    from cloudfilm.archive.importer import import_paths
    from cloudfilm.audit.service import Actor

    summary = import_paths(archive, [tmp_path / "ct"], actor=Actor.cli("test"))
    archive.close()
    assert summary.imported == 12 and not summary.rejected
