"""Where bytes live: a local directory or an S3 prefix, behind one small interface.

Folder, manifest and MedMNIST sources are written once against `Store`, so S3
support is not a second implementation of each source.
"""

from __future__ import annotations

import builtins
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from medclf.sources.base import SourceChanged, SourceError, safe_relpath


class Store:
    root_uri: str

    def list(self) -> list[str]:
        """All object keys (relative, '/'-separated) under the root, sorted, as the store names them: a caller
        checks each with `safe_relpath` (an S3 key may hold `..`; a local name may not be valid UTF-8)."""
        raise NotImplementedError

    def read(self, rel: str, version: str | None = None) -> bytes:
        """The bytes of `rel`; with `version` (from `version(rel)`), only if the object is still that version."""
        raise NotImplementedError

    def version(self, rel: str) -> str | None:
        """The version `list()` saw for `rel` (S3: its ETag), to read exactly what was listed; None if unknown."""
        return None

    def uri(self, rel: str) -> str:
        return f"{self.root_uri.rstrip('/')}/{rel}"

    def dirs(self) -> builtins.list[str]:  # `list` here is the method above
        """Immediate sub-folders of the root (empty ones included where the store has them)."""
        raise NotImplementedError

    def sub(self, rel_dir: str) -> Store:
        raise NotImplementedError


@dataclass
class LocalStore(Store):
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.root_uri = str(self.root)

    def list(self) -> list[str]:
        if not self.root.exists():
            raise SourceError(f"{self.root}: no such directory")
        out = []
        for dirpath, _dirs, files in os.walk(self.root, followlinks=False):
            for f in files:
                out.append(Path(dirpath, f).relative_to(self.root).as_posix())
        return sorted(out)

    def read(self, rel: str, version: str | None = None) -> bytes:
        rel = safe_relpath(rel, self.root_uri)
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise SourceError(f"{self.root_uri}: {rel!r} resolves outside the root (symlink?)", transient=False)
        return path.read_bytes()

    def dirs(self) -> builtins.list[str]:  # `list` here is the method above
        if not self.root.is_dir():
            raise SourceError(f"{self.root}: no such directory")
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def sub(self, rel_dir: str) -> LocalStore:
        return LocalStore(self.root / safe_relpath(rel_dir, self.root_uri))


class S3Store(Store):
    """An `s3://bucket/prefix` read through boto3; endpoint URL configurable (MinIO, moto)."""

    def __init__(self, uri: str, endpoint_url: str | None = None, client: Any = None) -> None:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise SourceError(f"{uri}: not an s3://bucket/prefix URI")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.lstrip("/").rstrip("/")
        self.root_uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self._client = client
        self._etags: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        # boto3 clients cannot be pickled; each decode worker process makes its own. The listing's ETags
        # travel with each record's fetch (`version`), not with every pickled copy of the store.
        return {**self.__dict__, "_client": None, "_etags": {}}

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            cfg = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=30)
            self._client = boto3.client("s3", endpoint_url=self.endpoint_url, config=cfg)
        return self._client

    def _key(self, rel: str) -> str:
        rel = safe_relpath(rel, self.root_uri)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def list(self) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        keys: list[str] = []
        pfx = f"{self.prefix}/" if self.prefix else ""
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=pfx):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(pfx) :]
                    if not rel or rel.endswith("/"):
                        continue
                    # as listed, even an unsafe key (`a/../b`): the folder source refuses it per file, naming it
                    # (normalising it, as `_key` does a manifest's relative path, would read another object)
                    keys.append(rel)
                    if obj.get("ETag"):
                        self._etags[keys[-1]] = obj["ETag"]
        except (BotoCoreError, ClientError) as err:
            raise SourceError(f"{self.root_uri}: cannot list ({self._where()}): {err}") from err
        return sorted(keys)

    def _where(self) -> str:
        return f"endpoint {self.endpoint_url}" if self.endpoint_url else "AWS default endpoint"

    def version(self, rel: str) -> str | None:
        return self._etags.get(rel)

    def read(self, rel: str, version: str | None = None) -> bytes:
        """The object's bytes; with `version` (the listed ETag) S3 answers only if it is unchanged (If-Match)."""
        from botocore.exceptions import BotoCoreError, ClientError

        key = self._key(rel)
        try:
            extra = {"IfMatch": version} if version else {}
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=key, **extra)["Body"].read()
            return body
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if version and (code == "PreconditionFailed" or status == 412):
                raise SourceChanged(
                    f"s3://{self.bucket}/{key}: cannot read consistently: the object changed between listing and "
                    f"reading (listed ETag {version}); nothing of this run is kept, and a new attempt lists "
                    "the source again"
                ) from None
            raise SourceError(f"s3://{self.bucket}/{key}: cannot read ({self._where()}): {err}") from err
        except BotoCoreError as err:
            raise SourceError(f"s3://{self.bucket}/{key}: cannot read ({self._where()}): {err}") from err

    def dirs(self) -> builtins.list[str]:  # `list` here is the method above
        from botocore.exceptions import BotoCoreError, ClientError

        pfx = f"{self.prefix}/" if self.prefix else ""
        out: set[str] = set()
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=pfx, Delimiter="/")
            for page in pages:
                out.update(cp["Prefix"][len(pfx) :].rstrip("/") for cp in page.get("CommonPrefixes", []))
        except (BotoCoreError, ClientError) as err:
            raise SourceError(f"{self.root_uri}: cannot list ({self._where()}): {err}") from err
        return sorted(d for d in out if d and not d.startswith("."))

    def sub(self, rel_dir: str) -> S3Store:
        rel = safe_relpath(rel_dir, self.root_uri)
        return S3Store(f"{self.root_uri}/{rel}", self.endpoint_url, self._client)


def open_store(uri: str | None, endpoint_url: str | None = None) -> Store:
    if not uri:
        raise SourceError("source.uri is empty")
    if uri.startswith("s3://"):
        return S3Store(uri, endpoint_url)
    return LocalStore(Path(uri).expanduser())


def split_uri(uri: str) -> tuple[str, str]:
    """`s3://b/p/file.csv` -> (`s3://b/p`, `file.csv`); local paths likewise."""
    if uri.startswith("s3://"):
        head, _, name = uri.rstrip("/").rpartition("/")
        return head, name
    p = Path(uri)
    return str(p.parent), p.name
