"""Offline ImageNet weights: read torchvision checkpoints with numpy, map them onto keras.applications.

`keras.applications(weights="imagenet")` downloads at run time, which fails offline, and torch is too
heavy (a multi-GB CUDA wheel) to be a dependency just to read a checkpoint.  So this module reads
`.pth` files itself, through a restricted unpickler: a checkpoint is a pickle, and unpickling one
unrestricted runs whatever code it names.  Keras is imported lazily so importing this module stays cheap.
Finding the installed offline checkpoint (and re-checking its sha256) is `medclf.modeling.pretrained`.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import keras

__all__ = ["RestrictedUnpickler", "import_torchvision_weights", "read_torch_checkpoint", "set_bn_epsilon"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "DoubleStorage": "<f8",
    "BFloat16Storage": "<u2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


@dataclass(frozen=True)
class _StorageType:
    """Stands in for `torch.<X>Storage`: only its name and dtype matter."""

    name: str
    dtype: np.dtype[Any]


@dataclass(frozen=True)
class _StorageRef:
    key: str
    stype: _StorageType
    view: tuple[int, int] | None = None  # legacy views: (element offset, element count) in the root storage


@dataclass(frozen=True)
class _LazyTensor:
    """A tensor whose storage bytes may come later in the file (legacy format stores them after the pickle)."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(
    storage: _StorageRef, storage_offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_: Any
) -> _LazyTensor:
    return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data: _LazyTensor, *_: Any) -> _LazyTensor:
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    **{("torch", name): _StorageType(name, np.dtype(dt)) for name, dt in _STORAGE_DTYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a tensor state_dict needs, to harmless numpy-side stand-ins.

    Anything else (`os.system`, `builtins.eval`, ...) raises `pickle.UnpicklingError` naming it, before
    it could be called.  Storages arrive as persistent ids and become `_StorageRef`s.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"forbidden global in checkpoint: {module}.{name}") from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id in checkpoint: {pid!r:.200}")
        view = pid[5] if len(pid) > 5 else None  # legacy: (view_key, offset, size) or None
        return _StorageRef(str(pid[2]), pid[1], None if view is None else (int(view[1]), int(view[2])))


def _load(fh: IO[bytes]) -> Any:
    """The only way this module unpickles anything."""
    return RestrictedUnpickler(fh).load()


def _materialise(obj: Any, storages: dict[str, np.ndarray]) -> Any:
    """Replace `_LazyTensor`s by numpy copies, bounds-checked so a crafted stride cannot read past the data."""
    if isinstance(obj, _LazyTensor):
        ref = obj.storage
        if ref.key not in storages:
            raise ValueError(f"checkpoint lacks the data of storage {ref.key}")
        base = storages[ref.key]
        if ref.view is not None:
            base = base[ref.view[0] : ref.view[0] + ref.view[1]]
        if 0 in obj.size:
            return np.zeros(obj.size, base.dtype)
        last = obj.offset + sum((n - 1) * s for n, s in zip(obj.size, obj.stride, strict=True))
        if obj.offset < 0 or min(obj.stride, default=0) < 0 or last >= base.size:
            raise ValueError(f"tensor view out of bounds of storage {ref.key}")
        arr = np.lib.stride_tricks.as_strided(
            base[obj.offset :], shape=obj.size, strides=[s * base.itemsize for s in obj.stride]
        )
        arr = np.array(arr, dtype=arr.dtype.newbyteorder("="))
        if ref.stype.name == "BFloat16Storage":  # no numpy bfloat16: widen the bit pattern to float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr
    if isinstance(obj, dict):
        return {k: _materialise(v, storages) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_materialise(v, storages) for v in obj)
    return obj


def _storage_refs(obj: Any) -> dict[str, _StorageType]:
    if isinstance(obj, _LazyTensor):
        return {obj.storage.key: obj.storage.stype}
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list | tuple) else ()
    return {k: v for item in items for k, v in _storage_refs(item).items()}


def _read_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError(f"{path}: zip checkpoint without a single <archive>/data.pkl")
        prefix = pkl[0][: -len("data.pkl")]
        obj = _load(io.BytesIO(zf.read(pkl[0])))
        names = set(zf.namelist())
        big = prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() == b"big"
        storages = {}
        for key, stype in _storage_refs(obj).items():
            dtype = stype.dtype.newbyteorder(">") if big else stype.dtype
            storages[key] = np.frombuffer(zf.read(f"{prefix}data/{key}"), dtype=dtype)
    return _materialise(obj, storages)


def _read_legacy(path: Path) -> Any:
    """Legacy layout: magic, protocol, sys_info, state_dict pickles, storage-key list, then raw storages."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if _load(fh) != _LEGACY_MAGIC:
            raise ValueError(f"{path}: not a PyTorch checkpoint (bad magic number)")
        _load(fh)  # protocol version
        sys_info = _load(fh)
        little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
        obj = _load(fh)
        keys = _load(fh)
        types = _storage_refs(obj)
        storages = {}
        for key in keys:
            if key not in types:
                raise ValueError(f"{path}: storage {key} is used by no tensor, its dtype is unknown")
            dtype = types[key].dtype if little else types[key].dtype.newbyteorder(">")
            (numel,) = struct.unpack("<q" if little else ">q", fh.read(8))
            if not 0 <= numel * dtype.itemsize <= size - fh.tell():  # before reading: no giant allocation
                raise ValueError(f"{path}: truncated or corrupt storage {key}")
            storages[key] = np.frombuffer(fh.read(numel * dtype.itemsize), dtype=dtype)
    return _materialise(obj, storages)


def _flatten(obj: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, np.ndarray):
            out[name] = value
        elif isinstance(value, dict):
            _flatten(value, name + ".", out)


def read_torch_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch checkpoint (zip or legacy format) into {name: array} without torch.

    Only tensor-rebuild globals are allowed (see `RestrictedUnpickler`).  A checkpoint wrapping its
    weights in {"state_dict": ...} or {"model": ...} is unwrapped; nested dicts get dotted names; other
    values (epochs, optimiser scalars) are dropped.  int64 buffers such as num_batches_tracked are kept.
    """
    path = Path(path)
    obj = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: checkpoint holds a {type(obj).__name__}, not a state_dict")  # noqa: TRY004
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    out: dict[str, np.ndarray] = {}
    _flatten(obj, "", out)
    return out


# --------------------------------------------------------------------------- torchvision -> keras mapping
# Each entry: (torch module prefix, keras layer name, kind); kind is conv | dw | bn | dense.
_Entry = tuple[str, str, str]


def _mobilenet_v2_entries() -> list[_Entry]:
    e: list[_Entry] = [
        ("features.0.0", "Conv1", "conv"),
        ("features.0.1", "bn_Conv1", "bn"),
        ("features.1.conv.0.0", "expanded_conv_depthwise", "dw"),
        ("features.1.conv.0.1", "expanded_conv_depthwise_BN", "bn"),
        ("features.1.conv.1", "expanded_conv_project", "conv"),
        ("features.1.conv.2", "expanded_conv_project_BN", "bn"),
    ]
    for i in range(2, 18):
        t, k = f"features.{i}.conv", f"block_{i - 1}"
        e += [
            (f"{t}.0.0", f"{k}_expand", "conv"),
            (f"{t}.0.1", f"{k}_expand_BN", "bn"),
            (f"{t}.1.0", f"{k}_depthwise", "dw"),
            (f"{t}.1.1", f"{k}_depthwise_BN", "bn"),
            (f"{t}.2", f"{k}_project", "conv"),
            (f"{t}.3", f"{k}_project_BN", "bn"),
        ]
    return e + [
        ("features.18.0", "Conv_1", "conv"),
        ("features.18.1", "Conv_1_bn", "bn"),
        ("classifier.1", "predictions", "dense"),
    ]


def _resnet50_entries() -> list[_Entry]:
    e: list[_Entry] = [("conv1", "conv1_conv", "conv"), ("bn1", "conv1_bn", "bn")]
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        for b in range(blocks):
            t, k = f"layer{stage}.{b}", f"conv{stage + 1}_block{b + 1}"
            for j in (1, 2, 3):
                e += [(f"{t}.conv{j}", f"{k}_{j}_conv", "conv"), (f"{t}.bn{j}", f"{k}_{j}_bn", "bn")]
            if b == 0:
                e += [(f"{t}.downsample.0", f"{k}_0_conv", "conv"), (f"{t}.downsample.1", f"{k}_0_bn", "bn")]
    return e + [("fc", "predictions", "dense")]


def _densenet121_entries() -> list[_Entry]:
    e: list[_Entry] = [("features.conv0", "conv1_conv", "conv"), ("features.norm0", "conv1_bn", "bn")]
    for block, layers in enumerate((6, 12, 24, 16), start=1):
        for j in range(1, layers + 1):
            t, k = f"features.denseblock{block}.denselayer{j}", f"conv{block + 1}_block{j}"
            e += [
                (f"{t}.norm1", f"{k}_0_bn", "bn"),
                (f"{t}.conv1", f"{k}_1_conv", "conv"),
                (f"{t}.norm2", f"{k}_1_bn", "bn"),
                (f"{t}.conv2", f"{k}_2_conv", "conv"),
            ]
        if block < 4:
            t = f"features.transition{block}"
            e += [(f"{t}.norm", f"pool{block + 1}_bn", "bn"), (f"{t}.conv", f"pool{block + 1}_conv", "conv")]
    return e + [("features.norm5", "bn", "bn"), ("classifier", "predictions", "dense")]


_ARCHS = {"mobilenetv2": _mobilenet_v2_entries, "resnet50": _resnet50_entries, "densenet121": _densenet121_entries}


def _iter_layers(model: Any) -> list[Any]:
    """All layers, descending into nested models, so a backbone wrapped in a bigger model is found."""
    out = []
    for layer in getattr(model, "layers", []):
        out.append(layer)
        out += _iter_layers(layer)
    return out


def set_bn_epsilon(model: keras.Model, eps: float = 1e-5) -> int:
    """Set `epsilon` on every BatchNormalization layer; returns how many were set.

    torch's BN epsilon is 1e-5 (Keras MobileNetV2 uses 1e-3, which moved outputs by up to 5.4), and weight
    files do not store it: call this again after every reload.  Cached train/test/predict functions are
    dropped because a traced graph would keep the old constant.
    """
    import keras

    bns = [layer for layer in _iter_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in bns:
        layer.epsilon = eps
    for fn in ("train_function", "test_function", "predict_function"):
        if hasattr(model, fn):
            setattr(model, fn, None)
    return len(bns)


def _convert(sd: dict[str, np.ndarray], prefix: str, kind: str, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    def get(name: str) -> np.ndarray:
        try:
            return sd[f"{prefix}.{name}"]
        except KeyError:
            raise ValueError(f"checkpoint lacks {prefix}.{name}") from None

    if kind == "bn":
        return [get(n) for n in ("weight", "bias", "running_mean", "running_var")]
    w = get("weight")
    kernel = {"conv": (2, 3, 1, 0), "dw": (2, 3, 0, 1)}.get(kind)
    out = [w.T if kernel is None else w.transpose(kernel)]
    if f"{prefix}.bias" in sd:  # a bias the keras layer lacks then fails the shape check, not silently
        out.append(sd[f"{prefix}.bias"])
    elif len(shapes) > 1:  # keras ResNet50 convs have a bias, torch's have none: zeros are equivalent
        out.append(np.zeros(shapes[1], w.dtype))
    return out


def import_torchvision_weights(model: keras.Model, path: str | Path, arch: str) -> dict[str, Any]:
    """Load a torchvision ImageNet checkpoint into a `keras.applications` model built with weights=None.

    `arch` is mobilenet_v2, resnet50 or densenet121.  The model may have any input size and
    include_top True (the classifier maps to `predictions`) or False (the classifier is skipped); it may
    also be nested in a bigger model.  Every BN epsilon is set to 1e-5.  Returns
    {"mapped": keras layers loaded, "skipped": checkpoint modules not loaded}.  Raises ValueError naming
    the layer on a shape mismatch, or when a backbone layer is missing from the model or checkpoint.

    Caveats on exactness: Keras MobileNetV2 pads stride-2 convs bottom/right where torch pads
    symmetrically (still classifies correctly).  torchvision's resnet50 is v1.5 (stride on the 3x3 conv)
    while Keras' ResNet50 strides the 1x1 conv: the weights load shape-wise and make a good initialisation
    for fine-tuning, but the network is not torchvision's.  DenseNet121 matches torchvision's topology.
    """
    key = arch.lower().replace("_", "").replace("-", "")
    if key not in _ARCHS:
        raise ValueError(f"unsupported arch {arch!r}; choose from mobilenet_v2, resnet50, densenet121")
    sd = read_torch_checkpoint(path)
    if key == "densenet121":  # old torchvision checkpoints name 'norm.1' what the model calls 'norm1'
        sd = {
            k.replace(".norm.", ".norm").replace(".conv.", ".conv").replace(".relu.", ".relu")
            if "denselayer" in k
            else k: v
            for k, v in sd.items()
        }
    layers = {layer.name: layer for layer in _iter_layers(model)}
    used: set[str] = set()
    plan: list[tuple[Any, list[np.ndarray]]] = []  # check every layer before touching any
    for prefix, name, kind in _ARCHS[key]():
        layer = layers.get(name)
        if layer is None:
            if kind == "dense":  # include_top=False
                continue
            raise ValueError(f"model has no layer {name!r} (expected for {arch}, torch {prefix})")
        shapes = [tuple(w.shape) for w in layer.weights]
        values = _convert(sd, prefix, kind, shapes)
        got = [tuple(v.shape) for v in values]
        if got != shapes:
            raise ValueError(f"shape mismatch for layer {name!r} <- {prefix}: keras {shapes}, checkpoint {got}")
        plan.append((layer, values))
        used.add(prefix)
    for layer, values in plan:
        layer.set_weights([v.astype(np.float32) for v in values])
    set_bn_epsilon(model, 1e-5)
    skipped = sorted(
        {k.rsplit(".", 1)[0] for k in sd if k.rsplit(".", 1)[0] not in used and not k.endswith("num_batches_tracked")}
    )
    return {"mapped": len(plan), "skipped": skipped}
