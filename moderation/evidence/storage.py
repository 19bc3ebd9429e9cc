"""Where sealed evidence lives: a directory or an S3-compatible bucket, behind one
interface (`EvidenceStore`). Blobs are written whole and named by the caller; a name is
written again only with the same content (an upload's screening is idempotent)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from moderation.errors import Unavailable


class StoreUnavailable(Unavailable):
    code = "evidence_store_unavailable"


class EvidenceStore(Protocol):
    def put(self, name: str, data: bytes) -> None: ...

    def get(self, name: str) -> bytes | None:
        """The blob, or None if there is none by that name."""
        ...

    def delete(self, name: str) -> None:
        """Remove the blob; nothing if it is already gone."""
        ...


class DirectoryStore:
    """Blobs as files under a directory only this service's user may read (0700/0600)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"evidence name {name!r} leaves the store")
        return path

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Written beside, then renamed: a reader never sees half a blob.
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".part-")
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(temporary, path)
        except OSError as error:
            raise StoreUnavailable(f"evidence store {self.root}: {error.strerror}") from error

    def get(self, name: str) -> bytes | None:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise StoreUnavailable(f"evidence store {self.root}: {error.strerror}") from error

    def delete(self, name: str) -> None:
        path = self._path(name)
        path.unlink(missing_ok=True)
        # Empty folders go with their last blob.
        for parent in path.parents:
            if parent == self.root.resolve() or not parent.is_relative_to(self.root.resolve()):
                break
            try:
                parent.rmdir()
            except OSError:
                break


class S3Store:
    """Blobs as objects under a prefix of a bucket (AWS S3, MinIO, Ceph; boto3)."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None) -> None:
        try:
            import boto3
        except ImportError as error:  # an optional dependency: moderation[s3]
            raise StoreUnavailable(
                "s3:// evidence needs boto3: pip install 'moderation[s3]'"
            ) from error
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client: Any = boto3.client("s3", endpoint_url=endpoint_url)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def put(self, name: str, data: bytes) -> None:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)
        except Exception as error:  # botocore's errors share no base worth naming
            raise StoreUnavailable(f"evidence bucket {self.bucket}: {error}") from error

    def get(self, name: str) -> bytes | None:
        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=self._key(name))
        except self._client.exceptions.NoSuchKey:
            return None
        except Exception as error:
            raise StoreUnavailable(f"evidence bucket {self.bucket}: {error}") from error
        body: bytes = answer["Body"].read()
        return body

    def delete(self, name: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(name))
        except Exception as error:
            raise StoreUnavailable(f"evidence bucket {self.bucket}: {error}") from error


def open_store(uri: str, *, s3_endpoint_url: str | None = None) -> EvidenceStore:
    """The store a `MODERATION_EVIDENCE_URI` names: s3://bucket/prefix, file:///dir or a path."""
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        return S3Store(parts.netloc, parts.path, s3_endpoint_url)
    if parts.scheme == "file":
        return DirectoryStore(Path(parts.path))
    if parts.scheme in ("", None):
        return DirectoryStore(Path(uri))
    raise StoreUnavailable(f"evidence URI {uri!r}: use a path, file:///dir or s3://bucket/prefix")
