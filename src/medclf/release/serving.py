"""The served model: an MLflow pyfunc that takes raw images and returns calibrated decisions.

Why a pyfunc and not the bare Keras flavour: a client (a PACS bridge, `curl`, a notebook) has
image *files*, not tensors of the training size. This wrapper accepts base64-encoded PNG/JPEG/
DICOM bytes or pixel arrays of any size, applies exactly the ingest geometry (channel mapping +
`fit_square`), runs the Keras model (whose own layers do scaling/normalisation), and returns
per-class probabilities plus the decision fitted on validation data (`medclf.evaluation.task`).
Everything the wrapper needs (task, classes, decision rule or per-finding thresholds, size) travels in the MLflow
`model_config`, so the served artefact is self-describing.

Input (pyfunc `predict` / `POST /invocations`):
  * a DataFrame (or `{"image": [...]}` / list) with one column `image`, each cell one of:
    base64 string of an image or DICOM file, raw `bytes`, or a nested list / ndarray (H, W[, C]);
  * an ndarray (H, W[, C]) or (N, H, W[, C]) — in-process only, bypasses schema checks when
    called via ``unwrap_python_model().predict_images``.
Output (`decision_columns`; the version is `ServingConfig.schema_version`, recorded as `output_schema_version` in
the MLmodel metadata; models registered before it are version 1), one row per input image:
  * binary (versions 1, 2 and 3 alike): `p_<class>` per class (double), `label` (string: the positive class when
    p_<positive> >= threshold, else the other) and `positive` (bool, p_<positive> >= threshold);
  * multiclass / ordinal (versions 2 and 3 alike): `p_<class>` per class (double), `prediction` (string: the argmax
    class; for ordinal with cut-points the grade `kclass.apply_cutpoints` gives on the expected grade), one
    `flag_<class>` (bool, p_<class> >= its validation threshold) per critical class, and for an ordinal referable view
    `p_referable` (double, P(grade >= referable_from)) and `referable` (bool, p_referable >= referable_threshold).
    No class's threshold ever decides `prediction`: a flag is an extra alert beside it;
  * multilabel (version 3 only): `p_<finding>` per finding (double, that finding's own sigmoid), `labels` (string:
    the findings called present, each where p_<finding> >= ITS OWN validation threshold, joined by ";" in the
    findings' order; "" when none is) and one `present_<finding>` (bool, p_<finding> >= its threshold) per finding.
    Version 3 is version 2 plus this row: a binary, multiclass or ordinal model's columns are version 2's.

Refused inputs: a cell that cannot be decoded, is a decompression bomb (over `max_pixels`), is
smaller than `min_size` pixels on a side, is more elongated than `max_aspect_ratio` (long side /
short side), or is a colour picture while the model's `modality` is greyscale (a chest X-ray model
refuses a photograph, `medclf.imaging.modality`) fails the *whole request* with HTTP 400 and the message
`input row <i>: <reason>`;
the output schema stays as above. Oversized requests are refused the same way *before any cell is
decoded*: more than `max_request_images` cells (default 64), or one cell over `max_image_bytes` (default
20 MiB of encoded image bytes, i.e. after base64 decoding; a pixel array over `max_pixels` pixels). Both are
model_config keys, so an operator can change them at serve time without re-registering:
`MLFLOW_PYFUNC_INFERENCE_CONFIG='{"max_request_images": 128}' mlflow models serve ...`. MLflow's scoring
server itself has no request-body limit: it reads the whole body before the pyfunc sees it (docs/PERFORMANCE.md,
"Serving under load"). `medclf predict` applies the same checks per file and writes the
reason into that file's `error` column instead, so one bad file does not stop a batch.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc.model import PythonModel, PythonModelContext

from medclf.config.vocabulary import OUTPUT_SCHEMA_VERSION, TaskKind
from medclf.imaging.images import decode_bytes, fit_square, to_channels
from medclf.imaging.modality import colour_problem
from medclf.imaging.pixels import DecodeError, to_uint8

INPUT_COLUMN = "image"
KERAS_ARTIFACT = "keras_model"
MAX_PIXELS = 80_000_000
MIN_SIZE = 16
MAX_ASPECT_RATIO = 4.0
MAX_REQUEST_IMAGES = 64
"""Images per request: a PACS bridge sends one study (a few images) at a time; 64 leaves room for a series."""
MAX_IMAGE_BYTES = 20 * 1024 * 1024
"""Encoded bytes per image: a 3000x3000 16-bit uncompressed DICOM radiograph is about 18 MB."""
TASKS = ("binary", "multiclass", "ordinal", "multilabel")
SCHEMA_VERSIONS = (1, 2, OUTPUT_SCHEMA_VERSION)
"""The output schemas a model_config may name (module docstring): 1 binary only, 2 not multilabel, 3 any task."""
LABEL_SEPARATOR = ";"
"""Joins a multi-label row's present findings in its `labels` column (so no finding name may hold it)."""


@dataclass(frozen=True)
class ServingConfig:
    """What the wrapper needs to turn raw images into decisions (the pyfunc `model_config`).

    `positive_class` and `threshold` are the binary decision. A multiclass, ordinal or multilabel config still
    carries both (the keys every model_config has) but they are never used for its decision: that is the argmax,
    the ordinal `cutpoints`, and the `flags` / referable view beside it; or, multilabel, each finding's own
    threshold (`thresholds`); its `classes` are the findings (`task.labels`) in output order."""

    classes: list[str]
    positive_class: str
    threshold: float
    image_size: int
    channels: int
    resize: str = "pad"
    batch_size: int = 32
    min_size: int = MIN_SIZE
    """Smallest accepted input side in pixels (`validate.min_size`): a 1×1 image is refused, not classified."""
    max_aspect_ratio: float = MAX_ASPECT_RATIO
    """Largest accepted long side / short side (`validate.max_aspect_ratio`): a 4000×40 sliver is refused."""
    max_pixels: int = MAX_PIXELS
    """Decompression-bomb guard for every decoder, PNG/JPEG and DICOM (`ingest.max_image_pixels`)."""
    max_request_images: int = MAX_REQUEST_IMAGES
    """Most image cells one request may carry; more → HTTP 400 before anything is decoded."""
    max_image_bytes: int = MAX_IMAGE_BYTES
    """Most encoded bytes (after base64) one cell may carry; more → HTTP 400 before anything is decoded."""
    modality: str | None = None
    """What the model was trained on (`ingest.modality`): a greyscale one refuses colour pictures. None (models
    registered before this key) checks no colour."""
    task: str = "binary"
    """"binary" | "multiclass" | "ordinal" | "multilabel" (`medclf.evaluation.task`); models registered before this
    key: binary."""
    cutpoints: list[float] = field(default_factory=list)
    """ordinal: the K-1 increasing cut-points on the expected grade (`kclass.apply_cutpoints`); empty: argmax."""
    flags: dict[str, float] = field(default_factory=dict)
    """multiclass: critical class -> threshold; `flag_<class>` is p_<class> >= it and never changes `prediction`."""
    referable_from: int | None = None
    """ordinal: the lowest referable grade index; `p_referable` = P(grade >= it)."""
    referable_threshold: float | None = None
    """ordinal, with `referable_from`: `referable` is p_referable >= it (fitted on validation)."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """multilabel: finding -> its own threshold (fitted on validation), one for every finding of `classes` and no
    other; `present_<finding>` is p_<finding> >= it. Looked up by name, never by position."""
    schema_version: int = OUTPUT_SCHEMA_VERSION
    """The output schema (module docstring): 1 for models registered before this key (all binary); 2 for those
    registered before multilabel (never multilabel); new configs: `OUTPUT_SCHEMA_VERSION`."""

    def __post_init__(self) -> None:
        problems = _config_problems(self)
        if problems:
            raise ValueError("invalid serving config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServingConfig:
        return cls(
            classes=list(d["classes"]),
            positive_class=str(d["positive_class"]),
            threshold=float(d["threshold"]),
            image_size=int(d["image_size"]),
            channels=int(d["channels"]),
            resize=str(d.get("resize", "pad")),
            batch_size=int(d.get("batch_size", 32)),
            min_size=int(d.get("min_size", MIN_SIZE)),
            max_aspect_ratio=float(d.get("max_aspect_ratio", MAX_ASPECT_RATIO)),
            max_pixels=int(d.get("max_pixels", MAX_PIXELS)),
            max_request_images=int(d.get("max_request_images", MAX_REQUEST_IMAGES)),
            max_image_bytes=int(d.get("max_image_bytes", MAX_IMAGE_BYTES)),
            modality=None if d.get("modality") is None else str(d["modality"]),
            task=str(d.get("task", "binary")),
            cutpoints=[float(c) for c in d.get("cutpoints") or []],
            flags={str(c): float(t) for c, t in (d.get("flags") or {}).items()},
            referable_from=None if d.get("referable_from") is None else int(d["referable_from"]),
            referable_threshold=None if d.get("referable_threshold") is None else float(d["referable_threshold"]),
            thresholds={str(c): float(t) for c, t in (d.get("thresholds") or {}).items()},
            schema_version=int(d.get("schema_version", 1)),
        )  # models registered before these keys

    def to_dict(self) -> dict[str, Any]:
        """Every field (the pyfunc `model_config`); `from_dict` reads it back."""
        return asdict(self)

    @property
    def positive_index(self) -> int:
        return self.classes.index(self.positive_class)


def task_keys(gates: dict[str, Any]) -> dict[str, Any]:
    """The ServingConfig task keys from `reports/gates.json`: its `task` and, for a K-class task, the decision
    evaluate fitted on validation (`medclf.evaluation.task.Decision.document`); for a multilabel task, each
    finding's threshold (`decision.thresholds`, `medclf.evaluation.multilabel.fit_thresholds`'s entries or bare
    numbers)."""
    task = str(gates.get("task", "binary"))
    if task == "binary":
        return {"task": task}
    decision = gates.get("decision") or {}
    if task == "multilabel":
        fits = decision.get("thresholds") or {}
        return {
            "task": task,
            "thresholds": {str(c): float(f["threshold"] if isinstance(f, Mapping) else f) for c, f in fits.items()},
        }
    referable = decision.get("referable") or {}
    return {
        "task": task,
        "cutpoints": [float(c) for c in decision.get("cutpoints") or []],
        "flags": {str(c): float(f["threshold"]) for c, f in (decision.get("flags") or {}).items()},
        "referable_from": int(referable["from_index"]) if referable else None,
        "referable_threshold": float(referable["threshold"]) if referable else None,
    }


def _config_problems(cfg: ServingConfig) -> list[str]:
    """What is wrong with a config's task keys (a model that cannot decide must fail to load, not answer)."""
    k, ordinal, ref, problems = len(cfg.classes), cfg.task == "ordinal", cfg.referable_from, []
    if cfg.task not in TASKS:
        problems.append(f"task must be one of {', '.join(TASKS)}; got {cfg.task!r}")
    if cfg.cutpoints and not (ordinal and len(cfg.cutpoints) == k - 1 and sorted(set(cfg.cutpoints)) == cfg.cutpoints):
        problems.append(f"cutpoints must be {k - 1} strictly increasing values of an ordinal task; got {cfg.cutpoints}")
    if cfg.flags and cfg.task != "multiclass":
        problems.append("flags (critical classes) are a multiclass setting")
    if set(cfg.flags) - set(cfg.classes) or any(not 0 <= t <= 1 for t in cfg.flags.values()):
        problems.append(f"flags must map classes of {cfg.classes} to thresholds within [0, 1]; got {cfg.flags}")
    if ref is not None and not (ordinal and 1 <= ref <= k - 1 and "referable" not in cfg.classes):
        problems.append(
            f"referable_from must be a grade index in [1, {k - 1}] of an ordinal task (with no class named "
            f"'referable': it would collide with p_referable); got {ref}"
        )
    thr = cfg.referable_threshold
    if (ref is None) != (thr is None) or (thr is not None and not 0 <= thr <= 1):
        problems.append(f"referable_from goes with a referable_threshold within [0, 1]; got {ref}, {thr}")
    problems += _multilabel_problems(cfg)
    v = cfg.schema_version
    if (
        v not in SCHEMA_VERSIONS or (cfg.task != "binary" and v == 1) or (cfg.task == "multilabel" and v < 3)
    ):  # multilabel came with 3
        problems.append(
            f"schema_version must be 1 (binary only), 2 (not multilabel) or {OUTPUT_SCHEMA_VERSION}; got {v}"
        )
    return problems


def _multilabel_problems(cfg: ServingConfig) -> list[str]:
    """A multilabel config decides each finding at its own threshold: it needs exactly one per finding."""
    if cfg.task != "multilabel":
        return ["thresholds (one per finding) are a multilabel setting"] if cfg.thresholds else []
    problems = []
    missing = [c for c in cfg.classes if c not in cfg.thresholds]
    unknown = [c for c in cfg.thresholds if c not in cfg.classes]
    if missing or unknown:
        problems.append(
            f"thresholds must name exactly the findings {cfg.classes}, one threshold each; missing {missing}, "
            f"unknown {unknown}"
        )
    bad = {c: t for c, t in cfg.thresholds.items() if not 0 <= t <= 1}  # NaN fails too
    if bad:
        problems.append(f"thresholds must lie within [0, 1]; got {bad}")
    if len(set(cfg.classes)) != len(cfg.classes) or not cfg.classes:
        problems.append(f"the findings must be distinct, at least one; got {cfg.classes}")
    odd = [c for c in cfg.classes if not c or LABEL_SEPARATOR in c]
    if odd:
        problems.append(f"a finding's name may not be empty or hold {LABEL_SEPARATOR!r} (it joins `labels`); got {odd}")
    return problems


def output_columns(classes: Sequence[str]) -> list[str]:
    """The probability columns, `p_<class>` in class order."""
    return [f"p_{c}" for c in classes]


def present_columns(classes: Sequence[str]) -> list[str]:
    """A multilabel model's per-finding decisions, `present_<finding>` in the findings' order."""
    return [f"present_{c}" for c in classes]


def decision_columns(cfg: ServingConfig) -> dict[str, str]:
    """Every output column in order -> its MLflow type (the module docstring's schema). The K-class names and
    order are `TaskSpec.output_columns`'s; binary keeps schema 1's `label` and `positive` (as TaskSpec says);
    multilabel (schema 3) is `p_<finding>`..., `labels`, `present_<finding>`..."""
    if cfg.task == "binary":
        return {**dict.fromkeys(output_columns(cfg.classes), "double"), "label": "string", "positive": "boolean"}
    if cfg.task == "multilabel":
        probs = dict.fromkeys(output_columns(cfg.classes), "double")
        return {**probs, "labels": "string", **dict.fromkeys(present_columns(cfg.classes), "boolean")}
    from medclf.evaluation.task import TaskSpec  # lazy: the metrics (scikit-learn) load only for a K-class model

    kind: TaskKind = "ordinal" if cfg.task == "ordinal" else "multiclass"
    critical = tuple(cfg.classes.index(c) for c in cfg.flags)
    names = TaskSpec(kind, tuple(cfg.classes), critical=critical, referable_from=cfg.referable_from).output_columns()
    return {c: "double" if c.startswith("p_") else "string" if c == "prediction" else "boolean" for c in names}


# ----------------------------------------------------------------------------- decoding
def _array_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Pixel arrays from JSON arrive as int64/float64; keep 0..255 values as they are.

    Integers already in 0..255 (and floats in 0..255) are taken as 8-bit pixel values, floats in
    [0, 1] as normalised intensities; anything else (e.g. 12-bit CT) is min-max scaled like ingest.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_ or arr.size == 0:
        return to_uint8(arr)
    if not np.issubdtype(arr.dtype, np.number):
        raise DecodeError(f"pixel array has non-numeric dtype {arr.dtype}")
    a = arr.astype(np.float64)
    if not np.isfinite(a).all():
        raise DecodeError("pixel data contains NaN or infinity")
    lo, hi = float(a.min()), float(a.max())
    if np.issubdtype(arr.dtype, np.floating) and lo >= 0 and hi <= 1:
        return np.round(a * 255).astype(np.uint8)
    if lo >= 0 and hi <= 255:
        return np.round(a).astype(np.uint8)
    return to_uint8(a)


def decode_one(item: Any, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """One input cell → uint8 H×W×C (not yet resized). Raises DecodeError with the reason."""
    if isinstance(item, str):
        try:
            data = base64.b64decode(item.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise DecodeError("string input is not valid base64 (send base64-encoded image bytes)") from None
        return decode_bytes(data, max_pixels)[0]  # DICOM by its marker, else Pillow
    if isinstance(item, (bytes, bytearray, memoryview)):
        return decode_bytes(bytes(item), max_pixels)[0]
    if item is None:
        raise DecodeError("missing image (null)")
    try:
        arr = np.asarray(item)
    except ValueError as err:
        raise DecodeError(f"pixel array is ragged: {err}") from None
    if arr.dtype == object:
        raise DecodeError("pixel array is ragged or holds non-numbers")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or min(arr.shape[:2]) < 1:
        raise DecodeError(f"pixel array must be (H, W), (H, W, 1|3|4); got shape {arr.shape}")
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    return _array_to_uint8(arr)


class InputRefused(DecodeError):
    """A decoded image the model refuses by its input bounds (size, aspect ratio, colour): the message names the
    bound. A DecodeError, so the endpoint answers HTTP 400 as for an undecodable cell; `medclf predict` reports it
    as refused, not as "could not be decoded"."""


def check_geometry(arr: np.ndarray, cfg: ServingConfig) -> np.ndarray:
    """Refuse (InputRefused) an image too small to classify or too elongated to letterbox meaningfully.

    A 1×1 image scaled to the model size is one flat colour, yet the model still returns a confident
    probability; a 4000×40 sliver padded to a square is 99 % padding. Neither resembles the training data.
    """
    h, w = int(arr.shape[0]), int(arr.shape[1])
    if min(h, w) < cfg.min_size:
        raise InputRefused(
            f"image {w}x{h} (WxH) is smaller than the minimum {cfg.min_size} px on a side (validate.min_size)"
        )
    ratio = max(h, w) / min(h, w)
    if ratio > cfg.max_aspect_ratio:
        raise InputRefused(
            f"image {w}x{h} (WxH) has aspect ratio {ratio:.4g}:1, above the maximum "
            f"{cfg.max_aspect_ratio:g}:1 (validate.max_aspect_ratio)"
        )
    return arr


def check_modality(arr: np.ndarray, cfg: ServingConfig) -> np.ndarray:
    """Refuse (InputRefused) a colour picture when the model's modality is greyscale; run it on the decode as
    the file holds it, before the channel mapping makes every input grey."""
    problem = colour_problem(arr, cfg.modality)
    if problem:
        raise InputRefused(problem)
    return arr


def check_input(arr: np.ndarray, cfg: ServingConfig) -> np.ndarray:
    """Every bound the model puts on a decoded input: size, aspect ratio, colour."""
    return check_modality(check_geometry(arr, cfg), cfg)


def prepare(item: Any, cfg: ServingConfig, resize: str | None = None) -> np.ndarray:
    """Decode, check and map one input to the model's uint8 (size, size, channels), as ingest does."""
    arr = check_input(decode_one(item, cfg.max_pixels), cfg)
    return fit_square(to_channels(arr, cfg.channels), cfg.image_size, resize or cfg.resize)


def encoded_size(item: Any) -> int | None:
    """Bytes a cell's image file holds, computed without decoding it (base64 text: from its length);
    None for a pixel array."""
    if isinstance(item, str):
        text = item.strip()  # the same object when nothing is stripped: no copy of a large cell
        return len(text) * 3 // 4 - (2 - len(text[-2:].rstrip("=")) if len(text) >= 2 else 0)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return memoryview(item).nbytes
    return None


def _array_hw(cell: Any) -> tuple[int, int]:
    """(H, W) of a pixel-array cell from its first row, without converting it; (0, 0) for anything else."""
    if isinstance(cell, np.ndarray):
        return (int(cell.shape[0]), int(cell.shape[1])) if cell.ndim >= 2 else (0, 0)
    if isinstance(cell, (list, tuple)) and cell and isinstance(cell[0], (list, tuple, np.ndarray)):
        return len(cell), len(cell[0])
    return 0, 0


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB ({n:,} bytes)"


def check_request(cells: Sequence[Any], cfg: ServingConfig) -> None:
    """Refuse (DecodeError) an oversized request before any cell is decoded: too many cells, or a cell whose
    encoded image (or pixel array) is over the per-image limit. Costs one length per cell."""
    if len(cells) > cfg.max_request_images:
        raise DecodeError(
            f"request has {len(cells)} images, above the limit of {cfg.max_request_images} per "
            f"request (max_request_images); send them in several requests"
        )
    for i, cell in enumerate(cells):
        size = encoded_size(cell)
        if size is not None and size > cfg.max_image_bytes:
            raise DecodeError(
                f"input row {i}: image is {_mb(size)} encoded, above the limit of "
                f"{_mb(cfg.max_image_bytes)} per image (max_image_bytes)"
            )
        h, w = _array_hw(cell)
        if h * w > cfg.max_pixels:
            raise DecodeError(
                f"input row {i}: pixel array of {h}x{w} (HxW) is above the limit of "
                f"{cfg.max_pixels:,} pixels (max_pixels)"
            )


def _cells(model_input: Any) -> list[Any]:
    """The list of image cells in any supported container."""
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN in model_input.columns:
            return list(model_input[INPUT_COLUMN])
        if model_input.shape[1] == 1:
            return list(model_input.iloc[:, 0])
        raise DecodeError(f"input needs a column named {INPUT_COLUMN!r}; got {list(model_input.columns)}")
    if isinstance(model_input, pd.Series):
        return list(model_input)
    if isinstance(model_input, dict):
        if INPUT_COLUMN not in model_input:
            raise DecodeError(f"input needs the key {INPUT_COLUMN!r}; got {sorted(model_input)}")
        v = model_input[INPUT_COLUMN]
        return list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v]
    if isinstance(model_input, np.ndarray) and model_input.dtype != object:
        if model_input.ndim in (2, 3) and not (model_input.ndim == 3 and model_input.shape[-1] > 4):
            return [model_input]  # one image
        return list(model_input)
    if isinstance(model_input, (str, bytes)):
        return [model_input]
    if isinstance(model_input, Iterable):
        return list(model_input)
    raise DecodeError(f"unsupported input type {type(model_input).__name__}")


def decisions(proba: np.ndarray, cfg: ServingConfig) -> pd.DataFrame:
    """Probabilities → output frame (`decision_columns`). Binary: the label follows the registered threshold, not
    argmax. Multiclass: the argmax; ordinal: the cut-points' grade (or argmax); flags never change either.
    Multilabel: (N, L) sigmoids, columns in `classes` order; each finding present at its own threshold."""
    from medclf.evaluation.kclass import apply_cutpoints
    from medclf.evaluation.metrics import thresholded_labels
    from medclf.evaluation.task import referable_score

    proba = np.asarray(proba, dtype=np.float64).reshape(-1, len(cfg.classes))
    out = pd.DataFrame(proba, columns=output_columns(cfg.classes))
    if cfg.task == "multilabel":
        return _multilabel_decisions(proba, out, cfg)
    if cfg.task == "binary":
        labels = thresholded_labels(proba, cfg.positive_index, cfg.threshold)
        out["label"] = [cfg.classes[i] for i in labels]
        out["positive"] = proba[:, cfg.positive_index] >= cfg.threshold
        return out
    # the grade the ordinal cut-points give, else the argmax (apply_cutpoints refuses an empty array)
    index = apply_cutpoints(proba, cfg.cutpoints) if cfg.cutpoints and len(proba) else proba.argmax(axis=1)
    out["prediction"] = [cfg.classes[i] for i in index]
    for name, threshold in cfg.flags.items():
        out[f"flag_{name}"] = proba[:, cfg.classes.index(name)] >= threshold
    if cfg.referable_from is not None:
        out["p_referable"] = referable_score(proba, cfg.referable_from)
        out["referable"] = out["p_referable"].to_numpy() >= float(cfg.referable_threshold or 0.0)  # never None here
    return out[list(decision_columns(cfg))]


def _multilabel_decisions(proba: np.ndarray, out: pd.DataFrame, cfg: ServingConfig) -> pd.DataFrame:
    """`present_<finding>` at each finding's own threshold (`multilabel.apply_thresholds`, the rule evaluate
    scored: by name) and `labels`, the present ones joined in the findings' order ("" for none)."""
    from medclf.evaluation.multilabel import apply_thresholds

    present = apply_thresholds(proba, cfg.thresholds, cfg.classes)
    joined = [LABEL_SEPARATOR.join(c for c, p in zip(cfg.classes, row, strict=True) if p) for row in present]
    out["labels"] = pd.Series(joined, index=out.index, dtype="str")  # a string column with no rows too
    for name, column in zip(present_columns(cfg.classes), present.T, strict=True):
        out[name] = column
    return out[list(decision_columns(cfg))]


# ----------------------------------------------------------------------------- the pyfunc
class MedclfModel(PythonModel):
    """Raw images in, probabilities + the task's decision out (see the module docstring)."""

    def load_context(self, context: PythonModelContext) -> None:
        self.cfg = ServingConfig.from_dict(dict(context.model_config or {}))
        self.model = load_keras(context.artifacts[KERAS_ARTIFACT])

    def predict_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, size, size, channels) → float (N, K) softmax (multilabel: (N, L) sigmoids), in fixed-size
        batches."""
        if len(images) == 0:
            return np.zeros((0, len(self.cfg.classes)), np.float32)
        # predict_on_batch runs the compiled predict function: batch-1 latency measured 4.9 ms vs
        # 284 ms for an eager `model(x)` call (MobileNetV2 0.35, 64x64, 2 loaded CPU cores).
        outs = [
            np.asarray(self.model.predict_on_batch(images[i : i + self.cfg.batch_size]))
            for i in range(0, len(images), self.cfg.batch_size)
        ]
        return np.concatenate(outs).astype(np.float32)

    # No type hints here on purpose: MLflow 3 derives a schema from `predict`'s hints and would
    # override the explicit signature (which must accept both strings and pixel lists). MLflow
    # then prints a one-time "Add type hints" UserWarning at import; it forces that warning
    # through its own `simplefilter("once")`, so a filter here cannot silence it.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]  # see above
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        # MlflowException(INVALID_PARAMETER_VALUE) is answered as HTTP 400 with its message
        cells = _cells(model_input)
        try:
            check_request(cells, self.cfg)  # size limits first: nothing is decoded for an oversized request
        except DecodeError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        batch = []
        for i, cell in enumerate(cells):
            try:
                batch.append(prepare(cell, self.cfg))
            except DecodeError as err:
                raise MlflowException(f"input row {i}: {err}", error_code=INVALID_PARAMETER_VALUE) from None
        x = (
            np.stack(batch)
            if batch
            else np.zeros((0, self.cfg.image_size, self.cfg.image_size, self.cfg.channels), np.uint8)
        )
        return decisions(self.predict_images(x), self.cfg)


def load_keras(path: str) -> Any:
    """Load the exported `.keras` model safely (custom layers register on `medclf.modeling.network` import)."""
    import importlib

    import keras

    try:
        importlib.import_module("medclf.modeling.network")
    except ModuleNotFoundError as err:
        if err.name != "medclf.modeling.network":
            raise
    return keras.saving.load_model(path, safe_mode=True, compile=False)


def signature(cfg: ServingConfig | Sequence[str]) -> Any:
    """Column `image` of any JSON type (base64 string or nested pixel list) → the config's `decision_columns`
    (given bare class names: a binary model's, as before the task keys)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema, TensorSpec

    if not isinstance(cfg, ServingConfig):
        cfg = ServingConfig(list(cfg), str(cfg[-1]), 0.5, 1, 1, schema_version=1)
    outputs: list[ColSpec | TensorSpec] = [ColSpec(t, c) for c, t in decision_columns(cfg).items()]
    any_type = AnyType()  # type: ignore[no-untyped-call]  # mlflow leaves AnyType.__init__ unannotated
    return ModelSignature(inputs=Schema([ColSpec(any_type, INPUT_COLUMN)]), outputs=Schema(outputs))


def encode_file(data: bytes) -> str:
    """Bytes → the base64 text the endpoint expects (helper for clients and tests)."""
    return base64.b64encode(data).decode("ascii")
