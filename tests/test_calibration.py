"""Temperature scaling: fitted on validation only, never worse than none, folded into the saved model."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from medclf.evaluation import calibration


def _synthetic(n: int, k: int, temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z), reported as softmax(z / temperature): temperature < 1 = over-confident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.0, (n, k))
    true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in true])
    zt = z / temperature
    return y, np.exp(zt) / np.exp(zt).sum(1, keepdims=True)


@pytest.mark.parametrize("k", [2, 4])
def test_fit_undoes_over_confidence_and_leaves_calibrated_alone(k):
    y, over = _synthetic(4000, k, temperature=0.4)
    t = calibration.fit_temperature(y, over)
    assert t == pytest.approx(1 / 0.4, rel=0.15), t  # recovers the planted over-confidence
    rec = calibration.calibrate(y, over)
    before, after = rec["val_before"], rec["val_after"]
    assert after["nll"] < before["nll"] - 0.05 and after["ece"] < before["ece"] / 2, rec
    assert after["brier"] < before["brier"]
    np.testing.assert_allclose(calibration.rescale(over, t).sum(1), 1.0, atol=1e-12)
    y, ok = _synthetic(4000, k, temperature=1.0, seed=1)
    assert calibration.fit_temperature(y, ok) == pytest.approx(1.0, abs=0.1)
    y, under = _synthetic(4000, k, temperature=2.0, seed=2)
    assert calibration.fit_temperature(y, under) < 0.8  # under-confident: sharpened


def test_fit_takes_validation_only_and_degenerate_val_changes_nothing():
    # the signature admits the validation arrays only (no test or train predictions can leak in)
    assert list(inspect.signature(calibration.fit_temperature).parameters)[:2] == ["y_val", "proba_val"]
    assert list(inspect.signature(calibration.calibrate).parameters) == ["y_val", "proba_val"]
    p = np.array([[0.9, 0.1], [0.8, 0.2]])
    assert calibration.fit_temperature(np.array([0, 0]), p) == 1.0  # one class in val: no interior minimum
    with pytest.raises(ValueError):
        calibration.rescale(p, 0.0)
    # ECE / Brier agree with medclf.evaluation.metrics (sklearn's bins) on the binary positive-class probability
    from medclf.evaluation import metrics

    y, q = _synthetic(500, 2, 0.5, seed=3)
    m = metrics.binary_metrics(y, q[:, 1], 0.5)
    assert calibration.ece(y, q) == pytest.approx(m["ece"], abs=1e-12) and calibration.brier(y, q) == pytest.approx(
        m["brier"]
    )


def test_folded_temperature_survives_save_and_reload(tmp_path):
    """The exported model.keras (loaded by the project's loader, safe_mode) outputs softmax(log p_raw / T)."""
    import keras

    from medclf.release.serving import load_keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    out = keras.layers.Dense(3, activation="softmax", name="classifier")(keras.layers.Dense(8, name="h")(inp))
    model = keras.Model(inp, out)
    model.get_layer("classifier").set_weights([w * 2 for w in model.get_layer("classifier").get_weights()])
    x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    raw = np.asarray(model.predict(x, verbose=0), float)
    calibration.fold_into_classifier(model, 2.5)
    model.save(tmp_path / "model.keras")
    got = np.asarray(load_keras(str(tmp_path / "model.keras")).predict(x, verbose=0), float)
    np.testing.assert_allclose(got, calibration.rescale(raw, 2.5), atol=1e-5)
    assert np.abs(got - raw).max() > 1e-2  # the temperature did change the output
    np.testing.assert_allclose(calibration.rescale(got, 1 / 2.5), raw, atol=1e-5)  # evaluate's "before" undoes it
    with pytest.raises(ValueError, match="softmax"):
        calibration.fold_into_classifier(model, 2.0, layer="h")
