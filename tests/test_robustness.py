"""Robustness report (issue 26 point 2): the perturbations, the completeness check, the gate, the figure and table."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medclf.evaluation import robustness as rb
from medclf.evaluation.metrics import roc_auc

ALL = [(p.name, s) for p in rb.PERTURBATIONS for s in range(1, len(p.params) + 1)]


def textured(n: int = 6, size: int = 24, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Images with structure (a gradient, a disc, noise), grey levels well inside 0..255."""
    rng = np.random.default_rng(seed)
    i, j = np.mgrid[0:size, 0:size] / size
    base = 60 + 100 * i + 40 * (((i - 0.5) ** 2 + (j - 0.5) ** 2) < 0.1)
    x = base[None, :, :, None] + rng.normal(0, 12, (n, size, size, channels))
    out: np.ndarray = np.clip(x, 0, 255).astype(np.uint8)
    return out


def level_set(n: int = 80, size: int = 24, channels: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class 1 is brighter on average than class 0 (overlapping), texture otherwise position-free noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    level = 120 + 16 * (y - 0.5) + rng.normal(0, 8, n)
    x = level[:, None, None, None] + rng.normal(0, 15, (n, size, size, channels))
    return np.clip(x, 0, 255).astype(np.uint8), y


def mean_predictor(x: np.ndarray) -> np.ndarray:
    """P(positive) rises with the mean intensity (threshold 0.5 at grey level 120)."""
    p = 1 / (1 + np.exp(-(x.reshape(len(x), -1).mean(axis=1) - 120) / 5))
    return np.stack([1 - p, p], axis=1)


def binary_score(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    pred = proba[:, 1] >= 0.5
    return {
        "auc": roc_auc(y, proba[:, 1]),
        "sensitivity": float(pred[y == 1].mean()),
        "specificity": float((~pred[y == 0]).mean()),
    }


def report(invertible: bool = True, channels: int = 1, **kw: Any) -> dict[str, Any]:
    x, y = level_set(channels=channels)
    return rb.robustness_report(mean_predictor, x, y, binary_score, seed=3, invertible=invertible, **kw)


# ----------------------------------------------------------------------------- the perturbations
def test_registry_lists_the_issue_shifts_with_one_to_three_severities() -> None:
    names = [p.name for p in rb.PERTURBATIONS]
    assert len(set(names)) == len(names)
    for n in ("gamma", "contrast", "brightness", "blur", "noise", "jpeg", "downsample", "rotate_ccw", "rotate_cw"):
        assert n in names
    assert {"crop", "pad_edge", "pad_black", "invert"} <= set(names)
    assert all(1 <= len(p.params) <= 3 for p in rb.PERTURBATIONS)
    assert [p.name for p in rb.PERTURBATIONS if p.needs_invertible] == ["invert"]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("name", "severity"), ALL)
def test_each_perturbation_keeps_shape_dtype_changes_the_image_and_is_deterministic(
    name: str, severity: int, channels: int
) -> None:
    x = textured(channels=channels)
    p = rb.perturbation(name)
    a, b = rb.apply(p, x, severity, seed=1), rb.apply(p, x, severity, seed=1)
    assert a.shape == x.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - x).mean() > 0.05, f"{name} s{severity} barely changed the images"
    assert np.array_equal(x, textured(channels=channels)), "the input must not be modified in place"


def test_noise_depends_on_the_seed_and_not_on_the_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    x, p = textured(n=10), rb.perturbation("noise")
    whole = rb.apply(p, x, 2, seed=1)
    assert not np.array_equal(whole, rb.apply(p, x, 2, seed=2))
    monkeypatch.setattr(rb, "CHUNK", 3)
    assert np.array_equal(whole, rb.apply(p, x, 2, seed=1))
    assert np.array_equal(rb.apply(rb.perturbation("blur"), x, 1, 0), rb.apply(rb.perturbation("blur"), x, 1, 5))


def test_rotation_fills_with_edge_pixels_and_black_pad_adds_a_black_border() -> None:
    x = np.full((2, 32, 32, 1), 200, np.uint8)
    for name in ("rotate_ccw", "rotate_cw", "pad_edge", "crop"):
        assert rb.apply(rb.perturbation(name), x, len(rb.perturbation(name).params), 0).min() >= 199, name
    black = rb.apply(rb.perturbation("pad_black"), x, 1, 0)
    assert black[:, 0].max() < 50 and black[:, :, 0].max() < 50 and black[:, 16, 16].min() == 200
    # the rotation turns the content: a bright top band moves
    band = np.zeros((1, 32, 32, 1), np.uint8)
    band[:, :4] = 255
    turned = rb.apply(rb.perturbation("rotate_ccw"), band, 2, 0)
    assert turned[0, :4, 0].mean() != turned[0, :4, -1].mean()


def test_down_sampling_and_blur_remove_fine_detail_more_at_the_higher_severity() -> None:
    x = textured(n=4, size=32)
    for name in ("blur", "downsample"):
        p = rb.perturbation(name)
        detail = [float(np.abs(np.diff(rb.apply(p, x, s, 0).astype(float), axis=2)).mean()) for s in (1, 2)]
        assert detail[1] < detail[0] < float(np.abs(np.diff(x.astype(float), axis=2)).mean()), name


def test_invert_maps_black_to_white() -> None:
    x = textured()
    assert np.array_equal(rb.apply(rb.perturbation("invert"), x, 1, 0), 255 - x)


# ----------------------------------------------------------------------------- completeness
def test_inversion_is_skipped_with_a_reason_when_the_modality_is_not_invertible() -> None:
    colour = report(invertible=False, channels=3)
    assert colour["skipped"] == [{"name": "invert", "reason": "not applicable to colour images"}]
    assert "invert" not in {r["name"] for r in colour["perturbations"]}
    grey = report(invertible=True)
    assert grey["skipped"] == []
    assert [(r["name"], r["severity"]) for r in grey["perturbations"]] == ALL
    assert report(invertible=False)["skipped"][0]["reason"] == "not applicable to this modality"


def test_a_planted_silent_skip_in_the_loop_fails_the_report(monkeypatch: pytest.MonkeyPatch) -> None:
    real = rb._rows
    monkeypatch.setattr(rb, "_rows", lambda p, *a: [] if p.name == "blur" else real(p, *a))
    with pytest.raises(rb.RobustnessIncomplete, match="blur: severities \\[\\] reported"):
        report()


def test_assert_complete_catches_every_kind_of_gap() -> None:
    good = report()
    rb.assert_complete(good, invertible=True)

    def broken(edit: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
        doc = {**good, "perturbations": [dict(r) for r in good["perturbations"]], "skipped": list(good["skipped"])}
        edit(doc)
        return doc

    cases: dict[str, Callable[[dict[str, Any]], object]] = {
        "jpeg: severities \\[1\\]": lambda d: d["perturbations"].remove(
            next(r for r in d["perturbations"] if r["name"] == "jpeg" and r["severity"] == 2)
        ),
        "crop: skipped without a reason": lambda d: (
            d.update(perturbations=[r for r in d["perturbations"] if r["name"] != "crop"]),
            d["skipped"].append({"name": "crop", "reason": ""}),
        ),
        "gamma: both skipped and reported": lambda d: d["skipped"].append({"name": "gamma", "reason": "x"}),
        "noise severity 1: metrics \\['auc'\\] missing": lambda d: d["perturbations"][8].pop("auc"),
        "silent no-op": lambda d: d["perturbations"][0].update(pixel_change=0.0),
    }
    for message, edit in cases.items():
        with pytest.raises(rb.RobustnessIncomplete, match=message):
            rb.assert_complete(broken(edit), invertible=True)
    with pytest.raises(rb.RobustnessIncomplete, match="invert: reported although not invertible"):
        rb.assert_complete(good, invertible=False)
    no_invert = broken(lambda d: d.update(perturbations=[r for r in d["perturbations"] if r["name"] != "invert"]))
    no_invert["skipped"] = [{"name": "invert", "reason": "not applicable to colour images"}]
    with pytest.raises(rb.RobustnessIncomplete, match="invert: skipped although invertible"):
        rb.assert_complete(no_invert, invertible=True)


def test_a_perturbation_that_does_nothing_or_raises_is_not_a_result(monkeypatch: pytest.MonkeyPatch) -> None:
    noop = rb.Perturbation("noop", (1.0,), lambda x, _, __: x.copy(), "identity by mistake")
    monkeypatch.setattr(rb, "PERTURBATIONS", (*rb.PERTURBATIONS, noop))
    with pytest.raises(rb.RobustnessIncomplete, match="noop severity 1: left every image unchanged"):
        report()

    def boom(x: np.ndarray, _: float, __: np.random.Generator) -> np.ndarray:
        raise RuntimeError("codec missing")

    monkeypatch.setattr(rb, "PERTURBATIONS", (*rb.PERTURBATIONS[:-1], rb.Perturbation("boom", (1.0,), boom, "")))
    with pytest.raises(RuntimeError, match="codec missing"):
        report()


def test_names_select_and_the_rest_are_listed_as_not_selected() -> None:
    doc = report(names=["brightness", "rotate_cw"])
    assert {r["name"] for r in doc["perturbations"]} == {"brightness", "rotate_cw"}
    assert len(doc["skipped"]) == len(rb.PERTURBATIONS) - 2
    assert all(s["reason"] == "not selected" for s in doc["skipped"])
    with pytest.raises(KeyError, match="unknown perturbation 'sharpen'"):
        report(names=["sharpen"])
    with pytest.raises(ValueError, match="uint8"):
        rb.robustness_report(mean_predictor, np.zeros((4, 8, 8, 1)), np.zeros(4), binary_score, 0, True)


# ----------------------------------------------------------------------------- the report's numbers
def test_an_intensity_reading_model_loses_to_brightness_and_inversion_not_to_rotation() -> None:
    doc = report()
    clean, rows = doc["clean"], {(r["name"], r["severity"]): r for r in doc["perturbations"]}
    assert clean["auc"] > 0.85 and min(clean["sensitivity"], clean["specificity"]) > 0.6
    assert rows[("invert", 1)]["delta_auc"] < -0.7  # the ranking turns round
    assert rows[("brightness", 1)]["delta_sensitivity"] < -0.4  # darker: positives missed
    assert rows[("brightness", 2)]["delta_specificity"] < -0.4  # brighter: negatives flagged
    for name in ("rotate_ccw", "rotate_cw"):
        for s in (1, 2):
            assert abs(rows[(name, s)]["delta_auc"]) < 0.02, (name, s)
    assert doc["worst"]["auc"]["name"] == "invert"
    assert doc["worst"]["auc"]["delta"] == pytest.approx(rows[("invert", 1)]["delta_auc"])
    assert doc["n"] == 80 and doc["invertible"] is True


def test_the_gate_passes_and_fails_around_the_bound() -> None:
    doc = report(names=["rotate_ccw", "rotate_cw", "blur"])
    drop = doc["clean"]["auc"] - min(r["auc"] for r in doc["perturbations"])
    assert rb.robustness_gate(doc, None, "auc") == {"skipped": True, "metric": "auc"}
    passed = rb.robustness_gate(doc, drop + 1e-9, "auc")
    assert passed["passed"] and passed["drop"] == pytest.approx(drop) and passed["bound"] == drop + 1e-9
    assert passed["worst"]["name"] in {"rotate_ccw", "rotate_cw", "blur"}
    assert not rb.robustness_gate(doc, drop - 1e-6, "auc")["passed"]
    assert not rb.robustness_gate(report(), 0.2, "auc")["passed"]  # inversion costs > 0.7
    undefined = {**doc, "clean": {**doc["clean"], "auc": float("nan")}}
    assert rb.robustness_gate(undefined, 1.0, "auc")["passed"] is False


def test_figure_and_markdown_table(tmp_path: Path) -> None:
    doc = report(invertible=False, channels=3, names=None)
    png = rb.robustness_png(doc, tmp_path / "robustness.png", "auc")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    lines = rb.robustness_markdown(doc, "auc")
    assert lines[0] == "| perturbation | severity | auc | Δ vs clean |"
    assert lines[2].startswith("| clean | - | ")
    assert len([ln for ln in lines if ln.startswith("| ")]) == len(doc["perturbations"]) + 2  # header, clean
    assert lines[-1] == "- invert: skipped (not applicable to colour images)"
    assert any(ln.startswith("| jpeg | 2 (10) | ") for ln in lines)


def test_a_tiny_keras_model_runs_through_the_report() -> None:
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 1), dtype="uint8")
    h = keras.layers.Rescaling(1 / 255)(inp)
    for filters in (4, 8):
        h = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(h)
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inp, out)
    x, y = level_set(n=64, size=32)
    calls: list[int] = []

    def predict(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        return np.asarray(model.predict(images, batch_size=64, verbose=0), dtype=np.float64)

    t0 = time.perf_counter()
    doc = rb.robustness_report(predict, x, y, binary_score, seed=0, invertible=True)
    assert time.perf_counter() - t0 < 20
    assert calls == [64] * (1 + len(ALL))  # the clean set and each perturbed copy, once
    assert all(np.isfinite(r["auc"]) for r in doc["perturbations"])
