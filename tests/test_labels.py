"""Issue 22, row 2 (and 11c): label spellings. Labels are trimmed and matched case-insensitively; other
variants go through `ingest.label_aliases`; a near-duplicate class name that nothing resolves is an error.

Real ingest, real chest X-ray JPEGs (data/demo, CC BY 4.0) copied into temporary sources.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medclf.config import ConfigError
from medclf.pipeline import invoke
from medclf.sources.base import SourceError

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "batch1"
DEMO_REGEX = r"^(pt[0-9a-f]{10})_"


def _demo(cls: str, n: int, skip: int = 0) -> list[Path]:
    files = sorted((DEMO / cls).glob("*.jpeg"))[skip : skip + n]
    assert len(files) == n, f"data/demo/batch1/{cls} has fewer than {skip + n} images"
    return files


def _manifest(raw: Path, labels: list[tuple[str, str]]) -> Path:
    """Copy one demo image per (demo class, label) into raw/img/ and write raw/labels.csv listing them."""
    (raw / "img").mkdir(parents=True)
    counts: dict[str, int] = {}
    rows = []
    for cls, label in labels:
        src = _demo(cls, 1, skip=counts.get(cls, 0))[0]
        counts[cls] = counts.get(cls, 0) + 1
        shutil.copy(src, raw / "img" / src.name)
        rows.append({"path": f"img/{src.name}", "label": label, "patient_id": src.name.split("_")[0]})
    pd.DataFrame(rows).to_csv(raw / "labels.csv", index=False)
    return raw / "labels.csv"


VARIANTS = [("PNEUMONIA", "PNEUMONIA")] * 6 + [("PNEUMONIA", "Pneumonia ")] * 3 + [("NORMAL", " normal")] * 9


def _ingest_manifest(make_settings, csv: Path, **ingest):
    s = make_settings({"ingest": {"source": {"kind": "manifest", "uri": str(csv)}, **ingest}})
    return s, invoke("ingest", s)


def test_case_variants_with_classes_null_are_an_error_naming_both_spellings_and_counts(tmp_path, make_settings):
    """The issue's manifest (`PNEUMONIA`, `Pneumonia `, ` normal`) used to give three classes, the variant
    the positive one. Now: an error naming both spellings and how many rows carry each; nothing is written."""
    csv = _manifest(tmp_path / "raw", VARIANTS)
    with pytest.raises(SourceError) as err:
        _ingest_manifest(make_settings, csv)
    msg = str(err.value)
    assert "'PNEUMONIA' (6 images" in msg and "'Pneumonia' (3 images" in msg, msg
    assert "ingest.label_aliases" in msg and "labels.csv line" in msg, msg
    assert getattr(err.value, "transient", None) is False  # deterministic: exit 3, not retried
    assert not (tmp_path / "data/ingest").exists()


def test_label_aliases_fold_the_variants_into_one_class(tmp_path, make_settings):
    csv = _manifest(tmp_path / "raw", VARIANTS + [("NORMAL", "healthy")])
    s, out = _ingest_manifest(
        make_settings, csv, label_aliases={"pneumonia": "PNEUMONIA", "Normal": "NORMAL", " HEALTHY ": "NORMAL"}
    )
    assert out["classes"] == ["NORMAL", "PNEUMONIA"] and out["images"] == 19 and out["quarantined"] == 0
    classes = json.loads((s.paths.ingest_dir / "classes.json").read_text())
    assert classes["classes"] == ["NORMAL", "PNEUMONIA"] and classes["positive_class"] == "PNEUMONIA"
    m = pd.read_parquet(s.paths.ingest_dir / "manifest.parquet")
    assert m.label.value_counts().to_dict() == {"NORMAL": 10, "PNEUMONIA": 9}


def test_with_classes_given_a_label_matching_a_class_after_trim_and_case_folding_maps_to_it(tmp_path, make_settings):
    csv = _manifest(
        tmp_path / "raw",
        [("PNEUMONIA", "pneumonia")] * 5
        + [("PNEUMONIA", " Pneumonia")] * 3
        + [("NORMAL", "NORMAL ")] * 4
        + [("NORMAL", "normal")] * 4,
    )
    s, out = _ingest_manifest(make_settings, csv, classes=["NORMAL", "PNEUMONIA"])
    assert out["images"] == 16 and out["quarantined"] == 0
    m = pd.read_parquet(s.paths.ingest_dir / "manifest.parquet")
    assert m.label.value_counts().to_dict() == {"NORMAL": 8, "PNEUMONIA": 8}
    assert (m.label_index == m.label.map({"NORMAL": 0, "PNEUMONIA": 1})).all()


def test_unknown_label_reason_names_the_manifest_and_its_line(tmp_path, make_settings):
    """Row 11c: the line is the CSV line a user sees in an editor (1-based, the header is line 1)."""
    labels = [("NORMAL", "NORMAL"), ("PNEUMONIA", "PNEUMONIA")] * 6
    labels[4] = ("NORMAL", "tumour?")  # data row 5 = file line 6
    csv = _manifest(tmp_path / "raw", labels)
    s, _ = _ingest_manifest(make_settings, csv, classes=["NORMAL", "PNEUMONIA"], max_quarantine_fraction=0.2)
    q = pd.read_csv(s.paths.reports_dir / "ingest/quarantine.csv")
    assert len(q) == 1, q
    reason = q.reason.iloc[0]
    assert reason.startswith("unknown label 'tumour?'") and f"{csv} line 6" in reason, reason


def test_folder_class_names_differing_only_in_case_are_an_error(tmp_path, make_settings):
    """Class folders are labels too: train/PNEUMONIA and test/Pneumonia (a case-sensitive file system)."""
    raw = tmp_path / "raw"
    for split, _cls, name, files in [
        ("train", "NORMAL", "NORMAL", _demo("NORMAL", 8)),
        ("train", "PNEUMONIA", "PNEUMONIA", _demo("PNEUMONIA", 6)),
        ("test", "NORMAL", "normal ", _demo("NORMAL", 2, skip=8)),
        ("test", "PNEUMONIA", "Pneumonia", _demo("PNEUMONIA", 2, skip=6)),
    ]:
        (raw / split / name).mkdir(parents=True)
        for f in files:
            shutil.copy(f, raw / split / name / f.name)
    s = make_settings({"ingest": {"source": {"kind": "folder", "uri": str(raw), "patient_id_regex": DEMO_REGEX}}})
    with pytest.raises(SourceError) as err:
        invoke("ingest", s)
    msg = str(err.value)
    assert "'PNEUMONIA' (6 images" in msg and "'Pneumonia' (2 images" in msg, msg
    assert "'NORMAL' (8 images" in msg and "'normal' (2 images" in msg, msg
    # the same folders, resolved by declaring the classes: every image lands in its class
    s = make_settings(
        {
            "ingest": {
                "source": {"kind": "folder", "uri": str(raw), "patient_id_regex": DEMO_REGEX},
                "classes": ["NORMAL", "PNEUMONIA"],
            }
        }
    )
    out = invoke("ingest", s)
    assert out["images"] == 18 and out["quarantined"] == 0
    m = pd.read_parquet(s.paths.ingest_dir / "manifest.parquet")
    assert m[m.split == "test"].label.value_counts().to_dict() == {"NORMAL": 2, "PNEUMONIA": 2}
    assert m.label.value_counts().to_dict() == {"NORMAL": 10, "PNEUMONIA": 8}


def test_dicom_manifest_labels_go_through_the_same_rules(tmp_path, make_settings):
    pydicom = pytest.importorskip("pydicom")
    from PIL import Image
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    raw = tmp_path / "dcm"
    raw.mkdir()
    rows = []
    for i, (cls, label) in enumerate(
        [("NORMAL", "Normal")] * 5 + [("PNEUMONIA", "viral  pneumonia")] * 3 + [("PNEUMONIA", "VIRUS")] * 3
    ):
        src = _demo(cls, 1, skip=i)[0]
        pixels = np.asarray(Image.open(src).convert("L"))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.PatientID = src.name.split("_")[0]
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = pixels.tobytes()
        ds.save_as(raw / f"{i}.dcm", enforce_file_format=True)
        rows.append({"path": f"{i}.dcm", "label": label})
    pd.DataFrame(rows).to_csv(raw / "labels.csv", index=False)
    source = {"kind": "dicom", "manifest": str(raw / "labels.csv")}
    s = make_settings(
        {"ingest": {"source": source, "classes": ["NORMAL", "VIRUS"], "label_aliases": {"Viral Pneumonia": "VIRUS"}}}
    )
    out = invoke("ingest", s)
    assert out["images"] == 11 and out["quarantined"] == 0
    m = pd.read_parquet(s.paths.ingest_dir / "manifest.parquet")
    assert m.label.value_counts().to_dict() == {"NORMAL": 5, "VIRUS": 6}


@pytest.mark.parametrize(
    ("ingest", "match"),
    [
        ({"classes": ["NORMAL", "normal "]}, r"ingest\.classes.*'NORMAL'.*'normal '"),
        (
            {"classes": ["NORMAL", "PNEUMONIA"], "label_aliases": {"viral": "VIRUS"}},
            r"ingest\.label_aliases.*'VIRUS' is not one of ingest\.classes",
        ),
        (
            {"label_aliases": {"pneumonia": "PNEUMONIA", "Pneumonia ": "Pneumonia"}},
            r"ingest\.label_aliases.*'pneumonia'.*'Pneumonia '",
        ),
        (
            {"classes": ["NORMAL", "PNEUMONIA"], "label_aliases": {"normal": "PNEUMONIA"}},
            r"ingest\.label_aliases.*class 'NORMAL'",
        ),
    ],
)
def test_ambiguous_classes_and_aliases_are_config_errors_naming_the_key(make_settings, ingest, match):
    with pytest.raises(ConfigError, match=match):
        make_settings({"ingest": ingest})
