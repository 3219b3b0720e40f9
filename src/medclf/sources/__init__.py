"""Data sources: each turns a configured location into `Record`s (see `base.py`)."""

from __future__ import annotations

from medclf.config import Source
from medclf.sources.base import Record, SourceError, SourceScan, resolve_labels


def scan(
    source: Source,
    classes: list[str] | None = None,
    subgroups: list[str] | None = None,
    label_aliases: dict[str, str] | None = None,
) -> SourceScan:
    """List `source`, every label in its canonical spelling (`base.resolve_labels`: trimmed, matched to
    `classes` case-insensitively, `label_aliases` applied; spellings that differ only in case are an error)."""
    return resolve_labels(_scan(source, classes, subgroups), classes, label_aliases)


def _scan(source: Source, classes: list[str] | None, subgroups: list[str] | None) -> SourceScan:
    """Dispatch on `source.kind`; heavy or optional imports stay inside each module. Only a manifest has
    the columns that `ingest.subgroups` (`subgroups`) declares; it reads its labels and groups from
    `source.label_column` and `source.group_column`."""
    if subgroups and source.kind not in ("manifest", "dicom"):
        raise SourceError(
            f"ingest.subgroups {subgroups} names manifest columns, but the {source.kind!r} source "
            "has none: subgroups need a manifest source (CSV/Parquet with those columns)"
        )
    if source.kind == "synthetic":
        from medclf.sources.synthetic import scan_synthetic

        return scan_synthetic(source.synthetic)
    from medclf.sources.store import open_store

    if source.kind == "folder":
        from medclf.sources.folder import scan_folder

        return scan_folder(open_store(source.uri, source.s3_endpoint_url), source.patient_id_regex, source.label_regex)
    if source.kind == "manifest":
        from medclf.sources.manifest import scan_manifest

        return scan_manifest(
            source.uri,
            source.s3_endpoint_url,
            kind="image",
            subgroups=subgroups,
            label_column=source.label_column,
            group_column=source.group_column,
        )
    if source.kind == "dicom":
        from medclf.sources.manifest import scan_manifest

        return scan_manifest(
            source.manifest or source.uri,
            source.s3_endpoint_url,
            kind="dicom",
            subgroups=subgroups,
            label_column=source.label_column,
            group_column=source.group_column,
        )
    if source.kind == "medmnist":
        from medclf.sources.medmnist import scan_medmnist

        return scan_medmnist(source, classes)
    raise SourceError(f"unknown source kind {source.kind!r}")


def scan_multilabel(
    source: Source,
    findings: list[str],
    subgroups: list[str] | None = None,
    label_aliases: dict[str, str] | None = None,
) -> SourceScan:
    """List `source` for the multi-label task whose findings are `findings` (`task.labels`): each record's label
    is its positive findings joined by `medclf.sources.multilabel.SEP`. `scan` does this for single-label tasks."""
    from medclf.sources.multilabel import check_findings

    check_findings(findings)
    if label_aliases:
        raise SourceError(
            f"ingest.label_aliases {sorted(label_aliases)} maps label spellings to classes, but this multilabel task "
            f"reads its findings {findings} from 0/1 columns named in task.labels: remove ingest.label_aliases",
            transient=False,
        )
    if subgroups and source.kind not in ("manifest", "dicom"):
        raise SourceError(
            f"ingest.subgroups {subgroups} names manifest columns, but the {source.kind!r} source "
            "has none: subgroups need a manifest source (CSV/Parquet with those columns)"
        )
    if source.kind in ("manifest", "dicom"):
        from medclf.sources.manifest import scan_manifest

        return scan_manifest(
            (source.manifest or source.uri) if source.kind == "dicom" else source.uri,
            source.s3_endpoint_url,
            kind="dicom" if source.kind == "dicom" else "image",
            subgroups=subgroups,
            label_column=source.label_column,
            group_column=source.group_column,
            findings=findings,
        )
    if source.kind == "medmnist":
        from medclf.sources.medmnist import scan_medmnist

        return scan_medmnist(source, None, findings=findings)
    raise SourceError(
        f"a multilabel task (task.labels {findings}) needs a source with several findings per image: a manifest "
        f"(source.kind: manifest or dicom, one 0/1 column per finding) or a multi-label MedMNIST .npz (medmnist); "
        f"the {source.kind!r} source gives one label per image",
        transient=False,
    )


__all__ = ["Record", "SourceError", "SourceScan", "scan", "scan_multilabel"]
