"""Temperature scaling (Guo et al. 2017): one scalar T > 0, fitted on the VALIDATION split, stored in the model.

The calibrated probabilities are softmax(log p / T). For a softmax classifier p = softmax(z) this is exactly
softmax(z / T), so train folds T into the final Dense layer (kernel and bias divided by T; see
`fold_into_classifier`): the saved `model.keras` outputs calibrated probabilities with stock layers only
(safe_mode loading, no custom objects), and evaluate, `medclf predict` and the served MLflow pyfunc apply
the same T without any code of their own. T is recorded in train_run.json (`calibration.temperature`);
evaluate undoes it (softmax(T log p), `rescale(p, 1 / T)`) only to report the "before" figures.

Pure numpy (the train stage's import chain stays keras + numpy). The ECE is defined here, once
(`ece_of`, sklearn's bin edges): `medclf.evaluation.metrics` imports it for its point estimates and bootstrap.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

EPS = 1e-7
LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))
ECE_BINS = 10


def rescale(proba: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(clip(p)) / T), row-wise; T = 1 returns the (renormalised) probabilities."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = np.log(np.clip(np.asarray(proba, dtype=np.float64), EPS, 1.0)) / temperature
    logp -= logp.max(axis=1, keepdims=True)
    e = np.exp(logp)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def nll(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels."""
    y = np.asarray(y).astype(np.int64)
    return float(-np.mean(np.log(np.clip(np.asarray(proba, float)[np.arange(len(y)), y], EPS, 1.0))))


def brier(y: np.ndarray, proba: np.ndarray, positive: int | None = None) -> float:
    """Binary (or one-vs-rest on `positive`): mean (p_pos - y)^2 on the last class (as evaluate reports it);
    K > 2 without `positive`: mean squared distance to the one-hot label."""
    y, p = np.asarray(y).astype(np.int64), np.asarray(proba, float)
    if positive is not None or p.shape[1] == 2:
        pos = p.shape[1] - 1 if positive is None else positive
        return float(np.mean((p[:, pos] - (y == pos)) ** 2))
    return float(((p - np.eye(p.shape[1])[y]) ** 2).sum(axis=1).mean())


def bin_ids(p: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bin index per probability, identical to sklearn's calibration_curve."""
    return np.searchsorted(np.linspace(0.0, 1.0, bins + 1)[1:-1], p, side="left")


def ece_design(conf: np.ndarray, outcome: np.ndarray, bins: int) -> np.ndarray:
    """N x bins matrix holding conf - outcome in each sample's bin column.

    ECE = sum_b n_b/N * |mean conf_b - mean outcome_b| = sum_b |sum_{i in b}(conf_i - outcome_i)| / N,
    so with resample weights W the per-resample ECE is |W @ D|.sum(1) / W.sum(1)
    (`medclf.evaluation.metrics`' bootstrap).
    """
    d = np.zeros((conf.size, bins))
    d[np.arange(conf.size), bin_ids(conf, bins)] = conf - outcome
    return d


def ece_of(conf: np.ndarray, outcome: np.ndarray, bins: int = ECE_BINS) -> float:
    """The one ECE: confidences vs 0/1 outcomes, `bins` equal-width bins weighted by count."""
    return float(np.abs(ece_design(conf, outcome, bins).sum(axis=0)).sum() / max(conf.size, 1))


def ece(y: np.ndarray, proba: np.ndarray, positive: int | None = None, bins: int = ECE_BINS) -> float:
    """Binary (or one-vs-rest on `positive`): ECE of p(positive, default the last class) vs the outcome;
    K > 2 without `positive`: top-label ECE. 10 equal-width bins, sklearn's edges (as `medclf.evaluation.metrics`)."""
    y, p = np.asarray(y).astype(np.int64), np.asarray(proba, float)
    if positive is not None or p.shape[1] == 2:
        pos = p.shape[1] - 1 if positive is None else positive
        conf, outcome = p[:, pos], (y == pos).astype(float)
    else:
        conf, outcome = p.max(axis=1), (p.argmax(axis=1) == y).astype(float)
    return ece_of(conf, outcome, bins)


def summary(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    return {"nll": round(nll(y, proba), 6), "ece": round(ece(y, proba), 6), "brier": round(brier(y, proba), 6)}


def fit_temperature(y_val: np.ndarray, proba_val: np.ndarray, tol: float = 1e-5) -> float:
    """The T minimising the validation NLL of softmax(log p / T): golden-section search on log T in
    [log 0.05, log 20] (the NLL is convex in 1/T, hence unimodal in log T).

    Takes the validation arrays only. Returns 1.0 (no change) when val has fewer than two classes present,
    where the NLL has no interior minimum.
    """
    y, p = np.asarray(y_val).astype(np.int64), np.asarray(proba_val, float)
    if p.ndim != 2 or len(y) != len(p):
        raise ValueError(f"proba_val must be (N, K) with N = len(y_val); got {p.shape} for {len(y)} labels")
    if len(np.unique(y)) < 2:
        return 1.0
    logp = np.log(np.clip(p, EPS, 1.0))

    def loss(log_t: float) -> float:
        z = logp / math.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))

    g = (math.sqrt(5) - 1) / 2
    a, b = LOG_T_BOUNDS
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(c), loss(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(d)
    t = math.exp((a + b) / 2)
    return t if loss(math.log(t)) <= loss(0.0) else 1.0  # never worse than no calibration


def calibrate(y_val: np.ndarray, proba_val: np.ndarray) -> dict[str, Any]:
    """Fit T on validation; the record train_run.json keeps: T and the val NLL/ECE/Brier before and after."""
    t = fit_temperature(y_val, proba_val)
    return {
        "method": "temperature",
        "temperature": round(t, 6),
        "fitted_on": "val",
        "n": len(y_val),
        "val_before": summary(y_val, proba_val),
        "val_after": summary(y_val, rescale(proba_val, round(t, 6))),
    }


def effect(y_test: np.ndarray, proba_test: np.ndarray, positive: int, temperature: float) -> dict[str, float]:
    """evaluate's figures: test ECE/Brier of p(positive) as the model outputs it (after) and with its
    temperature undone, softmax(T log p) (before)."""
    before = rescale(proba_test, 1 / temperature)
    return {
        "temperature": float(temperature),
        "ece_before": ece(y_test, before, positive),
        "brier_before": brier(y_test, before, positive),
        "ece_after": ece(y_test, proba_test, positive),
        "brier_after": brier(y_test, proba_test, positive),
    }


def fold_into_classifier(model: Any, temperature: float, layer: str = "classifier") -> None:
    """Divide the final softmax Dense layer's kernel and bias by T: the model then outputs
    softmax(z / T) = softmax(log p / T), with no extra layer."""
    dense = model.get_layer(layer)
    if getattr(dense, "activation", None) is None or dense.activation.__name__ != "softmax":
        raise ValueError(f"layer {layer!r} is not a softmax Dense layer: temperature cannot be folded into it")
    dense.set_weights([np.asarray(w) / temperature for w in dense.get_weights()])


def fold_per_finding(model: Any, temperatures: np.ndarray, layer: str = "classifier") -> None:
    """Multi-label: divide column j of the final sigmoid Dense layer's kernel and bias by T_j, so the model outputs
    sigmoid(z_j / T_j), each finding calibrated on its own (`medclf.evaluation.multilabel.fit_temperatures`)."""
    dense = model.get_layer(layer)
    if getattr(dense, "activation", None) is None or dense.activation.__name__ != "sigmoid":
        raise ValueError(f"layer {layer!r} is not a sigmoid Dense layer: per-finding temperatures cannot be folded")
    t = np.asarray(temperatures, dtype=np.float64)
    kernel, bias = (np.asarray(w) for w in dense.get_weights())
    if t.shape != bias.shape or not np.all(t > 0):
        raise ValueError(f"one positive temperature per finding ({bias.shape[0]}) is needed; got {t.tolist()}")
    dense.set_weights([(kernel / t).astype(kernel.dtype), (bias / t).astype(bias.dtype)])
