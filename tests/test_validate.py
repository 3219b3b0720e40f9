"""validate stage: each known failure of medical datasets, planted in a small synthetic ingest output.

The helper writes an ingest directory directly (manifest + arrays), because ingest
itself would never produce some of these failures (e.g. it keeps identical files in
one split). Images are 128-px smooth random textures scaled to 32×32 as ingest would: distinct under pHash, with
normal contrast and a dark-ish border, so a clean dataset raises no alarm.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from medclf.config import ConfigError, settings_from_dict
from medclf.imaging.images import fit_square
from medclf.imaging.splits import SPLITS
from medclf.infra.io import write_json
from medclf.stages import validate
from medclf.validation import leakage, tables
from medclf.validation.checks import CHECKS

CLASSES = ["normal", "opacity"]
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- synthetic ingest output
def source_image(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """A smooth random texture with X-ray-like mid-frequency detail (a 16×16 grid, bicubic)."""
    base = rng.normal(size=(16, 16))
    base = ((base - base.min()) / np.ptp(base) * 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC), float)
    img = 40 + smooth / 255 * 170 + rng.normal(0, 4, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def ingested(pil_or_array) -> np.ndarray:
    """What ingest stores: the source scaled to 32×32 (same `fit_square` as ingest)."""
    arr = np.asarray(pil_or_array)
    return fit_square(arr[..., None] if arr.ndim == 2 else arr, 32, "pad")


def clean_specs(seed: int = 0) -> list[dict]:
    """48 images, 2 per patient; train/val/test = 16/4/4 patients; each split exactly half 'opacity'."""
    rng = np.random.default_rng(seed)
    specs = []
    p = 0
    for split, n_patients in (("train", 16), ("val", 4), ("test", 4)):
        for k in range(n_patients):
            label = CLASSES[k % 2]
            for j in range(2):
                src = source_image(rng)
                specs.append(
                    {
                        "name": f"{label}/P{p:03d}_{j}.png",
                        "label": label,
                        "patient": f"p-{p:016x}",
                        "split": split,
                        "src": src,
                        "img": ingested(src),
                    }
                )
            p += 1
    return specs


def write_ingest(ingest_dir: Path, specs: list[dict], manifest_edit=None) -> None:
    ingest_dir.mkdir(parents=True, exist_ok=True)
    rows, arrays = [], {s: [] for s in SPLITS}
    for sp in specs:
        img = sp["img"]
        rows.append(
            {
                "id": hashlib.sha1(sp["name"].encode()).hexdigest()[:16],
                "source_uri": f"synthetic-test://{sp['name']}",
                "sha256": hashlib.sha256(img.tobytes()).hexdigest(),
                "patient_hash": sp["patient"],
                "label": sp["label"],
                "label_index": CLASSES.index(sp["label"]),
                "split": sp["split"],
                "row": len(arrays[sp["split"]]),
                "orig_height": 128,
                "orig_width": 128,
                "orig_channels": 1,
                "status": "ok",
                "reason": None,
            }
        )
        arrays[sp["split"]].append((img, CLASSES.index(sp["label"])))
    for split, items in arrays.items():
        np.save(ingest_dir / f"{split}_images.npy", np.stack([i for i, _ in items]))
        np.save(ingest_dir / f"{split}_labels.npy", np.array([lab for _, lab in items], np.int64))
    manifest = pd.DataFrame(rows)
    if manifest_edit:
        manifest_edit(manifest)
    manifest.to_parquet(ingest_dir / "manifest.parquet", index=False)
    write_json(
        ingest_dir / "classes.json", {"classes": CLASSES, "positive_class": "opacity", "image_size": 32, "channels": 1}
    )


def settings_for(tmp: Path, **validate_cfg):
    paths = {k: str(tmp / k) for k in ("ingest_dir", "augment_dir", "model_dir", "reports_dir", "cache_dir")}
    return settings_from_dict({"paths": paths, "validate": validate_cfg})


def run_validate(tmp: Path, specs: list[dict], manifest_edit=None, expect_fail: bool = False, **cfg) -> dict:
    settings = settings_for(tmp, **cfg)
    write_ingest(settings.paths.ingest_dir, specs, manifest_edit)
    if not expect_fail:
        return validate.run(settings)
    with pytest.raises(validate.ValidationFailed) as err:
        validate.run(settings)
    return {**err.value.result, "error_message": str(err.value)}


def pick(specs: list[dict], split: str, label: str, skip: int = 0) -> dict:
    return [s for s in specs if s["split"] == split and s["label"] == label][skip]


def relabel_in_manifest(spec: dict, label: str):
    def edit(m: pd.DataFrame) -> None:
        m.loc[m["source_uri"] == f"synthetic-test://{spec['name']}", "label"] = label

    return edit


def problems(result: dict) -> dict[str, str]:
    return {n: c["status"] for n, c in result["checks"].items() if c["status"] in ("fail", "warn")}


def examples(result: dict, check: str) -> str:
    return "\n".join(result["checks"][check].get("examples", []))


# --------------------------------------------------------------------------- clean data and drift
@pytest.fixture(scope="module")
def clean_runs(tmp_path_factory):
    """A clean dataset validated twice (the first run writes the baseline), then a drifted release."""
    tmp = tmp_path_factory.mktemp("clean")
    first = run_validate(tmp, clean_specs())
    baseline_written = (tmp / "cache_dir" / "validation_baseline.json").exists()
    headline_first = json.loads((tmp / "reports_dir" / "validate.json").read_text())
    second = validate.run(settings_for(tmp))
    summary_json = tmp / "reports_dir" / "validation" / "summary.json"
    summary_second = summary_json.read_bytes()
    validate.run(settings_for(tmp, drift_psi_max=0.35))  # a validate param that does not change the verdict
    summary_param_changed = summary_json.read_bytes()
    shifted = clean_specs()
    for split in SPLITS:  # a new release: brighter scans, and 3/4 instead of 1/2 'opacity' in every split
        for s in [s for s in shifted if s["split"] == split and s["label"] == "normal"][::2]:
            s["label"] = "opacity"
    for s in shifted:
        s["img"] = np.clip(s["img"].astype(int) + 25, 0, 255).astype(np.uint8)
    drifted = run_validate(tmp, shifted)
    return {
        "tmp": tmp,
        "first": first,
        "baseline_written": baseline_written,
        "second": second,
        "drifted": drifted,
        "summary_second": summary_second,
        "summary_param_changed": summary_param_changed,
        "headline_first": headline_first,
        "headline_drifted": json.loads((tmp / "reports_dir" / "validate.json").read_text()),
    }


def test_clean_dataset_passes_without_alarms_and_becomes_the_baseline(clean_runs):
    first, tmp = clean_runs["first"], clean_runs["tmp"]
    assert first["passed"] and problems(first) == {}, problems(first)
    assert first["checks"]["drift_intensity"]["status"] == "skipped"
    assert "No baseline" in first["markdown"] and first["drift"]["baseline"] is None
    assert clean_runs["baseline_written"]
    reports = tmp / "reports_dir" / "validation"
    metrics = json.loads((reports / "summary.json").read_text())  # compact verdict (augment waits on it)
    assert metrics["passed"] is True and metrics["offending"]["blank"] == 0 and metrics["images"] == 48
    # `dvc metrics show` reads only the headline: the two counts, no per-check detail
    assert clean_runs["headline_first"] == {"failed": 0, "warnings": 0}
    assert clean_runs["headline_drifted"] == {"failed": 0, "warnings": len(problems(clean_runs["drifted"]))}
    for name in ("index.html", "leakage.csv", "checks.json", "report.md"):
        assert (reports / "site" / name).exists(), name
    assert json.loads((reports / "site" / "checks.json").read_text())["checks"]["blank"]["bound"] == "std > 2.0"

    second = clean_runs["second"]  # the same data again: drift is checked, and is zero
    assert second["passed"] and problems(second) == {}
    assert second["checks"]["drift_intensity"]["status"] == "pass"
    assert second["drift"]["same_dataset"] and second["drift"]["intensity"]["mean"]["psi"] == pytest.approx(0)


def test_same_verdict_leaves_the_dvc_metrics_file_byte_identical(clean_runs):
    """augment depends on reports/validation/summary.json (dvc.yaml): a validate rerun with the same
    outcome (here a changed drift bound) must not change it, or DVC retrains for nothing. It held the
    run's seconds, so a validate-only param change made augment, train, evaluate and register stale."""
    assert clean_runs["summary_param_changed"] == clean_runs["summary_second"]
    assert b"seconds" not in clean_runs["summary_second"]


def test_drift_against_the_last_validated_version_warns(clean_runs):
    result = clean_runs["drifted"]
    assert result["passed"]  # drift warns by default
    assert problems(result) == {"drift_prevalence": "warn", "drift_intensity": "warn"}
    assert result["drift"]["intensity"]["mean"]["psi"] > 0.2 and result["drift"]["prevalence_shift_max"] > 0.1
    assert "all/opacity (shift=0.250)" in examples(result, "drift_prevalence")  # 3 decimals since 852b0b6
    assert "mean (psi=" in examples(result, "drift_intensity")


# --------------------------------------------------------------------------- planted errors
@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """One dataset with every error kind planted once, far enough apart not to trigger each other."""
    specs = clean_specs()
    plants: dict[str, tuple[dict, ...]] = {}
    src, dup = pick(specs, "train", "normal", 0), pick(specs, "test", "normal", 0)
    dup["img"] = src["img"].copy()  # the same file in train and test
    plants["duplicate"] = (src, dup)

    def reencode(pil: Image.Image, quality: int) -> Image.Image:
        buf = io.BytesIO()
        pil.save(buf, "JPEG", quality=quality)
        return Image.open(buf)

    a, b = pick(specs, "train", "opacity", 0), pick(specs, "val", "opacity", 0)
    b["img"] = ingested(reencode(Image.fromarray(a["src"]).resize((96, 96), Image.Resampling.BILINEAR), 80))
    plants["resized"] = (a, b)
    a, b = pick(specs, "train", "opacity", 2), pick(specs, "test", "opacity", 0)
    b["img"] = ingested(reencode(Image.fromarray(a["src"]), 60))
    plants["re-encoded"] = (a, b)
    a, b = pick(specs, "train", "normal", 2), pick(specs, "test", "normal", 2)
    b["patient"] = a["patient"]  # one patient in train and test
    plants["patient"] = (a, b)
    blank = pick(specs, "train", "normal", 4)
    blank["img"] = np.zeros_like(blank["img"])
    plants["blank"] = (blank,)
    odd = pick(specs, "train", "opacity", 4)
    plants["label"] = (odd,)
    result = run_validate(
        tmp_path_factory.mktemp("planted"), specs, manifest_edit=relabel_in_manifest(odd, "fracture"), expect_fail=True
    )
    return result, plants


def test_planted_errors_fail_the_stage_and_nothing_else_alarms(planted):
    result, _ = planted
    assert problems(result) == {
        "duplicate_cross_split": "fail",
        "near_duplicate_cross_split": "fail",
        "patient_overlap": "fail",
        "blank": "fail",
        "unknown_label": "fail",
    }
    assert not result["passed"] and result["n_errors"] == 5
    for check in result["errors"]:
        assert f"  - {check}: observed" in result["error_message"]


def test_exact_duplicate_across_train_and_test(planted):
    result, plants = planted
    src, dup = plants["duplicate"]
    assert src["name"] in examples(result, "duplicate_cross_split")
    assert dup["name"] in examples(result, "duplicate_cross_split")
    assert dup["name"] in result["error_message"]
    assert result["leakage"]["counts"]["exact_cross_split_pairs"] == 1
    assert src["name"] in result["leakage"]["exact_cross_split_examples"][0]


@pytest.mark.parametrize("how", ["resized", "re-encoded"])
def test_near_duplicate_across_splits(planted, how):
    result, plants = planted
    a, b = plants[how]
    pair = [e for e in result["checks"]["near_duplicate_cross_split"]["examples"] if a["name"] in e]
    assert pair and b["name"] in pair[0], examples(result, "near_duplicate_cross_split")
    assert result["leakage"]["counts"]["near_cross_split_pairs"] == 2
    assert result["checks"]["near_duplicate_cross_split"]["severity"] == "error"


def test_patient_in_two_splits(planted):
    result, plants = planted
    a, b = plants["patient"]
    text = examples(result, "patient_overlap")
    assert a["name"] in text and b["name"] in text and "train+test" in text
    assert result["leakage"]["counts"]["patients_in_several_splits"] == 1


def test_blank_image_is_reported_once(planted):
    result, plants = planted
    (blank,) = plants["blank"]
    assert blank["name"] in examples(result, "blank") and "std=0" in examples(result, "blank")
    assert "blank: observed 1 of 48 images (bound: std > 2.0)" in result["error_message"]
    assert result["checks"]["low_contrast"]["status"] == "pass"  # not also low-contrast / saturated / inverted


def test_unknown_label(planted):
    result, plants = planted
    (odd,) = plants["label"]
    assert odd["name"] in examples(result, "unknown_label") and "fracture" in examples(result, "unknown_label")
    assert result["checks"]["array_consistency"]["status"] == "pass"


def test_prevalence_gap_between_splits_fails(tmp_path):
    specs = clean_specs()
    for s in [s for s in specs if s["split"] == "test" and s["label"] == "normal"][:3]:
        s["label"] = "opacity"  # test becomes 7/8 'opacity' while train stays 1/2
    result = run_validate(tmp_path, specs, expect_fail=True)
    assert problems(result) == {"prevalence_gap": "fail"}
    assert "test/opacity (gap=0.375)" in examples(result, "prevalence_gap")
    assert "prevalence_gap: observed" in result["error_message"] and "≤ 0.1" in result["error_message"]
    assert json.loads((tmp_path / "reports_dir" / "validate.json").read_text()) == {"failed": 1, "warnings": 0}


# --------------------------------------------------------------------------- warnings and severity
def test_warnings_name_the_files_and_severity_overrides_apply(tmp_path):
    specs = clean_specs()
    inverted, saturated, flat, blank = (pick(specs, "train", "normal", k) for k in (1, 3, 5, 7))
    odd = pick(specs, "train", "opacity", 1)
    body = inverted["img"][8:24, 8:24].copy()
    inverted["img"] = np.full_like(inverted["img"], 235)  # bright surround, as a MONOCHROME1 scan shown raw
    inverted["img"][8:24, 8:24] = body
    saturated["img"] = saturated["img"].copy()
    saturated["img"][4:28, 4:28] = 255  # 56% of the pixels burnt out
    img = flat["img"].astype(float)
    flat["img"] = np.round(img.mean() + (img - img.mean()) * 5 / img.std()).astype(np.uint8)  # std 5
    blank["img"] = np.full_like(blank["img"], 128)
    result = run_validate(
        tmp_path,
        specs,
        manifest_edit=relabel_in_manifest(odd, "fracture"),
        severity={"blank": "warn", "unknown_label": "off"},
    )
    assert result["passed"]
    assert problems(result) == {"inverted": "warn", "saturated": "warn", "low_contrast": "warn", "blank": "warn"}
    assert inverted["name"] in examples(result, "inverted")
    assert saturated["name"] in examples(result, "saturated")
    assert flat["name"] in examples(result, "low_contrast")
    assert blank["name"] in examples(result, "blank")
    assert result["checks"]["unknown_label"]["status"] == "off" and "fracture" not in result["markdown"]
    assert "⚠️ warn" in result["markdown"] and saturated["name"] in result["markdown"]
    assert json.loads((tmp_path / "reports_dir" / "validate.json").read_text()) == {"failed": 0, "warnings": 4}


def test_unknown_check_name_in_severity_is_rejected():
    with pytest.raises(ConfigError, match=r"validate\.severity.*blnak"):
        settings_from_dict({"validate": {"severity": {"blnak": "warn"}}})
    assert set(CHECKS) >= {
        "duplicate_cross_split",
        "near_duplicate_cross_split",
        "patient_overlap",
        "blank",
        "unknown_label",
        "prevalence_gap",
    }


# --------------------------------------------------------------------------- pure pieces and wiring
def test_batched_phash_equals_imagehash():
    import imagehash

    rng = np.random.default_rng(3)
    batch = np.stack([ingested(source_image(rng, 80))[:, :30] for _ in range(6)])  # non-square: resize path
    bits = tables.phash_bits(batch, 16)
    for img, b in zip(batch, bits, strict=True):
        ref = imagehash.phash(Image.fromarray(img[..., 0]), hash_size=16).hash.flatten()
        assert np.array_equal(np.unpackbits(b)[: ref.size].astype(bool), ref)


def test_hamming_pairs_matches_brute_force():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 256, (300, 8), dtype=np.uint8)
    bits[7] = bits[3] ^ np.array([1, 0, 0, 0, 0, 0, 0, 4], np.uint8)  # distance 2
    i, j, d = leakage.hamming_pairs(bits, 20)
    unpacked = np.unpackbits(bits, axis=1).astype(int)
    dist = (unpacked[:, None, :] != unpacked[None, :, :]).sum(-1)
    want = {(a, b) for a, b in zip(*np.nonzero(np.triu(dist <= 20, 1)), strict=True)}
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == want and (3, 7) in want
    assert all(dist[a, b] == c for a, b, c in zip(i, j, d, strict=True))


def _stages_run(dvc_output: str) -> list[str]:
    """The stages `dvc repro` executed (DVC prints "Running stage 'x':" before each command)."""
    return re.findall(r"^Running stage '([^']+)'", dvc_output, re.MULTILINE)


@pytest.mark.slow
def test_dvc_reruns_validate_only_on_ingest_output_code_or_params(tmp_path):
    """Real `dvc repro validate` in a temporary git + DVC checkout of this pipeline (tiny synthetic source).

    A changed `validate` param makes validate, and nothing before it, stale; the rerun executes validate
    only (ingest: "didn't change, skipping", its dvc.lock entry byte-identical) and uses the new value.
    A param of a later stage leaves both up to date. (Code changes: tests/test_claims.py; a changed
    ingest output: tests/test_lifecycle.py.)
    """
    from tasks.common import dvc_status
    from tests.test_flow import make_checkout, run_cmd, set_params

    checkout = make_checkout(tmp_path / "checkout")
    first = run_cmd(checkout, "dvc", "repro", "validate")
    assert _stages_run(first) == ["ingest", "validate"], first[-2000:]
    lock_before = yaml.safe_load((checkout / "dvc.lock").read_text())["stages"]
    assert lock_before["validate"]["params"]["params.yaml"]["validate"]["drift_psi_max"] == 0.2

    set_params(checkout, {"augment": {"seed": 8}, "train": {"dropout": 0.3}, "evaluate": {"seed": 5}})
    assert dvc_status("ingest", checkout) == [] and dvc_status("validate", checkout) == []

    set_params(checkout, {"validate": {"drift_psi_max": 0.35}})
    assert dvc_status("ingest", checkout) == []
    assert dvc_status("validate", checkout) == [{"changed deps": {"params.yaml": {"validate": "modified"}}}]
    second = run_cmd(checkout, "dvc", "repro", "validate")
    assert _stages_run(second) == ["validate"], second[-2000:]
    assert "Stage 'ingest' didn't change, skipping" in second, second[-2000:]
    lock_after = yaml.safe_load((checkout / "dvc.lock").read_text())["stages"]
    assert lock_after["ingest"] == lock_before["ingest"]
    assert lock_after["validate"]["params"]["params.yaml"]["validate"]["drift_psi_max"] == 0.35
    checks = json.loads((checkout / "reports/validation/site/checks.json").read_text())["checks"]
    assert checks["drift_intensity"]["bound"] == "PSI ≤ 0.35", checks["drift_intensity"]  # the new value ran
    assert dvc_status("ingest", checkout) == [] and dvc_status("validate", checkout) == []


def test_great_expectations_is_imported_only_inside_functions():
    """GX takes seconds to import: no module-level import anywhere in the stage or its package."""
    files = [ROOT / "src/medclf/stages/validate.py", *sorted((ROOT / "src/medclf/validation").glob("*.py"))]
    for path in files:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.startswith("great_expectations") for n in names), path


# --------------------------------------------------------------------------- label conflicts (issue 12, row 1)
def test_same_file_under_two_labels_is_an_error_naming_both_paths(tmp_path):
    """Issue 12, row 1: identical bytes as NORMAL/x.png and PNEUMONIA/y.png passed with only a warning."""
    specs = clean_specs()
    a, b = pick(specs, "train", "normal", 0), pick(specs, "train", "opacity", 0)
    b["img"] = a["img"].copy()  # the same file under the other label, in the same split
    result = run_validate(tmp_path, specs, expect_fail=True)
    assert problems(result) == {"duplicate_within_split": "warn", "label_conflict": "fail"}
    assert result["checks"]["label_conflict"]["severity"] == "error"
    text = examples(result, "label_conflict")
    assert a["name"] in text and b["name"] in text, text
    assert "label_conflict: observed" in result["error_message"]
    assert a["name"] in result["error_message"] and b["name"] in result["error_message"]
    assert result["leakage"]["counts"]["label_conflict_pairs"] == 1


def test_label_conflict_across_splits_is_found_by_sha256():
    images = pd.DataFrame(
        {
            "file": ["train:N/x.png", "test:P/y.png", "val:N/z.png", "val:N/w.png"],
            "split": ["train", "test", "val", "val"],
            "label": ["normal", "opacity", "normal", "normal"],
            "sha256": ["s1", "s1", "s2", "s2"],
            "patient_hash": [None] * 4,
        }
    )
    leak = leakage.find_leakage(images.assign(_h=None), np.zeros((0, 32), bool), 0)
    out = leakage.annotate(images, leak)
    assert out["label_conflict_of"].tolist()[:2] == ["test:P/y.png (label opacity)", "train:N/x.png (label normal)"]
    assert out["label_conflict_of"].iloc[2:].isna().all()  # same bytes, same label: a duplicate, not a conflict
    assert "label_conflict" in CHECKS and CHECKS["label_conflict"][0] == "error"


def test_sliver_images_warn_by_a_configurable_aspect_bound(tmp_path):
    """Issue 12, row 7: a 4000×40 sliver passed `image_size` with no aspect check."""
    specs = clean_specs()
    sliver = pick(specs, "train", "normal", 1)

    def edit(m: pd.DataFrame) -> None:
        at = m["source_uri"] == f"synthetic-test://{sliver['name']}"
        m.loc[at, "orig_height"], m.loc[at, "orig_width"] = 40, 4000

    result = run_validate(tmp_path, specs, manifest_edit=edit, max_size=5000)
    assert problems(result) == {"aspect_ratio": "warn"}
    assert sliver["name"] in examples(result, "aspect_ratio") and "aspect_ratio=100" in examples(result, "aspect_ratio")
    result = run_validate(tmp_path / "loose", specs, manifest_edit=edit, max_size=5000, max_aspect_ratio=100)
    assert "aspect_ratio" not in problems(result)
