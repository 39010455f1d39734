"""Settings: environment, nesting, TOML, production refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cloudfilm.config import DuplicatePolicy, Environment, Settings


def test_settings__environment_nested(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUDFILM_DIMSE__PORT", "11999")
    monkeypatch.setenv(
        "CLOUDFILM_DIMSE__NODES",
        '{"CT01": {"host": "10.0.0.5"}, "WS01": {"host": "10.0.0.6", "port": 104, '
        '"allow_find": true, "allow_move": true}}',
    )
    monkeypatch.setenv("CLOUDFILM_INGEST__DUPLICATE_POLICY", "replace")
    settings = Settings()
    assert settings.dimse.port == 11999
    ct, ws = settings.dimse.nodes["CT01"], settings.dimse.nodes["WS01"]
    assert (ct.host, ct.port, ct.allow_store, ct.allow_find, ct.allow_move) == (
        "10.0.0.5",
        None,
        True,
        False,
        False,
    )
    assert (ws.port, ws.allow_find, ws.allow_move, ws.allow_get) == (104, True, True, False)
    assert settings.ingest.duplicate_policy is DuplicatePolicy.REPLACE


def test_settings__toml_file_below_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "cloudfilm.toml"
    config.write_text(
        'data_dir = "/srv/cf"\n[dimse]\nae_title = "HOSPITAL_PACS"\nport = 104\n'
        '[dimse.nodes.WS01]\nhost = "10.1.2.30"\nport = 11112\nallow_get = true\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("CLOUDFILM_CONFIG_FILE", str(config))
    monkeypatch.setenv("CLOUDFILM_DIMSE__PORT", "11112")
    settings = Settings()
    assert settings.data_dir == Path("/srv/cf")
    assert settings.dimse.ae_title == "HOSPITAL_PACS"
    assert settings.dimse.port == 11112  # the environment wins over the file
    assert settings.dimse.nodes["WS01"].allow_get is True
    assert settings.dimse.nodes["WS01"].allow_find is False


def test_settings__defaults_are_embedded_and_closed(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'cloudfilm.db'}"
    assert settings.storage_url == (tmp_path / "storage").resolve().as_uri()
    assert settings.dimse.accept_unknown_callers is False
    assert settings.dimse.host == "127.0.0.1"


@pytest.mark.parametrize("key", ["changeme", "short-key", "admin"])
def test_settings__production_refuses_placeholder_secret(
    key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDFILM_SECRET_KEY", key)
    with pytest.raises(ValidationError, match="placeholder or too short"):
        Settings(
            environment=Environment.PRODUCTION,
            database={"url": "postgresql+psycopg://app@db/cloudfilm"},
        )


def test_settings__production_needs_key_database_and_real_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CLOUDFILM_SECRET_KEY", raising=False)
    with pytest.raises(ValidationError, match="needs CLOUDFILM_SECRET_KEY"):
        Settings(environment=Environment.PRODUCTION)
    monkeypatch.setenv("CLOUDFILM_SECRET_KEY", "k" * 40)
    with pytest.raises(ValidationError, match="needs CLOUDFILM_DATABASE__URL"):
        Settings(environment=Environment.PRODUCTION)
    with pytest.raises(ValidationError, match="database.password holds a placeholder"):
        Settings(
            environment=Environment.PRODUCTION,
            database={"url": "postgresql+psycopg://app@db/cf", "password": "changeme"},
        )
    ok = Settings(
        environment=Environment.PRODUCTION,
        database={"url": "postgresql+psycopg://app@db/cf", "password": "Xy7!pq9#Lm"},
    )
    assert "Xy7" not in repr(ok)  # secrets never print


def test_settings__ae_title_validated() -> None:
    with pytest.raises(ValidationError, match="AE title"):
        Settings(dimse={"ae_title": "A" * 17})
    with pytest.raises(ValidationError, match="AE title"):
        Settings(dimse={"nodes": {"A\\B": {"host": "10.0.0.1"}}})


def test_settings__node_table_checked() -> None:
    with pytest.raises(ValidationError, match="host\n  Field required"):
        Settings(dimse={"nodes": {"WS01": {"allow_find": True}}})
    with pytest.raises(ValidationError, match="needs a real host"):
        Settings(dimse={"nodes": {"WS01": {"host": "*", "port": 104}}})
    with pytest.raises(ValidationError, match="not a TCP port"):
        Settings(dimse={"nodes": {"WS01": {"host": "10.0.0.1", "port": 70000}}})
    with pytest.raises(ValidationError, match="max_find_results"):
        Settings(dimse={"max_find_results": 0})
    with pytest.raises(ValidationError, match="Extra inputs"):
        Settings(dimse={"nodes": {"WS01": {"host": "10.0.0.1", "allow_delete": True}}})


def test_configuration_doc_is_current() -> None:
    from cloudfilm.config import settings_reference

    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text(encoding="utf-8") == settings_reference(), (
        "docs/configuration.md is stale: run `cloudfilm settings > docs/configuration.md`"
    )
