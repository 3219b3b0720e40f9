"""The K-class evidence (issue 24): per-class ROC and PR, the confusion matrix in counts and row-normalised, the
top-label reliability diagram with its bin counts, subgroup metrics, test_predictions.csv with the task's decision
columns, and the per-class Grad-CAM gallery, on the real 3-class chest X-ray subsample of
tests/test_kclass_pipeline.py. The gallery's captions never collide (binary gallery included): measured with
matplotlib's renderer on a gallery of long captions."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import uuid

import numpy as np
import pytest

from tests.conftest import CHEST_XRAY, KERMANY_REGEX, write_params
from tests.test_kclass_pipeline import CLASSES, PER_CLASS, _label

slow = pytest.mark.slow  # the model tests; the layout test above them is fast
FIGURES = ("roc", "pr", "confusion", "calibration", "gradcam")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- the gallery layout (fast, no model)
def _squash(s: str) -> str:
    return "".join(s.split())


def _overlap(a, b, tol: float = 0.5) -> bool:
    """Whether two display-space bboxes share more than a hairline (`tol` pixels)."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > tol and min(a.y1, b.y1) - max(a.y0, b.y0) > tol


def _saved_gallery(monkeypatch, tmp_path, groups, n, title):
    """`plots.gallery_png`'s figure as it is saved (bbox_inches="tight" and the save dpi in effect), whatever its
    layout code: {"texts": [(string, bbox)], "images": [bbox]} in display space, measured in the draw that writes
    the file (its draw_event)."""
    from medclf.evaluation import plots

    seen: list[dict] = []
    save = plots._save

    def measure(event):
        fig, r = event.canvas.figure, event.renderer
        drawn = [*fig.texts, *(t for ax in fig.axes for t in (ax.title, ax._left_title, ax._right_title, *ax.texts))]
        seen.append(
            {
                "texts": [
                    (t.get_text(), t.get_window_extent(r).frozen()) for t in drawn if t.get_visible() and t.get_text()
                ],
                "images": [ax.get_window_extent(r).frozen() for ax in fig.axes if ax.images],
            }
        )

    def caught(fig, path):
        fig.canvas.mpl_connect("draw_event", measure)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", caught)
    out = plots.gallery_png(groups, tmp_path / "gallery.png", n, title)
    assert out.read_bytes().startswith(PNG_MAGIC) and seen
    return seen[-1]  # the last draw is the one printed to the file


LONG = [
    "#12  true BACTERIA, predicted VIRUS  p(VIRUS)=0.9731 (the most confident confusion of this row)",
    "#7  p(PNEUMONIA)=0.0071 < 0.0105",
    "#1234  true NORMAL predicted NORMAL p(NORMAL)=0.9999 and a WWWWWWWWWWWWWWWWWWWWWWWWWWWWWW word",
    "#3\nsecond line\nthird line of a caption that also runs on for longer than any gallery cell is wide",
]


@pytest.mark.parametrize("n", [1, 3])
def test_gallery_captions_never_collide(monkeypatch, tmp_path, n):
    """Every caption keeps to itself: no two caption boxes overlap, no caption covers an image (its own or another
    cell's), a row label or the title; long captions, unbreakable words and several lines included."""
    rng = np.random.default_rng(0)
    rows = ["true positives", "false positives", "VIRUS: missed (true VIRUS, predicted another class)", "empty"]
    groups = {
        name: [
            {"overlay": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), "caption": LONG[(r + c) % len(LONG)]}
            for c in range(n if name != "empty" else 0)
        ]
        for r, name in enumerate(rows)
    }
    title = "Grad-CAM of the log-odds of 'VIRUS' on 'block_13_expand_relu', " * 3
    drawn = _saved_gallery(monkeypatch, tmp_path, groups, n, title)
    captions = {_squash(item["caption"]) for items in groups.values() for item in items}
    caps = [box for text, box in drawn["texts"] if _squash(text) in captions]
    others = [box for text, box in drawn["texts"] if _squash(text) not in captions | {"noneinthetestset"}]
    images = drawn["images"]
    assert len(caps) == sum(len(v) for v in groups.values()) and len(images) == len(caps)
    assert len(others) == len(groups) + 1, "a label per row and the title"
    for (i, a), (j, b) in itertools.combinations(enumerate(caps), 2):
        assert not _overlap(a, b), f"captions {i} and {j} overlap: {a} / {b}"
    for i, a in enumerate(caps):
        for j, im in enumerate(images):
            assert not _overlap(a, im), f"caption {i} covers image {j}"
        for j, o in enumerate(others):
            assert not _overlap(a, o), f"caption {i} covers label/title {j}"
    for (i, a), (j, b) in itertools.combinations(enumerate(others), 2):
        assert not _overlap(a, b), f"labels/title {i} and {j} overlap"
    for i, o in enumerate(others):
        for j, im in enumerate(images):
            assert not _overlap(o, im), f"label/title {i} covers image {j}"


def test_kclass_gallery_picks_are_per_class_and_most_confident_first():
    """Per class c: correct (true c, predicted c, by p_c), missed (true c, predicted another, by that class's p) and
    false calls (predicted c, true another, by p_c), at most n each."""
    from medclf.modeling.gradcam import class_picks

    proba = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.5, 0.4, 0.1]])
    y = np.array([0, 0, 0, 1, 1])
    pred = proba.argmax(axis=1)  # 0 0 1 2 0
    assert class_picks(y, pred, proba, 0, 5) == [[0, 1], [2], [4]]
    assert class_picks(y, pred, proba, 0, 1) == [[0], [2], [4]]
    assert class_picks(y, pred, proba, 1, 5) == [[], [3, 4], [2]]  # row 3 (p 0.8 wrong) before row 4
    assert class_picks(y, pred, proba, 2, 5) == [[], [], [3]]


def test_kclass_subgroups_count_every_image_and_write_no_nan():
    """Each category's n and per-class support add up; a macro AUC a category cannot define (a class absent) is None,
    not NaN; a small category gets its point figures and a note."""
    from medclf.evaluation.task import Decision, TaskSpec, subgroup_metrics

    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 20)
    proba = rng.dirichlet(np.ones(3), size=y.size)
    proba[np.arange(y.size), y] += 1.0
    proba /= proba.sum(axis=1, keepdims=True)
    site = np.where(np.arange(y.size) < 40, "A", "B")  # B holds class 2 only
    spec = TaskSpec("multiclass", tuple(CLASSES))
    out = subgroup_metrics(spec, Decision("argmax"), y, proba, {"site": site}, None, 30, 0)
    a, b = out["site"]["A"], out["site"]["B"]
    assert a["n"] + b["n"] == y.size and b["support"] == {"BACTERIA": 0, "NORMAL": 0, "VIRUS": 20}
    assert b["macro_auc"] is None and b["accuracy"] == pytest.approx(float((proba[40:].argmax(1) == 2).mean()))
    assert a["accuracy_ci_low"] <= a["accuracy"] <= a["accuracy_ci_high"] and "note" not in a
    json.dumps(out, allow_nan=False)
    small = subgroup_metrics(spec, Decision("argmax"), y[:10], proba[:10], {"site": site[:10]}, None, 30, 0)
    assert small["site"]["A"]["accuracy_ci_low"] is None and "no CI" in small["site"]["A"]["note"]


# ----------------------------------------------------------------------------- a real 3-class run (slow)
@pytest.fixture(scope="module")
def cxr3_sites(tmp_path_factory, mlflow_server):
    """tests/test_kclass_pipeline.py's project (PER_CLASS real chest X-rays per class, 32 px, 1+1 epochs), its
    manifest with a declared subgroup `site` (A/B by patient), Grad-CAM on (2 per group), 50 bootstrap resamples."""
    if not (CHEST_XRAY / "train").is_dir():
        pytest.skip(f"{CHEST_XRAY}/train absent (../shared/data, see its README)")
    from medclf.config import load_settings
    from medclf.stages import augment, ingest, train

    root = tmp_path_factory.mktemp("cxr3_sites")
    raw = root / "raw"
    (raw / "img").mkdir(parents=True)
    rows, taken, sites = ["path,label,patient_id,site"], dict.fromkeys(CLASSES, 0), {}
    for folder in ("NORMAL", "PNEUMONIA"):
        for f in sorted((CHEST_XRAY / "train" / folder).iterdir()):
            label = _label(f.name, folder)
            if taken[label] >= PER_CLASS:
                continue
            taken[label] += 1
            shutil.copy2(f, raw / "img" / f.name)
            pid = re.match(KERMANY_REGEX, f.name)
            patient = pid.group(1) if pid else f.stem
            site = sites.setdefault(patient, "AB"[len(sites) % 2])
            rows.append(f"img/{f.name},{label},{patient},{site}")
    (raw / "labels.csv").write_text("\n".join(rows) + "\n")
    overrides = {
        "paths": {"raw_data": str(raw)},
        "ingest": {
            "source": {"kind": "manifest", "uri": str(raw / "labels.csv")},
            "classes": CLASSES,
            "image_size": 32,
            "splits": {"val_fraction": 0.25, "test_fraction": 0.25},
            "subgroups": ["site"],
        },
        "task": {"type": "multiclass", "critical_classes": ["VIRUS"]},
        "validate": {"severity": {"prevalence_gap": "warn", "prevalence_bounds": "warn"}},
        "train": {"head_epochs": 1, "finetune_epochs": 1, "batch_size": 16, "early_stopping_patience": 0},
        "evaluate": {
            "bootstrap": 50,
            "gradcam_n": 2,
            "target_sensitivity": 0.8,
            "gates": {"bounds": {"balanced_accuracy": 0.0, "recall[VIRUS]": 0.0}},
        },
        "register": {"model_name": f"cxr3-sites-{uuid.uuid4().hex[:8]}"},
        "mlflow": {"tracking_uri": mlflow_server},
    }
    settings = load_settings(write_params(root, overrides))
    ingest.run(settings)  # validate is left out: it gates the data, which tests/test_kclass_pipeline.py covers
    augment.run(settings)
    train.run(settings)
    return settings


def _strict_json(path):
    def refuse(name):
        raise AssertionError(f"{path}: {name} is not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _test_split(settings):
    import pandas as pd

    from medclf.infra.catalog import MANIFEST, load_split

    _, y = load_split(settings.paths, "test", mmap=False)
    m = pd.read_parquet(MANIFEST.path(settings.paths))
    return y, m[m.split == "test"].sort_values("row")


def _assert_figures(reports, names):
    from PIL import Image

    for name in names:
        f = reports / "evaluate" / f"{name}.png"
        assert f.read_bytes().startswith(PNG_MAGIC), f
        with Image.open(f) as im:
            im.verify()  # a whole, decodable PNG


def _assert_subgroups(doc, test_rows, metrics):
    block = doc["subgroups"]["site"]
    assert set(block) == set(test_rows["subgroup_site"]) and sum(r["n"] for r in block.values()) == doc["test"]["n"]
    for cat, r in block.items():
        assert r["n"] == int((test_rows["subgroup_site"] == cat).sum()) == sum(r["support"].values())
        for m in metrics:
            assert r[m] is None or (isinstance(r[m], float) and math.isfinite(r[m])), (cat, m)
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["balanced_accuracy"] <= 1
        for m in metrics:
            lo, hi = r[f"{m}_ci_low"], r[f"{m}_ci_high"]
            assert ("note" in r) == (lo is None and hi is None) or r[m] is None, (cat, m)  # a CI unless too few
            assert lo is None or lo <= r[m] <= hi, (cat, m)


@slow
def test_multiclass_evidence_figures_predictions_subgroups_gallery(cxr3_sites, monkeypatch):
    import pandas as pd
    from mlflow import MlflowClient

    from medclf.evaluation import metrics
    from medclf.infra.catalog import TRAIN_RUN
    from medclf.stages import evaluate

    settings = cxr3_sites
    monkeypatch.setattr(metrics, "SUBGROUP_MIN_N", 3)  # ~12 test images per site: give them their CIs here
    out = evaluate.run(settings)
    reports = settings.paths.reports_dir
    doc, gates = _strict_json(reports / "metrics.json"), _strict_json(reports / "gates.json")
    y, test_rows = _test_split(settings)
    n = len(y)
    assert doc["test"]["n"] == n
    _assert_figures(reports, FIGURES)

    # test_predictions.csv: the served columns, one row per test image, the argmax (never one class's threshold)
    df = pd.read_csv(reports / "evaluate" / "test_predictions.csv")
    p_cols = [f"p_{c}" for c in CLASSES]
    assert list(df.columns) == ["test_row", "id", "label", *p_cols, "prediction", "flag_VIRUS"]
    assert len(df) == n and df["test_row"].tolist() == list(range(n))
    assert df["id"].tolist() == test_rows["id"].tolist() and df["label"].tolist() == [CLASSES[i] for i in y]
    proba = df[p_cols].to_numpy()
    assert df["prediction"].tolist() == [CLASSES[i] for i in proba.argmax(axis=1)]
    thr = gates["decision"]["flags"]["VIRUS"]["threshold"]
    assert df["flag_VIRUS"].tolist() == (df["p_VIRUS"] >= thr).tolist()
    assert np.asarray(doc["confusion"]["counts"]).sum() == n

    _assert_subgroups(doc, test_rows, ("accuracy", "balanced_accuracy", "macro_auc"))

    # the gallery: three rows per class, each at most gradcam_n, the correct ones as many as the test set has
    rows = out["gradcam"]["gradcam"]
    assert len(rows) == 3 * len(CLASSES) and all(0 <= v <= 2 for v in rows.values())
    pred = df["prediction"].to_numpy()
    for c in CLASSES:
        truth = df["label"].to_numpy() == c
        assert rows[f"{c}: correct (true and predicted {c})"] == min(2, int((truth & (pred == c)).sum()))
        assert rows[f"{c}: missed (true {c}, predicted another class)"] == min(2, int((truth & (pred != c)).sum()))
        assert rows[f"{c}: false call (predicted {c}, true another class)"] == min(2, int((~truth & (pred == c)).sum()))

    # every file of reports/evaluate/ reached the training run's `evaluate/` artifacts
    run_id = TRAIN_RUN.load(settings.paths)["run_id"]
    logged = {
        a.path for a in MlflowClient(tracking_uri=settings.mlflow.resolved_uri()).list_artifacts(run_id, "evaluate")
    }
    local = {f"evaluate/{f.name}" for f in (reports / "evaluate").iterdir()}
    assert local <= logged and {f"evaluate/{name}.png" for name in FIGURES} <= local
    assert "evaluate/test_predictions.csv" in logged


@slow
def test_ordinal_evidence_uses_the_cutpoints_and_the_referable_view(cxr3_sites, tmp_path):
    """The same model read as an ordinal task (grades in class order, referable from NORMAL): the CSV's prediction is
    the cut-points' grade and carries the served referable columns; figures and subgroups as for multiclass."""
    import pandas as pd

    from medclf.evaluation.kclass import apply_cutpoints
    from medclf.stages import evaluate

    base = cxr3_sites
    settings = base.model_copy(
        update={
            "task": base.task.model_copy(
                update={"type": "ordinal", "critical_classes": [], "referable_from": "NORMAL"}
            ),
            "evaluate": base.evaluate.model_copy(update={"gradcam_n": 1}),
            "paths": base.paths.model_copy(update={"reports_dir": tmp_path / "reports"}),
        }
    )
    out = evaluate.run(settings)
    reports = settings.paths.reports_dir
    doc, gates = _strict_json(reports / "metrics.json"), _strict_json(reports / "gates.json")
    assert out["task"] == doc["task"] == "ordinal"
    _assert_figures(reports, FIGURES)
    y, test_rows = _test_split(settings)
    df = pd.read_csv(reports / "evaluate" / "test_predictions.csv")
    p_cols = [f"p_{c}" for c in CLASSES]
    assert list(df.columns) == ["test_row", "id", "label", *p_cols, "prediction", "p_referable", "referable"]
    assert len(df) == len(y)
    proba, cuts = df[p_cols].to_numpy(), gates["decision"]["cutpoints"]
    assert len(cuts) == len(CLASSES) - 1
    assert df["prediction"].tolist() == [CLASSES[i] for i in apply_cutpoints(proba, cuts)]
    np.testing.assert_allclose(df["p_referable"], proba[:, 1:].sum(axis=1), atol=1e-6)
    assert df["referable"].tolist() == (df["p_referable"] >= gates["decision"]["referable"]["threshold"]).tolist()
    _assert_subgroups(doc, test_rows, ("accuracy", "balanced_accuracy", "macro_auc", "qwk", "mae"))
