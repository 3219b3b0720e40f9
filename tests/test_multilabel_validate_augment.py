"""Multi-label tasks (issue 25) in validate and augment: per-finding prevalence, label cardinality, co-occurrence,
rare findings, drift per finding, and capped ML-ROS balancing that keeps an N×L label matrix aligned.

The ingest output is written directly, as ingest writes it for `task.type: multilabel`: `{split}_labels.npy` an N×L
uint8 0/1 matrix (columns in `task.labels` order), `classes.json` with the findings as `classes`, no positive class
and `"task": "multilabel"`, the manifest's `label` the positive findings joined by ";" ("" for none). The images are
real ODIR-5K fundus photographs (../shared/data/fundus_odir, one eye per patient) picked by their real per-eye
findings and scaled to 32×32 as ingest would; without that folder, the same design is filled with smooth random
colour textures, so the tests run everywhere. Every expected number is computed here from the label matrices with
numpy, not read back from the code under test.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medclf.config import PRESETS, settings_from_dict
from medclf.imaging.images import fit_square
from medclf.imaging.multilabel_balance import MAX_GROWTH, balance_multilabel, multilabel_plan, preview_picks
from medclf.imaging.splits import SPLITS
from medclf.infra.io import write_json
from medclf.pipeline import invoke
from medclf.stages import validate
from medclf.validation import tables

ODIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "fundus_odir"
FINDINGS = ["normal", "diabetic_retinopathy", "glaucoma", "cataract"]
BLOCK: dict[tuple[str, ...], int] = {
    # 20 images with the same findings in every split, so no finding's prevalence differs much between splits
    ("normal",): 5,
    ("diabetic_retinopathy",): 5,
    ("glaucoma",): 3,
    ("cataract",): 4,
    ("diabetic_retinopathy", "glaucoma"): 1,
    (): 2,  # none of the four (e.g. AMD or myopia only): legal, an all-zero row
}
TRAIN_EXTRA = {("diabetic_retinopathy", "cataract"): 1}  # once more per train block: unequal, non-trivial shares
BLOCKS = {"train": 6, "val": 3, "test": 3}  # 126 / 60 / 60 images: every finding ≥ 12 positives in val and test
SIZE = 32


# --------------------------------------------------------------------------- a multi-label ingest output
def _texture(rng: np.random.Generator) -> np.ndarray:
    base = rng.normal(size=(12, 12, 3))
    base = ((base - base.min()) / np.ptp(base) * 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((96, 96), Image.Resampling.BICUBIC), float)
    return np.clip(30 + smooth * 0.75 + rng.normal(0, 4, smooth.shape), 0, 255).astype(np.uint8)


def _odir_pool() -> dict[tuple[str, ...], list[tuple[str, str]]] | None:
    """Per finding combination (over FINDINGS), (path, patient) of ODIR eyes, one eye per patient overall."""
    if not (ODIR / "labels.csv").exists():
        return None
    table = pd.read_csv(ODIR / "labels.csv")
    combos = [tuple(f for f in FINDINGS if getattr(row, f)) for row in table.itertuples()]
    pool: dict[tuple[str, ...], list[tuple[str, str]]] = {k: [] for k in [*BLOCK, *TRAIN_EXTRA]}
    used: set[str] = set()
    for combo in sorted(pool, key=lambda c: -len(c)):  # the scarce co-occurring findings pick their patients first
        for row, seen in zip(table.itertuples(), combos, strict=True):
            patient = str(row.patient_id)
            if seen == combo and patient not in used:
                pool[combo].append((str(row.path), patient))
                used.add(patient)
    return pool


def _clean_exposure(img: np.ndarray) -> bool:
    """Leave out the few eyes validate rightly flags as dark (low contrast, mostly black): not what is tested here."""
    mean, std, black, white = tables.chunk_stats(img[None])[0, :4]
    return bool(std > 12 and black < 0.4 and white < 0.4 and mean > 25)


@functools.cache
def _base_specs() -> tuple[dict, ...]:
    pool = _odir_pool()
    rng = np.random.default_rng(0)
    nxt = dict.fromkeys([*BLOCK, *TRAIN_EXTRA], 0)
    specs: list[dict] = []
    for split in SPLITS:
        block = {**BLOCK, **(TRAIN_EXTRA if split == "train" else {})}
        for _ in range(BLOCKS[split]):
            for combo, n in block.items():
                for _ in range(n):
                    while True:
                        k = nxt[combo]
                        nxt[combo] += 1
                        if pool is None:
                            name, patient, src = (
                                f"synthetic/{'+'.join(combo) or 'none'}_{k}.png",
                                f"s{k}",
                                _texture(rng),
                            )
                        else:
                            name, patient = pool[combo][k]
                            src = np.asarray(Image.open(ODIR / name).convert("RGB"))
                        img = fit_square(src, SIZE, "pad")
                        if _clean_exposure(img):
                            break
                    img.flags.writeable = False
                    specs.append(
                        {
                            "name": name,
                            "split": split,
                            "findings": list(combo),
                            "patient": hashlib.sha256(f"{name}:{patient}".encode()).hexdigest()[:16],
                            "img": img,
                        }
                    )
    return tuple(specs)


def dataset_specs() -> list[dict]:
    """One dict per image: name, split, findings (a fresh list: tests edit them), patient, ingested 32×32×3 array."""
    return [{**sp, "findings": list(sp["findings"])} for sp in _base_specs()]


def matrix(findings: list[str], columns: list[str] = FINDINGS) -> np.ndarray:
    return np.array([f in findings for f in columns], np.uint8)


def write_ingest(ingest_dir: Path, specs: list[dict], manifest_edit=None, label_edit=None) -> dict[str, np.ndarray]:
    """The ingest output of a multi-label task; returns the label matrices written, per split."""
    ingest_dir.mkdir(parents=True, exist_ok=True)
    rows, images, labels = [], {s: [] for s in SPLITS}, {s: [] for s in SPLITS}
    for sp in specs:
        split = sp["split"]
        rows.append(
            {
                "id": hashlib.sha1(sp["name"].encode()).hexdigest()[:16],
                "source_uri": f"odir://{sp['name']}",
                "sha256": hashlib.sha256(sp["img"].tobytes()).hexdigest(),
                "patient_hash": sp["patient"],
                "label": ";".join(sp["findings"]),
                "label_index": -1,
                "split": split,
                "row": len(images[split]),
                "orig_height": 224,
                "orig_width": 224,
                "orig_channels": 3,
                "status": "ok",
                "reason": None,
            }
        )
        images[split].append(sp["img"])
        labels[split].append(matrix(sp["findings"]))
    out = {s: np.stack(labels[s]) for s in SPLITS}
    if label_edit:
        label_edit(out)
    for split in SPLITS:
        np.save(ingest_dir / f"{split}_images.npy", np.stack(images[split]))
        np.save(ingest_dir / f"{split}_labels.npy", out[split])
    manifest = pd.DataFrame(rows)
    if manifest_edit:
        manifest_edit(manifest)
    manifest.to_parquet(ingest_dir / "manifest.parquet", index=False)
    write_json(
        ingest_dir / "classes.json",
        {"classes": FINDINGS, "positive_class": None, "task": "multilabel", "image_size": SIZE, "channels": 3},
    )
    return out


def settings_for(tmp: Path, augment: dict | None = None, **validate_cfg):
    paths = {k: str(tmp / k) for k in ("ingest_dir", "augment_dir", "model_dir", "reports_dir", "cache_dir")}
    return settings_from_dict(
        {
            "paths": paths,
            "ingest": {"modality": "fundus"},
            "task": {"type": "multilabel", "labels": FINDINGS},
            "validate": validate_cfg,
            "augment": {"preset": "fundus", **(augment or {})},
        }
    )


def run_validate(tmp: Path, specs: list[dict], expect_fail: bool = False, manifest_edit=None, label_edit=None, **cfg):
    settings = settings_for(tmp, **cfg)
    written = write_ingest(settings.paths.ingest_dir, specs, manifest_edit, label_edit)
    if not expect_fail:
        return invoke("validate", settings), written
    with pytest.raises(validate.ValidationFailed) as err:
        invoke("validate", settings)
    return {**err.value.result, "error_message": str(err.value)}, written


def problems(result: dict) -> dict[str, str]:
    return {n: c["status"] for n, c in result["checks"].items() if c["status"] in ("fail", "warn")}


def examples(result: dict, check: str) -> str:
    return "\n".join(result["checks"][check].get("examples", []))


def drop_finding(specs: list[dict], split: str, finding: str, n: int, only: bool = True) -> list[dict]:
    """Take `finding` off `n` images of `split` that carry it (alone, if `only`); returns them."""
    hit = [
        s for s in specs if s["split"] == split and finding in s["findings"] and (not only or len(s["findings"]) == 1)
    ]
    for s in hit[:n]:
        s["findings"] = [f for f in s["findings"] if f != finding]
    return hit[:n]


def stacked(written: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The label matrices per split and all of them ('all'), as int64."""
    out = {s: m.astype(np.int64) for s, m in written.items()}
    return {**out, "all": np.concatenate([out[s] for s in SPLITS])}


def add_finding(specs: list[dict], split: str | None, finding: str, combos: dict[tuple[str, ...], int]) -> None:
    """Give `finding` to the first `n` images of each block whose findings are `combo` (every split when None)."""
    for sp_split in [split] if split else list(SPLITS):
        for combo, n in combos.items():
            hit = [s for s in specs if s["split"] == sp_split and tuple(s["findings"]) == combo]
            blocks = BLOCKS[sp_split]
            per_block = len(hit) // blocks
            for b in range(blocks):
                for s in hit[b * per_block : b * per_block + n]:
                    s["findings"] = [f for f in FINDINGS if f in s["findings"] or f == finding]


# --------------------------------------------------------------------------- validate: clean data, numbers, drift
@pytest.fixture(scope="module")
def clean_runs(tmp_path_factory):
    """A clean multi-label dataset validated twice (the first run writes the baseline), then a release in which
    cataract is 15 points more prevalent in every split (and nothing else moved)."""
    tmp = tmp_path_factory.mktemp("multilabel")
    first, written = run_validate(tmp, dataset_specs())
    baseline = json.loads((tmp / "cache_dir" / "validation_baseline.json").read_text())
    summary_json = json.loads((tmp / "reports_dir" / "validation" / "summary.json").read_text())
    report_md = (tmp / "reports_dir" / "validation" / "site" / "report.md").read_text()
    second = invoke("validate", settings_for(tmp))
    drifted_specs = dataset_specs()
    # per block of 20: the 2 images with no finding and 1 with diabetic retinopathy only also get cataract
    add_finding(drifted_specs, None, "cataract", {(): 2, ("diabetic_retinopathy",): 1})
    drifted, drifted_written = run_validate(tmp, drifted_specs)
    return {
        "first": first,
        "written": written,
        "baseline": baseline,
        "summary_json": summary_json,
        "report_md": report_md,
        "second": second,
        "drifted": drifted,
        "drifted_written": drifted_written,
    }


def test_clean_multilabel_dataset_passes_and_becomes_a_multilabel_baseline(clean_runs):
    first = clean_runs["first"]
    assert first["passed"] and problems(first) == {}, problems(first)
    assert first["checks"]["rare_finding"]["status"] == "pass"
    assert first["checks"]["rare_finding"]["bound"] == (
        "val: positives of each finding ≥ 10; test: positives of each finding ≥ 10"
    )
    assert first["checks"]["array_consistency"]["status"] == "pass"
    assert "label matrix columns = 4 findings" in first["checks"]["array_consistency"]["bound"]
    baseline = clean_runs["baseline"]
    assert baseline["task"] == "multilabel" and set(baseline["prevalence"]["val"]) == set(FINDINGS)


def test_prevalence_cardinality_and_co_occurrence_match_numpy(clean_runs):
    got, m = clean_runs["first"]["multilabel"], stacked(clean_runs["written"])
    assert got["findings"] == FINDINGS and got["min_positives"] == 10
    for split, y in m.items():
        assert got["images"][split] == len(y)
        assert got["positives"][split] == dict(zip(FINDINGS, y.sum(0).tolist(), strict=True))
        assert list(got["prevalence"][split].values()) == pytest.approx(y.mean(0).tolist(), abs=1e-6)
        assert got["cardinality"][split] == pytest.approx(y.sum(1).mean(), abs=1e-6)
        assert got["no_finding"][split] == int((y.sum(1) == 0).sum())
        assert np.array_equal(np.array(got["co_occurrence"][split]), y.T @ y)
    co = m["all"].T @ m["all"]
    dr, gl, ca = (FINDINGS.index(f) for f in ("diabetic_retinopathy", "glaucoma", "cataract"))
    assert co[dr, gl] == 12 and co[dr, ca] == 6 and co[gl, ca] == 0  # the design: real ODIR eyes with both
    assert got["cardinality"]["train"] == pytest.approx(126 / 126) and got["cardinality"]["val"] == pytest.approx(0.95)
    assert got["rare_findings"] == []
    # the report shows the same numbers: prevalence per split, cardinality and the L×L co-occurrence table
    md = clean_runs["report_md"]
    row = m["all"][:, dr]
    assert f"| diabetic_retinopathy | {m['train'][:, dr].sum()} ({m['train'][:, dr].mean():.3f}) |" in md
    assert f"all ({len(row)})" in md and "| *findings per image* | 1.000 | 0.950 | 0.950 |" in md
    assert "| **diabetic_retinopathy** | " + " | ".join(map(str, co[dr])) + " |" in md
    # the compact verdict file (augment's dependency) carries positives and cardinality, no timings
    compact = clean_runs["summary_json"]["multilabel"]
    assert compact["positives"] == got["positives"] and compact["rare_findings"] == []


def test_drift_is_per_finding_prevalence_against_the_baseline(clean_runs):
    second = clean_runs["second"]  # the same data again: drift is checked, and is zero for every finding
    assert second["passed"] and problems(second) == {}
    assert second["checks"]["drift_prevalence"]["status"] == "pass"
    assert second["drift"]["prevalence_shift"] == dict.fromkeys(FINDINGS, 0.0)
    drifted = clean_runs["drifted"]
    assert drifted["passed"] and problems(drifted) == {"drift_prevalence": "warn"}
    before, after = stacked(clean_runs["written"]), stacked(clean_runs["drifted_written"])
    shift = {s: np.abs(after[s].mean(0) - before[s].mean(0)) for s in before}
    ca = FINDINGS.index("cataract")
    assert shift["all"][ca] == pytest.approx(0.15, abs=0.01) and shift["all"][:ca].max() == 0
    assert f"all/cataract (shift={shift['all'][ca]:.3f})" in examples(drifted, "drift_prevalence")
    assert not any(f in examples(drifted, "drift_prevalence") for f in FINDINGS[:ca])
    per_finding = drifted["drift"]["prevalence_shift"]
    assert per_finding["cataract"] == pytest.approx(max(v[ca] for v in shift.values()), abs=1e-6)
    assert per_finding["normal"] == per_finding["glaucoma"] == 0.0
    assert drifted["drift"]["prevalence_shift_max"] == pytest.approx(per_finding["cataract"])
    assert (
        f"per finding: normal 0.000, diabetic_retinopathy 0.000, glaucoma 0.000, cataract {per_finding['cataract']:.3f}"
        in drifted["markdown"]
    )


# --------------------------------------------------------------------------- validate: rare findings, splits
def test_rare_finding_warns_naming_the_finding_and_the_split(tmp_path):
    specs = dataset_specs()
    dropped = drop_finding(specs, "val", "cataract", 3)  # val keeps 9 cataract images (test keeps 12)
    assert len(dropped) == 3
    result, written = run_validate(tmp_path / "default", specs)
    positives = {s: int(written[s][:, FINDINGS.index("cataract")].sum()) for s in ("val", "test")}
    assert positives == {"val": 9, "test": 12}
    assert result["passed"] and problems(result) == {"rare_finding": "warn"}, problems(result)
    check = result["checks"]["rare_finding"]
    assert check["severity"] == "warn" and "val/cataract (count=9)" in examples(result, "rare_finding")
    assert "test/" not in examples(result, "rare_finding")
    assert "cataract in val (9 positives < 10)" in check["note"]
    assert result["multilabel"]["rare_findings"] == [{"finding": "cataract", "split": "val", "positives": 9}]
    assert "**cataract** in val (9)" in result["markdown"]
    # the bound is `validate.min_finding_positives`: at 13, glaucoma (12 in val and test) is too rare as well
    result, _ = run_validate(tmp_path / "strict", specs, min_finding_positives=13)
    assert problems(result) == {"rare_finding": "warn"}
    rare = {(r["finding"], r["split"]) for r in result["multilabel"]["rare_findings"]}
    assert rare == {("cataract", "val"), ("glaucoma", "val"), ("glaucoma", "test"), ("cataract", "test")}
    assert "val/glaucoma (count=12)" in examples(result, "rare_finding")


def test_a_finding_whose_prevalence_differs_between_splits_fails_as_a_class_does(tmp_path):
    specs = dataset_specs()
    # test only: per block, both images with no finding and one with diabetic retinopathy only get glaucoma
    add_finding(specs, "test", "glaucoma", {(): 2, ("diabetic_retinopathy",): 1})
    result, written = run_validate(tmp_path / "gap", specs, expect_fail=True, prevalence_bounds=[0.05, 0.34])
    gl = FINDINGS.index("glaucoma")
    share = {s: written[s][:, gl].mean() for s in SPLITS}
    gap = max(share.values()) - min(share.values())
    assert share["test"] == pytest.approx(0.35) and gap > 0.1
    assert problems(result) == {"prevalence_gap": "fail", "prevalence_bounds": "fail"}
    assert f"test/glaucoma (gap={gap:.3f})" in examples(result, "prevalence_gap")
    assert "diabetic_retinopathy" not in examples(result, "prevalence_gap")
    assert "test/glaucoma (share=0.350)" in examples(result, "prevalence_bounds")  # above the 0.34 bound
    assert "prevalence_gap: observed" in result["error_message"] and "≤ 0.1" in result["error_message"]
    # as for classes, the severity decides: a warning, and the stage passes
    result, _ = run_validate(tmp_path / "warn", specs, severity={"prevalence_gap": "warn"})
    assert result["passed"] and problems(result) == {"prevalence_gap": "warn"}


def test_unknown_findings_and_label_matrices_that_disagree_with_the_manifest_fail(tmp_path):
    specs = dataset_specs()
    odd, flipped = [s for s in specs if s["split"] == "train" and s["findings"] == ["glaucoma"]][:2]
    both = next(s for s in specs if s["findings"] == ["diabetic_retinopathy", "glaucoma"])

    def manifest_edit(m: pd.DataFrame) -> None:
        m.loc[m["source_uri"] == f"odir://{odd['name']}", "label"] = "glaucoma;drusen"  # not a finding
        m.loc[m["source_uri"] == f"odir://{both['name']}", "label"] = "glaucoma;diabetic_retinopathy"  # order: fine

    row = sum(1 for s in specs[: specs.index(flipped)] if s["split"] == "train")

    def label_edit(labels: dict[str, np.ndarray]) -> None:
        labels["train"][row, FINDINGS.index("cataract")] = 1  # the array says cataract, the manifest does not

    result, _ = run_validate(tmp_path, specs, True, manifest_edit, label_edit)
    assert problems(result) == {"unknown_label": "fail", "array_consistency": "fail"}, problems(result)
    assert odd["name"] in examples(result, "unknown_label") and "drusen" in examples(result, "unknown_label")
    consistency = examples(result, "array_consistency")
    assert flipped["name"] in consistency and "glaucoma;cataract" in consistency
    assert odd["name"] not in consistency and both["name"] not in consistency
    assert result["checks"]["label_conflict"]["status"] == "pass"


def test_label_matrix_width_and_values_are_checked():
    """The split table flags a label file that is not an N×L 0/1 matrix (a class-index vector, a wrong width, a 2)."""
    findings = ["a", "b", "c"]
    good = np.array([[1, 0, 1], [0, 0, 0]], np.uint8)
    assert tables.array_findings(good, 3, findings) == ["a;c", "", None]  # the third row: missing from the file
    assert tables.array_findings(good[:, :2], 2, findings) == [None, None]
    assert tables.array_findings(np.array([0, 2]), 2, findings) == [None, None]
    bad = good.copy()
    bad[1, 1] = 2
    manifest = pd.DataFrame({"split": ["train"] * 2 + ["val"] * 2 + ["test"] * 2})
    data = tables.IngestData(
        manifest, {"image_size": 8, "channels": 3}, {}, {"train": good, "val": bad, "test": np.zeros(2, np.int64)}
    )
    table = tables.split_table(manifest, data, findings).set_index("split")
    assert table["label_width"].tolist() == [3, 3, 0] and (table["expected_label_width"] == 3).all()
    assert table["label_non_binary"].tolist() == [0, 1, 0]
    assert "label_width" not in tables.split_table(manifest, data).columns  # single-label: unchanged


# --------------------------------------------------------------------------- augment: the capped ML-ROS sampler
def _rows(*groups: tuple[int, list[int]]) -> np.ndarray:
    return np.array([r for n, r in groups for _ in range(n)], np.uint8)


def test_capped_ml_ros_reaches_the_goals_without_doubling_any_finding():
    # A common; B only ever with C; C also alone. A naive per-label oversampler taking B to A's 40 would copy the
    # five B+C images 35 times and take C from 8 to 43.
    y = _rows((40, [1, 0, 0]), (5, [0, 1, 1]), (3, [0, 0, 1]), (4, [0, 0, 0]))
    before = y.sum(0)
    assert before.tolist() == [40, 5, 8]
    src = multilabel_plan(y, 1.0, seed=3)
    after = before + y[src].sum(0)
    # goals: min(max(own, 1.0 × 40), 2 × own) = 40, 10, 16; B is capped at 10, C at 16, and both get there
    assert after.tolist() == [40, 10, 16]
    assert (after <= MAX_GROWTH * before).all()
    bc = np.flatnonzero((y == [0, 1, 1]).all(1))
    assert sorted(src[np.isin(src, bc)].tolist()) == bc.tolist()  # each B+C image copied exactly once
    assert y[src].sum(1).min() > 0  # an image with no finding is never copied
    prev_before, prev_after = before / len(y), after / (len(y) + len(src))
    assert (prev_after <= 2 * prev_before).all()

    # co-occurrence with a common finding: A grows only through B's and C's copies, within its cap
    y = _rows((30, [1, 0, 0]), (10, [1, 1, 0]), (4, [0, 1, 0]), (3, [0, 0, 1]), (2, [1, 0, 1]), (5, [0, 0, 0]))
    before = y.sum(0)
    src = multilabel_plan(y, 1.0, seed=0)
    after = before + y[src].sum(0)
    # B: 14 -> 28 (cap), C: 5 -> 10 (cap); every B and C image copied once (least-copied first), so A gains the
    # 10 A+B and 2 A+C copies
    assert before.tolist() == [42, 14, 5] and after.tolist() == [54, 28, 10]
    assert np.bincount(src, minlength=len(y)).max() == 1
    # a lower target_ratio aims lower: 0.5 × 42 = 21 for B, 10 (its cap) for C
    after_half = before + y[multilabel_plan(y, 0.5, seed=0)].sum(0)
    assert after_half[1:].tolist() == [21, 10] and after_half[0] <= 2 * before[0]
    assert np.array_equal(multilabel_plan(y, 1.0, seed=0), src)  # seeded


def test_balance_multilabel_keeps_label_rows_with_their_images():
    y = _rows((30, [1, 0, 0]), (10, [1, 1, 0]), (4, [0, 1, 0]), (3, [0, 0, 1]), (2, [1, 0, 1]), (5, [0, 0, 0]))
    x = np.random.default_rng(0).integers(0, 256, (len(y), 24, 24, 3), dtype=np.uint8)
    x.flags.writeable = False
    a = balance_multilabel(x, y, PRESETS["fundus"], 1.0, seed=4, chunk=5)
    b = balance_multilabel(x, y, PRESETS["fundus"], 1.0, seed=4)
    n = len(y)
    assert a.labels.shape == (n + 14 + 5, 3) and a.labels.dtype == np.uint8  # B: +14, C: +5 (see the plan's test)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)  # chunk-independent
    assert np.array_equal(a.images[:n], x) and np.array_equal(a.labels[:n], y)  # originals first, untouched
    assert np.array_equal(a.labels[n:], y[a.source_row[n:]]) and a.is_synthetic[n:].all()
    assert not any(np.array_equal(a.images[i], x[a.source_row[i]]) for i in range(n, len(a.labels)))
    none = balance_multilabel(x, y, PRESETS["fundus"], 0.0, seed=4)
    assert len(none.labels) == n and not none.is_synthetic.any()
    with pytest.raises(ValueError, match="N×L 0/1"):
        balance_multilabel(x, y * 2, PRESETS["fundus"], 1.0, seed=4)


def test_preview_picks_show_every_finding_even_when_preview_n_is_small():
    y = _rows((30, [1, 0, 0, 0]), (6, [1, 1, 0, 0]), (2, [0, 0, 1, 1]), (1, [0, 0, 0, 1]), (5, [0, 0, 0, 0]))
    for n in (1, 3, 16):
        picks = preview_picks(y, 4, n, seed=7)
        assert len(set(picks)) == len(picks) >= min(n, len(y))
        assert (y[picks].sum(0) > 0).all(), (n, picks)  # every finding on show
        assert (y[picks].sum(1) == 0).any()  # and an image with none
    labels = np.array([0] * 5 + [1] * 3)
    picks = preview_picks(labels, 2, 4, seed=7)  # single-label: unchanged, alternating classes
    assert labels[picks].tolist() == [0, 1, 0, 1]


# --------------------------------------------------------------------------- augment: the stage
def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_augment_stage_multilabel(tmp_path):
    settings = settings_for(tmp_path, augment={"preview_n": 2})
    ing, out = settings.paths.ingest_dir, settings.paths.augment_dir
    written = write_ingest(ing, dataset_specs())
    ingest_before = _digests(ing)
    res = invoke("augment", settings)
    x0, y0 = np.load(ing / "train_images.npy"), written["train"]
    x, y = np.load(out / "train_images.npy"), np.load(out / "train_labels.npy")
    syn, src = np.load(out / "train_is_synthetic.npy"), np.load(out / "train_source_row.npy")
    n = len(y0)
    # labels stay an N×L 0/1 matrix aligned with the images; originals first; a copy carries its source's row
    assert y.shape == (len(x), len(FINDINGS)) and y.dtype == np.uint8 and set(np.unique(y)) <= {0, 1}
    assert np.array_equal(x[:n], x0) and np.array_equal(y[:n], y0) and not syn[:n].any() and syn[n:].all()
    assert np.array_equal(y[n:], y0[src[n:]]) and res["synthetic"] == len(y) - n > 0
    # per-finding counts, as documented: each reaches min(max(own, 1.0 × the most common), 2 × own) here (every
    # finding has images that carry it alone), none more than doubles, images with no finding are not copied
    before, after = y0.sum(0).astype(int), y.sum(0).astype(int)
    goal = np.minimum(np.maximum(before, before.max()), 2 * before)
    assert res["counts_before"] == dict(zip(FINDINGS, before.tolist(), strict=True))
    assert res["counts_after"] == dict(zip(FINDINGS, after.tolist(), strict=True))
    assert res["goal"] == dict(zip(FINDINGS, goal.tolist(), strict=True))
    assert (after >= goal).all() and (after <= 2 * before).all()
    assert after[FINDINGS.index("glaucoma")] == goal[FINDINGS.index("glaucoma")] > before[FINDINGS.index("glaucoma")]
    prev_before, prev_after = y0.mean(0), y.mean(0)
    assert list(res["prevalence_after"].values()) == pytest.approx(prev_after.tolist(), abs=1e-4)
    assert (prev_after <= 2 * prev_before + 1e-9).all()
    assert res["no_finding_after"] == res["no_finding_before"] == int((y0.sum(1) == 0).sum())
    assert res["cardinality_after"] == pytest.approx(y.sum(1).mean(), abs=1e-4)
    assert res["sampler"] == "ml_ros_capped" and res["max_growth"] == 2.0 and res["task"] == "multilabel"
    # the preview shows every finding and an image with none, although preview_n is 2
    assert all(res["preview_examples"][f] >= 1 for f in FINDINGS) and res["preview_examples"]["no finding"] >= 1
    preview = settings.paths.reports_dir / "augment" / "preview.png"
    assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # val and test (and the ingest output as a whole) are never changed; augment writes train files only
    assert _digests(ing) == ingest_before
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["augment.json", "train_images.npy", "train_labels.npy", "train_is_synthetic.npy", "train_source_row.npy"]
    )
    first = _digests(out)
    invoke("augment", settings)
    assert _digests(out) == first  # same params -> byte-identical output
    # without balancing: the train split as it is
    res = invoke("augment", settings_for(tmp_path, augment={"balance": False}))
    assert res["synthetic"] == 0 and res["counts_after"] == res["counts_before"] and res["sampler"] == "none"
    assert np.array_equal(np.load(out / "train_labels.npy"), y0)


def test_augment_refuses_a_multilabel_ingest_output_without_a_label_matrix(tmp_path):
    from medclf.stages.augment import AugmentError

    settings = settings_for(tmp_path)
    written = write_ingest(settings.paths.ingest_dir, dataset_specs())
    np.save(settings.paths.ingest_dir / "train_labels.npy", written["train"].argmax(1))  # class indices
    with pytest.raises(AugmentError, match=r"N×4 0/1 matrix"):
        invoke("augment", settings)
