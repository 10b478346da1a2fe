"""The cloud's object store: a local folder by default, S3 (or anything that speaks it)
when configured. Both sides behind one small interface, so the component registry, the
lake and the model registry never know which one they run on.

Keys are relative, slash-separated paths (``components/com.example.A/1.0.0/app.zip``):
no empty segments, no ``.``/``..``, no leading slash. Writes are atomic on both sides: a
reader sees the old object or the new one, never part of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgeloop.core.errors import CloudError, NotFoundError, ValidationError

_SEGMENT = re.compile(r"^[A-Za-z0-9._+=@,:-]+$")


@dataclass(frozen=True)
class ObjectInfo:
    """What the store knows of one object."""

    key: str
    size: int


def check_key(key: str) -> str:
    """``key`` if it is a safe object key; ValidationError naming the problem otherwise."""
    if not key or key.startswith("/") or key.endswith("/"):
        raise ValidationError(
            "must be a relative path without a leading or trailing '/'", field=f"key {key!r}"
        )
    for segment in key.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT.match(segment):
            raise ValidationError(
                f"segment {segment!r} is empty, '.', '..' or has characters outside "
                "letters, digits and ._+=@,:-",
                field=f"key {key!r}",
            )
    return key


class ObjectStore(Protocol):
    """Where the cloud keeps blobs (artifacts, lake files, models)."""

    def put(self, key: str, data: bytes) -> ObjectInfo:
        """Store ``data`` under ``key``, replacing what was there."""

    def get(self, key: str, *, start: int = 0, end: int | None = None) -> bytes:
        """The object's bytes, or the range ``[start, end)`` of them (for resumed downloads)."""

    def head(self, key: str) -> ObjectInfo | None:
        """The object's size, or None when there is none."""

    def delete(self, key: str) -> None:
        """Remove an object (no error when it is already gone)."""

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose keys start with ``prefix``, in key order."""

    def describe(self) -> str:
        """Where the objects live, for logs and `cloud up`'s report."""


class LocalObjectStore:
    """Objects as files under one folder (the embedded default)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def put(self, key: str, data: bytes) -> ObjectInfo:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".put-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return ObjectInfo(key, len(data))

    def get(self, key: str, *, start: int = 0, end: int | None = None) -> bytes:
        path = self._path(key)
        try:
            with path.open("rb") as fh:
                fh.seek(start)
                return fh.read() if end is None else fh.read(max(0, end - start))
        except FileNotFoundError as err:
            raise NotFoundError("object", key) from err

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            return ObjectInfo(key, path.stat().st_size)
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        found = []
        for path in self.root.rglob("*"):
            if path.is_file() and not path.name.startswith(".put-"):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    found.append(ObjectInfo(key, path.stat().st_size))
        yield from sorted(found, key=lambda info: info.key)

    def describe(self) -> str:
        return f"folder {self.root}"


class S3ObjectStore:
    """Objects in an S3 bucket (AWS, or any S3-compatible server at ``endpoint_url``)."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        prefix: str = "",
        client: Any = None,
    ) -> None:
        import boto3  # imported here: only an S3-backed cloud pays for it
        from botocore.config import Config

        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._client = client or boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}),
        )
        self._errors = self._client.exceptions

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist yet."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except Exception:
            try:
                self._client.create_bucket(Bucket=self.bucket)
            except Exception as err:
                raise CloudError(
                    f"cannot use S3 bucket {self.bucket!r} at {self.endpoint_url or 'AWS'}: {err}"
                ) from err

    def put(self, key: str, data: bytes) -> ObjectInfo:
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Body=data,
                ChecksumSHA256=_b64_sha256(data),
            )
        except Exception as err:
            raise CloudError(f"cannot store {key!r} in {self.describe()}: {err}") from err
        return ObjectInfo(key, len(data))

    def get(self, key: str, *, start: int = 0, end: int | None = None) -> bytes:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if start or end is not None:
            if end is not None and end <= start:
                return b""
            args["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            body: bytes = self._client.get_object(**args)["Body"].read()
        except self._errors.NoSuchKey as err:
            raise NotFoundError("object", key) from err
        except Exception as err:
            if _status(err) == 416:  # a range past the end: nothing left to read
                return b""
            raise CloudError(f"cannot read {key!r} from {self.describe()}: {err}") from err
        return body

    def head(self, key: str) -> ObjectInfo | None:
        try:
            response = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as err:
            if _status(err) == 404:
                return None
            raise CloudError(f"cannot look up {key!r} in {self.describe()}: {err}") from err
        return ObjectInfo(key, int(response["ContentLength"]))

    def delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            for item in page.get("Contents", []):
                yield ObjectInfo(item["Key"][len(self.prefix) :], int(item["Size"]))

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self.endpoint_url or 'AWS'}"


def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status is not None else None
    return None


def _b64_sha256(data: bytes) -> str:
    import base64

    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


def open_object_store(
    data_dir: Path, *, s3_endpoint: str | None = None, bucket: str = "edgeloop"
) -> ObjectStore:
    """The store `cloud up` uses: ``<data_dir>/objects``, or S3 when an endpoint is given."""
    if s3_endpoint:
        store = S3ObjectStore(bucket, endpoint_url=s3_endpoint)
        store.ensure_bucket()
        return store
    return LocalObjectStore(data_dir / "objects")
