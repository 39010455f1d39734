"""One settings object for every role of the program.

Values come, highest priority first, from keyword arguments, the environment
(``CLOUDFILM_*``, nested with ``__``: ``CLOUDFILM_DIMSE__PORT=11112``), an optional
TOML file (``CLOUDFILM_CONFIG_FILE``, default ``./cloudfilm.toml`` when it exists)
and the defaults below. Defaults are closed: remote callers are refused until
listed, production refuses placeholder secrets.
"""

from __future__ import annotations

import os
import re
import secrets
from decimal import Decimal
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Self, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

#: Secrets that ship in examples and must never reach production.
PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "secret", "cloudfilm", "admin"})


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class DuplicatePolicy(StrEnum):
    """What to do when a SOP Instance UID arrives again with different bytes."""

    KEEP_FIRST = "keep_first"
    REPLACE = "replace"


class ChecksumAlgorithm(StrEnum):
    SHA256 = "sha256"
    SM3 = "sm3"


class MirrorMode(StrEnum):
    SYNC = "sync"
    """Ingest answers only when both the primary and the mirror hold the bytes."""
    ASYNC = "async"
    """Ingest answers when the primary holds the bytes and the copy is queued durably."""


class _Section(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")


class DatabaseSettings(_Section):
    url: str | None = None
    """SQLAlchemy URL of the index database. Default: SQLite file ``cloudfilm.db`` in the
    data directory. Production: ``postgresql+psycopg://cloudfilm_app@db-host/cloudfilm``
    (a business role without DBA rights; the password belongs in ``password``)."""

    password: SecretStr | None = None
    """Password for the database URL, kept out of the URL so it never appears in logs."""

    app_role: str | None = None
    """PostgreSQL business role that ``cloudfilm migrate`` (run as the owner role) grants row
    access to after migrating, as if ``--grant-to ROLE`` were given. Set it in the owner's
    environment, e.g. ``cloudfilm_app``; empty: no grants."""

    pool_size: int = 10
    """Connections kept open per process (PostgreSQL only)."""

    echo: bool = False
    """Log every SQL statement. For debugging only: statements carry patient data."""


class StorageSettings(_Section):
    url: str | None = None
    """Where instance blobs live, as a backend URL: ``file:///srv/cloudfilm/storage``.
    Default: the ``storage`` folder in the data directory."""

    checksum: ChecksumAlgorithm = ChecksumAlgorithm.SHA256
    """Digest recorded for every stored object (``sm3`` for commercial-cryptography sites)."""

    fsync: bool = True
    """Flush every object and its directory to disk before the index commit. Turning it off
    trades crash safety for speed; only for throw-away test archives."""

    temp_max_age_seconds: int = 600
    """Temporary upload files older than this whose writer is gone are swept (S3: multipart
    uploads started longer ago than this are aborted)."""

    s3_access_key_id: str | None = None
    """Access key of the S3-compatible object store when ``url`` is ``s3://...``. Empty: the
    standard ``AWS_ACCESS_KEY_ID`` environment variable. Never put credentials in ``url``."""

    s3_secret_access_key: SecretStr | None = None
    """Secret key for ``s3_access_key_id`` (environment
    ``CLOUDFILM_STORAGE__S3_SECRET_ACCESS_KEY``, not the config file). Empty: the standard
    ``AWS_SECRET_ACCESS_KEY`` environment variable."""

    s3_connect_timeout_seconds: float = Field(default=3.0, gt=0)
    """Seconds to wait for a TCP connection to the object store; a stopped server fails at
    once (connection refused), an unreachable one after this. Default 3."""

    s3_read_timeout_seconds: float = Field(default=30.0, gt=0)
    """Seconds a request may wait for the next bytes from the object store before it fails
    (a hung server). Default 30."""

    s3_request_timeout_seconds: float = Field(default=600.0, gt=0)
    """Longest one request may take from start to last byte (one PUT of a whole object, one
    8 MiB part, one ranged read). Default 600: a 2 GiB object at 4 MB/s."""

    s3_max_retries: int = Field(default=3, ge=0)
    """Retries of a failed request (connection errors, 5xx, throttling) with exponential
    back-off from 0.1 s. Credentials refused or a missing bucket are never retried."""

    s3_retry_timeout_seconds: float = Field(default=30.0, gt=0)
    """No retry starts later than this many seconds after the first attempt."""

    mirror_url: str | None = None
    """A second backend that holds a copy of every object (``file:///mnt/nas/cloudfilm`` or
    ``s3://bucket/prefix?endpoint=...``). Empty (default): one copy only. Reads fall back to
    the mirror when the primary copy is missing or unreadable; the scrub repairs either copy
    from the other."""

    mirror_mode: MirrorMode = MirrorMode.SYNC
    """``sync`` (default): ingest is acknowledged only when both copies are written; a failed
    mirror write fails the ingest (the sender retries). ``async``: acknowledged when the
    primary holds the bytes and the mirror copy is queued in the database; the mirror copier
    (``cloudfilm serve``, ``cloudfilm storage mirror-sync``) catches up, also after a crash."""

    mirror_s3_access_key_id: str | None = None
    """Access key for an ``s3://`` mirror. Empty: ``s3_access_key_id`` (then
    ``AWS_ACCESS_KEY_ID``). Timeouts and retries are the primary's ``s3_*`` settings."""

    mirror_s3_secret_access_key: SecretStr | None = None
    """Secret key for ``mirror_s3_access_key_id`` (environment
    ``CLOUDFILM_STORAGE__MIRROR_S3_SECRET_ACCESS_KEY``). Empty: ``s3_secret_access_key``."""

    mirror_sync_interval_seconds: float = Field(default=30.0, gt=0)
    """Seconds between two passes of the mirror copier in ``cloudfilm serve`` (async copies
    and repairs of copies found missing on a read). A failed copy is retried with back-off."""

    scrub_share_per_day: float = Field(default=1 / 30, ge=0, le=1)
    """Share of the objects whose bytes the daily scrub re-reads and checks against the
    recorded checksum (least recently verified first), repairing a bad copy from the good
    one. Default 1/30: every object about once a month. 0: no background scrub."""


class IngestSettings(_Section):
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST
    """A known SOP Instance UID arriving with *different* bytes: ``keep_first`` keeps the
    stored object (the new one is refused and audited), ``replace`` stores the new one.
    Identical bytes are always a no-op."""

    max_object_bytes: int = 2 * 1024**3
    """Largest DICOM object accepted, in bytes."""

    max_frame_pixels: int = 20_000 * 20_000
    """Largest Rows x Columns accepted for one frame; larger headers are refused as absurd."""


class RetentionRule(_Section):
    """Studies of ``modality`` (any modality: ``*``) whose study date is more than ``years``
    ago are due for deletion by ``cloudfilm storage retention --apply``."""

    modality: str = "*"
    years: int = Field(ge=1, le=100)


class RetentionSettings(_Section):
    recycle_days: int = Field(default=30, ge=0, le=3650)
    """Days a deleted study, series or instance stays in the recycle bin (restorable)
    before its bytes are removed. 0 removes them at the next purge."""

    rules: list[RetentionRule] = Field(default_factory=list)
    """Retention periods, e.g. ``[{"modality": "*", "years": 30}, {"modality": "US",
    "years": 15}]``. Empty: nothing is ever due. A study matches the rule of its first
    listed modality that has one, else the ``*`` rule. Retention only proposes deletions
    (``cloudfilm storage retention``); ``--apply`` moves them to the recycle bin."""


class MonitoringSettings(_Section):
    interval_seconds: float = Field(default=60.0, gt=0)
    """Seconds between two passes of the storage monitor in ``cloudfilm serve``: each pass
    measures every backend, records a usage sample and raises or clears alarms. Ingest does
    not wait for it: every write checks free space itself (``refuse_*`` below)."""

    warning_percent: float = Field(default=85.0, gt=0, le=100)
    """Used share of a storage device (percent) that raises a *warning* alarm: time to
    order disks, add a tier or move old studies to nearline storage."""

    critical_percent: float = Field(default=95.0, gt=0, le=100)
    """Used share (percent) that raises a *critical* alarm: ingest will be refused soon."""

    clear_margin_percent: float = Field(default=1.0, ge=0, le=50)
    """An alarm clears when usage falls this many points below its threshold, so that a
    device hovering at the threshold does not raise and clear an alarm on every pass."""

    refuse_below_bytes: int = Field(default=2 * 1024**3, ge=0)
    """Ingest is refused (C-STORE 0xA700, HTTP 507) when a write would leave less free
    space than the larger of this and ``refuse_below_percent``: the disk never fills
    completely, so the index, the audit trail and the operating system can still write.
    Default 2 GiB."""

    refuse_below_percent: float = Field(default=2.0, ge=0, le=50)
    """Free share (percent of capacity) kept in reserve; see ``refuse_below_bytes``."""

    forecast_warning_days: float = Field(default=30.0, ge=0)
    """A *warning* alarm when the projection says the device reaches the refusal reserve
    within this many days at the growth rate of the last ``growth_window_days``. 0: off."""

    growth_window_days: int = Field(default=7, ge=1)
    """Days of usage samples the growth rate (bytes per day) is measured over."""

    sample_every_seconds: int = Field(default=3600, ge=1)
    """At most one usage sample per backend in this many seconds (the table stays small)."""

    sample_retention_days: int = Field(default=400, ge=1)
    """Usage samples older than this are deleted."""

    quota_bytes: dict[str, int] = Field(default_factory=dict)
    """Bytes the archive may use per tier (``online`` or a name in ``tiers.backends``),
    e.g. ``{"online": 50000000000000}``. Object storage has no free space to measure: with a
    quota its capacity is the quota and its used bytes are what the index places there
    (kept current between monitor passes by the bytes each process wrote), so usage alarms,
    the days-until-full projection and the ingest reserve work as for a disk. On a file
    system the quota caps the device (free = the smaller of both)."""

    @model_validator(mode="after")
    def _check_order(self) -> Self:
        if self.warning_percent >= self.critical_percent:
            raise ValueError(
                f"monitoring.warning_percent ({self.warning_percent}) must be below "
                f"critical_percent ({self.critical_percent})"
            )
        return self


class Codec(StrEnum):
    """Lossless codecs the archive can store pixel data in (``none``: as received)."""

    NONE = "none"
    JPEG_LS_LOSSLESS = "jpeg-ls-lossless"
    JPEG2000_LOSSLESS = "jpeg2000-lossless"
    RLE_LOSSLESS = "rle-lossless"
    HTJ2K_LOSSLESS = "htj2k-lossless"


class CompressionSettings(_Section):
    at_ingest: bool = True
    """Re-encode uncompressed images (Implicit/Explicit VR Little Endian, Deflated) in a
    lossless codec at ingest. The decoded pixels of the result are compared bit for bit
    with the received ones before the original is let go (always; not a switch); on any
    failure or difference the object is stored as received. Clients that do not accept
    the codec get the original transfer syntax back, transcoded on the fly. Turn it off to
    store every object byte for byte as sent."""

    codec: Codec = Codec.JPEG_LS_LOSSLESS
    """Codec for modalities not named in ``by_modality``: ``jpeg-ls-lossless`` (best ratio
    and speed measured, docs/benchmarks.md), ``jpeg2000-lossless``, ``rle-lossless``,
    ``htj2k-lossless`` (High-Throughput JPEG 2000, encoded with OpenJPH through imagecodecs;
    grey-scale images only, colour ones are kept as received) or ``none``."""

    by_modality: dict[str, Codec] = Field(default_factory=dict)
    """Codec per Modality (0008,0060), overriding ``codec``, e.g.
    ``{"US": "none", "XA": "jpeg2000-lossless"}``."""

    min_pixel_bytes: int = Field(default=8192, ge=0)
    """Pixel Data smaller than this (bytes) is stored as received: not worth the work."""

    deferred: bool = True
    """Compress after the object is acknowledged, in the background, instead of before
    (the sender waits for parsing, indexing and the disk only: 2–3× more images per
    second over STOW-RS and C-STORE). Each object gets a durable job in the same
    transaction that indexes it; the re-encoded copy replaces the received one once
    verified, and the received one is deleted ``deferred_grace_seconds`` later (readers
    that looked it up just before the switch can still finish). ``false``: compress
    before acknowledging, as the sender waits."""

    processes: int = Field(default=1, ge=1, le=32)
    """Processes that run the background compression (each uses one CPU core while
    busy, outside the server's own process)."""

    deferred_grace_seconds: int = Field(default=300, ge=0)
    """How long a received object outlives its compressed replacement."""

    deferred_delay_seconds: float = Field(default=15.0, ge=0)
    """How long after ingest an object's compression is due: a burst of images (a CT
    arriving) is taken in at full speed, and compressed once it has passed."""

    at_migration: bool = False
    """Before a tier migration copies a study off the online tier, its uncompressed images
    that have no compression job yet get one, run then and there (same codec choice, same
    bit-for-bit verification as at ingest, ``codec`` and ``by_modality`` even when
    ``at_ingest = false``), so the lower tier holds the compressed form: for an archive that
    keeps images online byte for byte as received and compresses what it moves down."""

    @field_validator("by_modality")
    @classmethod
    def _upper_modalities(cls, value: dict[str, Codec]) -> dict[str, Codec]:
        return {k.strip().upper(): v for k, v in value.items()}

    @model_validator(mode="after")
    def _check_available(self) -> Self:
        chosen = {self.codec, *self.by_modality.values()}
        if Codec.HTJ2K_LOSSLESS in chosen:
            from cloudfilm.storage.codecs import htj2k_available

            if not htj2k_available():
                raise ValueError(
                    "compression codec htj2k-lossless needs an HTJ2K encoder (the imagecodecs "
                    "package with OpenJPH), which is not installed: choose jpeg-ls-lossless "
                    "or jpeg2000-lossless"
                )
        return self

    def codec_for(self, modality: str) -> Codec:
        """The codec for objects of ``modality`` (``none`` when compression is off)."""
        if not self.at_ingest:
            return Codec.NONE
        return self.by_modality.get(modality.strip().upper(), self.codec)


#: The law's floor for keeping logs of network operations (网络安全法 §21: six months).
MIN_AUDIT_RETENTION_DAYS = 180


class AuditSettings(_Section):
    hash_algorithm: ChecksumAlgorithm = ChecksumAlgorithm.SM3
    """Digest that chains each audit record to the one before (``sm3`` or ``sha256``).
    Each record stores the algorithm it was hashed with, so switching keeps older
    records verifiable."""

    retention_days: int = MIN_AUDIT_RETENTION_DAYS
    """Days an audit record is kept before ``cloudfilm audit purge`` may remove it. At least
    180 (six months, 网络安全法 §21); hospitals often keep longer by their own rules."""

    max_results: int = Field(default=1000, ge=1)
    """Most records one search of ``/api/audit/events`` returns; page with ``offset``.
    The CSV export is streamed and has no such cap."""

    @field_validator("retention_days")
    @classmethod
    def _check_retention(cls, value: int) -> int:
        if value < MIN_AUDIT_RETENTION_DAYS:
            raise ValueError(
                f"audit.retention_days={value}: audit records must be kept at least "
                f"{MIN_AUDIT_RETENTION_DAYS} days (six months)"
            )
        return value


def _check_aet(value: str) -> str:
    """An AE title (PS3.5 AE VR): 1 to 16 characters, no backslash, no control characters."""
    text = value.strip()
    if not 0 < len(text) <= 16 or "\\" in text or not text.isprintable():
        raise ValueError(f"{value!r}: an AE title has 1 to 16 characters and no backslash")
    return text


class DicomNode(_Section):
    """A remote application entity in the node table, and what it may ask of us."""

    host: str
    """Address the AE connects from and, for a C-MOVE destination, is reached at: an IP
    address or a host name (resolved when an association arrives). Required. ``*``
    accepts the AE title from any address; only for nodes that call us and never
    receive."""

    port: int | None = None
    """TCP port of the AE's own Storage SCP. Needed to use the node as a C-MOVE destination;
    leave empty for nodes that only send or query."""

    allow_store: bool = True
    """May send objects to us (C-STORE)."""

    allow_find: bool = False
    """May query the archive (C-FIND, Patient and Study Root)."""

    allow_move: bool = False
    """May ask us to send objects to a node in this table (C-MOVE). The destination needs
    ``host`` and ``port``; it does not need any permission itself."""

    allow_get: bool = False
    """May retrieve objects on its own association (C-GET)."""

    @field_validator("port")
    @classmethod
    def _check_port(cls, value: int | None) -> int | None:
        if value is not None and not 0 < value < 65536:
            raise ValueError(f"port {value} is not a TCP port (1-65535)")
        return value

    @model_validator(mode="after")
    def _check_reachable(self) -> Self:
        if self.port is not None and self.host.strip() in ("", "*"):
            raise ValueError(
                "a node with a port is a C-MOVE destination and needs a real host, not '*'"
            )
        return self


class DimseSettings(_Section):
    ae_title: str = "CLOUDFILM"
    """Our AE title (max 16 characters, PS3.5 AE VR)."""

    port: int = 11112
    """TCP port of the DICOM listener (C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET)."""

    host: str = "127.0.0.1"
    """Address the DICOM listener binds to. ``0.0.0.0`` to accept modalities on the LAN."""

    accept_unknown_callers: bool = False
    """Accept associations from AE titles that are not in ``nodes``; such callers may only
    store and verify (C-STORE, C-ECHO), never query or retrieve. Leave off outside the lab;
    ``--demo`` turns it on for the local machine."""

    nodes: dict[str, DicomNode] = Field(default_factory=dict)
    """The node table: AE title → ``host``, ``port`` and permissions (``allow_store``
    default true; ``allow_find``, ``allow_move``, ``allow_get`` default false). TOML:
    ``[dimse.nodes.WS01]`` with ``host = "10.1.2.30"``, ``port = 104``,
    ``allow_find = true``; environment: JSON, e.g.
    ``{"CT01": {"host": "10.1.2.3"}, "WS01": {"host": "10.1.2.30", "port": 104,
    "allow_find": true, "allow_move": true}}``."""

    require_called_ae_title: bool = True
    """Refuse associations addressed to another AE title than ours."""

    max_pdu: int = 262_144
    """Largest PDU we accept, in bytes. Larger PDUs mean fewer round trips per image."""

    max_associations: int = 20
    """Simultaneous associations before new ones are rejected."""

    network_timeout: float = 60.0
    """Seconds of silence before an association is aborted."""

    max_find_results: int = 1000
    """Most matches one C-FIND returns; the rest are left out (the response ends with
    Success and the cut is logged and audited). Narrow the query to see them."""

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        return _check_aet(value)

    @field_validator("nodes")
    @classmethod
    def _check_node_titles(cls, value: dict[str, DicomNode]) -> dict[str, DicomNode]:
        return {_check_aet(aet): node for aet, node in value.items()}

    @field_validator("max_find_results")
    @classmethod
    def _check_max_find_results(cls, value: int) -> int:
        if value < 1:
            raise ValueError("max_find_results must be at least 1")
        return value


class DicomwebSettings(_Section):
    max_results: int = 1000
    """Most results one QIDO-RS search returns; more are paged with ``offset`` and
    announced by a ``Warning`` header (C-FIND has ``dimse.max_find_results``)."""


class PasswordKdf(StrEnum):
    ARGON2ID = "argon2id"
    PBKDF2_SM3 = "pbkdf2-sm3"


class SecuritySettings(_Section):
    password_kdf: PasswordKdf = PasswordKdf.ARGON2ID
    """How passwords are hashed: ``argon2id`` (RFC 9106) or ``pbkdf2-sm3`` (PBKDF2 with
    HMAC-SM3, for commercial-cryptography assessments). Existing hashes keep working after
    a switch and are re-hashed at the user's next login."""

    argon2_time_cost: int = Field(default=3, ge=1)
    """argon2id passes. With the memory below a login costs about 50-150 ms on a 2-core
    server (docs/benchmarks.md); raise it on faster machines."""

    argon2_memory_kib: int = Field(default=19_456, ge=8_192)
    """argon2id memory per hash, KiB (OWASP minimum 19 MiB)."""

    argon2_parallelism: int = Field(default=1, ge=1)
    """argon2id lanes."""

    pbkdf2_iterations: int = Field(default=100_000, ge=100_000)
    """PBKDF2-HMAC-SM3 iterations (at least 100 000; about 130 ms per login on a 2-core
    server, docs/benchmarks.md)."""

    cookie_secure: bool = True
    """Session cookies carry ``Secure`` and the ``__Host-`` prefix. Browsers accept them over
    plain HTTP only on localhost; turn off only for a lab served over HTTP on the LAN."""

    access_token_minutes: int = Field(default=60, ge=1, le=24 * 60)
    """Lifetime of the bearer tokens that integration clients get from
    ``POST /api/oauth/token``."""

    initial_admin_password: SecretStr | None = None
    """Password for the first administrators at install (otherwise random one-time
    passwords are printed once). Either way it must be changed at the first login."""


class HttpSettings(_Section):
    host: str = "127.0.0.1"
    """Address of the HTTP server. Behind nginx keep the loopback default."""

    port: int = 8000
    """TCP port of the HTTP server."""

    public_url: str | None = None
    """The address clients reach us at, e.g. ``https://film.hospital.cn``: used in the URLs
    we hand out (RetrieveURL, BulkDataURI). Default: taken from each request's Host header,
    which is right unless a proxy or client rewrites it."""

    cors_origins: list[str] = Field(default_factory=list)
    """Other web origins allowed to call the API from a browser (CORS), e.g.
    ``["https://his.hospital.cn"]``. Empty: same origin only. State-changing requests
    from any other ``Origin`` are refused."""

    ohif_dir: Path | None = None
    """The ``dist`` folder of the prebuilt OHIF viewer (npm ``@ohif/app``) served at
    ``/ohif/``. Default: ``web/ohif/node_modules/@ohif/app/dist`` in the checkout, where
    ``scripts/install-web`` (run by ``make run`` and ``make test``) installs it. Set it
    when the program runs from an installed package or the viewer lives elsewhere."""

    workers: int = Field(default=1, ge=1, le=64)
    """HTTP worker processes of ``cloudfilm serve`` (roles ``all`` and ``api``). One
    Python process uses one CPU core for requests: set it to the number of cores the
    server may use (``nproc``). The workers share the port; each opens its own database
    connections (``database.pool_size`` each). The DICOM listener, HL7 listener and
    background jobs stay in the main process."""


class RetrieveMethod(StrEnum):
    """How the gateway fetches a study from a PACS source."""

    MOVE = "move"
    GET = "get"
    WADO = "wado"
    WADO_URI = "wado-uri"
    FTP = "ftp"
    SFTP = "sftp"
    FOLDER = "folder"

    @property
    def drops_files(self) -> bool:
        """Whether the source is a folder files are dropped into (no DICOM Q/R)."""
        return self in (RetrieveMethod.FTP, RetrieveMethod.SFTP, RetrieveMethod.FOLDER)

    @property
    def remote_drop(self) -> bool:
        """Whether the source is a folder on a file server (FTP or SFTP)."""
        return self in (RetrieveMethod.FTP, RetrieveMethod.SFTP)


class RemoteAfter(StrEnum):
    """What the gateway does with a file on an FTP or SFTP source once its instance is
    delivered."""

    KEEP = "keep"
    DELETE = "delete"
    MOVE = "move"


class DeliveryMethod(StrEnum):
    """How the gateway hands studies to the archive."""

    STOW = "stow"
    CSTORE = "cstore"


class GatewaySource(_Section):
    """One PACS (or file drop) the gateway pulls exams from."""

    aet: str | None = None
    """The PACS's AE title. Required, except for ``ftp``, ``sftp`` and ``folder`` sources."""

    host: str | None = None
    """Address of the PACS's DICOM port (``ftp``/``sftp``: of the file server). Required,
    except for ``folder`` sources."""

    port: int = 104
    """TCP port of the PACS's DICOM Query/Retrieve SCP (``ftp``: of the FTP server, 21 when
    not set; ``sftp``: of the SSH server, 22 when not set)."""

    retrieve: RetrieveMethod = RetrieveMethod.MOVE
    """``move``: C-MOVE to the gateway's own Storage SCP (the PACS must list the gateway's
    AE title, address and ``gateway.scp_port`` as a destination); ``get``: C-GET, the
    images come back on the gateway's own association (no destination to configure, the
    PACS must allow C-GET for the gateway's AE); ``wado``: WADO-RS Retrieve Study from
    ``wado_url``; ``wado-uri``: one WADO-URI request per instance to ``wado_uri_url``
    (the instances listed by QIDO-RS at ``wado_url`` when set, else by C-FIND). Discovery is
    C-FIND for these. ``ftp``/``sftp``: files dropped in ``ftp_path`` on the FTP or SSH
    server ``host``; ``folder``: files dropped in the local ``folder``; these are found by
    listing, not by C-FIND."""

    wado_url: str | None = None
    """DICOMweb root of the PACS (for ``retrieve = "wado"``; for ``wado-uri`` its QIDO-RS
    lists the instances), e.g. ``http://10.1.2.3:8042/dicom-web``."""

    wado_uri_url: str | None = None
    """WADO-URI address of the PACS (for ``retrieve = "wado-uri"``), e.g.
    ``http://10.1.2.3:8042/wado``."""

    ftp_user: str = "anonymous"
    """User name on the FTP or SSH server (``retrieve = "ftp"`` or ``"sftp"``)."""

    ftp_password_env: str | None = None
    """Name of the environment variable that holds the FTP or SFTP password (the password
    itself is never in the configuration), e.g. ``CLOUDFILM_FTP_PACS1_PASSWORD``. SFTP
    without it signs in with the gateway user's SSH keys (``~/.ssh``)."""

    ftp_path: str = "/"
    """Remote folder the PACS or modality drops DICOM files into: files directly in it, or
    one sub-folder per study (one level)."""

    ftp_tls: bool = False
    """FTPS: ``AUTH TLS`` on the control connection and a protected data channel."""

    ftp_after: RemoteAfter = RemoteAfter.KEEP
    """What happens to a remote file once its instance is delivered: ``keep`` (the
    gateway remembers it and does not fetch it again), ``delete``, or ``move`` into
    ``ftp_done_path``."""

    ftp_done_path: str | None = None
    """Remote folder delivered files are moved into when ``ftp_after = "move"``."""

    sftp_known_hosts: Path | None = None
    """known_hosts file holding the SSH server's host key (``retrieve = "sftp"``); empty:
    the gateway user's ``~/.ssh/known_hosts``. A server whose key is not listed is refused."""

    folder: Path | None = None
    """Local folder watched for dropped DICOM files (``retrieve = "folder"``, e.g. a share
    a modality writes to); taken files go to its ``done/`` sub-folder, unreadable ones to
    ``failed/`` with a ``.reason.txt`` beside them."""

    modalities: list[str] = Field(default_factory=list)
    """Modalities to poll for (``["CT", "MR"]``); empty polls every modality."""

    poll_interval: float = Field(default=60.0, gt=0)
    """Seconds between polls of this source (a C-FIND, or a listing of the FTP or local
    folder: a dropped file is taken once its size is the same in two listings)."""

    window_days: int = Field(default=1, ge=0)
    """How far back each poll looks, in days before the last poll's date (the overlap that
    catches exams the PACS learned about late). ``0`` polls today only."""

    since: str | None = None
    """First StudyDate (YYYYMMDD) of the very first poll, to back-fill history from that day;
    empty starts today. Later polls start from the last day a poll covered."""

    @field_validator("aet")
    @classmethod
    def _check_source_aet(cls, value: str | None) -> str | None:
        return None if value is None else _check_aet(value)

    @model_validator(mode="after")
    def _check_source_kind(self) -> Self:
        method = self.retrieve
        if method is RetrieveMethod.FOLDER:
            if self.folder is None:
                raise ValueError('retrieve = "folder" needs the source\'s folder')
            return self
        if self.host is None:
            raise ValueError(f'retrieve = "{method}" needs the source\'s host')
        if method.remote_drop:
            if "port" not in self.model_fields_set:
                self.port = 21 if method is RetrieveMethod.FTP else 22
            if self.ftp_after is RemoteAfter.MOVE and not self.ftp_done_path:
                raise ValueError('ftp_after = "move" needs ftp_done_path')
            return self
        if self.aet is None:
            raise ValueError(f'retrieve = "{method}" needs the PACS\'s AE title (aet)')
        if method is RetrieveMethod.WADO_URI and not self.wado_uri_url:
            raise ValueError('retrieve = "wado-uri" needs the source\'s wado_uri_url')
        return self


class GatewayDestination(_Section):
    """A DICOM node inside the hospital that studies are sent back to from the archive (a
    workstation or the PACS): it must accept C-STORE from ``gateway.ae_title``."""

    aet: str
    """The destination's AE title (the called AE of the C-STORE association)."""

    host: str
    """Address of its DICOM port."""

    port: int = Field(default=104, gt=0, lt=65536)
    """Its DICOM port."""

    @field_validator("aet")
    @classmethod
    def _check_destination_aet(cls, value: str) -> str:
        return _check_aet(value)


class GatewaySettings(_Section):
    """The front service (前置服务, ``cloudfilm gateway``): pulls exams from PACS sources
    and delivers them to the archive from a durable queue."""

    database_url: str | None = None
    """SQLAlchemy URL of the gateway's own state database (queue, states, attempts).
    Default: SQLite file ``gateway.db`` in ``gateway.data_dir``. Never the archive's."""

    data_dir: Path = Path("./var/gateway")
    """Folder of the gateway: ``gateway.db`` and the ``spool/`` of received instances."""

    ae_title: str = "CLOUDFILM_GW"
    """The gateway's AE title: calling AE of its C-FIND/C-MOVE and the C-MOVE destination
    that each PACS must know."""

    scp_host: str = "127.0.0.1"
    """Address the gateway's Storage SCP binds to (``0.0.0.0`` when the PACS is on another
    machine)."""

    scp_port: int = 11113
    """TCP port of the gateway's Storage SCP (the C-MOVE destination)."""

    sources: dict[str, GatewaySource] = Field(default_factory=dict)
    """The PACS sources: name → ``aet``, ``host``, ``port``, ``retrieve``, ``modalities``,
    ``poll_interval``, ``window_days``. TOML: ``[gateway.sources.pacs1]``; environment:
    JSON, e.g. ``{"pacs1": {"aet": "PACS", "host": "10.1.2.3", "port": 104}}``."""

    archive_url: str = "http://127.0.0.1:8000"
    """Root URL of the archive (its ``/dicom-web`` and ``/api/oauth/token`` are below it)."""

    client_id: str | None = None
    """Integration client name (``cloudfilm client create``) the gateway signs in as."""

    client_secret: SecretStr | None = None
    """Its secret; keep it in the environment (``CLOUDFILM_GATEWAY__CLIENT_SECRET``)."""

    delivery: DeliveryMethod = DeliveryMethod.STOW
    """``stow`` (default): STOW-RS to ``archive_url`` with the client credentials; ``cstore``:
    DICOM C-STORE to the archive's DIMSE port (``archive_aet``, ``archive_host``,
    ``archive_port``; the archive's ``dimse.nodes`` must list ``gateway.ae_title`` with
    ``allow_store``)."""

    archive_aet: str = "CLOUDFILM"
    """The archive's AE title, for ``delivery = "cstore"``."""

    archive_host: str | None = None
    """Address of the archive's DIMSE port for ``delivery = "cstore"``; empty: the host of
    ``archive_url``."""

    archive_port: int = Field(default=11112, gt=0, lt=65536)
    """The archive's DIMSE port, for ``delivery = "cstore"``."""

    batch_size: int = Field(default=50, ge=1)
    """Instances sent per STOW-RS request or per C-STORE association (one study each)."""

    http_timeout: float = Field(default=120.0, gt=0)
    """Seconds an HTTP request to the archive may take."""

    network_timeout: float = Field(default=60.0, gt=0)
    """Seconds of DICOM silence before an association to a PACS is aborted."""

    backoff_initial_seconds: float = Field(default=1.0, gt=0)
    """Wait after the first failure of a step; doubled after each further failure."""

    backoff_max_seconds: float = Field(default=600.0, gt=0)
    """Longest wait between two attempts (10 minutes)."""

    dead_letter_attempts: int = Field(default=10, ge=1)
    """Failed attempts after which a study or instance goes to the dead-letter state; it is
    then retried only by hand (``cloudfilm gateway retry``)."""

    schedule_hours: str | None = None
    """Hours in which polled studies are retrieved and delivered, e.g. ``"20-6"`` (8 pm to
    6 am); empty means always. Back-fill by date range (``gateway fetch --from/--to``) keeps
    to it too, unless ``--now``; requests for one study (UID, accession, patient ID, the
    trigger) ignore it."""

    bandwidth_bytes_per_second: int | None = Field(default=None, gt=0)
    """Upper limit of the gateway's uploads to the archive in bytes per second, shared by
    all its work (STOW-RS bodies streamed through a token bucket, C-STORE objects taken
    whole), e.g. ``2000000`` for about 16 Mbit/s; empty means unlimited. Set it when the
    hospital's line to the archive is shared with other traffic."""

    bandwidth_send_back: bool = False
    """Also hold the send-back downloads from the archive (``gateway send-back``) to
    ``bandwidth_bytes_per_second``, in the same bucket as the uploads."""

    compress_before_upload: Codec = Codec.NONE
    """Lossless codec the gateway re-encodes uncompressed images in before sending them to
    the archive, to save bandwidth on the line to it: ``none`` (default: as the PACS sent
    them), ``jpeg-ls-lossless``, ``jpeg2000-lossless`` or ``htj2k-lossless``. Each image is
    verified bit-exact after decoding (the archive's own codec path); an image that cannot be
    verified or does not get smaller is sent as received. The archive then records the
    compressed form as the received one."""

    destinations: dict[str, GatewayDestination] = Field(default_factory=dict)
    """Hospital nodes studies are sent back to from the archive (``gateway send-back``):
    name → ``aet``, ``host``, ``port``. TOML: ``[gateway.destinations.ws1]``."""

    http_host: str = "127.0.0.1"
    """Address of the gateway's status API (``GET /status``, ``GET /studies``, ``POST
    /studies/{uid}/retry``, ``POST /trigger``). Loopback by default; any other address needs
    ``api_token``."""

    http_port: int = Field(default=11180, ge=0, lt=65536)
    """TCP port of the status API inside ``cloudfilm gateway``; ``0`` turns it off."""

    api_token: SecretStr | None = None
    """Bearer token the status API requires (``Authorization: Bearer ...``); keep it in
    ``CLOUDFILM_GATEWAY__API_TOKEN``. Without it the API runs only on a loopback address."""

    hl7_port: int | None = Field(default=None, ge=0, lt=65536)
    """TCP port of the gateway's HL7 v2 MLLP trigger listener (ORU^R01, ORM^O01, OMI^O23:
    a final exam is queued like ``POST /trigger``); empty: no listener. Plain MLLP carries
    patient data unencrypted: keep it on loopback or the hospital LAN."""

    hl7_host: str = "127.0.0.1"
    """Address the MLLP trigger listener binds to (``0.0.0.0`` for a RIS on the LAN, then
    set ``hl7_allowed_sources``)."""

    hl7_allowed_sources: list[str] = Field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])
    """Networks (CIDR) whose MLLP connections are accepted, e.g. ``["10.1.2.0/24"]``;
    others are closed at once. Default: loopback only."""

    hl7_source: str | None = None
    """The PACS source an HL7 trigger fetches from; empty: the only source that is not a
    file drop."""

    @field_validator("ae_title", "archive_aet")
    @classmethod
    def _check_gateway_aet(cls, value: str) -> str:
        return _check_aet(value)

    @field_validator("hl7_allowed_sources")
    @classmethod
    def _check_hl7_networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for network in value:
            ipaddress.ip_network(network, strict=False)
        return value

    @field_validator("schedule_hours")
    @classmethod
    def _check_schedule(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        start, _, end = value.partition("-")
        if not (start.strip().isdigit() and end.strip().isdigit()) or not (
            0 <= int(start) <= 23 and 0 <= int(end) <= 24
        ):
            raise ValueError(f"schedule_hours {value!r}: write it as START-END hours, e.g. 20-6")
        return value.strip()

    @property
    def state_url(self) -> str:
        """The state database URL with the default filled in."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'gateway.db').resolve()}"


_WINDOW = re.compile(r"^([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d$")


class TierBackend(_Section):
    url: str
    """Backend URL of the tier: ``s3://bucket/prefix?endpoint=...`` (object storage) or
    ``file:///mnt/tape`` (NAS, archive mount)."""

    online_reads: bool = True
    """``true``: objects on this tier are served on request (nearline). ``false``: the tier
    is slow or may be unavailable (offline); a read of one of its objects starts a recall to
    the online tier and is answered 503 with ``Retry-After`` until the recall is done."""

    s3_access_key_id: str | None = None
    """Access key for an ``s3://`` tier. Empty: ``storage.s3_access_key_id``. Timeouts and
    retries are the ``storage.s3_*`` settings."""

    s3_secret_access_key: SecretStr | None = None
    """Secret key for ``s3_access_key_id`` (environment, not the config file). Empty:
    ``storage.s3_secret_access_key``."""


class TierPolicy(_Section):
    source: str = "online"
    """The tier the studies leave: ``online`` (``storage.url``) or a name in
    ``tiers.backends``."""

    target: str
    """The tier they go to: a name in ``tiers.backends`` (or ``online``)."""

    older_than_days: int = Field(default=365, ge=0)
    """Studies whose Study Date (else the day they arrived) is more than this many days ago."""

    not_accessed_days: int | None = Field(default=None, ge=0)
    """Besides ``older_than_days``: only studies not retrieved (WADO, C-MOVE, C-GET) for this
    many days (never retrieved: counted from the day they arrived); empty: not considered.
    Set ``older_than_days = 0`` to move by last access alone."""

    modalities: list[str] = Field(default_factory=list)
    """Only studies with one of these modalities (``["CT", "MR"]``); empty: any."""

    institutions: list[str] = Field(default_factory=list)
    """Only studies of these Institution Names; empty: any."""

    min_study_bytes: int = Field(default=0, ge=0)
    """Only studies of at least this many stored bytes."""

    window: str | None = None
    """Local time window in which the background planner applies the policy, ``01:00-05:00``
    (may cross midnight); empty: any time. ``cloudfilm storage tier-plan`` ignores it."""

    @field_validator("modalities")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [m.upper() for m in value]

    @field_validator("window")
    @classmethod
    def _check_window(cls, value: str | None) -> str | None:
        if value and not _WINDOW.fullmatch(value):
            raise ValueError(f"window {value!r} is not HH:MM-HH:MM")
        return value or None


class TiersSettings(_Section):
    backends: dict[str, TierBackend] = Field(default_factory=dict)
    """Named tiers below the online one (``storage.url``, mirrored or not, is the tier
    ``online``), e.g. ``{"nearline": {"url": "s3://..."}, "offline": {"url":
    "file:///mnt/tape", "online_reads": false}}``. Empty (default): one tier only. An object
    lives on exactly one tier at a time under the same key; the index says which."""

    policies: list[TierPolicy] = Field(default_factory=list)
    """Migration rules applied by the planner (``cloudfilm storage tier-plan``, and in
    ``cloudfilm serve`` once per pass inside each rule's window). Pinned studies are skipped."""

    job_interval_seconds: float = Field(default=30.0, gt=0)
    """Seconds between two passes of the migration/recall job runner in ``cloudfilm serve``
    (a recall requested by a reader wakes it at once)."""

    job_lease_seconds: float = Field(default=120.0, gt=0)
    """A runner holds a job this long, renewed after every object; a job whose runner died
    (crash, kill -9) is taken over by another runner after the lease ran out."""

    max_attempts: int = Field(default=10, ge=1)
    """Failed steps are retried with back-off (2 s doubling, up to 10 min) this many times;
    then the job is ``failed`` until ``cloudfilm storage jobs retry``."""

    recall_retry_after_seconds: int = Field(default=30, ge=1)
    """``Retry-After`` of the 503 answer to a read of an object being recalled."""

    retrieve_wait_seconds: float = Field(default=5.0, ge=0, le=300)
    """A C-MOVE or C-GET of objects on a tier that is not read on request (offline) starts
    their study's recall and waits this long for it; when the recall has not finished by
    then the request fails with 0xA702 and the Error Comment "recall started, retry later"."""

    @field_validator("backends")
    @classmethod
    def _check_names(cls, value: dict[str, TierBackend]) -> dict[str, TierBackend]:
        for name in value:
            if name in ("online", "primary", "mirror", "*") or not re.fullmatch(
                r"[a-z][a-z0-9_-]{0,31}", name
            ):
                raise ValueError(f"tier name {name!r}: lowercase letters/digits, not online")
        return value

    @model_validator(mode="after")
    def _check_policies(self) -> Self:
        known = {"online", *self.backends}
        for policy in self.policies:
            for name in (policy.source, policy.target):
                if name not in known:
                    raise ValueError(f"policy names tier {name!r}; known: {', '.join(known)}")
            if policy.source == policy.target:
                raise ValueError(f"policy moves {policy.source!r} onto itself")
        return self


class ChargeEvent(StrEnum):
    """When a cloud film is charged (one charge per exam)."""

    RELEASED = "released"
    """When the report is released to the patient (the film is delivered then)."""
    FIRST_VIEW = "first-view"
    """When the patient first opens the exam."""


class ChargeDelivery(StrEnum):
    """How a charge reaches the HIS."""

    NONE = "none"
    """Not sent: the HIS charges by its own rules, reconciliation compares."""
    HL7 = "hl7"
    """HL7 v2 DFT^P03 over MLLP to ``billing.hl7_host``:``billing.hl7_port``."""
    HTTP = "http"
    """A JSON POST to ``billing.http_url`` with a bearer token."""


class BillingColumns(_Section):
    """Header names of an imported HIS charge list (CSV/XLSX), each a list of the names
    accepted for that column (first match wins; compared without spaces, case-blind)."""

    accession_number: list[str] = Field(
        default_factory=lambda: ["检查号", "申请单号", "医嘱号", "accession_number"]
    )
    """The exam's accession or order number: the reconciliation's first key."""
    patient_id: list[str] = Field(default_factory=lambda: ["患者ID", "病人ID", "patient_id"])
    """The hospital's patient ID (with day and item code, the second key)."""
    item_code: list[str] = Field(default_factory=lambda: ["收费项目编码", "项目编码", "item_code"])
    """The charge item code (收费项目编码)."""
    amount: list[str] = Field(default_factory=lambda: ["金额", "实收金额", "amount"])
    """The amount in yuan (negative for a refund line)."""
    department: list[str] = Field(default_factory=lambda: ["科室", "开单科室", "department"])
    """The department charged (开单科室)."""
    charged_at: list[str] = Field(default_factory=lambda: ["收费时间", "charged_at"])
    """When the HIS charged: ``2026-11-28 09:30[:00]``, ``2026/11/28 9:30`` or a date."""


class BillingSettings(_Section):
    enabled: bool = False
    """Record a charge for each delivered cloud film (收费). Off by default: the archive
    charges nothing until the hospital has set the price and the item code."""

    charge_event: ChargeEvent = ChargeEvent.RELEASED
    """When an exam is charged: ``released`` (the report is released to the patient) or
    ``first-view`` (the patient first opens the exam). Only this event makes a charge;
    an exam is charged once whatever happens after."""

    price: Decimal | None = Field(default=None, ge=0, max_digits=10, decimal_places=2)
    """Price of one cloud film in yuan (元), e.g. ``"20.00"``, as the hospital's price list
    (广东省医疗服务价格项目) gives it. Required when billing is enabled."""

    price_by_modality: dict[str, Decimal] = Field(default_factory=dict)
    """Other prices for some modalities (Modality, 0008,0060), e.g. ``{"CT": "25.00",
    "MR": "30.00"}``; the others pay ``price``."""

    item_code: str = Field(default="", max_length=64)
    """The charge item code (收费项目编码) the HIS knows the cloud film by, e.g. the
    provincial code of 数字影像云胶片. Empty by default on purpose: no official code is
    assumed; set the one of the hospital's price list."""

    item_name: str = Field(default="数字影像云胶片", max_length=128)
    """The charge item name (收费项目名称) sent with each charge."""

    currency: str = Field(default="CNY", pattern=r"^[A-Z]{3}$")
    """ISO 4217 currency of the prices."""

    delivery: ChargeDelivery = ChargeDelivery.NONE
    """How each charge (and each reversal) is sent to the HIS: ``none``, ``hl7`` (DFT^P03
    over MLLP, answered with an ACK) or ``http`` (JSON POST, 2xx accepted). The charge row
    is the durable outbox: it is sent after its transaction commits, and retried."""

    hl7_host: str = "127.0.0.1"
    """The HIS's MLLP host for ``delivery = "hl7"``."""

    hl7_port: int | None = Field(default=None, ge=1, le=65535)
    """The HIS's MLLP port for ``delivery = "hl7"`` (required then)."""

    hl7_receiving_application: str = Field(default="HIS", max_length=64)
    """MSH-5 of the DFT messages."""

    hl7_receiving_facility: str = Field(default="", max_length=64)
    """MSH-6 of the DFT messages."""

    http_url: str | None = None
    """The HIS endpoint for ``delivery = "http"`` (required then), e.g.
    ``https://his.example/api/charges``."""

    http_token: SecretStr | None = None
    """Bearer token sent to ``http_url``."""

    timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    """How long one delivery waits for the answer (ACK or HTTP response)."""

    max_attempts: int = Field(default=8, ge=1, le=100)
    """Deliveries of one charge before it is given up (``failed``); a given-up charge is
    sent again by ``cloudfilm billing resend``."""

    retry_base_seconds: float = Field(default=10.0, gt=0)
    """Back-off after the first failed delivery; each further failure waits four times
    longer, up to an hour."""

    interval_seconds: float = Field(default=5.0, gt=0)
    """How often ``cloudfilm serve`` looks for charges to send."""

    import_max_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    """Largest HIS charge list accepted (CSV or XLSX), in bytes."""

    columns: BillingColumns = Field(default_factory=BillingColumns)
    """Column names of the HIS charge list (Chinese names by default)."""

    @field_validator("price_by_modality")
    @classmethod
    def _upper_modalities(cls, value: dict[str, Decimal]) -> dict[str, Decimal]:
        for price in value.values():
            if price < 0 or price != price.quantize(Decimal("0.01")):
                raise ValueError("a price is ≥ 0 yuan with at most two decimals")
        return {k.strip().upper(): v for k, v in value.items()}

    @model_validator(mode="after")
    def _check_delivery(self) -> Self:
        if self.enabled and self.price is None:
            raise ValueError('billing.enabled needs billing.price (yuan, e.g. "20.00")')
        if self.delivery is ChargeDelivery.HL7 and self.hl7_port is None:
            raise ValueError("billing.delivery = hl7 needs billing.hl7_port")
        if self.delivery is ChargeDelivery.HTTP and not self.http_url:
            raise ValueError("billing.delivery = http needs billing.http_url")
        return self

    def price_for(self, modality: str) -> Decimal:
        """The price of one cloud film of ``modality``."""
        found = self.price_by_modality.get(modality.strip().upper(), self.price)
        return found if found is not None else Decimal("0.00")


class HL7Settings(_Section):
    port: int | None = None
    """TCP port of the HL7 v2 MLLP listener (the usual one is 2575). Empty: no listener.
    Plain MLLP carries patient data unencrypted: keep it on the hospital LAN, or behind a
    TLS tunnel (stunnel) in production."""

    host: str = "127.0.0.1"
    """Address the MLLP listener binds to. ``0.0.0.0`` to accept the HIS/RIS on the LAN
    (then set ``allowed_sources``)."""

    allowed_sources: list[str] = Field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])
    """Networks (CIDR) whose connections are accepted, e.g. ``["10.1.2.0/24"]``; other
    peers are closed at once (and audited). Default: loopback only (``127.0.0.1/32``,
    ``::1/128``), where a TLS tunnel such as stunnel delivers. Empty list: nobody."""

    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """Largest message accepted, in bytes (an ORU with a PDF in OBX-5 is a few MB).
    Larger ones are answered AR and the connection is closed."""

    idle_timeout_seconds: float = Field(default=300.0, gt=0)
    """Seconds without a byte before an idle connection is closed."""

    max_connections: int = Field(default=20, ge=1)
    """Simultaneous MLLP connections; more are closed at once (a HIS usually keeps one or
    two open)."""

    application: str = "CLOUDFILM"
    """MSH-3 of our ACKs when the sender left MSH-5 (receiving application) empty."""

    @field_validator("allowed_sources")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for network in value:
            ipaddress.ip_network(network, strict=False)
        return value


class WebServiceSettings(_Section):
    max_clock_skew_seconds: int = Field(default=300, ge=30, le=3600)
    """How far (seconds) a query WebService request's timestamp may be from the server's
    clock. Older or later requests are refused; each nonce is remembered in the database
    until its timestamp leaves this window, so a replay is refused by every server process.
    Widen only for a caller whose clock cannot be synced."""

    key_version: int = Field(default=1, ge=1)
    """Generation of the envelope keys (HKDF from ``secret_key``, the client id and this
    number). Raise it to give every client a new key at once (each client then needs its
    new key: ``cloudfilm client webservice-key NAME``)."""


class ReportSettings(_Section):
    hospital_name: str = "云胶片示范医院"
    """The hospital's name in the report header (and in notices)."""

    hospital_name_en: str = "Cloud Film Demonstration Hospital"
    """The English line under the name in the header; empty: none."""

    department_title: str = "医学影像科 检查报告单"
    """The title line under the hospital's name."""

    logo_path: Path | None = None
    """A PNG or SVG logo printed left of the hospital's name; empty: none."""

    footer: str = "本报告仅供临床参考，扫描二维码可查看电子胶片与原始影像。"
    """A line at the foot of every report page."""

    release_delay_hours: float = Field(default=0.0, ge=0, le=24 * 30)
    """Hours between a report's approval and its release to the patient (portal, SMS,
    kiosk). 0: released at once."""

    release_delay_by_modality: dict[str, float] = Field(default_factory=dict)
    """Other delays for some modalities, e.g. ``{"PT": 48}``."""

    hold_critical: bool = False
    """Keep reports with a critical finding (危急值) from release until a user releases them
    (the clinician tells the patient first)."""

    entry_token_days: int | None = Field(default=None, ge=1)
    """Days a QR code on a report or label stays valid; empty: until revoked (a printed
    report is kept for years). Opening it always needs the identity check."""

    key_images_max: int = Field(default=4, ge=0, le=12)
    """Key images printed on the report (rendered from the archive); 0: none."""

    encapsulate: bool = True
    """Also store each report PDF as a DICOM Encapsulated PDF in its study, so that DICOM
    viewers and workstations show it."""

    notify_registration: bool = False
    """Send the patient an SMS with the exam's link when the exam is registered (HL7
    ORM/OMI, FHIR ServiceRequest), if they have a phone on file and SMS is enabled
    (``notify.channels``)."""

    notify_release: bool = True
    """Send the patient an SMS with the exam's link when its report is released."""


class ReprintPolicy(StrEnum):
    ALLOWED = "allowed"
    """Reprints need no approval, up to ``kiosk.max_reprints`` more."""
    STAFF_APPROVAL = "staff-approval"
    """Each reprint needs a staff member's approval (``kiosk:approve``)."""
    NEVER = "never"
    """No reprint at a kiosk: the patient asks at the counter."""


class KioskSettings(_Section):
    max_prints: int = Field(default=1, ge=1, le=20)
    """Prints of one report version a kiosk may make on its own (a corrected report is a
    new version and starts again at 0). Raise it if patients need copies for several
    clinics."""

    reprint: ReprintPolicy = ReprintPolicy.STAFF_APPROVAL
    """What happens once ``max_prints`` is reached: ``allowed`` (up to ``max_reprints``
    more without asking), ``staff-approval`` (one more print per approval by a user with
    ``kiosk:approve``) or ``never``."""

    max_reprints: int = Field(default=2, ge=1, le=20)
    """Reprints beyond ``max_prints`` under ``reprint = "allowed"``."""

    ticket_minutes: int = Field(default=10, ge=1, le=10)
    """Minutes a kiosk ticket (the answer to a scan or card read) stays valid; at most 10:
    the patient stands at the kiosk."""

    medical_card_authority: str = ""
    """Assigning authority (PID-3 CX.4) of the hospital's medical cards; empty: a medical
    card number is looked up under any authority (two holders: no match)."""


class NotifyChannel(StrEnum):
    SMS = "sms"
    """A text message through the SMS platform (``notify.sms_driver``)."""
    WECHAT = "wechat"
    """A WeChat Official Account template message to an openid."""


class SmsDriver(StrEnum):
    HTTP = "http"
    """A generic HTTP SMS platform (``notify.http``)."""
    ALIYUN = "aliyun"
    """Alibaba Cloud SMS ``SendSms`` (``notify.aliyun``)."""


class HttpBodyFormat(StrEnum):
    JSON = "json"
    FORM = "form"


class NotifyTemplate(_Section):
    sms: str = ""
    """SMS text with ``{variable}`` placeholders (the signature is added by the driver or
    the platform); empty: the template is not sent by SMS."""

    sms_code: str | None = None
    """The platform's template code (Alibaba Cloud ``SMS_123456789``; for the ``http``
    driver sent in ``notify.http.template_field``). Required by ``aliyun``."""

    wechat_template_id: str | None = None
    """Template id of the Official Account's template message; empty: not sent by WeChat."""

    wechat_fields: dict[str, str] = Field(default_factory=dict)
    """WeChat template data: field name → text with ``{variable}`` placeholders, e.g.
    ``{"first": "{hospital}", "keyword1": "{exam}"}``."""

    wechat_url: str = ""
    """Address the WeChat message opens, with placeholders (``{link}``); empty: none."""


def _default_templates() -> dict[str, NotifyTemplate]:
    return {
        "exam-registered": NotifyTemplate(
            sms="您在{hospital}的{exam}检查已登记（{date}），报告发布后可在此查看：{link}",
            wechat_fields={
                "first": "您在{hospital}的检查已登记",
                "keyword1": "{exam}",
                "keyword2": "{date}",
                "remark": "报告发布后可点击查看",
            },
            wechat_url="{link}",
        ),
        "report-released": NotifyTemplate(
            sms="您在{hospital}的{exam}检查报告已发布，请点击查看：{link}",
            wechat_fields={
                "first": "您在{hospital}的检查报告已发布",
                "keyword1": "{exam}",
                "remark": "点击查看报告和影像",
            },
            wechat_url="{link}",
        ),
        "storage-alarm": NotifyTemplate(
            sms="云胶片存储告警：{message}",
            wechat_fields={"first": "云胶片存储告警", "keyword1": "{message}"},
        ),
    }


class NotifyHttpSettings(_Section):
    url: str | None = None
    """Address of the SMS platform's send API, e.g. ``https://sms.example.cn/api/send``."""

    method: str = "POST"
    """HTTP method of the send request (``POST`` or ``GET``; GET sends the fields in the
    query string)."""

    body_format: HttpBodyFormat = HttpBodyFormat.JSON
    """``json`` or ``form`` (``application/x-www-form-urlencoded``)."""

    phone_field: str = "mobile"
    """Field that carries the phone number."""

    text_field: str | None = "content"
    """Field that carries the rendered text; empty: no text is sent (template platforms)."""

    signature_field: str | None = None
    """Field that carries the signature (``notify.sms_signature``); empty: the text starts
    with ``【签名】`` instead."""

    template_field: str | None = None
    """Field that carries the template's ``sms_code``; empty: not sent."""

    variables_field: str | None = None
    """Field that carries the template variables as a JSON object; empty: not sent."""

    extra_fields: dict[str, str] = Field(default_factory=dict)
    """Constant fields added to every request (an account name, a channel code)."""

    auth_header: str = "Authorization"
    """Header that carries ``auth_value``."""

    auth_value: SecretStr | None = None
    """Value of ``auth_header`` (e.g. ``Bearer ...``); keep it in
    ``CLOUDFILM_NOTIFY__HTTP__AUTH_VALUE``."""

    hmac_secret: SecretStr | None = None
    """When set, each request carries ``hmac_header`` = hex HMAC-SHA256 over
    ``timestamp + "\\n" + body`` with this secret and the Unix time in
    ``hmac_timestamp_header``; a receipt signed the same way over its body is accepted.
    Keep it in ``CLOUDFILM_NOTIFY__HTTP__HMAC_SECRET``."""

    hmac_header: str = "X-Signature"
    """Header of the HMAC signature."""

    hmac_timestamp_header: str = "X-Timestamp"
    """Header of the signed Unix time."""

    success_field: str = "code"
    """Field of the JSON answer that tells success (dotted path, ``data.code``)."""

    success_value: str = "0"
    """Value of ``success_field`` (compared as text) that means the platform accepted."""

    message_id_field: str = "message_id"
    """Field of the JSON answer holding the platform's message id (dotted path); the
    delivery receipt names the message by it."""

    receipt_id_field: str = "message_id"
    """Field of a delivery receipt (JSON object, or array of them) with the message id."""

    receipt_status_field: str = "status"
    """Field of a delivery receipt with the delivery status."""

    receipt_delivered_values: list[str] = Field(default_factory=lambda: ["DELIVERED", "0"])
    """Values of ``receipt_status_field`` that mean delivered; any other means failed."""

    timeout_seconds: float = Field(default=10.0, gt=0)
    """How long one send request may take; a timeout is retried."""


class NotifyAliyunSettings(_Section):
    endpoint: str = "https://dysmsapi.aliyuncs.com/"
    """Alibaba Cloud SMS API address (RPC style, ``SendSms`` version 2017-05-25)."""

    access_key_id: str | None = None
    """AccessKey ID of a RAM user allowed to send SMS."""

    access_key_secret: SecretStr | None = None
    """AccessKey secret; keep it in ``CLOUDFILM_NOTIFY__ALIYUN__ACCESS_KEY_SECRET``."""

    region_id: str = "cn-hangzhou"
    """``RegionId`` common parameter."""

    timeout_seconds: float = Field(default=10.0, gt=0)
    """How long one send request may take; a timeout is retried."""


class NotifyWechatSettings(_Section):
    base_url: str = "https://api.weixin.qq.com"
    """WeChat API root (``/cgi-bin/token``, ``/cgi-bin/message/template/send``)."""

    app_id: str | None = None
    """AppID of the Official Account."""

    app_secret: SecretStr | None = None
    """AppSecret of the Official Account; keep it in
    ``CLOUDFILM_NOTIFY__WECHAT__APP_SECRET``."""

    callback_token: SecretStr | None = None
    """Token configured on the Official Account's server URL: WeChat signs its event
    pushes (template send results) with it; keep it in
    ``CLOUDFILM_NOTIFY__WECHAT__CALLBACK_TOKEN``."""

    timeout_seconds: float = Field(default=10.0, gt=0)
    """How long one request may take; a timeout is retried."""


class AlarmRecipient(_Section):
    channel: NotifyChannel
    """``sms`` or ``wechat``."""
    to: str
    """Phone number (``sms``) or openid (``wechat``) of the administrator."""


class NotifySettings(_Section):
    channels: list[NotifyChannel] = Field(default_factory=list)
    """Channels that send: ``["sms"]``, ``["sms", "wechat"]``. Empty (the default):
    nothing is queued or sent."""

    sms_driver: SmsDriver = SmsDriver.HTTP
    """How SMS are sent: ``http`` (a generic platform, ``notify.http``) or ``aliyun``
    (Alibaba Cloud, ``notify.aliyun``)."""

    sms_signature: str = ""
    """SMS signature (签名) the platform has approved, e.g. ``某某医院``; shown as
    ``【某某医院】`` in front of the text."""

    templates: dict[str, NotifyTemplate] = Field(default_factory=_default_templates)
    """Message templates by name (``exam-registered``, ``report-released``,
    ``storage-alarm`` ship with zh-CN texts); a name given here replaces that default,
    the other defaults stay. TOML: ``[notify.templates.report-released]``."""

    limit_per_hour: int = Field(default=5, ge=1)
    """Messages one recipient may get per hour; more are refused (state ``refused``,
    audited)."""

    limit_per_day: int = Field(default=10, ge=1)
    """Messages one recipient may get per day (24 hours); more are refused."""

    max_attempts: int = Field(default=6, ge=1, le=50)
    """Send attempts before a message is given up (state ``given-up``, audited)."""

    backoff_initial_seconds: float = Field(default=30.0, gt=0)
    """Wait before the first retry; doubled after each failed attempt."""

    backoff_max_seconds: float = Field(default=3600.0, gt=0)
    """Longest wait between two attempts."""

    lease_seconds: float = Field(default=120.0, gt=0)
    """How long a dispatcher holds a message it is sending; after that another process
    may send it again (a dispatcher that died)."""

    interval_seconds: float = Field(default=5.0, gt=0)
    """How often ``cloudfilm serve`` looks for due messages."""

    alarm_recipients: list[AlarmRecipient] = Field(default_factory=list)
    """Administrators who get a ``storage-alarm`` message when the storage monitor raises
    an alarm, e.g. ``[{channel = "sms", to = "13800000000"}]``."""

    receipt_token: SecretStr | None = None
    """Shared token a delivery receipt must carry in the ``X-Notify-Token`` header
    (``POST /api/notify/receipts/{driver}``); keep it in
    ``CLOUDFILM_NOTIFY__RECEIPT_TOKEN``. Without it only signed receipts (``http`` with
    ``hmac_secret``, ``wechat`` with ``callback_token``) are accepted."""

    http: NotifyHttpSettings = Field(default_factory=NotifyHttpSettings)
    """The generic HTTP SMS platform driver."""

    aliyun: NotifyAliyunSettings = Field(default_factory=NotifyAliyunSettings)
    """The Alibaba Cloud SMS driver."""

    wechat: NotifyWechatSettings = Field(default_factory=NotifyWechatSettings)
    """The WeChat Official Account driver."""

    @field_validator("templates")
    @classmethod
    def _keep_default_templates(cls, value: dict[str, NotifyTemplate]) -> dict[str, NotifyTemplate]:
        return {**_default_templates(), **value}

    @model_validator(mode="after")
    def _check_notify(self) -> Self:
        if self.limit_per_day < self.limit_per_hour:
            raise ValueError("notify.limit_per_day must be at least notify.limit_per_hour")
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            raise ValueError("notify.backoff_max_seconds must be at least backoff_initial_seconds")
        if self.http.method.upper() not in ("GET", "POST"):
            raise ValueError("notify.http.method is GET or POST")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CLOUDFILM_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        use_attribute_docstrings=True,
    )

    environment: Environment = Environment.DEVELOPMENT
    """``production`` refuses placeholder secrets and the demo switches."""

    data_dir: Path = Path("./var")
    """Folder of the embedded default: ``cloudfilm.db`` and ``storage/``."""

    secret_key: SecretStr = Field(default_factory=lambda: SecretStr(secrets.token_urlsafe(32)))
    """Key that signs tokens and links. Set it (≥ 32 characters) in production so all
    processes agree; the default is random per process."""

    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    """The index database."""
    storage: StorageSettings = Field(default_factory=StorageSettings)
    """Where the DICOM objects are kept."""
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    """What the ingest pipeline accepts."""
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    """Deletion: the recycle bin and retention periods."""
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    """Storage capacity monitoring: thresholds, alarms, the refusal reserve."""
    compression: CompressionSettings = Field(default_factory=CompressionSettings)
    """Lossless compression of uncompressed images at ingest."""
    audit: AuditSettings = Field(default_factory=AuditSettings)
    """The audit trail: hash chain and retention."""
    billing: BillingSettings = Field(default_factory=BillingSettings)
    """Charging for cloud films, delivery of the charges to the HIS, reconciliation."""
    dimse: DimseSettings = Field(default_factory=DimseSettings)
    """The DICOM listener."""
    http: HttpSettings = Field(default_factory=HttpSettings)
    """The HTTP server."""
    dicomweb: DicomwebSettings = Field(default_factory=DicomwebSettings)
    """QIDO-RS, WADO-RS and STOW-RS."""
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    """Password hashing, cookies, client tokens. The password and session *policy* is
    edited at run time by the security administrator (console / ``/api/admin/policy``)."""
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    """The front service inside the hospital network (``cloudfilm gateway``)."""
    tiers: TiersSettings = Field(default_factory=TiersSettings)
    """Storage tiers (online / nearline / offline), migration policies and the job runner."""
    hl7: HL7Settings = Field(default_factory=HL7Settings)
    """The HL7 v2 MLLP listener (ADT, ORM, ORU from the HIS/RIS)."""
    webservice: WebServiceSettings = Field(default_factory=WebServiceSettings)
    """The query WebService (JSON and SOAP doors with encrypted parameters and results)."""
    notify: NotifySettings = Field(default_factory=NotifySettings)
    """SMS and WeChat notifications: channels, drivers, templates, send limits, retries."""
    reports: ReportSettings = Field(default_factory=ReportSettings)
    """Report PDFs (header, QR code, key images) and release rules."""
    kiosk: KioskSettings = Field(default_factory=KioskSettings)
    """Self-service printing kiosks: prints per report, reprint policy, ticket lifetime."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003 - not used: no .env
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = os.environ.get("CLOUDFILM_CONFIG_FILE", "cloudfilm.toml")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if Path(toml_file).is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Self:
        if self.environment is not Environment.PRODUCTION:
            return self
        if "CLOUDFILM_SECRET_KEY" not in os.environ and not _set_explicitly(self, "secret_key"):
            raise ValueError(
                "production needs CLOUDFILM_SECRET_KEY (≥ 32 random characters) so that every "
                "process signs with the same key"
            )
        checks: dict[str, SecretStr | None] = {
            "secret_key": self.secret_key,
            "database.password": self.database.password,
            "storage.s3_secret_access_key": self.storage.s3_secret_access_key,
            "gateway.client_secret": self.gateway.client_secret,
            "gateway.api_token": self.gateway.api_token,
            "notify.aliyun.access_key_secret": self.notify.aliyun.access_key_secret,
            "notify.wechat.app_secret": self.notify.wechat.app_secret,
            "notify.receipt_token": self.notify.receipt_token,
            "notify.http.auth_value": self.notify.http.auth_value,
            "notify.http.hmac_secret": self.notify.http.hmac_secret,
            "notify.wechat.callback_token": self.notify.wechat.callback_token,
        }
        for name, value in checks.items():
            if value is None:
                continue
            text = value.get_secret_value()
            if text.lower() in PLACEHOLDER_SECRETS or (name == "secret_key" and len(text) < 32):
                raise ValueError(
                    f"{name} holds a placeholder or too short a value; set a real secret "
                    f"(environment CLOUDFILM_{name.upper().replace('.', '__')}) before starting "
                    "in production"
                )
        if self.database.url is None:
            raise ValueError("production needs CLOUDFILM_DATABASE__URL (PostgreSQL)")
        return self

    @property
    def database_url(self) -> str:
        """The index URL with the default filled in."""
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.data_dir / 'cloudfilm.db').resolve()}"

    @property
    def storage_url(self) -> str:
        if self.storage.url:
            return self.storage.url
        return (self.data_dir / "storage").resolve().as_uri()


def _set_explicitly(settings: Settings, name: str) -> bool:
    return name in settings.model_fields_set


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (cached; tests build their own ``Settings``)."""
    return Settings()


def settings_reference() -> str:
    """Markdown reference of every setting, from the field docstrings (docs/configuration.md)."""
    lines = [
        "# Configuration",
        "",
        "Generated by `cloudfilm settings` from the field docstrings in "
        "`src/cloudfilm/config.py`; do not edit by hand.",
        "",
        "Each setting comes, highest priority first, from the command line (where a flag "
        "exists), the environment variable shown, the TOML file named by "
        "`CLOUDFILM_CONFIG_FILE` (default `./cloudfilm.toml`, keys as in the first column, "
        "sections as `[dimse]`), and the default. Secrets are never printed.",
        "",
        "| setting | environment variable | default | what it does |",
        "|---|---|---|---|",
    ]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            key = f"{prefix}{name}"
            env = "`CLOUDFILM_" + key.upper().replace(".", "__") + "`"
            if prefix.endswith(".<AE>."):  # an entry of a table such as dimse.nodes
                env = "(in the table's JSON)"
            if field.is_required():
                default = "(required)"
            elif field.default_factory is not None:
                default = "(random per process)" if name == "secret_key" else "(empty)"
            elif isinstance(field.default, StrEnum):
                default = f"`{field.default.value}`"
            else:
                default = f"`{field.default}`" if field.default not in (None, "") else "—"
            text = " ".join((field.description or "").split()).replace("|", "\\|")
            lines.append(f"| `{key}` | {env} | {default} | {text} |")
            entry = get_args(annotation)[-1] if get_origin(annotation) is dict else None
            if isinstance(entry, type) and issubclass(entry, BaseModel):
                walk(entry, f"{key}.<AE>.")

    walk(Settings, "")
    return "\n".join(lines) + "\n"
