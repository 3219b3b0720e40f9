"""Prefect task `ingest`: `dvc repro --single-item ingest`, retried with backoff when the source is remote."""

from __future__ import annotations

from medclf.config import Settings
from tasks.common import stage_task

ingest = stage_task("ingest", "Read the raw source, decode, split by patient, write arrays + manifest.")


def retries(settings: Settings) -> int:
    """S3 and downloads fail transiently (throttling, resets); local folders do not."""
    src = settings.ingest.source
    remote = any((u or "").startswith(("s3://", "http://", "https://")) for u in (src.uri, src.manifest))
    downloads = src.kind == "medmnist" and not src.uri
    return 3 if remote or downloads else 0
