"""Grad-CAM (Selvaraju et al. 2017) for the nested-backbone model, from the class LOGIT on a feature map
fine enough for small inputs.

Two choices differ from the keras-io recipe (differentiate the softmax output w.r.t. the last conv map):

* **The score is the pre-softmax log-odds**, s_c = z_c - logsumexp_{j != c} z_j, with z the classifier
  Dense's pre-activation (kernel, bias). For two classes that is z_c - z_other = log(p_c / p_other). The
  softmax output saturates: at p = 1.00 its gradient p(1 - p) is 0 in float32 and every heatmap becomes
  uniform (issue 13). The log-odds keeps growing with the evidence, so its gradient does not vanish. It is
  also invariant to adding a constant to every logit, which softmax cannot see; a bare z_c is not, and
  for two classes its gradient carries the untrained common part of both rows of the kernel. Temperature
  scaling (medclf.evaluation.calibration.fold_into_classifier) divides the kernel and bias by T. That scales s_c, its
  gradients, the channel weights and the map by 1/T, and the per-image scaling to peak 1 removes that.
  So the heatmaps of a calibrated and an uncalibrated model are the same.
* **The feature map is the deepest one at least `MIN_SIDE` (7) cells wide, not always the last.** Grad-CAM
  cannot localise finer than its feature map. MobileNetV2's last map is input/32 wide: 4x4 at 128 px and
  2x2 at 64 px. The search walks the backbone's own graph and takes the deepest "cut" layer whose output is
  at least 7x7. A cut layer is one that no edge skips over, such as a residual block's `add` or a plain
  conv/activation between blocks, so every path to the output runs through it. MobileNetV2 at 128 px
  gives `block_13_expand_relu` (8x8, stride 16; the TensorFlow image-segmentation tutorial's U-Net takes
  its 8x8 skip from the same layer). At 224 px it gives the usual last map, `out_relu` (7x7).
  ZeroPadding layers are skipped: their
  borders are padding, not image. With no such layer the backbone's output is used, e.g. a backbone that
  only pools. Only a cut makes the rest of the backbone a function of the map alone, so it can be a
  Model (`Model(layer.output, backbone.output)`) and be differentiated on both backends. Grad-CAM++ would
  weight the same coarse map differently; it does not add resolution.

The backbone is a nested model, so the forward path is rebuilt: preprocessing (the outer layers up to the
backbone), then the backbone's lower part up to the feature layer, its upper part, pool, dropout
(inference) and the classifier's pre-activation. The gradient comes from tf.GradientTape on TensorFlow and
jax.grad on JAX. The rest is the recipe: channel weights are the spatially averaged gradients, the heatmap
is ReLU(sum_k w_k * A_k), scaled to [0, 1] per image.

A multi-class or ordinal task's gallery (`class_gallery`) is per class: for each class its correct cases and its most
confident confusions, every heat map on that class's log-odds.

A multi-label model (issue 25) has a **sigmoid** classifier: one independent probability p_c = sigmoid(z_c) per
finding. There the score is finding c's own logit z_c (the same pre-activation; log(p_c / (1 - p_c)) = z_c exactly,
and it does not saturate either), not the softmax log-odds, which would mix in the other findings' logits although
they play no part in p_c. `split_model` reads the head from the classifier layer's activation (`CamGraph.head`) and
`gradcam` picks the score from it; a softmax model's path is unchanged. Per-finding temperatures
(`medclf.evaluation.calibration.fold_per_finding`) divide column c by T_c, which scales z_c and its map by 1/T_c: the
per-image scaling to peak 1 removes that too. The multi-label gallery (`finding_gallery`) is per finding: its true
positives, misses and false calls at that finding's own threshold, every heat map on that finding's logit.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

HEAD_LAYERS = ("pool", "dropout", "classifier")
Head = Literal["softmax", "sigmoid"]
MIN_SIDE = 7
"""The smallest feature-map side Grad-CAM is computed on, where the backbone has one (see the module doc)."""


class GradCamError(RuntimeError):
    """The model does not have the structure Grad-CAM needs (named in the message)."""


@dataclass(frozen=True)
class CamGraph:
    """The model split at its Grad-CAM feature layer: `logits(features(images))` is the classifier's
    pre-activation, and its softmax (its sigmoid, for a sigmoid `head`) is `model(images)`."""

    features: Callable[[Any], Any]
    logits: Callable[[Any], Any]
    layer: str
    """The backbone layer whose output is the map ("backbone" when that is the backbone's own output)."""
    head: Head = "softmax"
    """The classifier's activation: "sigmoid" for a multi-label model, else "softmax" (every other activation)."""

    @property
    def score(self) -> str:
        """What `gradcam` differentiates, in words: "logit" (z_c, sigmoid head) or "log-odds" (`log_odds`)."""
        return "logit" if self.head == "sigmoid" else "log-odds"

    def proba(self, fmap: Any) -> Any:
        import keras

        if self.head == "sigmoid":
            return keras.ops.sigmoid(self.logits(fmap))
        return keras.ops.softmax(self.logits(fmap), axis=-1)


def _producers(layer: Any) -> list[Any]:
    return [t._keras_history.operation for t in layer._inbound_nodes[0].input_tensors] if layer._inbound_nodes else []


def _side(layer: Any) -> int:
    shape = getattr(layer, "output", None)
    shape = getattr(shape, "shape", None)
    if shape is None or len(shape) != 4 or shape[1] is None or shape[2] is None:
        return 0
    return int(min(shape[1], shape[2]))


def feature_layer(backbone: Any, min_side: int = MIN_SIDE) -> str | None:
    """The deepest cut layer of `backbone` with an output at least `min_side` square, or None."""
    import keras

    # every operation, raw ops such as MobileNetV3's hard-swish `x * relu6(x + 3)` included, in topological order
    layers = list(getattr(backbone, "operations", None) or getattr(backbone, "layers", []))
    if not layers or not all(hasattr(lyr, "_inbound_nodes") for lyr in layers):
        return None
    pos = {id(lyr): i for i, lyr in enumerate(layers)}
    lowest_pred = [min((pos.get(id(p), -1) for p in _producers(lyr)), default=i) for i, lyr in enumerate(layers)]
    skip_from = len(layers)  # the lowest source of an edge into any layer after i
    for i in range(len(layers) - 1, -1, -1):
        lyr = layers[i]
        if (
            skip_from >= i
            and _side(lyr) >= min_side
            and not isinstance(lyr, (keras.layers.InputLayer, keras.layers.ZeroPadding2D))
        ):
            return None if lyr is backbone.output._keras_history.operation else str(lyr.name)
        skip_from = min(skip_from, lowest_pred[i])
    return None


def _classifier_logits(layer: Any) -> Callable[[Any], Any]:
    import keras

    def logits(x: Any) -> Any:
        z = keras.ops.matmul(keras.ops.cast(x, "float32"), keras.ops.cast(layer.kernel, "float32"))
        return z + keras.ops.cast(layer.bias, "float32") if layer.bias is not None else z

    return logits


def classifier_head(layer: Any) -> Head:
    """The head of a classifier Dense: "sigmoid" when its activation is the sigmoid (one independent probability per
    output, a multi-label model), else "softmax"."""
    activation = getattr(layer, "activation", None)
    return "sigmoid" if getattr(activation, "__name__", None) == "sigmoid" else "softmax"


_SPLITS: weakref.WeakKeyDictionary[Any, dict[int, CamGraph]] = weakref.WeakKeyDictionary()


def split_model(model: Any, min_side: int = MIN_SIDE) -> CamGraph:
    """The contract structure preprocessing → backbone → pool → dropout → classifier, split for Grad-CAM.

    Cached per model: Keras builds `Model(inner_tensor, ...)` by re-calling the backbone's upper layers,
    which adds a node to each of them, so a split is made once per model, not once per call."""
    cached = _SPLITS.setdefault(model, {})
    if min_side not in cached:
        cached[min_side] = _split(model, min_side)
    return cached[min_side]


def _split(model: Any, min_side: int) -> CamGraph:
    import keras

    names = [layer.name for layer in model.layers]
    missing = [n for n in ("backbone", *HEAD_LAYERS) if n not in names]
    if missing:
        raise GradCamError(
            f"model lacks layer(s) {missing}; Grad-CAM needs backbone → pool → dropout → classifier (has {names})"
        )
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs  # bare tensor in, no structure warning
    backbone = model.get_layer("backbone")
    name = feature_layer(backbone, min_side)
    pool, dropout, classifier = (model.get_layer(n) for n in HEAD_LAYERS)
    to_logits = _classifier_logits(classifier)
    if name is None:  # the backbone's own output: cut the outer graph at the pool layer's input
        outer = keras.Model(inputs, pool.input, name="gradcam_features")
        upper: Any = None

        def features(x: Any) -> Any:
            return outer(x, training=False)
    else:  # preprocessing (outer graph up to the backbone), then the backbone's inner graph up to `name`
        pre = keras.Model(inputs, backbone._inbound_nodes[0].input_tensors[0], name="gradcam_preprocessing")
        inner = backbone.get_layer(name).output
        below = keras.Model(backbone.input, inner, name="gradcam_lower")
        upper = keras.Model(inner, backbone.output, name="gradcam_upper")  # fails unless `name` is a cut

        def features(x: Any) -> Any:
            return below(pre(x, training=False), training=False)

    def logits(fmap: Any) -> Any:
        h = upper(fmap, training=False) if upper is not None else fmap
        return to_logits(dropout(pool(h), training=False))

    return CamGraph(features=features, logits=logits, layer=name or "backbone", head=classifier_head(classifier))


def log_odds(z: Any, class_index: int) -> Any:
    """z_c - logsumexp_{j != c} z_j per row: log(p_c / (1 - p_c)) without the softmax's saturation."""
    import keras

    others = np.zeros(int(z.shape[-1]), np.float32)
    others[class_index] = -1e30
    return z[:, class_index] - keras.ops.logsumexp(z + others, axis=-1)


def logit(z: Any, class_index: int) -> Any:
    """z_c per row: a sigmoid output's own pre-activation, log(p_c / (1 - p_c)) for p_c = sigmoid(z_c)."""
    return z[:, class_index]


def _grads_tf(
    cam: CamGraph, x: np.ndarray, class_index: int, score: Callable[[Any, int], Any]
) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow as tf

    fmap = tf.convert_to_tensor(cam.features(x))
    with tf.GradientTape() as tape:
        tape.watch(fmap)
        s = score(fmap, class_index)
    grads = tape.gradient(s, fmap)
    return np.asarray(fmap), np.asarray(grads)


def _grads_jax(
    cam: CamGraph, x: np.ndarray, class_index: int, score: Callable[[Any, int], Any]
) -> tuple[np.ndarray, np.ndarray]:
    import jax

    fmap = cam.features(x)
    grads = jax.grad(lambda f: score(f, class_index).sum())(fmap)  # samples are independent
    return np.asarray(fmap), np.asarray(grads)


def gradcam(model: Any, images: np.ndarray, class_index: int, min_side: int = MIN_SIDE) -> np.ndarray:
    """Heatmaps (N, h, w) in [0, 1] at the feature map's resolution, for class (or finding) `class_index`: on its
    softmax log-odds (`log_odds`), or on its own logit z_c where the classifier is a sigmoid (`logit`)."""
    import keras

    if len(images) == 0:
        return np.zeros((0, 1, 1), np.float32)
    cam = split_model(model, min_side)
    of_logits = logit if cam.head == "sigmoid" else log_odds

    def score(fmap: Any, c: int) -> Any:
        return of_logits(cam.logits(fmap), c)

    backend = keras.backend.backend()
    if backend == "tensorflow":
        fmap, grads = _grads_tf(cam, images, class_index, score)
    elif backend == "jax":
        fmap, grads = _grads_jax(cam, images, class_index, score)
    else:
        raise GradCamError(f"Grad-CAM supports the tensorflow and jax Keras backends, not {backend!r}")
    weights = grads.astype(np.float64).mean(axis=(1, 2), keepdims=True)  # (N, 1, 1, C): each channel's weight
    heat_raw = np.maximum((fmap.astype(np.float64) * weights).sum(axis=-1), 0.0)
    peak = heat_raw.reshape(len(heat_raw), -1).max(axis=1).reshape(-1, 1, 1)
    heat: np.ndarray = np.divide(heat_raw, peak, out=np.zeros_like(heat_raw), where=peak > 0)
    return heat.astype(np.float32)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The heatmap (jet colours) resized bilinearly and blended onto the grey/RGB image (uint8 RGB)."""
    from matplotlib import colormaps
    from PIL import Image

    img = np.asarray(image)
    rgb = np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img[..., :3]
    h, w = rgb.shape[:2]
    heat = Image.fromarray(np.uint8(np.clip(heatmap, 0, 1) * 255)).resize((w, h), Image.Resampling.BILINEAR)
    colour = colormaps["jet"](np.asarray(heat) / 255.0)[..., :3] * 255
    return np.clip((1 - alpha) * rgb + alpha * colour, 0, 255).astype(np.uint8)


def class_picks(y: np.ndarray, pred: np.ndarray, proba: np.ndarray, c: int, n: int) -> list[list[int]]:
    """Up to `n` test rows per group of class index `c`, the most confident first: correct (true and predicted c, by
    p_c), missed (true c, predicted another, by the wrongly predicted class's p) and false calls (predicted c, true
    another, by p_c)."""
    y, pred, proba = np.asarray(y), np.asarray(pred), np.asarray(proba)
    confidence = proba[np.arange(len(y)), pred]
    out = []
    for mask, score in (
        ((y == c) & (pred == c), proba[:, c]),
        ((y == c) & (pred != c), confidence),
        ((y != c) & (pred == c), proba[:, c]),
    ):
        idx = np.flatnonzero(mask)
        out.append([int(i) for i in idx[np.argsort(-score[idx], kind="stable")][:n]])
    return out


def class_gallery(
    model: Any, images: np.ndarray, y: np.ndarray, pred: np.ndarray, proba: np.ndarray, classes: Sequence[str], n: int
) -> list[dict[str, list[dict[str, Any]]]]:
    """A K-class gallery, one entry per class c: {row: [{"overlay", "caption"}]} for its correct cases, misses and
    false calls (`class_picks`, up to `n` each), every heat map on class c's log-odds. `pred` is the task's decision
    per image (the argmax or the ordinal cut-points'); a caption names the test row, true and predicted class, p(c)."""
    y, pred = np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    out = []
    for c, name in enumerate(classes):
        picks = class_picks(y, pred, proba, c, n)
        flat = [i for group in picks for i in group]
        cams = iter(zip(flat, gradcam(model, np.asarray(images[flat]), c), strict=True)) if flat else iter([])
        rows = (
            f"{name}: correct (true and predicted {name})",
            f"{name}: missed (true {name}, predicted another class)",
            f"{name}: false call (predicted {name}, true another class)",
        )
        gallery: dict[str, list[dict[str, Any]]] = {}
        for row, group in zip(rows, picks, strict=True):
            gallery[row] = [
                {
                    "overlay": overlay(images[i], heat),
                    "caption": f"#{i}  true {classes[y[i]]}, predicted {classes[pred[i]]}, p({name})={proba[i, c]:.4f}",
                }
                for i, heat in (next(cams) for _ in group)
            ]
        out.append(gallery)
    return out


def finding_picks(y: np.ndarray, called: np.ndarray, proba: np.ndarray, c: int, n: int) -> list[list[int]]:
    """Up to `n` test rows per group of finding column `c`, the most confident first: true positives (present and
    called, by p_c), misses (present, not called, lowest p_c first) and false calls (absent, called, by p_c). `y` and
    `called` are N x L 0/1 (the truth, and p >= each finding's own threshold), `proba` N x L."""
    yc, cc, pc = np.asarray(y)[:, c] == 1, np.asarray(called, dtype=bool)[:, c], np.asarray(proba, dtype=float)[:, c]
    out = []
    for mask, order in ((yc & cc, -pc), (yc & ~cc, pc), (~yc & cc, -pc)):
        idx = np.flatnonzero(mask)
        out.append([int(i) for i in idx[np.argsort(order[idx], kind="stable")][:n]])
    return out


def finding_thresholds(thresholds: Mapping[str, float | Mapping[str, Any]], labels: Sequence[str]) -> np.ndarray:
    """The (L,) thresholds in `labels` order, each looked up by its finding's NAME: a number, or an entry with a
    "threshold" (gates.json's `decision.thresholds`). Positions are never used: a mapping must name every finding
    and no other, and a sequence is refused."""
    if not isinstance(thresholds, Mapping):
        raise TypeError(f"thresholds must map each finding's name to its threshold, not {type(thresholds).__name__}")
    names = list(labels)
    missing, extra = [c for c in names if c not in thresholds], [c for c in thresholds if c not in names]
    if missing or extra:
        raise ValueError(
            f"thresholds must name every finding of {names} and no other; missing {missing}, unknown {extra}"
        )
    vals = [v["threshold"] if isinstance(v, Mapping) else v for v in (thresholds[c] for c in names)]
    t = np.asarray(vals, dtype=float)
    bad = [c for c, v in zip(names, t, strict=True) if not 0.0 <= v <= 1.0]  # NaN fails too
    if bad:
        raise ValueError(f"thresholds must lie within [0, 1]; not so for {bad}")
    return t


def finding_gallery(
    model: Any,
    images: np.ndarray,
    y: np.ndarray,
    proba: np.ndarray,
    labels: Sequence[str],
    thresholds: Mapping[str, float | Mapping[str, Any]],
    n: int,
) -> list[dict[str, list[dict[str, Any]]]]:
    """A multi-label gallery in `class_gallery`'s structure (so `medclf.evaluation.plots.class_gallery_pngs` draws it),
    one entry per finding c of `labels` (the model's output order): {row: [{"overlay", "caption"}]} for its true
    positives, misses and false calls (`finding_picks`, up to `n` each), each case called at finding c's OWN threshold
    (`finding_thresholds`: looked up by name) and every heat map on finding c's logit z_c. `y` is the N x L 0/1
    truth, `proba` the N x L sigmoid outputs; a caption names the test row, p(c) against c's threshold and the
    findings present."""
    cam = split_model(model)
    names = list(labels)
    yy, pp = np.asarray(y), np.asarray(proba, dtype=float)
    if cam.head != "sigmoid":
        raise GradCamError(
            f"a per-finding gallery needs a sigmoid classifier (one logit per finding); it is {cam.head}"
        )
    units = int(model.get_layer("classifier").units)
    if yy.ndim != 2 or pp.shape != yy.shape or yy.shape[1] != len(names) or units != len(names):
        raise ValueError(
            f"y and proba must both be N x {len(names)} (findings {names}; the classifier has {units} outputs); "
            f"got {yy.shape} and {pp.shape}"
        )
    if not np.isin(yy, (0, 1)).all():
        raise ValueError("y must be a 0/1 matrix, one column per finding")
    yy = yy.astype(np.int64)
    t = finding_thresholds(thresholds, names)
    called = pp >= t[None, :]
    out = []
    for c, name in enumerate(names):
        picks = finding_picks(yy, called, pp, c, n)
        flat = [i for group in picks for i in group]
        cams = iter(zip(flat, gradcam(model, np.asarray(images[flat]), c), strict=True)) if flat else iter([])
        rows = (
            f"{name}: true positive (present, called at its threshold {t[c]:.4f})",
            f"{name}: missed (present, not called)",
            f"{name}: false call (absent, called)",
        )
        gallery: dict[str, list[dict[str, Any]]] = {}
        for row, group in zip(rows, picks, strict=True):
            items = []
            for i, heat in (next(cams) for _ in group):
                present = ", ".join(f for f, v in zip(names, yy[i], strict=True) if v) or "none"
                side = ">=" if called[i, c] else "<"
                caption = f"#{i}  p({name})={pp[i, c]:.4f} {side} {t[c]:.4f}; present: {present}"
                items.append({"overlay": overlay(images[i], heat), "caption": caption})
            gallery[row] = items
        out.append(gallery)
    return out
