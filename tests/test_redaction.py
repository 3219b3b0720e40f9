"""README: "File names that carry ids are redacted the same way in the manifest, the logs and MLflow", for a
FOLDER source (issue 15: only the manifest and ingest's reports were checked).

Real components: a class folder with Kermany-style names (`person1003_bacteria_6.png`, `IM-0002-4.png`),
a corrupt file (quarantined, so its name is reported) and a byte-identical copy under another patient's
name (validate warns and names both files). Ingest and augment + train run in process (caplog and the
captured stdout/stderr), validate and a failing ingest run as `medclf` subprocesses (their stdout and stderr),
train logs to a real MLflow server. Every log line, report, MLflow param, tag, dataset input and artifact
is searched for the raw patient ids and the raw file-name stems; none may appear. The pseudonymised names
must appear (the files are named, only redacted), so the search cannot pass because nothing was logged.

No stage sends a file name or a patient id to MLflow today (train logs params, digests and counts), so
the MLflow half guards against a future stage that does; see the mutation rows in docs/TESTING.md.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medclf.config import load_settings
from medclf.imaging.privacy import hash_patient
from tests.conftest import KERMANY_REGEX, write_params
from tests.test_ingest import make_folder

pytestmark = pytest.mark.slow

MEDCLF = str(Path(sys.executable).with_name("medclf"))
CORRUPT = "person1099_virus_1.png"  # patient person1099: quarantined, never decoded
COPY = "person1098_bacteria_7.png"  # NORMAL/: the same bytes as NORMAL/IM-0000-0.png, another patient (validate warns)


def raw_folder(root: Path) -> Path:
    make_folder(root, per_class=12)
    (root / "PNEUMONIA" / CORRUPT).write_bytes(b"not an image")
    shutil.copy2(root / "NORMAL" / "IM-0000-0.png", root / "NORMAL" / COPY)
    return root


def secrets_of(root: Path) -> tuple[set[str], set[str]]:
    """The raw patient ids and the raw file-name stems (each file's name without extension)."""
    import re

    regex = re.compile(KERMANY_REGEX)
    stems = {p.stem for p in root.rglob("*.png")}
    ids = {m.group(1) for s in stems if (m := regex.search(s))}
    assert len(ids) == 14 and len(stems) == 26, (ids, stems)
    return ids, stems


def leaks(text: str, needles: set[str]) -> list[str]:
    return sorted(n for n in needles if n in text)


def mlflow_text(uri: str, run_id: str, download_to: Path) -> str:
    """Every param, tag, dataset input and artifact (bytes decoded leniently) of a run, as one text."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    parts = [json.dumps(run.data.params), json.dumps(run.data.tags), run.info.run_name or ""]
    for ds in run.inputs.dataset_inputs:
        d = ds.dataset
        parts += [d.name, d.source, d.source_type, d.digest, str(d.schema), str(d.profile)]
        parts += [f"{t.key}={t.value}" for t in ds.tags]
    local = Path(download_artifacts(run_id=run_id, artifact_path="", dst_path=str(download_to), tracking_uri=uri))
    files = [p for p in local.rglob("*") if p.is_file()]
    assert any(p.name == "train_run.json" for p in files), files
    parts += [p.relative_to(local).as_posix() + "\n" + p.read_bytes().decode("utf-8", "replace") for p in files]
    return "\n".join(parts)


def test_folder_file_names_and_patient_ids_never_reach_logs_or_mlflow_in_clear(
    tmp_path, mlflow_server, monkeypatch, caplog, capfd
):
    from medclf.stages import augment, ingest, train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    root = raw_folder(tmp_path / "raw")
    ids, stems = secrets_of(root)
    needles = ids | stems
    source = {"kind": "folder", "uri": str(root), "patient_id_regex": KERMANY_REGEX}
    for d in ("run", "failing"):
        (tmp_path / d).mkdir()
    params = write_params(
        tmp_path / "run",
        {
            "ingest": {"source": source, "max_quarantine_fraction": 0.1},
            "validate": {
                "severity": {"prevalence_gap": "warn", "prevalence_bounds": "warn", "split_fractions": "warn"}
            },
            "augment": {"preview_n": 4},
            "train": {"head_epochs": 1, "finetune_epochs": 0, "batch_size": 16, "augment_workers": 0},
        },
    )
    settings = load_settings(params)

    # 1. ingest in process: logs at DEBUG, reports and manifest on disk
    caplog.set_level(logging.DEBUG)
    summary = ingest.run(settings)
    assert summary["images"] == 25 and summary["quarantined"] == 1, summary
    # 2. validate through the CLI: the console table (stderr) and the JSON result (stdout) name files
    val = subprocess.run(
        [MEDCLF, "--params", str(params), "validate"], capture_output=True, text=True, timeout=600, check=False
    )
    assert val.returncode == 0, val.stderr[-3000:]
    # 3. a failing ingest through the CLI: its error lists example file names
    failing = write_params(tmp_path / "failing", {"ingest": {"source": source, "max_quarantine_fraction": 0.0}})
    bad = subprocess.run(
        [MEDCLF, "--params", str(failing), "ingest"], capture_output=True, text=True, timeout=600, check=False
    )
    assert bad.returncode == 3 and "IngestError" in bad.stderr and "Examples:" in bad.stderr, bad.stderr[-3000:]
    # 4. augment + train in process, logging to MLflow
    augment.run(settings)
    run_id = train.run(settings)["run_id"]
    assert run_id
    out, err = capfd.readouterr()

    logs = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records)
    reports = settings.paths.reports_dir
    on_disk = "\n".join(
        p.read_bytes().decode("utf-8", "replace")
        for d in (reports / "ingest", reports / "validation")
        for p in sorted(d.rglob("*"))
        if p.is_file()
    )
    import pandas as pd

    manifest = pd.read_parquet(settings.paths.ingest_dir / "manifest.parquet").to_csv()
    texts = {
        "caplog": logs,
        "captured stdout/stderr": out + err,
        "medclf validate stdout": val.stdout,
        "medclf validate stderr": val.stderr,
        "medclf ingest (failing) stderr": bad.stdout + bad.stderr,
        "reports": on_disk,
        "manifest": manifest,
        "MLflow run": mlflow_text(mlflow_server, run_id, tmp_path / "artifacts"),
    }
    found = {where: leaks(text, needles) for where, text in texts.items()}
    assert not any(found.values()), "raw ids or file names in clear:\n" + "\n".join(
        f"  {where}: {', '.join(names)}" for where, names in found.items() if names
    )

    # the files ARE named where they are reported, pseudonymised
    corrupt = CORRUPT.replace("person1099", hash_patient("person1099"))
    copy = COPY.replace("person1098", hash_patient("person1098"))
    original = "IM-0000-0.png".replace("IM-0000", hash_patient("IM-0000"))
    assert corrupt in manifest and corrupt in on_disk
    assert corrupt in bad.stderr
    assert copy in val.stderr and original in val.stderr, val.stderr[-3000:]  # duplicate_within_split examples
    assert copy in val.stdout  # the JSON result's markdown report
