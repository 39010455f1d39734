"""``cloudfilm serve --mllp-port`` takes messages; ``cloudfilm hl7 messages|replay`` show
and replay them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hl7.client import MLLPClient

from conftest import free_port


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cloudfilm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


ADT = (
    "MSH|^~\\&|HIS|人民医院|CLOUDFILM|影像科|20261128083000||ADT^A01^ADT_A01|CLI0001|P|2.5"
    "|||AL|NE|CHN|UNICODE UTF-8\rPID|1||P1^^^HIS^PI||张三丰^^^^^^L||19800101|M\r"
)


def test_serve_mllp__messages_listed_and_replayed(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "var")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "cloudfilm", "serve", "--data-dir", data_dir,
         "--http-port", str(free_port()), "--dicom-port", str(free_port()),
         "--mllp-port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()[1][-3000:]
            try:
                with MLLPClient("127.0.0.1", port) as client:
                    ack = client.send_message(ADT.encode("utf-8"))
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "the MLLP port did not open"
                time.sleep(0.3)
        assert b"MSA|AA|CLI0001" in ack
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    listed = _cli("hl7", "messages", "--data-dir", data_dir, "--type", "ADT")
    assert listed.returncode == 0, listed.stderr
    assert "CLI0001" in listed.stdout and "processed" in listed.stdout
    assert "张三丰" not in listed.stdout
    empty = _cli("hl7", "messages", "--data-dir", data_dir, "--status", "failed")
    assert "CLI0001" not in empty.stdout
    replay = _cli("hl7", "replay", "1", "--data-dir", data_dir)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert "#1 ADT^A01: processed" in replay.stdout


def test_serve__refuses_plain_mllp_off_loopback_in_production(tmp_path: Path) -> None:
    import pytest
    import typer

    from cloudfilm.cli import _refuse_open_mllp
    from cloudfilm.config import Environment, HL7Settings, Settings

    base = Settings(data_dir=tmp_path)
    open_lan = HL7Settings(port=2575, host="0.0.0.0")
    lan = base.model_copy(update={"environment": Environment.PRODUCTION, "hl7": open_lan})
    with pytest.raises(typer.Exit):
        _refuse_open_mllp(lan)
    tunnelled = lan.model_copy(update={"hl7": HL7Settings(port=2575)})
    _refuse_open_mllp(tunnelled)  # loopback behind a TLS tunnel: allowed
    _refuse_open_mllp(base.model_copy(update={"hl7": open_lan}))  # development: allowed
