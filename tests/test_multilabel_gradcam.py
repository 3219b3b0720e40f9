"""Per-finding Grad-CAM for multi-label (sigmoid) models (issue 25), medclf.modeling.gradcam.

The model is the train stage's own (`build_model(..., head="sigmoid", weights="none")`, MobileNetV2 at 32 px), with
a random classifier kernel large enough that the findings' logits differ. Each finding's heat map must be Grad-CAM
of that finding's logit z_c, written out here with tf.GradientTape on the model's own layers; the per-finding
gallery must call each case at that finding's own threshold, looked up by name.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.test_evaluate import tiny_model

SIZE, LABELS = 32, ("effusion", "nodule", "mass")


@pytest.fixture(scope="module")
def sigmoid_model():
    import keras

    from medclf.modeling.network import build_model

    keras.utils.set_random_seed(0)
    model, _ = build_model("mobilenet_v2", len(LABELS), SIZE, 1, width=0.35, weights="none", head="sigmoid")
    dense = model.get_layer("classifier")
    kernel, bias = dense.get_weights()
    rng = np.random.default_rng(1)
    dense.set_weights([rng.normal(0, 1.0, kernel.shape).astype(kernel.dtype), rng.normal(0, 0.5, bias.shape)])
    return model


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (12, SIZE, SIZE, 1), dtype=np.uint8)


def _reference(model, x: np.ndarray, layer: str, score: str, c: int) -> np.ndarray:
    """Grad-CAM by its definition, with tf.GradientTape on the model's own layers (not medclf.modeling.gradcam): A =
    the backbone layer's output, recorded during one forward pass of the whole backbone; z = pool(backbone) @ kernel +
    bias (the classifier's pre-activation); score "logit" = z_c, "log-odds" = z_c - logsumexp_{j != c} z_j (float64);
    w_k = mean_ij d score / d A_ijk; cam = ReLU(sum_k w_k A_k), divided by its maximum per image."""
    import keras
    import tensorflow as tf

    bb, dense = model.get_layer("backbone"), model.get_layer("classifier")
    both = keras.Model(bb.input, [bb.get_layer(layer).output, bb.output])
    h = model.get_layer("rescale")(tf.convert_to_tensor(x))
    h = model.get_layer("gray_to_rgb")([h, h, h])
    with tf.GradientTape() as tape:
        fmap, out = both(h, training=False)
        pooled = tf.cast(model.get_layer("pool")(out), tf.float64)
        z = tf.matmul(pooled, tf.cast(dense.kernel, tf.float64)) + tf.cast(dense.bias, tf.float64)
        if score == "logit":
            s = z[:, c]
        else:
            others = tf.concat([z[:, :c], z[:, c + 1 :]], axis=1)
            s = z[:, c] - tf.reduce_logsumexp(others, axis=1)
    a, g = fmap.numpy().astype(np.float64), tape.gradient(s, fmap).numpy().astype(np.float64)
    cam = np.maximum(np.einsum("nijk,nk->nij", a, g.mean(axis=(1, 2))), 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    return np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0), z.numpy()


def test_sigmoid_heatmap_is_the_gradient_of_the_findings_own_logit(sigmoid_model, images):
    """A sigmoid classifier is detected from its activation; `logits` is its pre-sigmoid value (sigmoid of it is the
    model's output); finding c's map is Grad-CAM of z_c, not of the softmax log-odds (which differs here); folding
    per-finding temperatures into the classifier leaves every map as it was."""
    from medclf.evaluation.calibration import fold_per_finding
    from medclf.modeling.gradcam import gradcam, split_model

    model, x = sigmoid_model, images[:4]
    cam = split_model(model)
    assert (cam.head, cam.score) == ("sigmoid", "logit")
    out = np.asarray(model(x, training=False))
    np.testing.assert_allclose(np.asarray(cam.proba(cam.features(x))), out, atol=1e-6)
    maps, differs, real = [], [], 0
    for c in range(len(LABELS)):
        heat = gradcam(model, x, c)
        reference, z = _reference(model, x, cam.layer, "logit", c)
        np.testing.assert_allclose(1 / (1 + np.exp(-z)), out, atol=1e-5)  # z is the pre-sigmoid value
        assert heat.shape == (4, 8, 8) and np.isfinite(heat).all()
        np.testing.assert_allclose(heat, reference, atol=1e-3)
        real += int((reference.max(axis=(1, 2)) > 0).sum())
        softmax_view, _ = _reference(model, x, cam.layer, "log-odds", c)
        differs.append(np.abs(softmax_view - reference).max())
        maps.append(heat)
    assert real >= 6, real  # most maps carry positive evidence somewhere (not all-zero after the ReLU)
    assert max(differs) > 0.1, differs  # the softmax log-odds would give other maps: the test tells them apart

    dense = model.get_layer("classifier")
    saved = dense.get_weights()
    try:
        fold_per_finding(model, np.array([0.5, 2.0, 4.0]))
        for c, heat in enumerate(maps):
            np.testing.assert_allclose(gradcam(model, x, c), heat, atol=1e-3)
    finally:
        dense.set_weights(saved)


def test_softmax_heads_keep_the_log_odds():
    """A softmax classifier (3 classes) is still explained on the log-odds, not on z_c."""
    import tensorflow as tf

    from medclf.modeling.gradcam import gradcam, split_model

    model = tiny_model(SIZE, 1, 3)
    x = np.random.default_rng(2).integers(0, 256, (3, SIZE, SIZE, 1), dtype=np.uint8)
    cam = split_model(model)
    assert (cam.head, cam.score) == ("softmax", "log-odds")
    fmap = tf.convert_to_tensor(cam.features(x))
    for c in range(3):
        with tf.GradientTape() as tape:
            tape.watch(fmap)
            z = tf.cast(cam.logits(fmap), tf.float64)
            s = z[:, c] - tf.reduce_logsumexp(tf.concat([z[:, :c], z[:, c + 1 :]], axis=1), axis=1)
        a, g = fmap.numpy().astype(np.float64), tape.gradient(s, fmap).numpy().astype(np.float64)
        ref = np.maximum(np.einsum("nijk,nk->nij", a, g.mean(axis=(1, 2))), 0.0)
        peak = ref.max(axis=(1, 2), keepdims=True)
        ref = np.divide(ref, peak, out=np.zeros_like(ref), where=peak > 0)
        np.testing.assert_allclose(gradcam(model, x, c), ref, atol=1e-3)


# per finding: (threshold, the y column, p column) for 12 images; thresholds differ per finding and are given
# below in an order that is not the labels' order, mixing gates.json's {"threshold": ...} entries and numbers
THRESHOLDS = {"mass": {"threshold": 0.8, "rule": "f1"}, "effusion": 0.3, "nodule": {"threshold": 0.55}}
Y = np.array(
    [
        [1, 0, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1],  # effusion
        [0, 1, 1, 1, 0, 1, 0, 1, 1, 0, 0, 0],  # nodule
        [1, 1, 0, 0, 1, 0, 1, 1, 0, 0, 1, 1],  # mass
    ]
).T
P = np.array(
    [
        [0.35, 0.50, 0.10, 0.70, 0.90, 0.25, 0.32, 0.05, 0.60, 0.28, 0.45, 0.75],
        [0.10, 0.60, 0.58, 0.40, 0.70, 0.90, 0.20, 0.52, 0.35, 0.65, 0.56, 0.05],
        [0.85, 0.75, 0.30, 0.90, 0.79, 0.20, 0.95, 0.60, 0.82, 0.10, 0.50, 0.81],
    ]
).T


def _expected(thr: dict[str, float], n: int) -> dict[str, list[list[int]]]:
    """The picks written out: per finding, present & p >= its threshold (highest p first), present & p < it (lowest
    first), absent & p >= it (highest first), up to n each."""
    out = {}
    for c, name in enumerate(LABELS):
        t, rows = thr[name], range(len(Y))
        tp = sorted((i for i in rows if Y[i, c] == 1 and P[i, c] >= t), key=lambda i: -P[i, c])
        miss = sorted((i for i in rows if Y[i, c] == 1 and P[i, c] < t), key=lambda i: P[i, c])
        false = sorted((i for i in rows if Y[i, c] == 0 and P[i, c] >= t), key=lambda i: -P[i, c])
        out[name] = [tp[:n], miss[:n], false[:n]]
    return out


@pytest.fixture(scope="module")
def gallery(sigmoid_model, images):
    from medclf.modeling.gradcam import finding_gallery

    return finding_gallery(sigmoid_model, images, Y, P, list(LABELS), THRESHOLDS, n=2)


def test_picks_follow_each_findings_own_threshold_by_name(sigmoid_model, images, gallery):
    """Each finding's true positives, misses and false calls are those at ITS threshold (looked up by name, in a
    dict whose order is not the labels'), the most confident first; thresholds applied by position would give other
    picks. Every overlay is that finding's own map."""
    from medclf.modeling.gradcam import finding_gallery, gradcam, overlay

    by_name = {k: v["threshold"] if isinstance(v, dict) else v for k, v in THRESHOLDS.items()}
    expected = _expected(by_name, 2)
    by_position = dict(zip(LABELS, by_name.values(), strict=True))  # the dict's values taken in label order
    assert _expected(by_position, 2) != expected  # the data tells the two apart
    assert len(gallery) == len(LABELS)
    for c, (name, rows) in enumerate(zip(LABELS, gallery, strict=True)):
        assert list(rows) == [
            f"{name}: true positive (present, called at its threshold {by_name[name]:.4f})",
            f"{name}: missed (present, not called)",
            f"{name}: false call (absent, called)",
        ]
        picked = [[int(re.match(r"#(\d+) ", it["caption"]).group(1)) for it in items] for items in rows.values()]
        assert picked == expected[name], (name, picked, expected[name])
        flat = [i for group in picked for i in group]
        own = gradcam(sigmoid_model, images[flat], c)
        others = [gradcam(sigmoid_model, images[flat], j) for j in range(len(LABELS)) if j != c]
        items = [it for group in rows.values() for it in group]
        for k, (i, it) in enumerate(zip(flat, items, strict=True)):
            assert f"p({name})={P[i, c]:.4f}" in it["caption"]
            ov = it["overlay"].astype(int)
            assert ov.shape == (SIZE, SIZE, 3)
            assert np.abs(ov - overlay(images[i], own[k]).astype(int)).max() <= 1
            for other in others:  # another finding's map, where it differs, would not match
                if np.abs(other[k] - own[k]).max() > 0.2:
                    assert np.abs(ov - overlay(images[i], other[k]).astype(int)).max() > 1
    assert sum(len(g) for rows in gallery for g in rows.values()) >= 12

    with pytest.raises(TypeError, match="name"):  # a bare sequence would be applied by position: refused
        finding_gallery(sigmoid_model, images, Y, P, list(LABELS), [0.3, 0.55, 0.8], n=2)
    with pytest.raises(ValueError, match="missing"):
        finding_gallery(sigmoid_model, images, Y, P, list(LABELS), {"effusion": 0.3, "nodule": 0.5}, n=2)


def test_gallery_is_drawn_by_class_gallery_pngs(gallery, tmp_path):
    """`plots.class_gallery_pngs` draws the per-finding gallery unchanged (one figure for these 9 rows)."""
    from PIL import Image

    from medclf.evaluation import plots

    counts = plots.class_gallery_pngs(
        gallery, list(LABELS), lambda name: tmp_path / f"{name}.png", 2, "'block_3_expand_relu'; each on its logit"
    )
    assert counts == {"gradcam": {row: len(items) for rows in gallery for row, items in rows.items()}}
    with Image.open(tmp_path / "gradcam.png") as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_a_softmax_model_has_no_finding_gallery(images):
    from medclf.modeling.gradcam import GradCamError, finding_gallery

    with pytest.raises(GradCamError, match="sigmoid"):
        finding_gallery(tiny_model(SIZE, 1, 3), images, Y, P, list(LABELS), THRESHOLDS, n=2)
