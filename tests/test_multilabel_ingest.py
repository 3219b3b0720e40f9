"""Multi-label ingest (issue 25): ODIR-5K's per-eye findings read from a manifest's 0/1 columns, ChestMNIST's 14
findings from a MedMNIST `.npz`, whole patients split by iterative stratification, and the contract downstream
stages read: `<split>_labels.npy` an N×L uint8 0/1 matrix (columns in `task.labels` order), the manifest's `label`
the positive findings joined by ";" ("" for none), `classes.json` with `classes` = `task.labels`, no positive class
and `"task": "multilabel"`, per-finding counts per split in the ingest summary.

The ODIR tests copy a small real subsample of ../shared/data/fundus_odir (40 patients, both eyes) into tmp_path and
run the real ingest stage; the split test runs the pure split function on the whole `labels.csv` (no images).
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medclf.config import Source, load_settings
from medclf.imaging.privacy import redact
from medclf.imaging.splits import SPLITS, assign_splits_multilabel, label_counts, link_groups
from medclf.pipeline import invoke
from medclf.sources import scan_multilabel
from medclf.sources.base import SourceError
from medclf.sources.medmnist import KNOWN, MULTILABEL
from medclf.sources.multilabel import findings_matrix
from tests.conftest import SHARED, write_params

ODIR = SHARED / "data" / "fundus_odir"
FINDINGS = [
    "normal",
    "diabetic_retinopathy",
    "glaucoma",
    "cataract",
    "amd",
    "hypertensive_retinopathy",
    "myopia",
    "other",
]
CHEST = KNOWN["chestmnist"][0]
needs_odir = pytest.mark.skipif(
    not (ODIR / "labels.csv").is_file(), reason=f"{ODIR}/labels.csv absent (../shared/data, see its README)"
)


def _odir_rows() -> list[dict[str, str]]:
    with open(ODIR / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _pick_patients(rows: list[dict[str, str]], per_finding: int = 5) -> dict[str, list[dict[str, str]]]:
    """`per_finding` patients with both eyes for each finding, rarest finding first: 40 patients, 80 eyes."""
    by_patient: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], []).append(r)
    two_eyes = {p: eyes for p, eyes in by_patient.items() if len(eyes) == 2}
    chosen: dict[str, list[dict[str, str]]] = {}
    for finding in sorted(FINDINGS, key=lambda f: sum(r[f] == "1" for r in rows)):
        have = [p for p, eyes in two_eyes.items() if p not in chosen and any(e[finding] == "1" for e in eyes)]
        for p in have[:per_finding]:
            chosen[p] = two_eyes[p]
    return chosen


@pytest.fixture(scope="module")
def odir(tmp_path_factory):
    """The real ingest stage on 80 real ODIR eyes (40 patients), plus two rows with a cell other than 0/1."""
    if not (ODIR / "labels.csv").is_file():
        pytest.skip(f"{ODIR}/labels.csv absent (../shared/data, see its README)")
    rows = _odir_rows()
    chosen = _pick_patients(rows)
    root = tmp_path_factory.mktemp("odir_ml")
    raw = root / "raw"
    (raw / "images").mkdir(parents=True)
    spare = [r for r in rows if r["patient_id"] not in chosen][:2]  # two more real eyes, with bad cells
    spare[0] = {**spare[0], "glaucoma": "2"}
    spare[1] = {**spare[1], "amd": "", "myopia": "yes"}
    written = [eye for eyes in chosen.values() for eye in eyes] + spare
    with open(raw / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for eye in written:
            shutil.copy2(ODIR / eye["path"], raw / eye["path"])
            w.writerow(eye)
    overrides = {
        "ingest": {
            "source": {"kind": "manifest", "uri": str(raw / "labels.csv"), "group_column": "patient_id"},
            "image_size": 32,
            "channels": 3,
            "modality": "fundus",
            "splits": {"val_fraction": 0.2, "test_fraction": 0.2},
        },
        "task": {"type": "multilabel", "labels": FINDINGS},
    }
    settings = load_settings(write_params(root, overrides))
    summary = invoke("ingest", settings)
    return settings, raw, written, summary


def _uri(raw: Path, eye: dict[str, str]) -> str:
    """An eye's `source_uri` as ingest writes it: the patient id in its file name pseudonymised."""
    return redact(str(raw / eye["path"]), eye["patient_id"])


def _split_data(settings, split: str) -> tuple[pd.DataFrame, np.ndarray]:
    m = pd.read_parquet(settings.paths.ingest_dir / "manifest.parquet")
    part = m[(m.status == "ok") & (m.split == split)].sort_values("row")
    return part, np.load(settings.paths.ingest_dir / f"{split}_labels.npy")


@needs_odir
def test_odir_label_matrix_matches_the_csv_row_for_row(odir):
    settings, raw, written, summary = odir
    by_path = {_uri(raw, e): e for e in written}
    seen = 0
    for split in SPLITS:
        part, y = _split_data(settings, split)
        assert y.dtype == np.uint8 and y.shape == (len(part), len(FINDINGS)), (split, y.dtype, y.shape)
        assert list(part.row) == list(range(len(part)))
        for (_, m_row), y_row in zip(part.iterrows(), y, strict=True):
            eye = by_path[m_row.source_uri]
            want = [int(eye[f]) for f in FINDINGS]
            assert y_row.tolist() == want, (split, eye["path"])
            assert m_row.label == ";".join(f for f, v in zip(FINDINGS, want, strict=True) if v)
            assert m_row.label_index == -1
        seen += len(part)
    assert seen == 80 == summary["images"]
    assert summary["patients"] == 40


@needs_odir
def test_odir_classes_json_and_summary_follow_the_contract(odir):
    settings, _, _, summary = odir
    meta = json.loads((settings.paths.ingest_dir / "classes.json").read_text())
    assert meta == {
        "classes": FINDINGS,
        "positive_class": None,
        "image_size": 32,
        "channels": 3,
        "task": "multilabel",
    }
    on_disk = json.loads((settings.paths.reports_dir / "ingest" / "summary.json").read_text())
    assert on_disk["task"] == summary["task"] == "multilabel" and on_disk["classes"] == FINDINGS
    counts = on_disk["label_counts"]
    assert sorted(counts) == sorted(SPLITS)
    for split in SPLITS:
        _, y = _split_data(settings, split)
        assert counts[split] == dict(zip(FINDINGS, y.sum(axis=0).tolist(), strict=True)), split
        assert on_disk["splits"][split] == len(y)
    # every finding has positives in train, and the 5 patients picked per finding give val and test some too
    for f in FINDINGS:
        assert counts["train"][f] > 0 and counts["val"][f] + counts["test"][f] > 0, (f, counts)


@needs_odir
def test_odir_each_patient_in_one_split(odir):
    settings, _, _, _ = odir
    m = pd.read_parquet(settings.paths.ingest_dir / "manifest.parquet")
    ok = m[m.status == "ok"]
    assert ok.patient_hash.notna().all() and ok.groupby("patient_hash").size().eq(2).all()
    crossing = ok.groupby("patient_hash").split.nunique()
    assert crossing.max() == 1, f"patients in two splits: {list(crossing[crossing > 1].index)}"
    assert set(ok.split) == set(SPLITS)


@needs_odir
def test_odir_a_cell_other_than_0_or_1_quarantines_its_row_naming_line_column_and_value(odir):
    settings, raw, written, summary = odir
    q = pd.read_csv(settings.paths.reports_dir / "ingest" / "quarantine.csv")
    assert summary["quarantined"] == 2 and len(q) == 2, q
    manifest = raw / "labels.csv"
    assert sorted(q.reason) == [
        f"label column 'amd' is blank, not 0 or 1; label column 'myopia' is 'yes', not 0 or 1 at {manifest} line 83",
        f"label column 'glaucoma' is '2', not 0 or 1 at {manifest} line 82",
    ], list(q.reason)


# --------------------------------------------------------------------------- refusals (the source, no images)
def _manifest(tmp_path: Path, rows: list[dict[str, object]], name: str = "labels.csv") -> Path:
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _rows(n: int = 6) -> list[dict[str, object]]:
    return [
        {"path": f"images/{i}.jpg", "patient_id": str(100 + i // 2), "a": i % 2, "b": int(i % 3 == 0), "c": 0}
        for i in range(n)
    ]


def test_a_listed_label_column_missing_from_the_manifest_is_named_with_the_columns(tmp_path):
    uri = _manifest(tmp_path, _rows())
    with pytest.raises(SourceError) as err:
        scan_multilabel(Source(kind="manifest", uri=str(uri)), ["a", "glaucoma", "b"])
    msg = str(err.value)
    assert msg.startswith(f"{uri}: no column 'glaucoma' (task.labels) in the header (line 1)"), msg
    assert msg.endswith("columns: path, patient_id, a, b, c"), msg


def test_a_constant_label_column_is_refused_naming_file_column_and_rows(tmp_path):
    rows = _rows()
    uri = _manifest(tmp_path, rows)
    with pytest.raises(SourceError) as err:
        scan_multilabel(Source(kind="manifest", uri=str(uri)), ["a", "c"])
    msg = str(err.value)
    assert msg.startswith(f"{uri}: label column 'c' (task.labels) is 0 in all 6 rows (lines 2-7)"), msg
    assert "no image carries it" in msg and "drop it from task.labels" in msg, msg
    for r in rows:
        r["c"] = 1
    uri = _manifest(tmp_path, rows, "ones.csv")
    with pytest.raises(SourceError, match=r"ones\.csv: label column 'c' \(task.labels\) is 1 in all 6 rows"):
        scan_multilabel(Source(kind="manifest", uri=str(uri)), ["a", "c"])
    # the rows with a bad cell do not count: a column varying only thanks to them is still constant
    rows[0]["a"], rows[0]["b"] = 1, 7
    rows = [r | {"b": 0} if i else r for i, r in enumerate(rows)]
    uri = _manifest(tmp_path, rows, "bad_cell.csv")
    with pytest.raises(SourceError) as err:
        scan_multilabel(Source(kind="manifest", uri=str(uri)), ["a", "b"])
    assert "label column 'b' (task.labels) is 0 in all 5 rows with 0/1 cells (of 6, lines 2-7" in str(err.value)


def test_manifest_findings_become_joined_labels_and_the_group_its_patient(tmp_path):
    rows = _rows()
    uri = _manifest(tmp_path, rows)
    got = scan_multilabel(Source(kind="manifest", uri=str(uri)), ["b", "a"])
    assert not got.quarantine
    assert [r.label for r in got.records] == ["b", "a", "", "b;a", "", "a"]  # task.labels order; "" is legal
    assert [r.patient_id for r in got.records] == ["100", "100", "101", "101", "102", "102"]
    assert [r.where for r in got.records] == [f"{uri} line {i}" for i in range(2, 8)]
    np.testing.assert_array_equal(
        findings_matrix([r.label for r in got.records], ["b", "a"]), [[1, 0], [0, 1], [0, 0], [1, 1], [0, 0], [0, 1]]
    )
    # Parquet: bool and float columns read as 0/1 too (a float column with 1.0 from a blank-free export)
    df = pd.DataFrame(rows).astype({"a": bool, "b": float})
    df.to_parquet(tmp_path / "labels.parquet")
    again = scan_multilabel(Source(kind="manifest", uri=str(tmp_path / "labels.parquet")), ["b", "a"])
    assert [r.label for r in again.records] == [r.label for r in got.records]


def test_single_label_settings_are_refused_for_a_multilabel_task(tmp_path):
    uri = _manifest(tmp_path, _rows())
    with pytest.raises(SourceError, match=r"source\.label_column 'dr_grade' names a single label column"):
        scan_multilabel(Source(kind="manifest", uri=str(uri), label_column="dr_grade"), ["a", "b"])
    with pytest.raises(SourceError, match=r"ingest\.label_aliases \['x'\] maps label spellings"):
        scan_multilabel(Source(kind="manifest", uri=str(uri)), ["a", "b"], label_aliases={"x": "a"})
    with pytest.raises(SourceError, match=r"'folder' source gives one label per image"):
        scan_multilabel(Source(kind="folder", uri=str(tmp_path)), ["a", "b"])
    with pytest.raises(SourceError, match=r"task\.labels: 'a;b' cannot name a finding"):
        scan_multilabel(Source(kind="manifest", uri=str(uri)), ["a;b", "c"])


def test_binary_manifests_are_read_as_before(tmp_path):
    """Without task.labels the manifest source is the single-label one: `label` required, 0/1 columns ignored."""
    from medclf.sources import scan

    rows = [r | {"label": "NORMAL" if r["a"] else "PNEUMONIA"} for r in _rows()]
    uri = _manifest(tmp_path, rows)
    got = scan(Source(kind="manifest", uri=str(uri)))
    assert [r.label for r in got.records] == [str(r["label"]) for r in rows]
    with pytest.raises(SourceError, match=r"no column 'label' \(source\.label_column\)"):
        scan(Source(kind="manifest", uri=str(_manifest(tmp_path, _rows(), "nolabel.csv"))))


# --------------------------------------------------------------------------- the split (pure, the full ODIR table)
@needs_odir
def test_iterative_stratification_keeps_each_findings_share_close_on_the_full_odir_table():
    df = pd.read_csv(ODIR / "labels.csv", dtype=str, keep_default_na=False)
    y = df[FINDINGS].astype(int).to_numpy()
    groups = link_groups([[p] for p in df.patient_id])
    fractions = {"train": 0.65, "val": 0.15, "test": 0.2}
    out = assign_splits_multilabel(groups, y, [None] * len(df), 0.15, 0.2, seed=42)
    assert out == assign_splits_multilabel(groups, y, [None] * len(df), 0.15, 0.2, seed=42)  # seeded
    assert out != assign_splits_multilabel(groups, y, [None] * len(df), 0.15, 0.2, seed=43)
    patients = pd.DataFrame({"patient": df.patient_id, "split": out}).groupby("patient").split.nunique()
    assert patients.max() == 1, f"patients in two splits: {list(patients[patients > 1].index)[:5]}"
    counts, total = label_counts(y, out, FINDINGS), y.sum(axis=0)
    for split, frac in fractions.items():
        assert abs(out.count(split) - frac * len(df)) <= 0.01 * len(df), (split, out.count(split))
        for f, t in zip(FINDINGS, total, strict=True):  # within 3 images of the fraction (random: tens)
            assert abs(counts[split][f] - frac * t) <= 3, (split, f, counts[split][f], frac * t)


def test_iterative_stratification_keeps_groups_whole_and_fixed_splits_fixed():
    rng = np.random.default_rng(0)
    groups = [g for g in range(120) for _ in range(1 + g % 3)]  # 1 to 3 images a patient
    y = (rng.random((len(groups), 4)) < [0.5, 0.2, 0.1, 0.05]).astype(np.uint8)
    y[:, 3] = 0
    y[[i for i, g in enumerate(groups) if g % 10 == 0], 3] = 1  # a rare finding, on whole patients
    fixed: list[str | None] = [("test" if g >= 110 else None) for g in groups]
    out = assign_splits_multilabel(groups, y, fixed, 0.2, 0.1, seed=1)
    assert all(s == "test" for s, f in zip(out, fixed, strict=True) if f == "test")  # official test kept
    assert "test" not in {s for s, f in zip(out, fixed, strict=True) if f is None}  # and not carved again
    per_group = {g: {s for s, gg in zip(out, groups, strict=True) if gg == g} for g in set(groups)}
    assert all(len(s) == 1 for s in per_group.values()), "a patient's images in two splits"
    rare = Counter(s for s, row in zip(out, y, strict=True) if row[3])
    assert rare["val"] > 0 and rare["train"] > rare["val"], rare
    none = assign_splits_multilabel(groups, np.zeros_like(y), [None] * len(groups), 0.2, 0.1, seed=1)
    assert set(none) == set(SPLITS)  # all-zero rows are legal and still split by size


# --------------------------------------------------------------------------- ChestMNIST (a tiny local .npz)
def _chest_npz(path: Path, n: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """MedMNIST's layout: `<split>_images` (N, 28, 28) uint8, `<split>_labels` (N, 14) uint8 0/1."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, count in n.items():
        arrays[f"{split}_images"] = rng.integers(0, 255, (count, 28, 28), dtype=np.uint8)
        labels = (rng.random((count, 14)) < 0.3).astype(np.uint8)
        labels[: count // 4] = 0  # "no finding" images, as most of ChestMNIST
        arrays[f"{split}_labels"] = labels
    np.savez(path, **arrays)
    return arrays


def test_chestmnist_flag_carries_medmnist_names_and_md5s(tmp_path):
    from medclf.sources import medmnist

    assert CHEST == [
        "atelectasis",
        "cardiomegaly",
        "effusion",
        "infiltration",
        "mass",
        "nodule",
        "pneumonia",
        "pneumothorax",
        "consolidation",
        "edema",
        "emphysema",
        "fibrosis",
        "pleural",
        "hernia",
    ]
    assert {"chestmnist"} == MULTILABEL and KNOWN["chestmnist"][1][28] == "02c8a6516a18b556561a56cbdd36c4a8"
    assert sorted(KNOWN["chestmnist"][1]) == [28, 64, 128, 224]
    # the real download path: fetched (here from a file:// URL) and checked against MedMNIST's MD5
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "chestmnist.npz").write_bytes(b"not the real file")
    with pytest.raises(SourceError, match="MD5 mismatch .*expected 02c8a6516a18b556561a56cbdd36c4a8"):
        medmnist.download(
            "chestmnist", 28, tmp_path / "cache", url_template=f"file://{tmp_path}/srv/{{flag}}{{suffix}}.npz"
        )


def test_chestmnist_npz_ingests_as_an_n_by_l_matrix_of_the_picked_findings(tmp_path):
    arrays = _chest_npz(tmp_path / "chestmnist.npz", {"train": 40, "val": 12, "test": 12})
    picked = ["effusion", "atelectasis", "hernia"]  # some of the 14, in the task's own order
    cols = [CHEST.index(f) for f in picked]
    overrides = {
        "ingest": {
            "source": {"kind": "medmnist", "uri": str(tmp_path / "chestmnist.npz"), "medmnist_flag": "chestmnist"},
            "image_size": 28,
            "channels": 1,
        },
        "task": {"type": "multilabel", "labels": picked},
    }
    settings = load_settings(write_params(tmp_path, overrides))
    out = invoke("ingest", settings)
    assert out["splits"] == {"train": 40, "val": 12, "test": 12} and out["task"] == "multilabel"
    m = pd.read_parquet(settings.paths.ingest_dir / "manifest.parquet").set_index("source_uri")
    for split in SPLITS:  # the official splits, every image in its own row
        y = np.load(settings.paths.ingest_dir / f"{split}_labels.npy")
        want = arrays[f"{split}_labels"][:, cols]
        assert y.dtype == np.uint8
        for i in range(len(want)):
            row = m.loc[f"{tmp_path / 'chestmnist.npz'}#{split}/{i}"]
            assert y[row.row].tolist() == want[i].tolist(), (split, i)
            assert row.label == ";".join(f for f, v in zip(picked, want[i], strict=True) if v)
        assert out["label_counts"][split] == dict(zip(picked, want.sum(axis=0).tolist(), strict=True))
    meta = json.loads((settings.paths.ingest_dir / "classes.json").read_text())
    assert meta["classes"] == picked and meta["positive_class"] is None and meta["task"] == "multilabel"


def test_chestmnist_refusals_name_file_split_row_and_column(tmp_path):
    path = tmp_path / "chestmnist.npz"
    arrays = _chest_npz(path, {"train": 20, "val": 6})
    src = Source(kind="medmnist", uri=str(path), medmnist_flag="chestmnist")
    arrays["val_labels"][4, 2] = 3
    np.savez(path, **arrays)
    with pytest.raises(SourceError) as err:
        scan_multilabel(src, ["effusion", "edema"])
    assert str(err.value).startswith(f"{path}: val_labels row 4 column 2 ('effusion') is 3, not 0 or 1"), err.value
    arrays["val_labels"][4, 2] = 1
    arrays["train_labels"][:, 13] = 0
    arrays["val_labels"][:, 13] = 0
    np.savez(path, **arrays)
    with pytest.raises(SourceError, match=r"finding 'hernia' is 0 in all 26 rows of train_labels, val_labels"):
        scan_multilabel(src, ["effusion", "hernia"])
    with pytest.raises(SourceError, match=r"task.labels \['pleural_thickening'\] are not among the file's findings"):
        scan_multilabel(src, ["effusion", "pleural_thickening"])
    from medclf.sources import scan

    with pytest.raises(SourceError, match=r"MedMNIST chestmnist is multi-label .*set task.type: multilabel"):
        scan(src)
    with pytest.raises(SourceError, match=r"MedMNIST dermamnist is single-label"):
        scan_multilabel(Source(kind="medmnist", uri=str(path), medmnist_flag="dermamnist"), ["a", "b"])


def test_a_row_refused_while_listing_names_its_file_without_the_patient_id(tmp_path):
    """ODIR names files by patient (`1006_left.jpg`): quarantine.csv lists a refused row by its path with the
    patient id pseudonymised, as ingest names every decoded file (it was written in the clear)."""
    from medclf.imaging.privacy import hash_patient

    rows = [
        {"path": f"images/{100 + i // 2}_{'left' if i % 2 else 'right'}.jpg", "patient_id": str(100 + i // 2)}
        | {"a": i % 2, "b": int(i % 3 == 0)}
        for i in range(6)
    ]
    rows[3]["b"] = 7  # a bad cell: patient 101's left eye
    rows[4]["split"] = "holdout"  # an unknown split: patient 102's right eye
    rows = [r | {"split": r.get("split", "")} for r in rows]
    got = scan_multilabel(Source(kind="manifest", uri=str(_manifest(tmp_path, rows))), ["a", "b"])
    uris = dict(got.quarantine)
    assert len(uris) == 2 and not any(pid in u for u in uris for pid in ("101", "102")), uris
    assert any(u.endswith(f"{hash_patient('101')}_left.jpg") for u in uris), uris
    assert any(u.endswith(f"{hash_patient('102')}_right.jpg") for u in uris), uris
