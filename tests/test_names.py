"""Issue 22, rows 7, 11a and 11g: odd file names and paths. A non-UTF-8 file name, a path that escapes its
root, a name a store cannot address as listed: each is quarantined, named (escaped) with a reason, and the
rest ingests. A `..` that stays inside the root is normalised and read. What still fails does so with the
deterministic-failure exit code (3, docs/ORCHESTRATION.md), not 1.

Real files on a real (Linux, bytes-named) file system, real chest X-ray JPEGs (data/demo, CC BY 4.0).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from medclf.cli import EXIT_STAGE, main
from medclf.pipeline import invoke
from medclf.stages.ingest import IngestError
from tests.conftest import write_params

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "batch1"
DEMO_REGEX = r"^(pt[0-9a-f]{10})_"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a bytes file system (Linux)")


def _demo(cls: str, n: int, skip: int = 0) -> list[Path]:
    files = sorted((DEMO / cls).glob("*.jpeg"))[skip : skip + n]
    assert len(files) == n
    return files


def _folder(raw: Path, n: int = 10) -> Path:
    for cls in ("NORMAL", "PNEUMONIA"):
        (raw / cls).mkdir(parents=True)
        for f in _demo(cls, n):
            shutil.copy(f, raw / cls / f.name)
    return raw


def _write_bytes_name(directory: Path, name: bytes, src: Path) -> None:
    """A real file whose name is not valid UTF-8 (Linux names are bytes)."""
    os.makedirs(os.fsencode(directory), exist_ok=True)
    with open(os.fsencode(directory) + b"/" + name, "wb") as fh:
        fh.write(src.read_bytes())


def _folder_settings(make_settings, raw: Path, **ingest):
    return make_settings(
        {
            "ingest": {
                "source": {"kind": "folder", "uri": str(raw), "patient_id_regex": DEMO_REGEX},
                "max_quarantine_fraction": 0.2,
                **ingest,
            }
        }
    )


@linux_only
def test_a_non_utf8_file_name_is_quarantined_with_its_escaped_name_and_the_rest_ingests(tmp_path, make_settings):
    """Row 7: one latin-1 file name (`caf\\xe9.jpeg`) and one class folder named in latin-1 used to abort the
    whole ingest with `UnicodeEncodeError ... surrogates not allowed`, naming no file."""
    raw = _folder(tmp_path / "raw")
    real = _demo("NORMAL", 2, skip=10)
    _write_bytes_name(raw / "NORMAL", real[0].name.encode()[:-5] + b"_caf\xe9.jpeg", real[0])
    _write_bytes_name(Path(os.fsdecode(os.fsencode(raw) + b"/PNEUMON\xcfA")), b"x.jpeg", real[1])
    s = _folder_settings(make_settings, raw)
    out = invoke("ingest", s)
    assert out["images"] == 20 and out["quarantined"] == 2
    assert out["classes"] == ["NORMAL", "PNEUMONIA"]  # the latin-1 folder is not a class
    q = pd.read_csv(s.paths.reports_dir / "ingest/quarantine.csv")
    assert len(q) == 2, q
    by_name = {u.rsplit("/", 2)[-2] + "/" + u.rsplit("/", 1)[-1]: r for u, r in zip(q.uri, q.reason, strict=True)}
    file_reason = next(r for u, r in by_name.items() if u.endswith("_caf\\xe9.jpeg"))
    assert "not valid UTF-8" in file_reason and "caf\\xe9.jpeg" in file_reason, by_name
    assert by_name["PNEUMON\\xcfA/x.jpeg"].count("not valid UTF-8") == 1, by_name
    m = pd.read_parquet(s.paths.ingest_dir / "manifest.parquet")
    assert (m.status == "ok").sum() == 20 and (m.status == "quarantined").sum() == 2
    assert not m.source_uri.str.contains(real[0].name.split("_")[0]).any(), "patient ids in names are redacted"


def _manifest(raw: Path, paths: list[str]) -> Path:
    """raw/img/ holds 10 + 10 demo JPEGs; the manifest lists them, then `paths` (labelled NORMAL)."""
    (raw / "img" / "sub").mkdir(parents=True)
    rows = []
    for cls in ("NORMAL", "PNEUMONIA"):
        for f in _demo(cls, 10):
            shutil.copy(f, raw / "img" / f.name)
            rows.append({"path": f"img/{f.name}", "label": cls})
    rows += [{"path": p, "label": "NORMAL"} for p in paths]
    pd.DataFrame(rows).to_csv(raw / "labels.csv", index=False)
    return raw / "labels.csv"


def test_a_dotdot_path_that_stays_inside_the_root_is_normalised_and_read(tmp_path, make_settings):
    """Row 11a: `img/sub/../x.jpeg` is `img/x.jpeg`; it used to be refused as "escapes its root" and to
    block the run."""
    raw = tmp_path / "raw"
    extra = _demo("NORMAL", 1, skip=10)[0]
    second = extra.name.replace(".", "_2.", 1)
    csv = _manifest(raw, [f"img/sub/../{extra.name}", f"./img/./sub/../../img/{second}"])
    shutil.copy(extra, raw / "img" / extra.name)
    shutil.copy(_demo("NORMAL", 1, skip=11)[0], raw / "img" / second)
    s = make_settings({"ingest": {"source": {"kind": "manifest", "uri": str(csv)}}})
    out = invoke("ingest", s)
    assert out["images"] == 22 and out["quarantined"] == 0
    m = pd.read_parquet(s.paths.ingest_dir / "manifest.parquet")
    assert m.source_uri.str.endswith(f"/img/{extra.name}").sum() == 1
    assert not m.source_uri.str.contains(r"\.\./|/\./", regex=True).any()


def test_a_path_that_escapes_its_root_is_quarantined_naming_its_row_and_the_rest_ingests(tmp_path, make_settings):
    """Row 11a: one escaping row used to fail the whole manifest; now it is quarantined (never read), with the
    manifest and its line, and the other rows ingest."""
    raw = tmp_path / "raw"
    outside = tmp_path / "outside.jpeg"
    shutil.copy(_demo("NORMAL", 1, skip=12)[0], outside)
    csv = _manifest(raw, ["../outside.jpeg", "img/../../outside.jpeg", str(outside)])  # lines 22, 23, 24
    s = make_settings({"ingest": {"source": {"kind": "manifest", "uri": str(csv)}, "max_quarantine_fraction": 0.2}})
    out = invoke("ingest", s)
    assert out["images"] == 20 and out["quarantined"] == 3
    q = pd.read_csv(s.paths.reports_dir / "ingest/quarantine.csv")
    reasons = list(q.reason)
    assert [sum(f"{csv} line {n}" in r for r in reasons) for n in (22, 23, 24)] == [1, 1, 1], reasons
    assert sum("escapes its root" in r for r in reasons) == 2 and sum("is absolute" in r for r in reasons) == 1
    m = pd.read_parquet(s.paths.ingest_dir / "manifest.parquet")
    assert not (m.status == "ok").loc[m.source_uri.str.contains("outside")].any()


def _cli_ingest(tmp_path: Path, source: dict, capsys) -> tuple[int, dict, str]:
    params = write_params(tmp_path, {"ingest": {"source": source}})
    code = main(["--params", str(params), "ingest"])
    record = json.loads((tmp_path / ".cache/runs/ingest.json").read_text())
    return code, record, capsys.readouterr().err


def test_traversal_only_manifest_exits_with_the_deterministic_failure_code(tmp_path, monkeypatch, capsys):
    """Row 11g: a manifest whose only row escapes its root used to exit 1 (an unclassified SourceError)."""
    monkeypatch.delenv("MEDCLF_STAGE_RESULT", raising=False)
    monkeypatch.delenv("MEDCLF_RUN_TOKEN", raising=False)
    raw = tmp_path / "raw"
    raw.mkdir()
    pd.DataFrame([{"path": "../../etc/passwd", "label": "NORMAL"}]).to_csv(raw / "m.csv", index=False)
    code, record, err = _cli_ingest(tmp_path, {"kind": "manifest", "uri": str(raw / "m.csv")}, capsys)
    assert code == EXIT_STAGE and record["exit_code"] == EXIT_STAGE and record["error"]["transient"] is False
    assert "escapes its root" in err and "m.csv line 2" in err, err


@linux_only
def test_bad_name_only_folder_exits_with_the_deterministic_failure_code(tmp_path, monkeypatch, capsys):
    """Row 11g: a folder whose only image has a non-UTF-8 name used to exit 1 (UnicodeEncodeError)."""
    monkeypatch.delenv("MEDCLF_STAGE_RESULT", raising=False)
    monkeypatch.delenv("MEDCLF_RUN_TOKEN", raising=False)
    raw = tmp_path / "raw"
    _write_bytes_name(raw / "NORMAL", b"\xff.jpeg", _demo("NORMAL", 1)[0])
    code, record, err = _cli_ingest(tmp_path, {"kind": "folder", "uri": str(raw)}, capsys)
    assert code == EXIT_STAGE and record["error"]["error_type"] == IngestError.__name__, (code, err)
    assert "\\xff.jpeg" in err and "not valid UTF-8" in err, err


def test_an_s3_key_with_dotdot_is_quarantined_naming_the_key_and_the_rest_ingests(tmp_path, make_settings, s3_server):
    """Row 11a, S3: one listed key with `..` (S3 keys are literal: `NORMAL/sub/../x.jpeg` is not `NORMAL/x.jpeg`)
    used to fail the whole listing ("unsafe S3 key"). Now each such key is quarantined, named, never read."""
    import uuid

    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"medclf-names-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    for cls in ("NORMAL", "PNEUMONIA"):
        for f in _demo(cls, 10):
            client.put_object(Bucket=bucket, Key=f"raw/{cls}/{f.name}", Body=f.read_bytes())
    extra = _demo("NORMAL", 2, skip=10)
    odd = ["raw/NORMAL/sub/../odd.jpeg", "raw/NORMAL/../../escape.jpeg"]
    for key, f in zip(odd, extra, strict=True):
        client.put_object(Bucket=bucket, Key=key, Body=f.read_bytes())
    s = make_settings(
        {
            "ingest": {
                "source": {
                    "kind": "folder",
                    "uri": f"s3://{bucket}/raw",
                    "s3_endpoint_url": s3_server,
                    "patient_id_regex": DEMO_REGEX,
                },
                "max_quarantine_fraction": 0.2,
            }
        }
    )
    out = invoke("ingest", s)
    assert out["images"] == 20 and out["quarantined"] == 2
    q = pd.read_csv(s.paths.reports_dir / "ingest/quarantine.csv")
    assert sorted(q.uri) == sorted(f"s3://{bucket}/{k}" for k in odd), q
    assert all("not read" in r or "escapes its root" in r for r in q.reason), list(q.reason)


def _encode_error() -> Exception:
    try:
        os.fsdecode(b"caf\xe9.jpeg").encode()
    except UnicodeError as err:
        return err
    raise AssertionError("a lone surrogate must not encode")


def _traversal_error() -> Exception:
    from medclf.sources.base import safe_relpath

    try:
        safe_relpath("../x.png", "labels.csv line 2")
    except Exception as err:  # noqa: BLE001 - the SourceError a traversal raises, as a stage would
        return err
    raise AssertionError("'..' out of the root must be refused")


@pytest.mark.parametrize("make", [_encode_error, _traversal_error], ids=["bad-name", "traversal"])
def test_bad_name_and_traversal_errors_are_deterministic_failures(make):
    """Row 11g, wherever such an error still surfaces (a name that cannot be encoded, a path out of its root):
    the documented deterministic-failure code 3, not 1 (the same input fails the same way: never retried)."""
    from medclf.cli import error_record

    record = error_record("ingest", make())
    assert record["exit_code"] == EXIT_STAGE and record["transient"] is False, record
