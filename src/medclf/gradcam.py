"""Grad-CAM for the nested-backbone model (keras-io "Grad-CAM class activation visualization").

The keras-io recipe builds ``Model(inputs, [last_conv.output, outputs])``. Our backbone is a
*nested* model, whose ``.output`` belongs to its own inner graph, so that recipe fails with
"not connected to inputs". The backbone's output in the *outer* graph is the input of the
"pool" layer, so we split the model there:

    features = Model(inputs, model.get_layer("pool").input)(images)   # last conv feature map
    probs    = classifier(dropout(pool(features)))                     # the head, re-applied

and differentiate the class score with respect to ``features`` (tf.GradientTape on TensorFlow,
jax.grad on JAX). The rest is the recipe: channel weights = spatially averaged gradients,
heatmap = ReLU(sum_k w_k * A_k), scaled to [0, 1].
"""

from __future__ import annotations

from typing import Any

import numpy as np

HEAD_LAYERS = ("pool", "dropout", "classifier")


class GradCamError(RuntimeError):
    """The model does not have the structure Grad-CAM needs (named in the message)."""


def split_model(model: Any) -> tuple[Any, Any]:
    """(feature model, head function) of the contract structure backbone → pool → dropout → classifier."""
    import keras

    names = [layer.name for layer in model.layers]
    missing = [n for n in ("backbone", *HEAD_LAYERS) if n not in names]
    if missing:
        raise GradCamError(f"model lacks layer(s) {missing}; Grad-CAM needs "
                           f"backbone → pool → dropout → classifier (has {names})")
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs  # bare tensor in, no structure warning
    features = keras.Model(inputs, model.get_layer("pool").input, name="gradcam_features")
    layers = [model.get_layer(n) for n in HEAD_LAYERS]

    def head(x: Any) -> Any:
        for layer in layers:
            x = layer(x, training=False) if layer.name == "dropout" else layer(x)
        return x

    return features, head


def _grads_tf(features: Any, head: Any, x: np.ndarray, class_index: int) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow as tf

    fmap = tf.convert_to_tensor(features(x, training=False))
    with tf.GradientTape() as tape:
        tape.watch(fmap)
        score = head(fmap)[:, class_index]
    grads = tape.gradient(score, fmap)
    return np.asarray(fmap), np.asarray(grads)


def _grads_jax(features: Any, head: Any, x: np.ndarray, class_index: int) -> tuple[np.ndarray, np.ndarray]:
    import jax

    fmap = features(x, training=False)
    grads = jax.grad(lambda f: head(f)[:, class_index].sum())(fmap)  # samples are independent
    return np.asarray(fmap), np.asarray(grads)


def gradcam(model: Any, images: np.ndarray, class_index: int) -> np.ndarray:
    """Heatmaps (N, h, w) in [0, 1] at the feature-map resolution, for class `class_index`."""
    import keras

    if len(images) == 0:
        return np.zeros((0, 1, 1), np.float32)
    features, head = split_model(model)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        fmap, grads = _grads_tf(features, head, images, class_index)
    elif backend == "jax":
        fmap, grads = _grads_jax(features, head, images, class_index)
    else:
        raise GradCamError(f"Grad-CAM supports the tensorflow and jax Keras backends, not {backend!r}")
    weights = grads.mean(axis=(1, 2), keepdims=True)  # (N, 1, 1, C): importance of each channel
    cam = np.maximum((fmap * weights).sum(axis=-1), 0.0)
    peak = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
    heat: np.ndarray = np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)
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
