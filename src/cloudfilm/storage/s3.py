"""S3-compatible object storage backend (AWS S3, MinIO, Ceph RGW, SeaweedFS, OSS/COS/OBS).

URL form::

    s3://BUCKET[/PREFIX]?endpoint=http://10.0.0.5:9000&region=us-east-1[&style=path|virtual]

``endpoint`` is the server's base URL (omit it for AWS itself); ``style`` is the bucket
addressing, path-style (``http://host/bucket/key``, what MinIO, Ceph and SeaweedFS expect)
by default when an endpoint is given, virtual-hosted for AWS. Credentials never go in the
URL: they come from ``storage.s3_access_key_id`` / ``storage.s3_secret_access_key`` or the
standard ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``)
environment variables.

Objects are read and written with obstore (Rust ``object_store``). It sends no
``x-amz-checksum-*`` headers unless asked, which many S3-compatible servers reject; we never
ask. A PUT is atomic and durable when the server acknowledges it, so there are no temporary
objects. Streams larger than one part go up as multipart uploads; an upload abandoned by a
crash is invisible but holds space until :meth:`S3Backend.sweep_temporary` aborts it
(boto3, the one bucket-administration call).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, BinaryIO, cast
from urllib.parse import parse_qs, urlparse

import obstore
from obstore.exceptions import PermissionDeniedError, UnauthenticatedError
from obstore.store import S3Store

from cloudfilm.errors import CloudFilmError, NotFound, StorageUnavailable
from cloudfilm.storage.base import ObjectInfo, check_key

if TYPE_CHECKING:
    from obstore import ReadableFile

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_S3_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
#: Part size of multipart uploads and read-ahead of :meth:`S3Backend.open`.
PART_BYTES = 8 * 1024 * 1024
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "ExpiredToken",
    "InvalidToken",
}


class S3Backend:
    """Objects in one bucket (under an optional prefix) of an S3-protocol server."""

    def __init__(
        self,
        url: str,
        *,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        connect_timeout: float = 3.0,
        read_timeout: float = 30.0,
        request_timeout: float = 600.0,
        max_retries: int = 3,
        retry_timeout: float = 30.0,
        fsync: bool = True,  # noqa: ARG002 - S3 acknowledges a PUT only once it is durable
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "s3":
            raise ValueError(f"not an s3 URL: {url}")
        if parsed.username or parsed.password:
            raise ValueError(
                "credentials do not belong in the storage URL (it is logged and shown): set "
                "storage.s3_access_key_id / storage.s3_secret_access_key or AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY"
            )
        bucket = parsed.hostname or ""
        if not _BUCKET.fullmatch(bucket):
            raise ValueError(f"{bucket!r} is not an S3 bucket name (s3://BUCKET/prefix?...)")
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        unknown = set(query) - {"endpoint", "region", "style"}
        if unknown:
            raise ValueError(
                f"unknown s3 URL option(s) {', '.join(sorted(unknown))}; "
                "known: endpoint, region, style"
            )
        self.url = url
        self.bucket = bucket
        self.prefix = parsed.path.strip("/")
        self.endpoint = query.get("endpoint")
        self.region = query.get("region", "us-east-1")
        style = query.get("style", "path" if self.endpoint else "virtual")
        if style not in ("path", "virtual"):
            raise ValueError(f"s3 URL option style={style!r}: use path or virtual")
        self.style = style
        access_key_id = access_key_id or os.environ.get("AWS_ACCESS_KEY_ID")
        secret_access_key = secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY")
        session_token = session_token or os.environ.get("AWS_SESSION_TOKEN")
        if not access_key_id or not secret_access_key:
            # Without them the client would go looking for instance metadata credentials.
            raise StorageUnavailable(
                f"no credentials for {self._where}: set storage.s3_access_key_id and "
                "storage.s3_secret_access_key (CLOUDFILM_STORAGE__S3_ACCESS_KEY_ID, "
                "CLOUDFILM_STORAGE__S3_SECRET_ACCESS_KEY) or AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY"
            )
        self.access_key_id = access_key_id
        self._secret = secret_access_key
        self._session_token = session_token
        self.timeouts = {
            "connect": connect_timeout,
            "read": read_timeout,
            "request": request_timeout,
            "retry": retry_timeout,
        }
        self.max_retries = max_retries
        config: dict[str, Any] = {
            "region": self.region,
            "access_key_id": access_key_id,
            "secret_access_key": secret_access_key,
            "virtual_hosted_style_request": style == "virtual",
        }
        if session_token:
            config["session_token"] = session_token
        if self.endpoint:
            config["endpoint"] = self.endpoint
        self._store = S3Store(
            bucket,
            prefix=self.prefix or None,
            config=cast(Any, config),
            client_options={
                "allow_http": bool(self.endpoint and self.endpoint.startswith("http://")),
                "connect_timeout": timedelta(seconds=connect_timeout),
                "read_timeout": timedelta(seconds=read_timeout),
                "timeout": timedelta(seconds=request_timeout),
            },
            retry_config={
                "max_retries": max_retries,
                "retry_timeout": timedelta(seconds=retry_timeout),
                "backoff": {
                    "init_backoff": timedelta(milliseconds=100),
                    "max_backoff": timedelta(seconds=5),
                    "base": 2,
                },
            },
        )

    @property
    def _where(self) -> str:
        server = self.endpoint or f"AWS S3 ({self.region})"
        return f"bucket {self.bucket!r} at {server}"

    # -- the interface ---------------------------------------------------------------------

    def put(self, key: str, data: bytes | BinaryIO) -> None:
        check_key(key)
        try:
            if isinstance(data, bytes | bytearray | memoryview):
                # One PUT: atomic, nothing left behind if it fails half-way.
                obstore.put(self._store, key, data, use_multipart=False)
            else:
                obstore.put(self._store, key, data, chunk_size=PART_BYTES, max_concurrency=4)
        except Exception as exc:
            raise self._error(exc, "write", key, absent_is_bucket=True) from exc

    def open(self, key: str) -> BinaryIO:
        check_key(key)
        try:
            reader = obstore.open_reader(self._store, key, buffer_size=PART_BYTES)
        except Exception as exc:
            raise self._error(exc, "read", key) from exc
        return cast(BinaryIO, io.BufferedReader(_ObjectReader(reader, self, key), PART_BYTES))

    def read(self, key: str) -> bytes:
        check_key(key)
        try:
            return bytes(obstore.get(self._store, key).bytes())
        except Exception as exc:
            raise self._error(exc, "read", key) from exc

    def open_range(self, key: str, start: int, end: int) -> bytes:
        check_key(key)
        if end <= start:
            return b""
        try:
            return bytes(obstore.get_range(self._store, key, start=start, end=end))
        except Exception as exc:
            if "InvalidRange" in str(exc):  # start at or past the end: nothing, like a file
                return b""
            raise self._error(exc, "read", key) from exc

    def delete(self, key: str) -> None:
        check_key(key)
        try:
            obstore.delete(self._store, key)  # S3 DELETE of an absent key succeeds
        except FileNotFoundError:
            self._raise_if_bucket_missing()
        except Exception as exc:
            raise self._error(exc, "delete", key) from exc

    def stat(self, key: str) -> ObjectInfo:
        check_key(key)
        try:
            meta = obstore.head(self._store, key)
        except Exception as exc:
            raise self._error(exc, "stat", key) from exc
        return ObjectInfo(key, meta["size"], meta["last_modified"].astimezone(UTC))

    def iter_objects(self) -> Iterator[ObjectInfo]:
        try:
            for chunk in obstore.list(self._store, chunk_size=1000):
                for meta in chunk:
                    yield ObjectInfo(
                        meta["path"], meta["size"], meta["last_modified"].astimezone(UTC)
                    )
        except Exception as exc:
            raise self._error(exc, "list", None, absent_is_bucket=True) from exc

    def sweep_temporary(self, max_age_seconds: float) -> int:
        """Abort multipart uploads under our prefix started more than ``max_age_seconds``
        ago (a writer that crashed); also proves that the bucket answers."""
        self._raise_if_bucket_missing()
        client = self._admin_client()
        cutoff = datetime.now(UTC) - timedelta(seconds=max_age_seconds)
        prefix = f"{self.prefix}/" if self.prefix else ""
        removed = 0
        try:
            pages = client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                for upload in page.get("Uploads", []):
                    if upload["Initiated"] < cutoff:
                        client.abort_multipart_upload(
                            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                        removed += 1
        except Exception as exc:
            raise self._error(exc, "sweep", None) from exc
        return removed

    # -- helpers -----------------------------------------------------------------------------

    def _admin_client(self) -> Any:
        """A boto3 client for the bucket calls obstore does not make. Checksums only when the
        operation requires them: the CRC32 headers boto3 sends by default since 1.36 are
        refused by many S3-compatible servers."""
        import boto3
        from botocore.config import Config

        config = Config(
            region_name=self.region,
            connect_timeout=self.timeouts["connect"],
            read_timeout=self.timeouts["read"],
            retries={"max_attempts": self.max_retries + 1, "mode": "standard"},
            s3={"addressing_style": self.style},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self._secret,
            aws_session_token=self._session_token,
            config=config,
        )

    def _raise_if_bucket_missing(self) -> None:
        """A cheap LIST of one name: raises ``StorageUnavailable`` naming the cause when the
        bucket is missing, the credentials are refused or the server is unreachable."""
        try:
            obstore.list_with_delimiter(self._store, "cloudfilm-bucket-check")
        except Exception as exc:
            raise self._error(exc, "list", None, absent_is_bucket=True) from exc

    def _error(
        self, exc: Exception, what: str, key: str | None, *, absent_is_bucket: bool = False
    ) -> CloudFilmError:
        """Our error for a client exception: ``NotFound`` for a missing object, otherwise
        ``StorageUnavailable`` that says what is wrong and what to check."""
        if isinstance(exc, CloudFilmError):
            return exc
        text = str(exc)
        code_match = _S3_CODE.search(text)
        code = code_match.group(1) if code_match else ""
        if code == "NoSuchBucket":
            return self._no_bucket()
        if isinstance(exc, FileNotFoundError):
            if absent_is_bucket:
                return self._no_bucket()
            if code != "NoSuchKey":
                # HEAD answers 404 without a body: missing object or missing bucket?
                self._raise_if_bucket_missing()
            return NotFound(f"storage object {key} is missing")
        if (
            isinstance(exc, PermissionDeniedError | UnauthenticatedError)
            or code in _CREDENTIAL_CODES
        ):
            return StorageUnavailable(
                f"S3 {what} refused by {self._where}: the credentials were not accepted "
                f"({code or '403 Forbidden'}) for access key {self.access_key_id!r}; check "
                "storage.s3_access_key_id / storage.s3_secret_access_key (or AWS_ACCESS_KEY_ID "
                "/ AWS_SECRET_ACCESS_KEY) and the key's rights on the bucket"
            )
        lowered = text.lower()
        if "error sending request" in lowered or "connect" in lowered or "dns" in lowered:
            return StorageUnavailable(
                f"S3 endpoint unreachable: could not {what} at {self._where} (connection "
                "failed); is the server running and the endpoint in the storage URL right?"
            )
        if "timed out" in lowered or "timeout" in lowered:
            return StorageUnavailable(
                f"S3 {what} timed out at {self._where}: the server accepted the connection but "
                "did not answer in time (storage.s3_read_timeout_seconds)"
            )
        first_line = text.splitlines()[0][:300] if text else type(exc).__name__
        return StorageUnavailable(f"S3 {what} failed at {self._where}: {first_line}")

    def _no_bucket(self) -> StorageUnavailable:
        return StorageUnavailable(
            f"S3 bucket {self.bucket!r} does not exist at {self.endpoint or 'AWS S3'}: create "
            "it (e.g. `aws s3 mb`, `mc mb`, or `weed shell` s3.bucket.create) or fix the "
            "storage URL"
        )


class _ObjectReader(io.RawIOBase):
    """A seekable raw stream over obstore's ranged reader, with our errors."""

    def __init__(self, reader: ReadableFile, backend: S3Backend, key: str) -> None:
        self._reader = reader
        self._backend = backend
        self._key = key

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            chunk = self._reader.read(len(view))
        except Exception as exc:
            raise self._backend._error(exc, "read", self._key) from exc
        size = len(chunk)
        view[:size] = memoryview(chunk)
        return size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._reader.seek(offset, whence)

    def tell(self) -> int:
        return self._reader.tell()

    def close(self) -> None:
        if not self.closed:
            self._reader.close()
        super().close()
