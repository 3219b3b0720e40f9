"""Multi-class and ordinal sources: configurable manifest label/group columns (HAM10000's `dx` and `lesion_id`,
a DR table's `dr_grade`), and MedMNIST's multi-class and ordinal flags with INFO's class names."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medclf.config import Source
from medclf.pipeline import invoke
from medclf.sources import scan
from medclf.sources.base import SourceError
from medclf.sources.manifest import scan_manifest
from medclf.sources.medmnist import KNOWN
from tests.conftest import SHARED

RETINA_DEV = SHARED / "data" / "retina_mnist" / "retinamnist_dev.npz"
DX = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 200, (32, 32), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _ham_manifest(raw: Path, lesions: int = 21, per_lesion: int = 2) -> Path:
    """HAM10000-shaped metadata.csv: `path, lesion_id, dx, sex`, several images per lesion, three lesions a class."""
    rows = []
    for lesion in range(lesions):
        dx = DX[lesion % len(DX)]
        (raw / dx).mkdir(parents=True, exist_ok=True)
        for k in range(per_lesion):
            rel = f"{dx}/ISIC_{lesion:03d}{k}.png"
            (raw / rel).write_bytes(_png(lesion * 10 + k))
            rows.append({"path": rel, "lesion_id": f"HAM_{lesion:07d}", "dx": dx, "sex": "FM"[lesion % 2]})
    pd.DataFrame(rows).to_csv(raw / "metadata.csv", index=False)
    return raw / "metadata.csv"


def _ham_source(uri: Path, **over: object) -> Source:
    return Source(kind="manifest", uri=str(uri), label_column="dx", group_column="lesion_id", **over)


def test_manifest_reads_the_configured_label_and_group_columns(tmp_path):
    uri = _ham_manifest(tmp_path / "raw")
    got = scan(_ham_source(uri))
    assert len(got.records) == 42 and not got.quarantine
    assert sorted({r.label for r in got.records}) == DX
    by_path = {r.uri.rsplit("/", 2)[-2] + "/" + r.uri.rsplit("/", 1)[-1]: r for r in got.records}
    assert by_path["bkl/ISIC_0021.png"].label == "bkl"
    assert by_path["bkl/ISIC_0021.png"].patient_id == "HAM_0000002"
    assert by_path["bkl/ISIC_0020.png"].patient_id == "HAM_0000002"


def test_a_missing_configured_column_names_the_file_the_line_and_the_column(tmp_path):
    uri = _ham_manifest(tmp_path / "raw")
    with pytest.raises(SourceError) as err:
        scan(Source(kind="manifest", uri=str(uri), label_column="diagnosis", group_column="lesion_id"))
    msg = str(err.value)
    assert "metadata.csv" in msg and "'diagnosis'" in msg and "label_column" in msg and "line 1" in msg, msg
    assert "columns: path, lesion_id, dx, sex" in msg, msg
    with pytest.raises(SourceError, match=r"metadata\.csv: no column 'lesion' \(source\.group_column\)"):
        scan(Source(kind="manifest", uri=str(uri), label_column="dx", group_column="lesion"))
    # the default label column is required too; the default group column (`patient_id`) stays optional
    with pytest.raises(SourceError, match=r"no column 'label' \(source\.label_column\)"):
        scan(Source(kind="manifest", uri=str(uri)))
    assert len(scan(Source(kind="manifest", uri=str(uri), label_column="dx")).records) == 42


def test_the_configured_columns_are_not_subgroups(tmp_path):
    uri = _ham_manifest(tmp_path / "raw")
    for col, what in (("dx", "label"), ("lesion_id", "group")):
        with pytest.raises(SourceError, match=rf"'{col}' cannot be a subgroup .*{what} \(source\."):
            scan(_ham_source(uri), subgroups=[col])
    assert {r.subgroups["sex"] for r in scan(_ham_source(uri), subgroups=["sex"]).records} == {"F", "M"}


def test_label_and_group_columns_cannot_collide():
    with pytest.raises(ValueError, match="both 'dx'"):
        Source(kind="manifest", uri="m.csv", label_column="dx", group_column="dx")
    with pytest.raises(ValueError, match="source.label_column: 'path'"):
        Source(kind="manifest", uri="m.csv", label_column="path")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_integer_grades_become_labels_0_to_4(tmp_path, fmt):
    """`dr_grade` 0..4 reads as "0".."4" from CSV and from Parquet, also where a blank cell made the column float
    (2.0 -> "2", never "2.0"); a blank grade is a missing label, quarantined with its line."""
    raw = tmp_path / "raw"
    raw.mkdir()
    grades: list[float | None] = [0, 1, 2, 3, 4, 2, None]
    for i in range(len(grades)):
        (raw / f"{i}.png").write_bytes(_png(i))
    df = pd.DataFrame({"path": [f"{i}.png" for i in range(len(grades))], "dr_grade": grades})
    df["patient_id"] = [f"{1000 + i // 2}" for i in range(len(grades))]
    if fmt == "csv":
        df["dr_grade"] = df["dr_grade"].astype("Int64")  # integers as a DR table stores them, one blank cell
        df.to_csv(raw / "labels.csv", index=False)
        uri = raw / "labels.csv"
        assert (raw / "labels.csv").read_text().splitlines()[1].split(",")[1] == "0"
    else:
        df["patient_id"] = df["patient_id"].astype(int).astype(float)  # numeric ids: no "1000.0" either
        df.to_parquet(raw / "labels.parquet")
        uri = raw / "labels.parquet"
        assert pd.read_parquet(uri)["dr_grade"].dtype == np.float64
    got = scan(Source(kind="manifest", uri=str(uri), label_column="dr_grade"))
    assert [r.label for r in got.records] == ["0", "1", "2", "3", "4", "2"]
    assert [r.patient_id for r in got.records] == ["1000", "1000", "1001", "1001", "1002", "1002"]
    assert len(got.quarantine) == 1 and f"{uri.name} line 8" in got.quarantine[0][1], got.quarantine
    assert "missing label" in got.quarantine[0][1]


def test_float_like_grade_text_reads_as_its_integer(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(0))
    (tmp_path / "b.png").write_bytes(_png(1))
    (tmp_path / "m.csv").write_text("path,grade\na.png,3.0\nb.png, 1 \n")
    got = scan_manifest(str(tmp_path / "m.csv"), None, kind="image", label_column="grade")
    assert [r.label for r in got.records] == ["3", "1"]


def test_a_lesion_with_several_images_lands_in_one_split(tmp_path, make_settings):
    """The real ingest stage: the HAM10000 layout, 3 images a lesion, grouped by `lesion_id`."""
    uri = _ham_manifest(tmp_path / "raw", lesions=42, per_lesion=3)
    s = make_settings(
        {
            "ingest": {
                "source": {"kind": "manifest", "uri": str(uri), "label_column": "dx", "group_column": "lesion_id"},
                "image_size": 32,
                "channels": 3,
                "modality": "dermoscopy",
            },
            "task": {"type": "multiclass"},
        }
    )
    out = invoke("ingest", s)
    assert out["classes"] == DX and out["images"] == 126 and out["patients"] == 42, out
    m = pd.read_parquet(s.paths.ingest_dir / "manifest.parquet")
    ok = m[m.status == "ok"]
    assert len(ok) == 126 and ok.patient_hash.notna().all()
    assert ok.groupby("patient_hash").size().eq(3).all()
    assert ok.groupby("patient_hash").split.nunique().max() == 1, "a lesion crosses splits"
    assert set(ok.split) == {"train", "val", "test"}
    assert not m.astype(str).apply(lambda c: c.str.contains("HAM_", regex=False)).any().any(), "raw lesion id"


def _fake_medmnist(path: Path, k: int, n: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny .npz with MedMNIST's keys: `<split>_images` (N, 28, 28, 3) uint8, `<split>_labels` (N, 1) uint8."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, count in n.items():
        arrays[f"{split}_images"] = rng.integers(0, 255, (count, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % k).astype(np.uint8)[:, None]
    np.savez(path, **arrays)
    return arrays


def test_medmnist_known_flags_carry_medmnist_class_names():
    assert KNOWN["dermamnist"][0] == [
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    ]
    assert KNOWN["retinamnist"][0] == ["0", "1", "2", "3", "4"]
    assert KNOWN["octmnist"][0] == ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"]
    assert KNOWN["breastmnist"][0] == ["malignant", "normal, benign"]
    sizes = {"pathmnist": 9, "bloodmnist": 8, "tissuemnist": 8, "organamnist": 11, "organcmnist": 11}
    assert {f: len(KNOWN[f][0]) for f in sizes} == sizes and len(KNOWN["organsmnist"][0]) == 11
    for flag, (names, md5) in KNOWN.items():
        assert len(set(names)) == len(names), flag
        assert sorted(md5) == [28, 64, 128, 224] and all(len(h) == 32 for h in md5.values()), flag


def test_medmnist_multiclass_npz_named_by_its_flag_gets_medmnist_class_names(tmp_path, make_settings):
    arrays = _fake_medmnist(tmp_path / "dermamnist.npz", 7, {"train": 42, "val": 14, "test": 14})
    source = Source(kind="medmnist", uri=str(tmp_path / "dermamnist.npz"), medmnist_flag="dermamnist")
    got = scan(source)
    assert got.class_names == KNOWN["dermamnist"][0]
    first = {r.uri.rsplit("#", 1)[1]: r.label for r in got.records}
    assert first["train/4"] == "melanoma" and first["val/5"] == "melanocytic nevi"
    assert first["test/0"] == "actinic keratoses and intraepithelial carcinoma"
    s = make_settings(
        {
            "ingest": {
                "source": {"kind": "medmnist", "uri": source.uri, "medmnist_flag": "dermamnist"},
                "image_size": 28,
                "channels": 3,
                "modality": "dermoscopy",
            },
            "task": {"type": "multiclass"},
        }
    )
    out = invoke("ingest", s)
    assert out["classes"] == KNOWN["dermamnist"][0]
    assert out["splits"] == {split: len(arrays[f"{split}_labels"]) for split in ("train", "val", "test")}


def test_medmnist_download_refuses_a_size_without_an_md5(tmp_path, monkeypatch):
    from medclf.sources import medmnist

    monkeypatch.setitem(medmnist.KNOWN, "octmnist", (KNOWN["octmnist"][0], {28: KNOWN["octmnist"][1][28]}))
    with pytest.raises(SourceError, match=r"octmnist \(64px\): no MD5 .* not downloaded unchecked"):
        medmnist.download("octmnist", 64, tmp_path / "cache", url_template="http://127.0.0.1:9/{flag}{suffix}")
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif(not RETINA_DEV.exists(), reason=f"{RETINA_DEV} is absent (the shared RetinaMNIST development part)")
def test_retinamnist_dev_reads_as_five_grades():
    with np.load(RETINA_DEV) as npz:
        want = {split: npz[f"{split}_labels"].reshape(-1) for split in ("train", "val", "test")}
    got = scan(Source(kind="medmnist", uri=str(RETINA_DEV), medmnist_flag="retinamnist"))
    assert got.class_names == ["0", "1", "2", "3", "4"]
    assert {r.label for r in got.records} == {"0", "1", "2", "3", "4"}
    for split, y in want.items():
        labels = [r.label for r in got.records if r.split == split]
        assert labels == [str(int(v)) for v in y], split
    # without the flag the grades read the same, as their integers
    plain = scan(Source(kind="medmnist", uri=str(RETINA_DEV)))
    assert [r.label for r in plain.records] == [r.label for r in got.records]


def test_folder_label_regex_reads_the_class_from_the_file_name(tmp_path):
    """The Kermany chest X-rays as 3 classes with params only: `source.label_regex` takes the label from the name
    where it matches (`person*_bacteria_*`, `person*_virus_*`), the folder's name elsewhere (NORMAL)."""
    for rel in ("NORMAL/IM-0001-0001.jpeg", "PNEUMONIA/person1_bacteria_1.jpeg", "PNEUMONIA/person2_virus_3.jpeg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(_png(len(rel)))
    src = Source(
        kind="folder", uri=str(tmp_path), patient_id_regex=r"^(person\d+|IM-\d+)", label_regex="_(bacteria|virus)_"
    )
    got = {r.uri.rsplit("/", 1)[-1]: (r.label, r.patient_id) for r in scan(src).records}
    assert got == {
        "IM-0001-0001.jpeg": ("NORMAL", "IM-0001"),
        "person1_bacteria_1.jpeg": ("bacteria", "person1"),
        "person2_virus_3.jpeg": ("virus", "person2"),
    }
    plain = {r.label for r in scan(Source(kind="folder", uri=str(tmp_path))).records}
    assert plain == {"NORMAL", "PNEUMONIA"}


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"kind": "folder", "uri": "x", "label_regex": "_(virus"}, "source.label_regex: '_(virus' is not a valid"),
        ({"kind": "folder", "uri": "x", "patient_id_regex": "[a-"}, "source.patient_id_regex: '[a-' is not a valid"),
        ({"kind": "manifest", "uri": "x.csv", "label_regex": "_(virus)_"}, "applies to folder sources only"),
    ],
)
def test_a_bad_label_or_patient_regex_is_a_config_error_naming_the_key(over, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=re.escape(message)):
        Source(**over)
