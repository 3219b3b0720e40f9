"""Robustness report (issue 26): the test metrics under controlled acquisition shifts, the proxy for external shift.

Each entry of `PERTURBATIONS` is a named, deterministic change of a uint8 batch N x H x W x C (C = 1 or 3), one to
three severities, shape and dtype kept. `robustness_report` scores the clean test set and each perturbation x severity
with the caller's `predict` (images -> N x K probabilities) and `score` (y, proba -> higher-is-better metrics): the
module is task-agnostic. One perturbed copy exists at a time (made `CHUNK` images at a time), predicted once.

**Nothing is dropped silently.** A registered perturbation is in `perturbations` with every severity, or in `skipped`
with a reason (inversion where the modality does not allow it, a name left out of `names`). One that raises
propagates; one that leaves every image unchanged is a no-op, not a result. `assert_complete` checks all of that and
`robustness_report` calls it before returning.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PIL.ImageFilter import GaussianBlur

CHUNK = 128  # images perturbed at a time (bounds the float intermediates)

NOT_SELECTED = "not selected"


class RobustnessIncomplete(AssertionError):
    """A registered perturbation is missing from the report without a recorded reason, or was a no-op."""


@dataclass(frozen=True)
class Perturbation:
    name: str
    params: tuple[float, ...]
    """One parameter per severity (severity i is params[i - 1])."""
    apply: Callable[[np.ndarray, float, np.random.Generator], np.ndarray]  # (batch, param, seeded rng) -> batch
    doc: str
    needs_invertible: bool = False


# ----------------------------------------------------------------------------- the perturbations (uint8 -> uint8)
def _u8(a: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return out


def _pil_map(x: np.ndarray, fn: Callable[[Image.Image], Image.Image], hw: tuple[int, int] | None = None) -> np.ndarray:
    """Apply a PIL Image -> Image function to every image of the batch (mode L or RGB); `hw`: its output size."""
    h, w = hw or x.shape[1:3]
    out = np.empty((len(x), h, w, x.shape[-1]), np.uint8)
    for i, img in enumerate(x):
        out[i] = np.asarray(fn(Image.fromarray(img[..., 0] if x.shape[-1] == 1 else img))).reshape(h, w, -1)
    return out


def _resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of each image to h x w (antialiased when shrinking)."""
    return _pil_map(x, lambda im: im.resize((w, h), Image.Resampling.BILINEAR), (h, w))


def _jpeg(im: Image.Image, quality: float) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=int(quality))
    return Image.open(io.BytesIO(buf.getvalue())).convert(im.mode)


def _rotate(x: np.ndarray, degrees: float) -> np.ndarray:
    """Bilinear rotation about the centre (counter-clockwise as displayed); outside the image the nearest edge pixel
    is repeated, never black, so the rotation adds no border a model could key on."""
    h, w = x.shape[1:3]
    t, (i, j) = np.deg2rad(degrees), np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    sy = np.clip(cy + (i - cy) * np.cos(t) - (j - cx) * np.sin(t), 0, h - 1)
    sx = np.clip(cx + (i - cy) * np.sin(t) + (j - cx) * np.cos(t), 0, w - 1)
    y0, x0 = np.floor(sy).astype(np.intp), np.floor(sx).astype(np.intp)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (sy - y0)[..., None].astype(np.float32), (sx - x0)[..., None].astype(np.float32)
    xf = x.astype(np.float32)
    top = xf[:, y0, x0] * (1 - fx) + xf[:, y0, x1] * fx
    return _u8(top * (1 - fy) + (xf[:, y1, x0] * (1 - fx) + xf[:, y1, x1] * fx) * fy)


def _crop(x: np.ndarray, frac: float) -> np.ndarray:
    h, w = x.shape[1:3]
    mh, mw = (min(max(1, round(frac * n)), (n - 1) // 2) for n in (h, w))
    return _resize(x[:, mh : h - mh, mw : w - mw], h, w)


def _pad(x: np.ndarray, frac: float, mode: str) -> np.ndarray:
    mh, mw = (max(1, round(frac * n)) for n in x.shape[1:3])
    padded = np.pad(x, ((0, 0), (mh, mh), (mw, mw), (0, 0)), mode=mode)  # type: ignore[call-overload]
    return _resize(padded, *x.shape[1:3])


def _down_up(x: np.ndarray, f: float) -> np.ndarray:
    h, w = x.shape[1:3]
    return _resize(_resize(x, max(1, round(h / f)), max(1, round(w / f))), h, w)


def _mean(x: np.ndarray) -> np.ndarray:
    m: np.ndarray = x.mean(axis=(1, 2, 3), keepdims=True, dtype=np.float32)
    return m


PERTURBATIONS: tuple[Perturbation, ...] = (
    Perturbation("gamma", (0.7, 1.5), lambda x, g, _: _u8(255 * (np.arange(256) / 255) ** g)[x], "255 (x/255)^g"),
    Perturbation("contrast", (0.6, 1.4), lambda x, f, _: _u8(_mean(x) + f * (x - _mean(x))), "about each mean"),
    Perturbation("brightness", (-30.0, 30.0), lambda x, d, _: _u8(x + np.float32(d)), "grey levels added, clipped"),
    Perturbation("blur", (1.0, 2.0), lambda x, s, _: _pil_map(x, lambda im: im.filter(GaussianBlur(s))), "sigma, px"),
    Perturbation("noise", (5.0, 12.0), lambda x, s, g: _u8(x + g.normal(0, s, x.shape)), "Gaussian, sigma in levels"),
    Perturbation("jpeg", (30.0, 10.0), lambda x, q, _: _pil_map(x, lambda im: _jpeg(im, q)), "re-encoded, quality"),
    Perturbation("downsample", (2.0, 4.0), lambda x, f, _: _down_up(x, f), "shrunk by this factor, back up"),
    Perturbation("rotate_ccw", (5.0, 10.0), lambda x, a, _: _rotate(x, a), "degrees, edge-replicated fill"),
    Perturbation("rotate_cw", (5.0, 10.0), lambda x, a, _: _rotate(x, -a), "degrees, edge-replicated fill"),
    Perturbation("crop", (0.08,), lambda x, f, _: _crop(x, f), "this share of each side cropped, resized back"),
    Perturbation("pad_edge", (0.08,), lambda x, f, _: _pad(x, f, "edge"), "padded (edge pixels), resized back"),
    Perturbation("pad_black", (0.08,), lambda x, f, _: _pad(x, f, "constant"), "padded (black), resized back"),
    Perturbation("invert", (1.0,), lambda x, _, __: 255 - x, "255 - x, only where the modality allows it", True),
)


def perturbation(name: str) -> Perturbation:
    if found := [p for p in PERTURBATIONS if p.name == name]:
        return found[0]
    raise KeyError(f"unknown perturbation {name!r}; registered: {[p.name for p in PERTURBATIONS]}")


def apply(p: Perturbation, x: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """The perturbed copy of `x` at `severity` (1-based), deterministic for `seed`, made `CHUNK` images at a time."""
    param = p.params[severity - 1]
    rng = np.random.default_rng([seed, zlib.crc32(p.name.encode()), severity])
    out = np.empty(x.shape, np.uint8)
    for s in range(0, len(x), CHUNK):
        part = p.apply(np.asarray(x[s : s + CHUNK], dtype=np.uint8), param, rng)
        if part.shape != out[s : s + CHUNK].shape or part.dtype != np.uint8:
            raise ValueError(f"perturbation {p.name}: returned {part.shape} {part.dtype}, expected uint8 {x.shape}")
        out[s : s + CHUNK] = part
    return out


# ----------------------------------------------------------------------------- the report
def _skip_reason(p: Perturbation, invertible: bool, channels: int, selected: set[str] | None) -> str | None:
    if selected is not None and p.name not in selected:
        return NOT_SELECTED
    if p.needs_invertible and not invertible:
        return "not applicable to colour images" if channels == 3 else "not applicable to this modality"
    return None


def _rows(p: Perturbation, x: np.ndarray, seed: int, score_of: Callable[[np.ndarray], dict[str, float]]) -> list[Any]:
    rows = []
    for severity, param in enumerate(p.params, 1):
        xp = apply(p, x, severity, seed)
        diff = [np.abs(xp[s : s + CHUNK] - x[s : s + CHUNK].astype(np.int16)).sum() for s in range(0, len(x), CHUNK)]
        rows.append({"name": p.name, "severity": severity, "param": param, "pixel_change": float(sum(diff)) / x.size})
        rows[-1].update(score_of(xp))
    return rows


def _worst(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[str, Any] | None:
    """The row with the lowest defined `metric`: name, severity, param, value and delta; None if none is defined."""
    defined = [r for r in rows if np.isfinite(r[metric])]
    if not defined:
        return None
    w = min(defined, key=lambda r: float(r[metric]))
    return {k: w[k] for k in ("name", "severity", "param")} | {"value": w[metric], "delta": w[f"delta_{metric}"]}


def robustness_report(
    predict: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    score: Callable[[np.ndarray, np.ndarray], dict[str, float]],
    seed: int,
    invertible: bool,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The clean metrics, every perturbation x severity with its metrics and `delta_<metric>` (perturbed - clean),
    the skipped perturbations with a reason, and per metric the worst row. Raises `RobustnessIncomplete` if a
    registered perturbation went missing, and whatever a perturbation, `predict` or `score` raises."""
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.dtype != np.uint8 or len(x) != len(y):
        raise ValueError(f"need uint8 images N x H x W x (1|3) and N labels; got {x.shape} {x.dtype}, {len(y)}")
    selected = None if names is None else set(names)
    for n in selected or ():
        perturbation(n)  # unknown names are an error, not a skip

    def score_of(images: np.ndarray) -> dict[str, float]:
        proba = np.asarray(predict(images))
        if proba.ndim != 2 or len(proba) != len(y):
            raise ValueError(f"predict returned {proba.shape} for {len(y)} images; expected N x K probabilities")
        return {k: float(v) for k, v in score(y, proba).items()}

    clean = score_of(np.asarray(x))
    if reserved := set(clean) & {"name", "severity", "param", "pixel_change"}:
        raise ValueError(f"score returned reserved keys {sorted(reserved)}")
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for p in PERTURBATIONS:
        if reason := _skip_reason(p, invertible, x.shape[-1], selected):
            skipped.append({"name": p.name, "reason": reason})
            continue
        rows.extend(_rows(p, x, seed, score_of))
    for r in rows:
        r.update({f"delta_{k}": r[k] - v for k, v in clean.items()})
    report = dict(clean=clean, n=len(y), seed=seed, invertible=invertible, perturbations=rows, skipped=skipped)
    report["worst"] = {k: _worst(rows, k) for k in clean}
    assert_complete(report, invertible)
    return report


def assert_complete(report: Mapping[str, Any], invertible: bool) -> None:
    """Raise `RobustnessIncomplete` unless every registered perturbation is in the results with all its severities
    (each with the clean metrics and a change to the images) or in `skipped` with a reason, never both, and
    inversion is present exactly when `invertible`."""
    problems = []
    rows, keys = report["perturbations"], set(report["clean"])
    skipped = {s["name"]: s.get("reason") for s in report["skipped"]}
    for p in PERTURBATIONS:
        got = sorted(r["severity"] for r in rows if r["name"] == p.name)
        want = list(range(1, len(p.params) + 1))
        if p.name in skipped:
            if not skipped[p.name]:
                problems.append(f"{p.name}: skipped without a reason")
            if got:
                problems.append(f"{p.name}: both skipped and reported")
        elif got != want:
            problems.append(f"{p.name}: severities {got} reported, {want} registered, and not listed as skipped")
        if p.needs_invertible and (skipped.get(p.name, NOT_SELECTED) != NOT_SELECTED if invertible else got):
            problems.append(f"{p.name}: {'skipped although' if invertible else 'reported although not'} invertible")
    for r in rows:
        if missing := keys - set(r):
            problems.append(f"{r['name']} severity {r['severity']}: metrics {sorted(missing)} missing")
        if not r.get("pixel_change"):
            problems.append(f"{r['name']} severity {r['severity']}: left every image unchanged (a silent no-op)")
    if problems:
        raise RobustnessIncomplete("robustness report incomplete: " + "; ".join(problems))


def robustness_gate(report: Mapping[str, Any], max_drop: float | None, metric: str) -> dict[str, Any]:
    """The optional gate: the largest drop of `metric` (clean - perturbed) over all rows must be <= `max_drop`.
    An undefined metric (NaN, clean or perturbed) fails: the robustness it bounds was not measured."""
    if max_drop is None:
        return {"skipped": True, "metric": metric}
    clean, rows = report["clean"][metric], report["perturbations"]
    if not np.isfinite(clean) or any(not np.isfinite(r[metric]) for r in rows):
        return {"passed": False, "metric": metric, "bound": max_drop, "drop": None, "worst": None, "note": "undefined"}
    worst = _worst(rows, metric)
    drop = float(clean - worst["value"]) if worst else 0.0
    return {"passed": drop <= max_drop, "metric": metric, "bound": max_drop, "drop": drop, "worst": worst}


def robustness_png(report: Mapping[str, Any], path: Path, metric: str, max_drop: float | None = None) -> Path:
    """Horizontal bars: `metric` per perturbation x severity against the clean value (dashed), the change written on
    each bar; bars that drop more than `max_drop` (the gate's bound, dotted; 0.05 without one) in red."""
    from medclf.evaluation.plots import _plt, _save

    plt = _plt()
    rows, clean = report["perturbations"], report["clean"][metric]
    vals = [r[metric] if np.isfinite(r[metric]) else 0.0 for r in rows]
    bound = 0.05 if max_drop is None else max_drop
    left = max(0.0, np.floor(10 * min([*vals, clean if np.isfinite(clean) else 0.0]) - 1) / 10)
    fig, ax = plt.subplots(figsize=(6.4, 0.28 * len(rows) + 1.6))
    pos = np.arange(len(rows))[::-1]
    colour = ["tab:red" if clean - v > bound else "tab:blue" for v in vals]
    ax.barh(pos, np.asarray(vals) - left, left=left, color=colour, alpha=0.45)
    ax.axvline(clean, color="black", ls="--", lw=1.2, label=f"clean {clean:.3f}")
    if max_drop is not None:
        ax.axvline(clean - max_drop, color="tab:red", ls=":", lw=1.2, label=f"gate: drop <= {max_drop:g}")
    for y_, r in zip(pos, rows, strict=True):
        ax.text(left + 0.005, y_, _num(r[f"delta_{metric}"], "+.3f"), va="center", fontsize=7)
    ax.set_yticks(pos, [f"{r['name']} s{r['severity']} ({r['param']:g})" for r in rows], fontsize=8)
    ax.set_xlim(left, max(1.0, *vals, clean) if np.isfinite(clean) else 1.0)
    ax.set_xlabel(metric)
    skipped = ", ".join(f"{s['name']} ({s['reason']})" for s in report["skipped"])
    title = f"Robustness: test {metric} under acquisition shifts (n={report['n']})"
    ax.set_title(title + (f"\nskipped: {skipped}" if skipped else ""), fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _num(v: float, fmt: str = ".3f") -> str:
    return format(v, fmt) if np.isfinite(v) else "n/a"


def robustness_markdown(report: Mapping[str, Any], metric: str) -> list[str]:
    """A compact table (perturbation, severity, metric, delta vs clean) for the version page and the model card."""
    lines = [f"| perturbation | severity | {metric} | Δ vs clean |", "|---|---|---|---|"]
    lines.append(f"| clean | - | {_num(report['clean'][metric])} | - |")
    for r in report["perturbations"]:
        delta = _num(r[f"delta_{metric}"], "+.3f")
        lines.append(f"| {r['name']} | {r['severity']} ({r['param']:g}) | {_num(r[metric])} | {delta} |")
    lines.extend(f"- {s['name']}: skipped ({s['reason']})" for s in report["skipped"])
    return lines
