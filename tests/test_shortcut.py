"""The shortcut check (medclf.evaluation.shortcut, issue 26): exact on hand-made maps, and it sees a real shortcut.

`test_check_warns_for_a_model_trained_on_a_corner_marker` trains two tiny models with real Keras training: one on
noise images whose label is carried only by a bright square in the top-left corner (a planted marker), one on a
lesion in the image's centre (the planted-lesion setting of tests/test_gradcam.py). The check must warn for the
first, not for the second, and tell them apart by a wide margin.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from medclf.evaluation.shortcut import BOUND, area_fractions, border_heat, shortcut_report

SIZE, MARK = 48, 6


@pytest.mark.parametrize("side", [5, 7, 8, 12, 48])
def test_uniform_map_gives_the_area_share(side: int):
    """Heat unrelated to position: the band's and corners' share of the area, at any map resolution."""
    (f,) = border_heat(np.full((1, side, side), 0.7))
    area = area_fractions()
    assert area == pytest.approx({"border": 1 - 0.8**2, "corner": 0.3**2})
    assert f is not None
    assert f["border_fraction"] == pytest.approx(0.36) and f["corner_fraction"] == pytest.approx(0.09)


def test_corner_blob_centre_blob_and_zero_map():
    maps = np.zeros((4, 20, 20))
    maps[0, :2, :2] = 1.0  # top-left corner: inside the band and the corner square
    maps[1, 18:, 18:] = 0.5  # bottom-right corner
    maps[2, 8:12, 8:12] = 1.0  # centre: none on the border
    fr = border_heat(maps)
    assert fr[0] == pytest.approx({"border_fraction": 1.0, "corner_fraction": 1.0})
    assert fr[1] == pytest.approx({"border_fraction": 1.0, "corner_fraction": 1.0})
    assert fr[2] == pytest.approx({"border_fraction": 0.0, "corner_fraction": 0.0})
    assert fr[3] is None  # no heat: no fractions
    strip = np.zeros((1, 20, 20))
    strip[0, :, :2] = 1.0  # a left-border strip (padding): all on the border, 30 % of it in the corners
    assert border_heat(strip)[0] == pytest.approx({"border_fraction": 1.0, "corner_fraction": 0.3})


def test_report_per_class_worst_and_warning():
    maps = np.zeros((6, 10, 10))
    maps[:3, 4:6, 4:6] = 1.0  # class 0: centred heat
    maps[3:5, 0, :] = 1.0  # class 1: a top strip ...
    maps[5] = 0.0  # ... and one map with no heat
    rep = shortcut_report(maps, [0, 0, 0, 1, 1, 1], ["a", "b"], rows=[10, 11, 12, 13, 14, 15], worst_n=1)
    json.dumps(rep, allow_nan=False)  # strict JSON
    a, b = rep["per_class"]["a"], rep["per_class"]["b"]
    assert a["n"] == 3 and a["border_fraction_mean"] == 0.0 and a["warn"] is False
    assert b["n"] == 3 and b["n_no_heat"] == 1 and b["border_fraction_mean"] == 1.0 and b["warn"] is True
    assert b["border_enrichment"] == pytest.approx(1 / 0.36, abs=1e-3)
    assert rep["overall"]["n"] == 6
    assert [w["row"] for w in rep["worst"]] == [13, 10] and rep["worst"][0]["class"] == "b"
    assert rep["warning"] and "'b'" in rep["warning"] and "'a'" not in rep["warning"]
    assert shortcut_report(maps[:3], [0, 0, 0], ["a", "b"])["warning"] is None
    assert shortcut_report(maps[:3], [0, 0, 0], ["a", "b"])["per_class"]["b"]["border_fraction_mean"] is None


def _data(n: int, seed: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Grey noise; every second image (label 1) carries a bright MARK x MARK square: in the top-left corner
    ("corner", the only thing telling the classes apart) or at a random place in the central half ("centre")."""
    rng = np.random.default_rng(seed)
    x = np.clip(rng.normal(70, 25, (n, SIZE, SIZE, 1)), 0, 255)
    y = np.arange(n) % 2
    for i in np.flatnonzero(y):
        r, c = (1, 1) if where == "corner" else rng.integers(SIZE // 4, 3 * SIZE // 4 - MARK, 2)
        x[i, r : r + MARK, c : c + MARK] = np.clip(rng.normal(220, 10, (MARK, MARK, 1)), 0, 255)
    return x.astype(np.uint8), y


def _trained(where: str):
    """The model contract (nested "backbone" → pool → dropout → classifier), maps 48, 24, 12, 6: Grad-CAM on 12x12."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((SIZE, SIZE, 1), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inp)
    b_in = keras.Input((SIZE, SIZE, 1))
    h = b_in
    for i, filters in enumerate((8, 16, 16, 32)):
        h = keras.layers.Conv2D(filters, 3, strides=2 if i else 1, padding="same", activation="relu")(h)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(keras.Model(b_in, h, name="backbone")(x))
    x = keras.layers.Dropout(0.0, name="dropout")(x)
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax", name="classifier")(x))
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    xs, ys = _data(192, 0, where)
    model.fit(xs, ys, batch_size=32, epochs=8, verbose=0)
    return model


def test_check_warns_for_a_model_trained_on_a_corner_marker():
    """The check on the test-set Grad-CAM (the evaluate stage's `check_test_set`): a model that learned a planted
    top-left marker warns for the marked class, with its heat in the corners; a model that learned a centred lesion
    does not warn, and its corner and border fractions are far below the marker model's."""
    from medclf.evaluation.shortcut import check_test_set

    reports = {}
    for where in ("corner", "centre"):
        model = _trained(where)
        xt, yt = _data(64, 1, where)
        acc = (model.predict(xt, verbose=0).argmax(1) == yt).mean()
        assert acc >= 0.9, (where, acc)  # it learned the planted signal
        rep, groups = check_test_set(model, xt, yt, ["clean", "marked"], seed=0, n=3)
        json.dumps(rep, allow_nan=False)
        assert rep["sampled"] == rep["of"] == 64 and rep["per_class"]["marked"]["n"] == 32
        assert [len(v) for v in groups.values()] == [3, 3]
        reports[where] = rep
    marker, lesion = reports["corner"]["per_class"]["marked"], reports["centre"]["per_class"]["marked"]
    summary = {k: (reports[k]["per_class"], reports[k]["warning"]) for k in reports}
    assert marker["warn"] and "'marked'" in (reports["corner"]["warning"] or ""), summary
    assert marker["corner_enrichment"] > 2 * BOUND, summary
    assert not lesion["warn"] and reports["centre"]["warning"] is None, summary
    assert marker["corner_fraction_mean"] > 3 * lesion["corner_fraction_mean"] + 0.2, summary
    assert marker["border_fraction_mean"] > lesion["border_fraction_mean"] + 0.3, summary
    assert all(w["border_fraction"] > 0.5 for w in reports["corner"]["worst"] if w["class"] == "marked"), summary
