"""Grad-CAM (medclf.modeling.gradcam): correct by its definition, and useful on a model that really learned a lesion.

The model in `test_true_positive_heatmaps_fall_on_the_planted_lesion` is trained here with real Keras
training to see a bright blob at a random place in noise. Its last feature map is 4x4, like MobileNetV2's
at 128 px, and its true positives reach p = 1.00. That is the regime in which issue 13 found uniform,
useless heatmaps.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_evaluate import tiny_model

SIZE, LESION = 32, 6


def _lesion_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grey noise; every second image (label 1) carries a bright LESION x LESION square at a random place."""
    rng = np.random.default_rng(seed)
    x = np.clip(rng.normal(70, 25, (n, SIZE, SIZE, 1)), 0, 255)
    y = np.arange(n) % 2
    boxes = np.zeros((n, 2), int)
    for i in np.flatnonzero(y):
        r, c = rng.integers(2, SIZE - LESION - 2, 2)
        x[i, r : r + LESION, c : c + LESION] = np.clip(rng.normal(210, 15, (LESION, LESION, 1)), 0, 255)
        boxes[i] = r, c
    return x.astype(np.uint8), y, boxes


def _small_net():
    """The model contract (nested "backbone" → pool → dropout → softmax "classifier") with 32, 16, 8, 4 px maps."""
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
    return keras.Model(inp, keras.layers.Dense(2, activation="softmax", name="classifier")(x))


def _localisation(heat: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per heatmap, at pixel resolution (each cell repeated over the pixels it covers): peak / mean, the
    share of all heat inside the lesion box divided by the box's share of the image, and whether the
    hottest cell overlaps the box."""
    n, cells = heat.shape[:2]
    k = SIZE // cells
    up = heat.astype(np.float64).repeat(k, 1).repeat(k, 2)
    total = up.reshape(n, -1).sum(1)
    peak_to_mean = np.divide(up.reshape(n, -1).max(1), total / SIZE**2, out=np.zeros(n), where=total > 0)
    inside = np.array([up[i, r : r + LESION, c : c + LESION].sum() for i, (r, c) in enumerate(boxes)])
    enrichment = np.divide(inside, total, out=np.zeros(n), where=total > 0) / (LESION**2 / SIZE**2)
    hot = [np.unravel_index(h.argmax(), h.shape) for h in heat]
    on_box = np.array(
        [
            a * k < r + LESION and (a + 1) * k > r and b * k < c + LESION and (b + 1) * k > c
            for (a, b), (r, c) in zip(hot, boxes, strict=True)
        ]
    )
    return peak_to_mean, enrichment, on_box


def test_true_positive_heatmaps_fall_on_the_planted_lesion():
    """Issue 13: Grad-CAM must explain. On a trained model's true positives (p = 1.00), most heatmaps must
    (a) be peaked (peak / mean >= 4; a uniform map has 1, an all-zero one 0), and (b) put their heat on the
    planted lesion: the hottest cell overlaps the lesion and the lesion box holds >= 8x its area share of
    the heat. The previous implementation (softmax output, last 4x4 map) gave 3.8-4.7x and failed (b).
    Folding a temperature of 0.01 into the classifier pushes the other class's probability to exactly 0 in
    float32. That must leave the heatmaps unchanged, because the score is the logit, not the saturated
    softmax."""
    import keras

    from medclf.evaluation.calibration import fold_into_classifier
    from medclf.modeling.gradcam import gradcam, split_model

    model = _small_net()
    x, y, _ = _lesion_data(192, seed=0)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=8, verbose=0)
    xt, yt, boxes = _lesion_data(64, seed=1)
    p = model.predict(xt, verbose=0)[:, 1]
    tp = np.flatnonzero((yt == 1) & (p >= 0.5))
    assert len(tp) >= 24 and np.median(p[tp]) > 0.9999, (len(tp), p[tp])  # it learned, and it is saturated
    assert split_model(model).layer != "backbone"  # the 8x8 map inside the backbone, not its 4x4 output

    heat = gradcam(model, xt[tp], class_index=1)
    assert heat.shape == (len(tp), 8, 8)
    peak_to_mean, enrichment, on_box = _localisation(heat, boxes[tp])
    good = (peak_to_mean >= 4) & (enrichment >= 8) & on_box
    assert good.mean() >= 0.8, {
        "peak/mean": np.round(peak_to_mean, 1),
        "enrichment": np.round(enrichment, 1),
        "on box": on_box,
    }

    fold_into_classifier(model, 0.01)  # logits x 100: p(negative) underflows to 0.0 for every true positive
    assert (model.predict(xt[tp], verbose=0)[:, 0] == 0).mean() > 0.5
    np.testing.assert_allclose(gradcam(model, xt[tp], class_index=1), heat, atol=1e-3)


def test_gradcam_highlights_the_region_that_drives_the_score():
    """A hand-built model whose score is the brightness of the top-left quadrant: CAM must peak there,
    and the overlay (the heatmap upsampled to the image's size) must be hot there and cold elsewhere.
    Its backbone has no layer of 7x7 or more besides its input, so Grad-CAM falls back to its 4x4 output."""
    import keras

    from medclf.modeling.gradcam import gradcam, overlay

    inp = keras.Input((16, 16, 1), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    bb_in = keras.Input((16, 16, 1))
    feat = keras.layers.AveragePooling2D(4)(bb_in)  # 4x4 "conv feature map", 1 channel
    backbone = keras.Model(bb_in, feat, name="backbone")
    x = backbone(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(0.0, name="dropout")(x)
    out = keras.layers.Dense(2, activation="softmax", name="classifier")(x)
    model = keras.Model(inp, out)
    model.get_layer("classifier").set_weights([np.array([[-5.0, 5.0]]), np.zeros(2)])
    img = np.zeros((1, 16, 16, 1), np.uint8)
    img[0, :4, :4] = 255
    cam = gradcam(model, img, class_index=1)
    assert cam.shape == (1, 4, 4)
    assert cam[0, 0, 0] == pytest.approx(1.0) and cam[0].sum() == pytest.approx(1.0)
    ov = overlay(img[0], cam[0])
    assert ov.shape == (16, 16, 3) and ov.dtype == np.uint8
    # on a black image the overlay is the jet colour of the upsampled heat: red-hot over the top-left
    # quadrant that drives the score, blue-cold far from it (bilinear upsampling blurs one cell's border)
    ov = overlay(np.zeros((16, 16, 1), np.uint8), cam[0]).astype(int)
    red, blue = ov[..., 0], ov[..., 2]
    assert (red[:2, :2] > 40).all() and (blue[:2, :2] < 10).all()
    assert (blue[8:, :] > 40).all() and (red[8:, :] < 10).all() and (blue[:, 8:] > 40).all()


def _reference_gradcam(model, x: np.ndarray, class_index: int, layer: str) -> np.ndarray:
    """Grad-CAM by its definition (Selvaraju et al.), written out here with tf.GradientTape on the model's own
    layers, not with medclf.modeling.gradcam: A = the backbone layer's output, recorded on the tape during one forward
    pass of the whole backbone; score = log(p_c / (1 - p_c)) from the model's own softmax output (float64);
    w_k = mean_ij d score / d A_ijk; cam = ReLU(sum_k w_k A_k), divided by its maximum per image."""
    import keras
    import tensorflow as tf

    bb = model.get_layer("backbone")
    both = keras.Model(bb.input, [bb.get_layer(layer).output, bb.output])
    h = model.get_layer("rescale")(tf.convert_to_tensor(x))
    h = model.get_layer("to_rgb")([h, h, h])
    with tf.GradientTape() as tape:
        fmap, out = both(h, training=False)
        p = tf.cast(model.get_layer("classifier")(model.get_layer("pool")(out)), tf.float64)[:, class_index]
        score = tf.math.log(p) - tf.math.log1p(-p)  # not saturated at these random weights' p ~ 0.5
    a, g = fmap.numpy().astype(np.float64), tape.gradient(score, fmap).numpy().astype(np.float64)
    cam = np.maximum(np.einsum("nijk,nk->nij", a, g.mean(axis=(1, 2))), 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    return np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)  # ReLU of an all-negative sum is 0


@pytest.mark.parametrize(
    ("backbone", "size", "layer", "side"),
    [
        ("mobilenet", 128, "block_13_expand_relu", 8),  # the train stage's MobileNetV2: its last map would be 4x4
        ("mobilenet_v3_small", 64, "activation_1", 8),  # hard-swish is a raw op (x * relu6(x + 3) / 6), not a layer
    ],
)
def test_gradcam_on_nested_keras_applications_backbone(backbone: str, size: int, layer: str, side: int):
    """The split works for real nested keras.applications backbones: `proba(features(x))` is the model's
    output; the map is the deepest layer of at least 7x7 through which every path runs; the heatmaps equal
    Grad-CAM computed by its definition, each scaled so that its peak is exactly 1, and vary over the image."""
    import keras

    from medclf.modeling.gradcam import gradcam, split_model

    if backbone == "mobilenet":
        model = tiny_model(size, 1, 2, backbone="mobilenet")
    else:
        keras.utils.set_random_seed(0)
        inp = keras.Input((size, size, 1), dtype="uint8")
        h = keras.layers.Rescaling(1.0, name="rescale")(inp)
        h = keras.layers.Concatenate(name="to_rgb")([h, h, h])
        base = keras.applications.MobileNetV3Small(
            input_shape=(size, size, 3), alpha=0.75, weights=None, include_top=False, include_preprocessing=True
        )
        base.name = "backbone"
        h = keras.layers.Dropout(0.2, name="dropout")(keras.layers.GlobalAveragePooling2D(name="pool")(base(h)))
        model = keras.Model(inp, keras.layers.Dense(2, activation="softmax", name="classifier")(h))
    x = np.random.default_rng(0).integers(0, 256, (2, size, size, 1), dtype=np.uint8)
    cam_graph = split_model(model)
    assert cam_graph.layer == layer
    np.testing.assert_allclose(np.asarray(cam_graph.proba(cam_graph.features(x))), np.asarray(model(x)), atol=1e-5)
    real = np.zeros((2, 2), dtype=bool)  # [class, image]: the map has positive evidence somewhere
    for class_index in (0, 1):
        cam = gradcam(model, x, class_index=class_index)
        assert cam.shape == (2, side, side) and np.isfinite(cam).all() and cam.min() >= 0
        reference = _reference_gradcam(model, x, class_index, layer)
        np.testing.assert_allclose(cam, reference, atol=1e-3)
        peaks = cam.max(axis=(1, 2))
        # A map is scaled to peak exactly 1, or is all 0 where ReLU(sum_k w_k A_k) is 0 everywhere: with two
        # classes s_1 = -s_0, so one class's map can be all-negative before the ReLU at random weights (seen
        # on a CI CPU whose float rounding differs from this machine's).
        real[class_index] = reference.max(axis=(1, 2)) > 0
        np.testing.assert_allclose(peaks[real[class_index]], 1.0, atol=1e-6)
        assert (peaks[~real[class_index]] == 0).all(), peaks
        assert (cam.reshape(2, -1)[real[class_index]].std(axis=1) > 0.05).all(), cam  # a real map, not a constant
    assert real.any(axis=0).all(), real  # s_1 = -s_0: every image has a real map for at least one class
