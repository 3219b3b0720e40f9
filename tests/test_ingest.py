"""ingest: sources, deliberate mode conversions, quarantine of bad input, splits, privacy, atomicity."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medclf.infra.catalog import load_split
from medclf.pipeline import invoke
from medclf.sources.base import SourceError
from medclf.stages.ingest import IngestError
from tests.conftest import CHEST_XRAY, KERMANY_REGEX


def _png(arr: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format=fmt) if mode else Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _texture(seed: int, size: int = 40, bright: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 120, (size, size), dtype=np.uint8)
    if bright:
        base[size // 4 : size // 2, size // 4 : size // 2] = 250
    return base


def make_folder(root: Path, per_class: int = 12, splits: bool = False) -> Path:
    """A class-folder dataset with patient ids in file names (two images per patient)."""
    for c, cls in enumerate(["NORMAL", "PNEUMONIA"]):
        for i in range(per_class):
            split = "" if not splits else ("test/" if (i // 2) % 4 == 0 else "train/")
            d = root / f"{split}{cls}"
            d.mkdir(parents=True, exist_ok=True)
            name = f"person{c}{i // 2:03d}_bacteria_{i}.png" if c else f"IM-{i // 2:04d}-{i}.png"
            (d / name).write_bytes(_png(_texture(c * 1000 + i, bright=bool(c))))
    return root


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
            h.update(str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()


def folder_settings(make_settings, root: Path, **over):
    ing = {"source": {"kind": "folder", "uri": str(root), "patient_id_regex": KERMANY_REGEX}}
    ing.update(over)
    return make_settings({"ingest": ing})


def test_synthetic_default_is_patient_disjoint_and_deterministic(make_settings):
    s = make_settings()
    r1 = invoke("ingest", s)
    m1 = pd.read_parquet(s.paths.ingest_dir / "manifest.parquet")
    x1, _ = load_split(s.paths, "train", mmap=False)
    assert r1["images"] == 80 and set(r1["splits"]) == {"train", "val", "test"}
    ok = m1[m1.status == "ok"]
    per_patient = ok.groupby("patient_hash")["split"].nunique()
    assert per_patient.max() == 1, "a patient appears in more than one split"
    invoke("ingest", s)
    m2 = pd.read_parquet(s.paths.ingest_dir / "manifest.parquet")
    x2, _ = load_split(s.paths, "train", mmap=False)
    pd.testing.assert_frame_equal(m1, m2)
    assert np.array_equal(x1, x2)
    assert x1.dtype == np.uint8 and x1.shape[1:] == (32, 32, 1)


def test_folder_source_modes_are_converted_deliberately(tmp_path, make_settings):
    root = make_folder(tmp_path / "raw")
    d = root / "NORMAL"
    g16 = (np.linspace(0, 4095, 40 * 40).reshape(40, 40)).astype(np.uint16)  # 12-bit data in 16 bits
    (d / "IM-0900-1.png").write_bytes(_png(g16))
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 128
    (d / "IM-0901-1.png").write_bytes(_png(rgba, "RGBA"))
    pal = Image.fromarray(_texture(5)).convert("P")
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    (d / "IM-0902-1.png").write_bytes(buf.getvalue())
    cmyk = Image.fromarray(np.dstack([_texture(6)] * 3)).convert("CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG")
    (d / "IM-0903-1.jpg").write_bytes(buf.getvalue())
    (d / "IM-0904-1.bmp").write_bytes(_png(_texture(7), fmt="BMP"))
    (d / "IM-0905-1.tif").write_bytes(_png(_texture(8), fmt="TIFF"))
    s = folder_settings(make_settings, root, max_quarantine_fraction=0.0)
    out = invoke("ingest", s)
    assert out["quarantined"] == 0 and out["images"] == 30
    m = pd.read_parquet(s.paths.ingest_dir / "manifest.parquet")
    from medclf.imaging.privacy import hash_patient

    row = m[m.patient_hash == hash_patient("IM-0900")].iloc[0]
    x, _ = load_split(s.paths, row.split)
    img = x[row.row]
    # 16-bit ramp is scaled (not clipped): the full 0..255 range survives the resize.
    assert img.max() >= 250 and img.min() <= 5
    row = m[m.patient_hash == hash_patient("IM-0901")].iloc[0]
    rgba_img = load_split(s.paths, row.split)[0][row.row]
    # 200 red at alpha 0.5 over black -> ~100 red -> luma ~30 (not 255-ish: no white compositing).
    assert 20 <= int(rgba_img[16, 16, 0]) <= 40


BAD_INPUTS = {
    "corrupt.png": (b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20, "corrupt"),
    "truncated.jpg": (None, "truncated"),
    "empty.png": (b"", "zero-byte file"),
    "notes.txt": (b"this is not an image\n", "not an image"),
}


def test_bad_inputs_are_quarantined_with_reasons(tmp_path, make_settings):
    root = make_folder(tmp_path / "raw", per_class=20)
    jpeg = _png(np.dstack([_texture(3)] * 3), fmt="JPEG")
    for name, (data, _) in BAD_INPUTS.items():
        (root / "NORMAL" / name).write_bytes(data if data is not None else jpeg[: len(jpeg) // 2])
    (root / "EMPTYCLASS").mkdir()
    before = tree_digest(root)
    s = folder_settings(make_settings, root, max_quarantine_fraction=0.5, classes=["NORMAL", "PNEUMONIA"])
    out = invoke("ingest", s)
    q = pd.read_csv(s.paths.reports_dir / "ingest/quarantine.csv")
    for name, (_, reason) in BAD_INPUTS.items():
        hit = q[q.uri.str.endswith(name)]
        assert len(hit) == 1, f"{name} not quarantined"
        assert reason in hit.reason.iloc[0], (name, hit.reason.iloc[0])
    assert q.reason.str.contains("empty class folder 'EMPTYCLASS'").any()
    assert out["images"] == 40
    assert tree_digest(root) == before, "ingest modified the raw data"


def test_decompression_bomb_and_limit_summary(tmp_path, make_settings):
    root = make_folder(tmp_path / "raw", per_class=4)
    (root / "NORMAL" / "IM-0999-1.png").write_bytes(_png(np.zeros((400, 400), np.uint8)))
    s = folder_settings(make_settings, root, max_image_pixels=100_000, max_quarantine_fraction=0.0)
    with pytest.raises(IngestError) as err:
        invoke("ingest", s)
    msg = str(err.value)
    assert "1 of 9 inputs" in msg and "decompression bomb" in msg and "-1.png" in msg
    assert "max_quarantine_fraction" in msg


def _manifest_images(raw: Path, n: int = 12) -> list[dict[str, str]]:
    """`n` textured PNGs under raw/img/ and their manifest rows (two classes, one patient each)."""
    (raw / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        (raw / "img" / f"{i}.png").write_bytes(_png(_texture(i)))
        rows.append({"path": f"img/{i}.png", "label": ["benign", "malignant"][i % 2], "patient_id": f"P{i}"})
    return rows


def test_unknown_and_missing_labels_from_manifest(tmp_path, make_settings):
    raw = tmp_path / "raw"
    rows = _manifest_images(raw)
    rows[0]["label"] = "tumour?"
    rows[1]["label"] = ""
    for i, row in enumerate(rows):
        row["sex"] = "FM"[i % 3 % 2]  # a declared subgroup (ingest.subgroups) travels into ingest's manifest
    pd.DataFrame(rows).to_csv(raw / "labels.csv", index=False)
    s = make_settings(
        {
            "ingest": {
                "source": {"kind": "manifest", "uri": str(raw / "labels.csv")},
                "classes": ["benign", "malignant"],
                "max_quarantine_fraction": 0.5,
                "subgroups": ["sex"],
            }
        }
    )
    invoke("ingest", s)
    m = pd.read_parquet(s.paths.ingest_dir / "manifest.parquet")
    by_file = dict(zip(m.source_uri.str.extract(r"img/(\d+)\.png")[0].astype(int), m.subgroup_sex, strict=True))
    assert by_file == {i: "FM"[i % 3 % 2] for i in range(len(rows)) if i != 1}  # 1 (no label) is not listed
    q = pd.read_csv(s.paths.reports_dir / "ingest/quarantine.csv")
    assert q[q.uri.str.endswith("img/0.png")].reason.iloc[0].startswith("unknown label 'tumour?'")
    assert "missing label" in q[q.uri.str.endswith("img/1.png")].reason.iloc[0]
    m = pd.read_parquet(s.paths.ingest_dir / "manifest.parquet")
    assert not m.astype(str).apply(lambda c: c.str.contains(r"\bP\d+\b", regex=True)).any().any()


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/passwd", "img/../../x.png"])
def test_manifest_path_traversal_is_rejected(tmp_path, make_settings, bad):
    """The row is refused, never read, and quarantined naming the manifest line (issue 22, row 11a: it used to
    fail the whole manifest; tests/test_names.py has a manifest whose other rows ingest)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    pd.DataFrame([{"path": bad, "label": "a"}]).to_csv(raw / "m.csv", index=False)
    s = make_settings({"ingest": {"source": {"kind": "manifest", "uri": str(raw / "m.csv")}}})
    with pytest.raises(IngestError, match=r"path .*(escapes its root|is absolute).* \(listed at .*m\.csv line 2\)"):
        invoke("ingest", s)


def test_empty_folder_and_missing_source(tmp_path, make_settings):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no class sub-folders"):
        invoke("ingest", folder_settings(make_settings, tmp_path / "empty"))
    with pytest.raises(SourceError, match="no such directory"):
        invoke("ingest", folder_settings(make_settings, tmp_path / "nope"))


def test_killed_ingest_leaves_previous_outputs_intact(tmp_path, make_settings, monkeypatch):
    s = make_settings()
    invoke("ingest", s)
    before = {p.name: p.read_bytes() for p in s.paths.ingest_dir.iterdir()}

    def boom(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", boom)
    with pytest.raises(KeyboardInterrupt):
        invoke("ingest", make_settings({"ingest": {"image_size": 48}}))
    after = {p.name: p.read_bytes() for p in s.paths.ingest_dir.iterdir()}
    assert before == after
    leftovers = [p for p in s.paths.ingest_dir.parent.iterdir() if "staging" in p.name]
    assert leftovers == []


def test_official_splits_kept_and_missing_val_carved_by_patient(tmp_path, make_settings):
    root = make_folder(tmp_path / "raw", per_class=24, splits=True)
    s = folder_settings(make_settings, root)
    invoke("ingest", s)
    m = pd.read_parquet(s.paths.ingest_dir / "manifest.parquet")
    test_uris = m[m.split == "test"].source_uri
    assert test_uris.str.contains("/test/").all() and len(test_uris) == 12
    assert (m.split == "val").sum() > 0
    assert m.groupby("patient_hash").split.nunique().max() == 1


def test_medmnist_npz_labels_n_and_n1(tmp_path, make_settings):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 30), ("val", 6), ("test", 8)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 2, n)
        arrays[f"{split}_labels"] = y[:, None] if split == "train" else y
    np.savez(tmp_path / "pneumoniamnist.npz", **arrays)
    # image_size 28 = the file's size: ingest stores the pixels unchanged, so each stored row can be matched
    # to its .npz image exactly, independently of the manifest's bookkeeping
    s = make_settings(
        {
            "ingest": {
                "image_size": 28,
                "source": {
                    "kind": "medmnist",
                    "uri": str(tmp_path / "pneumoniamnist.npz"),
                    "medmnist_flag": "pneumoniamnist",
                },
            }
        }
    )
    out = invoke("ingest", s)
    assert out["splits"] == {"train": 30, "val": 6, "test": 8}
    assert out["classes"] == ["normal", "pneumonia"]
    # per image: the label ingest stored is the .npz label, for the (N, 1) train labels and the (N,) others
    names = ["normal", "pneumonia"]  # pneumoniamnist's label order (medmnist INFO)
    m = pd.read_parquet(s.paths.ingest_dir / "manifest.parquet").set_index("source_uri")
    for split in ("train", "val", "test"):
        x, y = load_split(s.paths, split, mmap=False)
        want = arrays[f"{split}_labels"].reshape(-1)
        assert arrays[f"{split}_labels"].shape == ((30, 1) if split == "train" else (len(want),))
        assert sorted(y.tolist()) == sorted(want.tolist())  # same label counts in the split ...
        for i, img in enumerate(arrays[f"{split}_images"]):  # ... and on the same images
            row = m.loc[f"{s.ingest.source.uri}#{split}/{i}"]
            assert row.split == split and row.label == names[want[i]], (split, i)
            np.testing.assert_array_equal(x[row.row][..., 0], img, err_msg=f"{split}/{i}: not this row's image")
            assert y[row.row] == out["classes"].index(names[want[i]]), (split, i, y[row.row], want[i])


def test_medmnist_download_checks_md5_and_fails_offline_clearly(tmp_path, monkeypatch):
    from medclf.sources import medmnist

    src = tmp_path / "srv"
    src.mkdir()
    payload = b"pretend npz"
    (src / "pneumoniamnist.npz").write_bytes(payload)
    good = hashlib.md5(payload).hexdigest()
    monkeypatch.setitem(medmnist.KNOWN, "pneumoniamnist", (["normal", "pneumonia"], {28: good}))
    tmpl = f"file://{src}/{{flag}}{{suffix}}.npz"
    path = medmnist.download("pneumoniamnist", 28, tmp_path / "cache", url_template=tmpl)
    assert path.read_bytes() == payload
    monkeypatch.setitem(medmnist.KNOWN, "pneumoniamnist", (["normal", "pneumonia"], {28: "0" * 32}))
    with pytest.raises(SourceError, match="MD5 mismatch"):
        medmnist.download("pneumoniamnist", 28, tmp_path / "cache2", url_template=tmpl)
    with pytest.raises(SourceError, match="set ingest.source.uri to its local path"):
        medmnist.download("pneumoniamnist", 28, tmp_path / "c3", url_template="http://127.0.0.1:9/{flag}{suffix}")


def test_dicom_via_manifest(tmp_path, make_settings):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    raw = tmp_path / "dcm"
    raw.mkdir()
    rows = []
    for i in range(10):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.PatientID = f"MRN{i // 2}"
        ds.Rows = ds.Columns = 40
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = (_texture(i).astype(np.uint16) * 16).tobytes()
        ds.save_as(raw / f"{i}.dcm", enforce_file_format=True)
        rows.append({"path": f"{i}.dcm", "label": "a" if i % 2 else "b", "patient_id": f"MRN{i // 2}"})
    (raw / "bad.dcm").write_bytes(b"DICM?" * 10)
    rows.append({"path": "bad.dcm", "label": "a", "patient_id": "MRN99"})
    pd.DataFrame(rows).to_csv(raw / "labels.csv", index=False)
    s = make_settings(
        {"ingest": {"source": {"kind": "dicom", "manifest": str(raw / "labels.csv")}, "max_quarantine_fraction": 0.2}}
    )
    out = invoke("ingest", s)
    assert out["images"] == 10 and out["patients"] == 5
    q = pd.read_csv(s.paths.reports_dir / "ingest/quarantine.csv")
    assert q.uri.str.endswith("bad.dcm").any() and "DICOM" in q.reason.iloc[0]


def test_patient_ids_never_reach_outputs_in_clear(tmp_path, make_settings):
    root = make_folder(tmp_path / "raw")
    s = folder_settings(make_settings, root)
    invoke("ingest", s)
    blob = b"".join(p.read_bytes() for p in s.paths.ingest_dir.iterdir() if p.suffix != ".npy")
    blob += b"".join(p.read_bytes() for p in (s.paths.reports_dir / "ingest").iterdir())
    for pid in (b"person1000", b"IM-0001", b"person1001"):
        assert pid not in blob


@pytest.mark.shared
def test_real_chest_xray_splits_are_patient_disjoint(tmp_path, make_settings):
    if not CHEST_XRAY.exists():
        pytest.skip(f"{CHEST_XRAY} is absent (../shared not beside the checkout)")
    s = make_settings(
        {
            "ingest": {
                "source": {"kind": "folder", "uri": str(CHEST_XRAY), "patient_id_regex": KERMANY_REGEX},
                "image_size": 32,
            }
        }
    )
    out = invoke("ingest", s)
    assert out["images"] + out["quarantined"] == 5216
    m = pd.read_parquet(s.paths.ingest_dir / "manifest.parquet")
    ok = m[m.status == "ok"]
    assert ok.patient_hash.notna().all()
    assert ok.groupby("patient_hash").split.nunique().max() == 1
    frac = ok.split.value_counts(normalize=True)
    assert 0.1 < frac["test"] < 0.3 and 0.05 < frac["val"] < 0.25
    prev = ok.groupby("split").label.apply(lambda s: (s == "PNEUMONIA").mean())
    assert prev.max() - prev.min() < 0.05
    assert not ok.source_uri.str.contains(r"person\d+_", regex=True).any()
    assert os.environ.get("MEDCLF_PATIENT_SALT")


def test_salt_is_created_once_even_with_parallel_decode_workers(tmp_path, make_settings, monkeypatch):
    """A fresh checkout has no salt: forked decode workers must not race to create it."""
    from medclf.imaging import privacy

    monkeypatch.delenv("MEDCLF_PATIENT_SALT", raising=False)
    monkeypatch.setenv("MEDCLF_PATIENT_SALT_FILE", str(tmp_path / "secrets/patient_salt"))
    privacy._salt.cache_clear()
    root = make_folder(tmp_path / "raw", per_class=150)
    try:
        out = invoke("ingest", folder_settings(make_settings, root, workers=2))
    finally:
        privacy._salt.cache_clear()
    assert out["images"] == 300
    assert len((tmp_path / "secrets/patient_salt").read_text()) == 64


def test_exact_duplicates_stay_in_one_split(tmp_path, make_settings):
    """README: "Exact-duplicate images are kept in the same split" (the `h:<sha256>` split key).

    No patient regex, so nothing but the image hash links the copies: without the hash key the ten
    byte-identical files (different names, both class folders' worth of neighbours) spread over the splits.
    """
    root = tmp_path / "raw"
    for c, cls in enumerate(["NORMAL", "PNEUMONIA"]):
        (root / cls).mkdir(parents=True)
        for i in range(15):
            (root / cls / f"distinct_{c}_{i:02d}.png").write_bytes(_png(_texture(500 + c * 100 + i, bright=bool(c))))
    dup = _png(_texture(4242))
    for i in range(10):
        (root / "NORMAL" / f"copy_{i:02d}_of_scan.png").write_bytes(dup)
    s = make_settings({"ingest": {"source": {"kind": "folder", "uri": str(root)}}})
    out = invoke("ingest", s)
    assert out["images"] == 40 and out["quarantined"] == 0
    m = pd.read_parquet(s.paths.ingest_dir / "manifest.parquet")
    ok = m[m.status == "ok"]
    assert ok.patient_hash.isna().all(), "the copies must be linked by their hash alone"
    copies = ok[ok.sha256 == hashlib.sha256(dup).hexdigest()]
    assert len(copies) == 10
    assert copies.split.nunique() == 1, f"duplicates spread over splits: {copies.split.value_counts().to_dict()}"
    assert ok.groupby("sha256").split.nunique().max() == 1
    # the split is real: the other images do reach val and test, so one split for the copies is not by default
    assert {"train", "val", "test"} <= set(ok.split)


# --------------------------------------------------------------------------- issue 12
def test_positive_class_must_be_among_the_inferred_classes(tmp_path, make_settings):
    """Row 4 (classes: null): classes.json used to name COVID, which no image has, as the positive class."""
    root = make_folder(tmp_path / "raw", per_class=8)  # 4 patients per class: no split comes out empty
    s = folder_settings(make_settings, root, positive_class="COVID")
    with pytest.raises(IngestError, match=r"ingest\.positive_class 'COVID' is not one of the classes found"):
        invoke("ingest", s)
    assert not (s.paths.ingest_dir / "classes.json").exists()
    out = invoke("ingest", folder_settings(make_settings, root, positive_class="NORMAL"))
    assert out["images"] == 16


def test_missing_manifest_file_names_the_manifest_line_and_path(tmp_path, make_settings):
    """Row 9: the reason for a row whose file is missing names the manifest, its line and the path."""
    raw = tmp_path / "raw"
    rows = _manifest_images(raw)
    rows[3]["path"] = "img/gone_P3.png"  # data line 4 = file line 5 (line 1 is the header)
    pd.DataFrame(rows).to_csv(raw / "labels.csv", index=False)
    s = make_settings(
        {"ingest": {"source": {"kind": "manifest", "uri": str(raw / "labels.csv")}, "max_quarantine_fraction": 0.5}}
    )
    invoke("ingest", s)
    q = pd.read_csv(s.paths.reports_dir / "ingest/quarantine.csv")
    reason = q[q.uri.str.contains("img/gone_")].reason.iloc[0]
    assert f"{raw / 'labels.csv'} line 5" in reason, reason
    assert "img/gone_" in reason and "No such file" in reason, reason
    assert "P3" not in reason, "the patient id in the file name must be redacted, as in the uri"


def test_png_renamed_dcm_in_a_dicom_manifest_is_not_a_dicom_file(tmp_path, make_settings):
    """Row 10, end to end: `fake.dcm` (a PNG) listed in a DICOM manifest is quarantined as "not a DICOM file"."""
    raw = tmp_path / "dcm"
    raw.mkdir()
    (raw / "fake.dcm").write_bytes(_png(np.dstack([_texture(1, size=200)] * 3)))
    pd.DataFrame([{"path": "fake.dcm", "label": "a"}]).to_csv(raw / "labels.csv", index=False)
    s = make_settings({"ingest": {"source": {"kind": "dicom", "manifest": str(raw / "labels.csv")}}})
    with pytest.raises(IngestError):
        invoke("ingest", s)
    q = pd.read_csv(s.paths.reports_dir / "ingest/quarantine.csv")
    assert q.reason.tolist() == ["not a DICOM file"]


def test_failed_run_on_a_missing_source_creates_no_salt(tmp_path, make_settings, monkeypatch):
    """Row 11: a run that fails on a nonexistent source used to leave a new secrets/patient_salt behind."""
    from medclf.imaging import privacy

    monkeypatch.delenv("MEDCLF_PATIENT_SALT", raising=False)
    monkeypatch.delenv("MEDCLF_PATIENT_SALT_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    s = folder_settings(make_settings, tmp_path / "nope")
    privacy._salt.cache_clear()
    try:
        with pytest.raises(SourceError, match="no such directory"):
            invoke("ingest", s)
        assert not (tmp_path / "secrets").exists(), "a failed run created the patient-id salt"
        invoke("ingest", folder_settings(make_settings, make_folder(tmp_path / "raw", per_class=8)))
        assert len((tmp_path / "secrets/patient_salt").read_text()) == 64  # a good run still creates it
    finally:
        privacy._salt.cache_clear()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width×height (1-bit grey) and holds no pixel data: a bomb's header."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height", [(10_000, 9_000), (20_000, 10_000)])  # 1.1× and 2.5× the limit
def test_decompression_bomb_message_quotes_the_configured_limit(width, height):
    """Row 17: past twice the limit the reason quoted Pillow's 160,000,000, not max_image_pixels=80,000,000."""
    from medclf.imaging.images import decode_image
    from medclf.imaging.pixels import DecodeError

    with pytest.raises(DecodeError) as err:
        decode_image(_png_header_only(width, height), 80_000_000)
    msg = str(err.value)
    assert msg.startswith("decompression bomb:") and "max_image_pixels=80000000" in msg, msg
    assert f"{width * height}" in msg and "160000000" not in msg, msg


def test_jpeg_original_size_is_the_files_not_the_draft_decode(tmp_path, make_settings):
    """Row 15: a 200×200 JPEG was recorded as 100×100 (libjpeg's reduced DCT scale); RGB as 1 channel."""
    root = tmp_path / "raw"
    for c, cls in enumerate(["NORMAL", "PNEUMONIA"]):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            rgb = np.dstack([_texture(10 * c + i, size=200)] * 3)
            (root / cls / f"IM-{c}{i:03d}-1.jpg").write_bytes(_png(rgb, fmt="JPEG"))
            (root / cls / f"IM-{c}{i:03d}-2.jpg").write_bytes(_png(_texture(10 * c + i, size=200)[:, :150], fmt="JPEG"))
    s = folder_settings(make_settings, root)
    assert s.ingest.image_size * 2 <= 100  # small enough that libjpeg decodes at a reduced scale
    invoke("ingest", s)
    m = pd.read_parquet(s.paths.ingest_dir / "manifest.parquet")
    rgb, grey = m[m.source_uri.str.endswith("-1.jpg")], m[m.source_uri.str.endswith("-2.jpg")]
    assert len(rgb) == len(grey) == 8
    assert (rgb.orig_height == 200).all() and (rgb.orig_width == 200).all() and (rgb.orig_channels == 3).all()
    assert (grey.orig_height == 200).all() and (grey.orig_width == 150).all() and (grey.orig_channels == 1).all()


def test_a_split_that_comes_out_empty_is_an_error_naming_the_counts(tmp_path, make_settings):
    """Issue 22, row 10: four patients (two per class) of real chest X-rays: the patient split carves test and
    val out of each class, and train came out empty. Validate passed that (split_fractions is a warning) and augment
    failed later. Now ingest refuses it, naming patients and images per split and the fractions, writes no dataset
    and records the failure."""
    import json
    import shutil

    from tests.test_source_snapshot import DEMO_REGEX

    root = tmp_path / "raw"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        files = sorted((Path(__file__).parents[1] / "data/demo/batch1" / cls).glob("pt*_1.jpeg"))[:2]
        for f in files:  # two patients, one image each
            shutil.copy(f, root / cls / f.name)
    s = make_settings(
        {
            "ingest": {
                "source": {"kind": "folder", "uri": str(root), "patient_id_regex": DEMO_REGEX},
                "splits": {"val_fraction": 0.15, "test_fraction": 0.2},
            }
        }
    )
    with pytest.raises(IngestError) as err:
        invoke("ingest", s)
    msg = str(err.value)
    assert "the train split is empty" in msg, msg
    assert "train 0 patients / 0 images" in msg and "val 2 patients / 2 images" in msg, msg
    assert "test 2 patients / 2 images" in msg and "4 patients, 4 images" in msg, msg
    assert "ingest.splits.val_fraction=0.15" in msg and "test_fraction=0.2" in msg, msg
    assert not (s.paths.ingest_dir / "manifest.parquet").exists()
    failed = json.loads((s.paths.reports_dir / "ingest" / "failed_run.json").read_text())
    assert failed["status"] == "failed" and "train split is empty" in failed["error"]
