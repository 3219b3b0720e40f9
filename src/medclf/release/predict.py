"""`medclf predict PATH... [--model URI]`: batch inference with the registered pyfunc.

The same pyfunc that `mlflow models serve` runs does the preprocessing and the thresholding,
so a CSV from here and a response from the endpoint agree to the last digit. Files that cannot
be decoded (`DecodeError: <reason>`, a decompression bomb over `ingest.max_image_pixels` included), or that
the model refuses (`refused: <reason>`: smaller than its `min_size`, more elongated than its
`max_aspect_ratio`, a colour picture for a greyscale `modality`), get a row with the reason in `error` instead
of stopping the batch. Files go to the model in requests of at most the model's own `max_request_images`
(read from the loaded model's config, so an operator's override at load time is followed too).

The CSV: `path`, the columns the served model returns (`medclf.release.serving.decision_columns`: binary
`p_<class>`..., `label`, `positive`; multiclass/ordinal `p_<class>`..., `prediction`, `flag_<class>`...,
`p_referable`, `referable`; multilabel `p_<finding>`..., `labels` (the present findings, ";"-joined, "" for none),
`present_<finding>`...), `error`, then `threshold` (binary only: the K-class decision is not one threshold) or
`threshold_<finding>` per finding (multilabel: each finding's own threshold), `model_uri` and `model_version`. A
binary model's CSV is the one schema 1 wrote. A multilabel row with no finding present has `labels` ""; a file
that was not scored has it empty too, and its reason in `error`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medclf.config import Settings
from medclf.imaging.images import DICOM_SUFFIXES, decode_bytes
from medclf.imaging.pixels import DecodeError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", *DICOM_SUFFIXES}


class PredictError(RuntimeError):
    """Nothing to predict on, or the model cannot be loaded (the message says which)."""


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, plus image/DICOM files found recursively in folders (sorted, hidden skipped)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
        elif p.is_file():
            out.append(p)
        else:
            raise PredictError(f"{p}: no such file or directory")
    if not out:
        raise PredictError(f"no image or DICOM files found in {[str(p) for p in paths]}")
    return out


def _decode(path: Path, max_pixels: int) -> Any:
    """File → uint8 pixel array (DICOM by extension or by its 'DICM' marker), bomb-guarded by `max_pixels`."""
    return decode_bytes(path.read_bytes(), max_pixels, name=path.name)[0]


def default_model_uri(settings: Settings) -> str:
    return f"models:/{settings.registry.model_name}@champion"


def _resolve_version(settings: Settings, uri: str) -> str | None:
    """'models:/name@alias' → the version number it points to now (recorded in the output)."""
    if not uri.startswith("models:/") or "@" not in uri:
        return uri.rsplit("/", 1)[-1] if uri.startswith("models:/") else None
    from mlflow import MlflowClient

    name, alias = uri[len("models:/") :].split("@", 1)
    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except Exception as err:  # noqa: BLE001 - the load below reports the real problem
        raise PredictError(
            f"{uri}: cannot resolve the alias ({err}). Is a version promoted to '{alias}'? See docs/PROMOTION.md"
        ) from None


def chunk_size(model: Any) -> int:
    """Images per `predict` call: the loaded pyfunc's own `max_request_images` (it refuses more)."""
    return max(1, int(model.unwrap_python_model().cfg.max_request_images))


def predict_paths(
    paths: Sequence[str | Path], model_uri: str | None, out: str | Path, settings: Settings
) -> dict[str, Any]:
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd

    from medclf.infra.io import atomic_file
    from medclf.release.serving import INPUT_COLUMN, InputRefused, check_input, decision_columns

    uri = model_uri or default_model_uri(settings)
    files = expand_paths(paths)
    if uri.startswith(("models:/", "runs:/")):
        from medclf.infra.tracking import configure

        configure(settings.mlflow.resolved_uri())
    version = _resolve_version(settings, uri)
    model = mlflow.pyfunc.load_model(uri)
    cfg = model.unwrap_python_model().cfg
    types = decision_columns(cfg)  # the served model's output columns, in order, and their types
    cols, binary, multilabel = list(types), cfg.task == "binary", cfg.task == "multilabel"
    rows: list[dict[str, Any]] = []
    refused = 0
    step = chunk_size(model)
    for start in range(0, len(files), step):
        chunk, arrays, ok = files[start : start + step], [], []
        for f in chunk:
            try:
                # the model's size/aspect/colour bounds here too, so a refused file gets its own error row
                arrays.append(check_input(_decode(f, settings.ingest.max_image_pixels), cfg))
                ok.append(f)
            except InputRefused as err:
                refused += 1
                rows.append({"path": str(f), "error": f"refused: {err}"})
            except (DecodeError, OSError) as err:
                rows.append({"path": str(f), "error": f"{type(err).__name__}: {err}"})
        if arrays:
            pred = model.predict(pd.DataFrame({INPUT_COLUMN: arrays}))
            for f, rec in zip(ok, pred.to_dict("records"), strict=True):
                row = {c: bool(rec[c]) if types[c] == "boolean" else rec[c] for c in cols}
                rows.append({"path": str(f), **row, "error": ""})
    order = {str(f): i for i, f in enumerate(files)}
    rows.sort(key=lambda r: order[r["path"]])
    df = pd.DataFrame(rows, columns=["path", *cols, "error"])
    if binary:  # the threshold as its exact repr (float_format below would round it; the label depends on it)
        df["threshold"] = repr(float(cfg.threshold))
    if multilabel:  # each finding's own threshold, as exactly (its `present_<finding>` depends on it)
        for c in cfg.classes:
            df[f"threshold_{c}"] = repr(float(cfg.thresholds[c]))
    df["model_uri"], df["model_version"] = uri, version
    out = Path(out)
    with atomic_file(out) as fh:
        df.to_csv(fh, index=False, float_format="%.9g")
    failed = int((df["error"].fillna("") != "").sum())
    if failed:
        log.warning(
            "predict: %d of %d files not scored: %d could not be decoded, %d refused by the model's input "
            "bounds (size, aspect ratio, colour); see the 'error' column of %s",
            failed,
            len(df),
            failed - refused,
            refused,
            out,
        )
    scored = df[df["error"].fillna("") == ""]
    if multilabel:  # files with each finding present (a file may count under several)
        labels = {c: int(scored[f"present_{c}"].astype(bool).sum()) for c in cfg.classes}
    else:
        labels = {str(k): int(v) for k, v in scored["label" if binary else "prediction"].value_counts().items()}
    summary: dict[str, Any] = {"model_uri": uri, "model_version": version}
    if binary:
        summary["threshold"] = cfg.threshold
    summary |= {"files": len(df), "failed": failed, "refused": refused, "labels": labels, "out": str(out)}
    if binary:
        summary["positive_class"] = cfg.positive_class
        summary["mean_p"] = float(np.nanmean(df[f"p_{cfg.positive_class}"])) if len(df) > failed else None
    elif multilabel:  # the scored files with no finding present
        summary |= {"task": cfg.task, "no_finding": int((scored["labels"].fillna("") == "").sum())}
    else:  # how many scored files each flag (and the referable view) called
        extra = [c for c in cols if c.startswith("flag_") or c == "referable"]
        summary |= {"task": cfg.task, **{c: int(scored[c].astype(bool).sum()) for c in extra}}
    return summary
