"""The model: raw uint8 image -> preprocessing layers -> "backbone" -> "pool" -> "dropout" -> "classifier".

Evaluation, serving and Grad-CAM rely on this structure (and these layer names).  Everything a
prediction needs (scaling, the backbone's own normalisation, grayscale -> 3 channels, resizing)
is a stock Keras layer inside the model, so the saved `.keras` file takes the ingest arrays as they
are and loads with `safe_mode=True` (no Lambda layers, no custom classes).

The backbone registry is `BACKBONES` (its rows are defined in `medclf.config`, which validates
`train.backbone` against them); where pretrained weights come from is `medclf.modeling.pretrained`.
Keras is imported lazily (inside functions): importing this module stays cheap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medclf.config import BACKBONES as _BACKBONE_TABLE
from medclf.config import Mode
from medclf.modeling.pretrained import WeightsError, imagenet_error, load_into, weights_kind

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from medclf.config import Train

log = logging.getLogger(__name__)

__all__ = [
    "BACKBONES",
    "Backbone",
    "Mode",
    "WeightsError",
    "backbone_spec",
    "build_model",
    "compile_model",
    "freeze_backbone",
    "make_backbone",
    "make_optimizer",
    "preprocessing_layers",
    "unfreeze_top",
]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
BACKBONE_LAYER, POOL_LAYER, DROPOUT_LAYER, CLASSIFIER_LAYER = "backbone", "pool", "dropout", "classifier"


@dataclass(frozen=True)
class Backbone:
    """One row of `medclf.config.BACKBONES` (the names `train.backbone` accepts), with its fields named."""

    app: str
    """Constructor name in keras.applications."""
    mode: Mode
    torch_arch: str | None = None
    """Architecture name for medclf.modeling.weights.import_torchvision_weights, if a torchvision checkpoint maps."""
    width: bool = False
    """Takes a width multiplier (`alpha`)."""
    min_size: int = 32


BACKBONES: dict[str, Backbone] = {name: Backbone(*row) for name, row in _BACKBONE_TABLE.items()}


def backbone_spec(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"train.backbone: unknown backbone {name!r}; choose one of {sorted(BACKBONES)}") from None


def _make_base(spec: Backbone, size: int, width: float, weights: str | None, name: str) -> keras.Model:
    import keras

    kwargs: dict[str, Any] = {"include_top": False, "weights": weights, "input_shape": (size, size, 3), "pooling": None}
    if spec.width:
        kwargs["alpha"] = width
    # named afterwards: EfficientNetV2 looks its block table up by the `name` argument (KeyError 'backbone')
    base = getattr(keras.applications, spec.app)(**kwargs)
    base.name = name
    return base


AUTO_UPSAMPLE_BELOW = 96
"""`train.input_size: auto`: pretrained backbones see images smaller than this upsampled inside the model."""
AUTO_UPSAMPLE_MAX = 128


def resolve_input_size(input_size: int | str | None, backbone: str, image_size: int, weights: str) -> int | None:
    """`train.input_size` as built: an explicit size or None as given; `auto` -> the size the backbone sees.

    Pretrained weights: images under 96 px are upsampled to twice their size, within 96..128 (28 -> 96,
    64 -> 128), measured on 500 real chest X-rays, 3 seeds (docs/PERFORMANCE.md, "The adaptive recipe"): at 28 px
    test AUC 0.968 vs 0.806 at 32 px; at 64 px 0.987 vs 0.978. From scratch nothing is upsampled beyond the
    backbone's smallest size (there are no 224 px features to match, only cost). None = no resize layer."""
    if input_size != "auto":
        return None if input_size is None else int(input_size)
    size = image_size
    if weights_kind(weights) != "none" and image_size < AUTO_UPSAMPLE_BELOW:
        size = min(AUTO_UPSAMPLE_MAX, max(AUTO_UPSAMPLE_BELOW, 2 * image_size))
    size = max(size, backbone_spec(backbone).min_size)
    return None if size == image_size else size


def make_backbone(
    name: str, size: int, width: float, weights: str, cache_dir: Path
) -> tuple[keras.Model, dict[str, Any]]:
    """The keras.applications base (include_top=False, pooling=None) with its weights loaded.

    Returns (model, info) where info says where the weights came from and which preprocessing they need.
    """
    spec = backbone_spec(name)
    if size < spec.min_size:
        raise ValueError(f"{name} needs images of at least {spec.min_size}px; set train.input_size")
    if not spec.width and width != 1.0:
        log.warning("train.width=%s is ignored: %s has no width multiplier", width, name)
    kind = weights_kind(weights)
    info: dict[str, Any] = {
        "weights": kind,
        "weights_source": weights if kind in ("torch", "keras") else kind,
        "preprocessing": spec.mode,
    }
    if kind == "imagenet":
        try:
            return _make_base(spec, size, width, "imagenet", BACKBONE_LAYER), info
        except Exception as err:  # keras raises a bare Exception when the download fails
            raise imagenet_error(name, err) from err
    base = _make_base(spec, size, width, None, BACKBONE_LAYER)
    if kind != "none":
        info.update(
            load_into(
                base,
                weights,
                cache_dir,
                backbone=name,
                app=spec.app,
                torch_arch=spec.torch_arch,
                width=width,
                has_width=spec.width,
            )
        )
    return base, info


# --------------------------------------------------------------------------- preprocessing + model
def preprocessing_layers(x: Any, mode: Mode, channels: int, image_size: int, input_size: int | None) -> Any:
    """uint8 (H, W, C) -> what the backbone expects, as stock serialisable layers (float32 under any policy)."""
    from keras import layers

    scale, offset = {"tf": (1 / 127.5, -1.0), "torch": (1 / 255.0, 0.0)}.get(mode, (1.0, 0.0))
    x = layers.Rescaling(scale, offset, dtype="float32", name="rescale")(x)
    if input_size and input_size != image_size:
        x = layers.Resizing(input_size, input_size, antialias=input_size < image_size, dtype="float32", name="resize")(
            x
        )
    if channels == 1:
        x = layers.Concatenate(axis=-1, dtype="float32", name="gray_to_rgb")([x, x, x])
    elif channels != 3:
        raise ValueError(f"images must have 1 or 3 channels, got {channels}")
    if mode == "caffe" and channels == 3:  # RGB -> BGR as a frozen permutation (no Lambda layer)
        flip = layers.Dense(3, use_bias=False, trainable=False, dtype="float32", name="rgb_to_bgr")
        x = flip(x)
        flip.set_weights([np.eye(3, dtype="float32")[::-1].copy()])
    if mode == "torch":
        x = layers.Normalization(
            mean=list(IMAGENET_MEAN), variance=[s * s for s in IMAGENET_STD], dtype="float32", name="normalize"
        )(x)
    elif mode == "caffe":
        x = layers.Normalization(
            mean=list(CAFFE_MEAN_BGR), variance=[1.0, 1.0, 1.0], dtype="float32", name="normalize"
        )(x)
    return x


def build_model(
    backbone: str,
    n_classes: int,
    image_size: int,
    channels: int,
    *,
    input_size: int | str | None = None,
    width: float = 1.0,
    dropout: float = 0.2,
    weights: str = "none",
    preprocessing: str = "auto",
    cache_dir: Path = Path(".cache"),
    head: str = "softmax",
) -> tuple[keras.Model, dict[str, Any]]:
    """The full classifier; returns (model, info).  Build it under the dtype policy / distribution scope wanted.

    With pretrained weights the backbone is called with training=False: its BatchNorm layers stay in
    inference mode even when unfrozen (keras-io fine-tuning guide), so small medical batches never
    corrupt ImageNet statistics.  `head` is the classifier's activation: softmax (one class per image) or
    sigmoid (multi-label: one independent probability per finding).  With weights=none there are no statistics to
    protect: random features cannot be "fine-tuned", and a frozen random BatchNorm stack collapses to a constant
    output (measured: val AUC 0.50), so a from-scratch backbone follows the training flag
    (`info["from_scratch"]`), trains whole in one phase, and its BatchNorm momentum is lowered to
    0.9 so the moving statistics are usable after a short run.
    """
    import keras
    from keras import layers

    if n_classes < 2:
        raise ValueError(f"need at least 2 classes, got {n_classes}")
    if head not in ("softmax", "sigmoid"):
        raise ValueError(f"head is softmax or sigmoid, not {head!r}")
    input_size = resolve_input_size(input_size, backbone, image_size, weights)
    size = input_size or image_size
    base, info = make_backbone(backbone, size, width, weights, cache_dir)
    mode: Mode = info["preprocessing"] if preprocessing == "auto" else preprocessing  # type: ignore[assignment]
    info["preprocessing"] = mode
    inp = keras.Input((image_size, image_size, channels), dtype="uint8", name="image")
    x = preprocessing_layers(inp, mode, channels, image_size, input_size)
    from_scratch = info["weights"] == "none"
    x = base(x, training=None if from_scratch else False)
    x = layers.GlobalAveragePooling2D(name=POOL_LAYER)(x)
    x = layers.Dropout(dropout, name=DROPOUT_LAYER)(x)
    out = layers.Dense(n_classes, activation=head, dtype="float32", name=CLASSIFIER_LAYER)(x)
    if from_scratch:  # Keras' 0.99-0.999 needs thousands of steps before inference-mode statistics mean anything
        for bn in _bn_layers(base):
            bn.momentum = min(bn.momentum, 0.9)
    model = keras.Model(inp, out, name=f"medclf_{backbone}")
    info.update(backbone=backbone, input_size=size, params=int(model.count_params()), from_scratch=from_scratch)
    return model, info


# --------------------------------------------------------------------------- two-phase fine-tuning
def _bn_layers(model: Any) -> list[Any]:
    import keras

    out = []
    for layer in getattr(model, "layers", []):
        if isinstance(layer, keras.layers.BatchNormalization):
            out.append(layer)
        out += _bn_layers(layer)
    return out


def freeze_backbone(model: keras.Model) -> None:
    """Phase 1: only the head (classifier) trains."""
    model.get_layer(BACKBONE_LAYER).trainable = False


def unfreeze_top(model: keras.Model, n: int) -> dict[str, int]:
    """Phase 2: unfreeze the top `n` layers of the backbone, keeping EVERY BatchNormalization frozen.

    Frozen BN (with the backbone called training=False) keeps ImageNet statistics and avoids the
    collapse that re-estimating them on small, homogeneous medical batches causes.
    """
    base = model.get_layer(BACKBONE_LAYER)
    base.trainable = n > 0
    if n > 0:
        for layer in base.layers[:-n] if n < len(base.layers) else []:
            layer.trainable = False
    for bn in _bn_layers(base):
        bn.trainable = False
    trainable = [lyr for lyr in base.layers if lyr.trainable and lyr.weights]
    return {
        "unfrozen_layers": len(trainable),
        "trainable_params": int(sum(np.prod(v.shape) for v in model.trainable_weights)),
    }


# --------------------------------------------------------------------------- optimisation
def make_optimizer(cfg: Train, lr: float, steps_per_epoch: int, epochs: int) -> Any:
    """Adam/AdamW/SGD(momentum 0.9) with linear warm-up then cosine decay over this phase's steps."""
    import keras

    total = max(1, steps_per_epoch * epochs)
    warm = min(round(cfg.warmup_epochs * steps_per_epoch), total - 1)
    rate: Any = lr
    if cfg.lr_schedule == "cosine" or warm:
        rate = keras.optimizers.schedules.CosineDecay(
            0.0 if warm else lr,
            decay_steps=max(1, total - warm),
            alpha=0.01 if cfg.lr_schedule == "cosine" else 1.0,
            warmup_target=lr if warm else None,
            warmup_steps=warm,
        )
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=0.9, nesterov=True)
    return keras.optimizers.Adam(rate)


def weighted_bce(pos_weight: np.ndarray) -> Any:
    """The multi-label loss: binary cross-entropy per finding, a positive of finding j weighted `pos_weight[j]`
    (`medclf.training.data.positive_weights`), averaged over findings. Built per fit; the saved model is exported
    uncompiled, so the loss is never serialised."""
    import keras

    w = keras.ops.convert_to_tensor(np.asarray(pos_weight, dtype=np.float32))

    def loss(y_true: Any, y_pred: Any) -> Any:
        p = keras.ops.clip(keras.ops.cast(y_pred, "float32"), 1e-7, 1.0 - 1e-7)
        y = keras.ops.cast(y_true, "float32")
        per = -(w * y * keras.ops.log(p) + (1.0 - y) * keras.ops.log(1.0 - p))
        return keras.ops.mean(per, axis=-1)

    return loss


def compile_model(
    model: Any,
    cfg: Train,
    lr: float,
    steps_per_epoch: int,
    epochs: int,
    n_classes: int,
    jit: bool,
    pos_weight: np.ndarray | None = None,
) -> None:
    """Compile for one phase. `pos_weight` (multi-label): the sigmoid head's weighted binary cross-entropy
    (`weighted_bce`); else categorical cross-entropy, or its focal form (`train.loss: focal`)."""
    import keras

    if pos_weight is not None:
        if cfg.loss == "focal":
            raise ValueError("train.loss: focal is the categorical focal loss; a multilabel task uses weighted BCE")
        loss: Any = weighted_bce(pos_weight)
    elif cfg.loss == "focal":
        loss = keras.losses.CategoricalFocalCrossentropy(alpha=1.0, gamma=cfg.focal_gamma)
    else:
        loss = keras.losses.CategoricalCrossentropy()
    model.compile(
        optimizer=make_optimizer(cfg, lr, steps_per_epoch, epochs),
        loss=loss,
        jit_compile=jit,
        metrics=[keras.metrics.AUC(name="auc", multi_label=True, num_labels=n_classes)],
    )
