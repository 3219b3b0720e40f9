"""ingest: read a source, decode every image once, split by patient, write arrays + manifest.

Outputs (all under `paths.ingest_dir`, swapped in atomically as one directory):
`manifest.parquet`, `<split>_images.npy` (N×H×W×C uint8, memory-mappable),
`<split>_labels.npy` (int64), `classes.json`. Quarantined inputs are listed in
`reports/ingest/quarantine.csv` with a reason each, beside `summary.json`.

Multi-label tasks (issue 25; `task.labels` set, which only `task.type: multilabel` may): the source lists each
image's positive findings (`sources.scan_multilabel`), `<split>_labels.npy` is an N×L uint8 0/1 matrix
(columns in `task.labels` order), the manifest's `label` the positive findings joined by ";" ("" for none) with
`label_index` -1, and `classes.json` has `classes` = `task.labels`, `positive_class` null and `"task":
"multilabel"`. Patients are split by iterative stratification (`splits.assign_splits_multilabel`), and
`summary.json` adds `"task": "multilabel"` and `label_counts` (per split, the images carrying each finding).

Data and reports are committed together (`io.atomic_dirs`), so `reports/ingest/` always describes the
dataset in `data/ingest/`. A failed run keeps a good previous dataset and its reports, and says why it
failed in `reports/ingest/failed_run.json` and `failed_quarantine.csv` (the next good run removes them).

The source is fingerprinted (every file's size, times and inode; an S3 prefix's listing with ETags) before
it is read, and checked again after decoding and just before the commit: a file added, removed or rewritten
meanwhile fails the run with `SourceChanged` (transient: a retry reads the source again) and nothing is
written, so the dataset, its reports and DVC's hash of the source (taken after the command) describe the
same files. A split that comes out empty fails the run, naming patients and images per split.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medclf.config import Ingest, Paths, Settings, source_location
from medclf.evaluation.subgroups import SUBGROUP_PREFIX
from medclf.imaging.changes import describe, diff_manifests, snapshot, snapshot_differences
from medclf.imaging.privacy import hash_patient, redact, salt
from medclf.imaging.splits import (
    SPLITS,
    assign_splits,
    assign_splits_multilabel,
    empty_split_problem,
    label_counts,
    link_groups,
)
from medclf.infra import catalog
from medclf.infra.io import atomic_dir, atomic_dirs, atomic_file, disk_writes, recover_dir, write_json, write_npy
from medclf.pipeline import declared
from medclf.sources import Record, scan, scan_multilabel
from medclf.sources.base import SourceChanged
from medclf.sources.decode import Decoded, decode_all
from medclf.sources.multilabel import findings_matrix, unknown_findings

log = logging.getLogger(__name__)


class IngestError(RuntimeError):
    """Ingest refused to produce a dataset (too much bad input, nothing usable)."""

    transient = False  # the same input is refused again (medclf.cli.is_transient)


def _class_list(cfg: Ingest, scanned: list[str] | None, labels: list[str]) -> list[str]:
    if cfg.classes:
        return list(cfg.classes)
    if scanned:
        return list(scanned)
    return sorted(set(labels))


def _quarantine_report(quarantine: list[tuple[str, str]], total: int, limit: float) -> str | None:
    if not total:
        return "no input images found"
    frac = len(quarantine) / total
    if frac <= limit:
        return None
    counts = pd.Series([r.split(":")[0] for _, r in quarantine]).value_counts()
    lines = [
        (
            f"{len(quarantine)} of {total} inputs ({frac:.1%}) were quarantined, above "
            f"ingest.max_quarantine_fraction={limit:.1%}. Reasons:"
        )
    ]
    lines += [f"  {n:6d} × {reason}" for reason, n in counts.items()]
    lines += ["Examples:"] + [f"  {u}: {r}" for u, r in quarantine[:5]]
    return "\n".join(lines)


def build_manifest(
    ok: list[Decoded], splits: list[str], classes: list[str], quarantined: list[Decoded], multilabel: bool = False
) -> pd.DataFrame:
    """One row per image, usable then quarantined. `multilabel`: `label` is the ";"-joined findings and
    `label_index` -1 (an image has no one class; its row of `<split>_labels.npy` has its findings)."""
    rows = []
    counters = {s: 0 for s in SPLITS}
    for d, split in zip(ok, splits, strict=True):
        pid = d.record.patient_id
        rows.append(
            {
                "id": hashlib.sha1(d.uri.encode()).hexdigest()[:16],
                "source_uri": d.uri,
                "sha256": d.sha256,
                "patient_hash": hash_patient(pid) if pid else None,
                "label": d.record.label,
                "label_index": -1 if multilabel else classes.index(d.record.label or ""),
                "split": split,
                "row": counters[split],
                "orig_height": d.orig_shape[0],
                "orig_width": d.orig_shape[1],
                "orig_channels": d.orig_shape[2],
                "colourfulness": d.colourfulness,
                "status": "ok",
                "reason": None,
            }
        )
        counters[split] += 1
    for d in quarantined:
        pid = d.record.patient_id
        rows.append(
            {
                "id": hashlib.sha1(d.uri.encode()).hexdigest()[:16],
                "source_uri": d.uri,
                "sha256": d.sha256 or None,
                "patient_hash": hash_patient(pid) if pid else None,
                "label": d.record.label,
                "label_index": -1,
                "split": None,
                "row": -1,
                "orig_height": d.orig_shape[0],
                "orig_width": d.orig_shape[1],
                "orig_channels": d.orig_shape[2],
                "colourfulness": d.colourfulness,
                "status": "quarantined",
                "reason": d.reason,
            }
        )
    df = pd.DataFrame(rows)
    for name in dict.fromkeys(g for d in (*ok, *quarantined) for g in d.record.subgroups):  # ingest.subgroups
        df[SUBGROUP_PREFIX + name] = [d.record.subgroups.get(name) for d in (*ok, *quarantined)]
    return df


@declared
def run(settings: Settings) -> dict[str, Any]:
    cfg, paths = settings.ingest, settings.paths
    t0 = time.perf_counter()
    reports = catalog.INGEST_REPORTS.path(paths)
    for out in (paths.ingest_dir, reports):  # finish a commit a kill interrupted; drop dead runs' staging dirs
        recover_dir(out)
    source = _source_snapshot(cfg, paths)  # before the listing: what ingest reads must still be this after reading
    findings = list(settings.task.labels)  # set for (and only for) a multilabel task: config._multilabel_fits
    if findings:
        scanned = scan_multilabel(cfg.source, findings, cfg.subgroups, cfg.label_aliases)
        classes = findings
    else:
        scanned = scan(cfg.source, cfg.classes, cfg.subgroups, cfg.label_aliases)
        labels = [r.label or "" for r in scanned.records]
        classes = _class_list(cfg, scanned.class_names, [lab for lab in labels if lab])
    if cfg.positive_class is not None and cfg.positive_class not in classes:  # classes: null (else config checks)
        raise IngestError(f"ingest.positive_class {cfg.positive_class!r} is not one of the classes found {classes}")
    # resolve (or create) the key once, before decode workers fork; only after the source was found, so that
    # a run that fails on a missing or bad source or configuration leaves no new secrets/patient_salt behind
    salt()
    decoded = decode_all(scanned.records, cfg)
    t_decode = time.perf_counter() - t0
    _check_source(cfg, paths, source, scanned.records)  # a file deleted mid-read is a changed source, not a quarantine
    for d in decoded:
        if findings:  # "" (no finding) is a label; a name outside task.labels is not
            unknown = unknown_findings(d.record.label, findings)
            if d.reason is None and d.record.label is None:
                d.reason = "missing label"
            elif d.reason is None and unknown:
                d.reason = f"unknown finding(s) {unknown} (expected some of {findings})" + (
                    f" at {d.record.where}" if d.record.where else ""
                )
        elif d.reason is None and d.record.label not in classes:
            d.reason = (
                f"unknown label {d.record.label!r} (expected one of {classes})"
                + (f" at {d.record.where}" if d.record.where else "")
                if d.record.label
                else "missing label"
            )
    ok = [d for d in decoded if d.reason is None]
    bad = [d for d in decoded if d.reason is not None]
    quarantine = scanned.quarantine + [(d.uri, d.reason or "") for d in bad]
    qdf = pd.DataFrame(quarantine, columns=["uri", "reason"])
    total = len(decoded) + len(scanned.quarantine)
    problem = _quarantine_report(quarantine, total, cfg.max_quarantine_fraction)
    if problem or not ok:
        problem = problem or "no usable images"
        where = _record_failure(
            paths,
            qdf,
            {
                "status": "failed",
                "error": problem,
                "inputs": total,
                "images": len(ok),
                "quarantined": len(quarantine),
                "classes": classes,
                "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            },
        )
        raise IngestError(problem + f"\nSee {where}.")

    keys = [[f"p:{hash_patient(d.record.patient_id)}"] if d.record.patient_id else [] for d in ok]
    keys = [k + [f"h:{d.sha256}"] for k, d in zip(keys, ok, strict=True)]
    official = [d.record.split if cfg.splits.use_official else None for d in ok]
    groups = link_groups(keys)
    y = findings_matrix([d.record.label for d in ok], findings) if findings else None
    if y is not None:  # whole patients, each finding's positives spread close to the fractions
        splits = assign_splits_multilabel(
            groups, y, official, cfg.splits.val_fraction, cfg.splits.test_fraction, cfg.splits.seed
        )
    else:
        splits = assign_splits(
            groups,
            [d.record.label or "" for d in ok],
            official,
            cfg.splits.val_fraction,
            cfg.splits.test_fraction,
            cfg.splits.seed,
        )
    problem = empty_split_problem(
        splits, groups, cfg.splits.val_fraction, cfg.splits.test_fraction, cfg.splits.use_official
    )
    if problem:  # validate's split_fractions is a warning; an empty train or val split fails augment or train
        where = _record_failure(
            paths,
            qdf,
            {
                "status": "failed",
                "error": problem,
                "inputs": total,
                "images": len(ok),
                "quarantined": len(quarantine),
                "classes": classes,
                "splits": {s: splits.count(s) for s in SPLITS},
                "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            },
        )
        raise IngestError(problem + f"\nSee {where}.")
    manifest = build_manifest(ok, splits, classes, bad, multilabel=y is not None)
    changes = diff_manifests(_previous_manifest(paths), manifest)
    counts = {}
    with atomic_dirs(paths.ingest_dir, reports) as (tmp, rtmp):  # data and its reports, committed together
        for split in SPLITS:
            idx = [i for i, s in enumerate(splits) if s == split]
            shape = (len(idx), cfg.image_size, cfg.image_size, cfg.channels)
            # plain writes into preallocated blocks, no memory map: a full disk is a DiskFull naming the file
            # (a memory map on a full disk was a SIGBUS), and atomic_dirs removes the staging at once
            write_npy(catalog.IMAGES.under(tmp, split=split), shape, np.uint8, (ok[i].image for i in idx))
            if y is not None:  # N×L uint8 0/1, columns in task.labels order
                split_labels = y[idx]
            else:  # `ok` labels are all in classes
                split_labels = np.array([classes.index(ok[i].record.label or "") for i in idx], dtype=np.int64)
            with disk_writes(catalog.LABELS.under(tmp, split=split)):
                np.save(catalog.LABELS.under(tmp, split=split), split_labels)
            counts[split] = len(idx)
        with disk_writes(catalog.MANIFEST.under(tmp)):
            manifest.to_parquet(catalog.MANIFEST.under(tmp), index=False)
        meta: dict[str, Any] = {
            "classes": classes,
            "positive_class": None if y is not None else cfg.positive_class or classes[-1],
            "image_size": cfg.image_size,
            "channels": cfg.channels,
        }
        write_json(catalog.CLASSES.under(tmp), meta | ({"task": "multilabel"} if y is not None else {}))
        elapsed = time.perf_counter() - t0
        summary = {
            "images": len(ok),
            "quarantined": len(quarantine),
            "classes": classes,
            "splits": counts,
            "patients": int(manifest.loc[manifest.status == "ok", "patient_hash"].nunique()),
            "seconds": round(elapsed, 2),
            "decode_images_per_second": round(len(decoded) / t_decode, 1),
            "changes": changes,
        }
        if y is not None:  # the images carrying each finding, per split
            summary |= {"task": "multilabel", "label_counts": label_counts(y, splits, findings)}
        with disk_writes(_in_reports(rtmp, catalog.QUARANTINE)):
            qdf.to_csv(_in_reports(rtmp, catalog.QUARANTINE), index=False)
        write_json(_in_reports(rtmp, catalog.INGEST_SUMMARY), summary)
        _check_source(cfg, paths, source, scanned.records)  # last look before the commit: nothing changed since
    catalog.INGEST_METRICS.save(paths, {"images": len(ok), "quarantined": len(quarantine)})  # `dvc metrics show`
    log.info(
        "ingest: %d images (%s), %d quarantined, %.1f s; since the last ingest: %s",
        len(ok),
        counts,
        len(quarantine),
        elapsed,
        describe(changes),
    )
    return summary


Snapshot = tuple[str, dict[str, Any]]
"""Where the source lives (`config.source_location`) and its fingerprint: local files' `changes.Stat`, S3 ETags."""


def _source_snapshot(cfg: Ingest, paths: Paths) -> Snapshot | None:
    """The source as it is now; None for a generated source (synthetic, MedMNIST by download). Ingest's own
    outputs (and the project lock), should they lie under the source's folder, are not the source."""
    where = source_location(cfg.source)
    if where is None:
        return None
    if where.startswith("s3://"):
        from medclf.sources.store import open_store

        store = open_store(where, cfg.source.s3_endpoint_url)
        return where, {rel: store.version(rel) for rel in store.list()}
    return where, snapshot(where, exclude=(paths.ingest_dir, paths.reports_dir, paths.cache_dir))


def _check_source(cfg: Ingest, paths: Paths, before: Snapshot | None, records: list[Record]) -> None:
    """Raise SourceChanged, naming the files, if the source differs from `before` (taken before reading)."""
    if before is None:
        return
    where, files = before
    now = _source_snapshot(cfg, paths)
    diff = snapshot_differences(files, now[1] if now else {})
    if not diff:
        return
    pids = {r.patient_id for r in records if r.patient_id}
    regex = (
        re.compile(cfg.source.patient_id_regex) if cfg.source.kind == "folder" and cfg.source.patient_id_regex else None
    )

    def shown(rel: str) -> str:  # named as the manifest and quarantine.csv name files: patient ids pseudonymised
        m = regex.search(rel.rsplit("/", 1)[-1]) if regex else None
        for pid in [p for p in pids if p in rel] + ([m.group(1) if m.groups() else m.group(0)] if m else []):
            rel = redact(rel, pid)
        return rel

    parts = []
    for kind, rels in diff.items():
        more = f" and {len(rels) - 5} more" if len(rels) > 5 else ""
        parts.append(f"{kind}: {', '.join(shown(r) for r in rels[:5])}{more}")
    n = sum(len(v) for v in diff.values())
    raise SourceChanged(
        f"{where}: the source changed while ingest read it ({n} file{'s' if n != 1 else ''}; {'; '.join(parts)}): "
        "nothing of this run is kept (the previous dataset and its reports stay as they were), and a new "
        "attempt reads the source again"
    )


def _in_reports(reports: Path, artifact: catalog.Artifact) -> Path:
    """`artifact` (under `paths.reports_dir`) inside `reports`, a directory standing for `INGEST_REPORTS`."""
    return reports / Path(artifact.rel).relative_to(catalog.INGEST_REPORTS.rel)


def _record_failure(paths: Paths, quarantine: pd.DataFrame, record: dict[str, Any]) -> Path:
    """Write a failed run's reports without contradicting the dataset in `ingest_dir`; return the quarantine's path.

    With a good previous dataset, its `summary.json` and `quarantine.csv` stay as they are (they describe
    `data/ingest`, which the failed run kept); the failure goes to `failed_run.json` and
    `failed_quarantine.csv` beside them. With no dataset there is nothing to contradict: the reports
    directory is replaced by the failed run's quarantine.csv (and the same two files).
    """
    failed_csv = catalog.INGEST_FAILED_QUARANTINE.path(paths)
    if catalog.MANIFEST.path(paths).exists():
        failed_csv.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(failed_csv) as fh:
            quarantine.to_csv(fh, index=False)
        write_json(catalog.INGEST_FAILED_RUN.path(paths), record)
        return failed_csv
    with atomic_dir(catalog.INGEST_REPORTS.path(paths)) as tmp:
        quarantine.to_csv(_in_reports(tmp, catalog.QUARANTINE), index=False)
        quarantine.to_csv(_in_reports(tmp, catalog.INGEST_FAILED_QUARANTINE), index=False)
        write_json(_in_reports(tmp, catalog.INGEST_FAILED_RUN), record)
    return failed_csv


def _previous_manifest(paths: Paths) -> pd.DataFrame | None:
    """The last ingest's manifest (what the current model saw), to say what changed since."""
    path = catalog.MANIFEST.path(paths)
    try:
        if not path.exists():
            return None
        try:  # `status`: quarantined rows are no part of the dataset (changes.diff_manifests)
            return pd.read_parquet(path, columns=["source_uri", "sha256", "label", "status"])
        except (KeyError, ValueError):  # an older manifest without it: every row counts as an image
            return pd.read_parquet(path, columns=["source_uri", "sha256", "label"])
    except (OSError, ValueError, KeyError) as err:  # an older layout: report "first ingest" rather than fail
        log.warning("ingest: cannot read the previous manifest %s (%s); changes not computed", path, err)
        return None
