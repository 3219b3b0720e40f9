"""Quality of the DEFAULT demo recipe over seeds, on its own test split and on patients it never saw.

    .venv/bin/python bench/demo_quality.py [--seeds 1234 1 2] [--shared ../shared/data/chest_xray]
                                           [--workdir DIR] [--out quality.json]

For each seed, a scratch project under a temporary folder gets the repository's `params.yaml` unchanged
except: every `paths.*` points into the scratch folder, `paths.raw_data` and `ingest.source.uri` are the
embedded demo's `batch1` (1,200 images, absolute path), `train.seed` is the seed and `mlflow.tracking_uri`
is a local SQLite store shared by the seeds (`sqlite:///<workdir>/mlflow.db`, also set as
MLFLOW_TRACKING_URI). The stages run as `medclf --params ... <stage>` processes (ingest, validate,
augment, train, evaluate) with a fixed MEDCLF_PATIENT_SALT. From `reports/metrics.json` and
`reports/gates.json`: the test split's ROC-AUC, sensitivity, specificity, F1 and accuracy at the
threshold chosen on validation (a failed release gate is reported, not fatal).

Unseen patients (`--shared`, the Kermany release's train/{NORMAL,PNEUMONIA}, 5,216 images): the demo
(batch1 + batch2) was built from it by `data/demo/regenerate.py`, whose file names carry
`pseudonym(<release patient id>)`. Every release patient whose pseudonym is in neither batch is unseen;
its images (byte-identical copies within a class kept once, as regenerate.py does, and any file
byte-identical to a demo patient's file dropped) go through regenerate.py's own `encode` (grayscale,
128 px Lanczos, JPEG q90) and then exactly ingest's `decode_image -> to_channels -> fit_square`. Each
seed's `models/model.keras` scores them; ROC-AUC, and the threshold metrics at that seed's validation
threshold (`gates.json`), with 95 % bootstrap CIs. The unseen set is NOT balanced like the demo (the release
has ~3x more pneumonia), so balanced accuracy is reported too.

Prints a table, mean +- sd over seeds, and a final JSON line. The machine is shared: the 1-minute load
average is recorded at the start and after every seed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from medclf.config import Settings, load_settings
from medclf.imaging.images import decode_image, fit_square, to_channels

DEMO = ROOT / "data" / "demo"
STAGES = ("ingest", "validate", "augment", "train", "evaluate")
METRICS = ("roc_auc", "recall", "specificity", "f1", "accuracy", "balanced_accuracy")
SHORT = {
    "roc_auc": "AUC",
    "recall": "sens",
    "specificity": "spec",
    "f1": "F1",
    "accuracy": "acc",
    "balanced_accuracy": "bacc",
}


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def regenerate_module() -> ModuleType:
    """`data/demo/regenerate.py` imported as a module (its pseudonym, patients and encode)."""
    path = DEMO / "regenerate.py"
    spec = importlib.util.spec_from_file_location("chest_xray_demo_regenerate", path)
    if spec is None or spec.loader is None:
        sys.exit(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def write_params(scratch: Path, batch1: Path, seed: int, tracking_uri: str) -> Path:
    """The repository's params.yaml with paths in `scratch`, the demo's batch1 as raw data, the seed."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["paths"] = {
        "raw_data": str(batch1),
        "ingest_dir": str(scratch / "data/ingest"),
        "augment_dir": str(scratch / "data/augment"),
        "model_dir": str(scratch / "models"),
        "reports_dir": str(scratch / "reports"),
        "cache_dir": str(scratch / ".cache"),
    }
    data["ingest"]["source"]["uri"] = str(batch1)
    data["train"]["seed"] = seed
    data["mlflow"]["tracking_uri"] = tracking_uri
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_stage(params: Path, name: str, env: dict[str, str]) -> tuple[float, int, dict[str, Any] | None]:
    """`medclf --params P <name>` in a fresh process: (wall s, exit code, its JSON result or None)."""
    logs = params.parent / "logs"
    logs.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "medclf.cli", "--params", str(params), name],
        env=env,
        capture_output=True,
        text=True,
        cwd=params.parent,
        check=False,
    )
    wall = time.perf_counter() - t0
    (logs / f"{name}.out").write_text(out.stdout)
    (logs / f"{name}.err").write_text(out.stderr)
    try:
        result = json.loads(out.stdout) if out.returncode == 0 else None
    except json.JSONDecodeError:
        result = None
    if out.returncode and not (name == "evaluate" and "release gates failed" in out.stderr):
        sys.exit(f"medclf {name} failed ({out.returncode}), see {logs}:\n{out.stderr[-3000:]}")
    return wall, out.returncode, result


# --------------------------------------------------------------------------- unseen patients
def demo_pseudonyms(regen: ModuleType) -> dict[str, set[str]]:
    """Patient pseudonyms per demo batch, read from the file names."""
    out: dict[str, set[str]] = {}
    for batch in ("batch1", "batch2"):
        names = [p.name for p in (DEMO / batch).rglob("*") if p.is_file()]
        out[batch] = {m.group(1) for n in names if (m := regen.OUTPUT_PATIENT_REGEX.match(n))}
    return out


def unseen_set(regen: ModuleType, shared: Path, settings: Settings) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Images (N x S x S x C uint8, as ingest would make them) and labels of the release patients the demo
    never used; plus a description of the selection."""
    cfg = settings.ingest
    classes = ["NORMAL", "PNEUMONIA"]
    root = regen.train_root(shared)
    demo = demo_pseudonyms(regen)
    in_demo = demo["batch1"] | demo["batch2"]
    pools = {label: regen.patients(root, label) for label in regen.CLASSES}  # byte-identical copies dropped
    release_files = sum(
        1
        for label in regen.CLASSES
        for f in (root / label).iterdir()
        if f.suffix.lower() in regen.IMAGE_EXTENSIONS and not f.name.startswith(".")
    )
    demo_src = {
        hashlib.sha256(f.read_bytes()).hexdigest()
        for pool in pools.values()
        for p in pool
        if regen.pseudonym(p.pid) in in_demo
        for f in p.files
    }
    matched = {b: len({regen.pseudonym(p.pid) for pool in pools.values() for p in pool} & s) for b, s in demo.items()}
    images: list[np.ndarray] = []
    labels: list[int] = []
    patients: dict[str, set[str]] = {c: set() for c in classes}
    dropped_same_bytes = 0
    t0 = time.perf_counter()
    for label in regen.CLASSES:
        for p in pools[label]:
            if regen.pseudonym(p.pid) in in_demo:
                continue
            for f in p.files:
                if hashlib.sha256(f.read_bytes()).hexdigest() in demo_src:
                    dropped_same_bytes += 1
                    continue
                payload = regen.encode(f)  # the demo's own 128 px grayscale JPEG
                arr = decode_image(payload, cfg.max_image_pixels, cfg.channels, cfg.image_size)  # as ingest
                images.append(fit_square(to_channels(arr, cfg.channels), cfg.image_size, cfg.resize))
                labels.append(classes.index(label))
                patients[label].add(p.pid)
    y = np.asarray(labels, dtype=np.int64)
    counts = Counter(classes[i] for i in labels)
    info = {
        "release_images": release_files,
        "release_patients": sum(len(pool) for pool in pools.values()),
        "demo_patients": {b: len(s) for b, s in demo.items()},
        "demo_patients_found_in_release": matched,
        "images": len(labels),
        "patients": sum(len(s) for s in patients.values()),
        "images_per_class": dict(counts),
        "patients_per_class": {c: len(s) for c, s in patients.items()},
        "prevalence": round(float(y.mean()), 4) if len(y) else None,
        "dropped_same_bytes_as_demo": dropped_same_bytes,
        "patients_in_both_classes": len(patients["NORMAL"] & patients["PNEUMONIA"]),
        "prepare_s": round(time.perf_counter() - t0, 1),
    }
    if matched["batch1"] != len(demo["batch1"]) or matched["batch2"] != len(demo["batch2"]):
        sys.exit(
            f"not every demo pseudonym maps to a release patient: {matched} vs "
            f"{ {b: len(s) for b, s in demo.items()} } (wrong --shared?)"
        )
    return np.stack(images), y, info


def score_unseen(
    model_path: Path, classes_json: Path, x: np.ndarray, y: np.ndarray, threshold: float, n_boot: int
) -> dict[str, Any]:
    """The seed's exported model on the unseen images: metrics at its validation threshold (+ 95 % CIs)."""
    import keras

    from medclf.evaluation import metrics

    classes = json.loads(classes_json.read_text())
    pos = classes["classes"].index(classes["positive_class"])
    model = keras.saving.load_model(model_path, safe_mode=True)
    t0 = time.perf_counter()
    proba = np.asarray(model.predict(x, batch_size=64, verbose=0), dtype=np.float64)
    predict_s = time.perf_counter() - t0
    yb = (y == pos).astype(np.int64)  # unseen labels are indices into [NORMAL, PNEUMONIA]
    if classes["classes"] != ["NORMAL", "PNEUMONIA"]:
        sys.exit(f"unexpected class order {classes['classes']}")
    pb = np.clip(proba[:, pos], 0.0, 1.0)
    ci = metrics.metrics_with_ci(yb, pb, threshold, n_boot, 0)
    at05 = metrics.binary_metrics(yb, pb, 0.5)
    out: dict[str, Any] = {k: v["value"] for k, v in ci.items()}
    out.update({f"{k}_ci": [round(ci[k]["ci_low"], 4), round(ci[k]["ci_high"], 4)] for k in METRICS})
    out.update({k: v for k, v in metrics.binary_metrics(yb, pb, threshold).items() if k in metrics.COUNTS})
    out["at_0.5"] = {k: round(at05[k], 4) for k in ("recall", "specificity", "f1", "balanced_accuracy")}
    out["predict_s"] = round(predict_s, 1)
    out["n"] = len(y)
    return out


# --------------------------------------------------------------------------- per seed
def one_seed(
    seed: int, work: Path, batch1: Path, env: dict[str, str], unseen: tuple[np.ndarray, np.ndarray] | None, n_boot: int
) -> dict[str, Any]:
    scratch = work / f"seed{seed}"
    shutil.rmtree(scratch, ignore_errors=True)
    params = write_params(scratch, batch1, seed, env["MLFLOW_TRACKING_URI"])
    settings = load_settings(params)
    walls: dict[str, float] = {}
    results: dict[str, Any] = {}
    evaluate_rc = 0
    for name in STAGES:
        walls[name], rc, results[name] = run_stage(params, name, env)
        if name == "evaluate":
            evaluate_rc = rc
        print(f"  seed {seed}: {name} {walls[name]:.1f}s (load {load1()})", flush=True)
    reports = settings.paths.reports_dir
    doc = json.loads((reports / "metrics.json").read_text())
    gates = json.loads((reports / "gates.json").read_text())
    threshold = float(gates["threshold"])
    test = doc["test"]
    train = results["train"] or {}
    ing = results["ingest"] or {}
    row: dict[str, Any] = {
        "seed": seed,
        "threshold": round(threshold, 4),
        "gates_passed": bool(gates["passed"]) and not evaluate_rc,
        "gate_failures": gates.get("failures", []),
        "test": {k: test.get(k) for k in METRICS}
        | {f"{k}_ci": [test.get(f"{k}_ci_low"), test.get(f"{k}_ci_high")] for k in METRICS}
        | {"n": test.get("n"), **{k: test.get(k) for k in ("tp", "fp", "tn", "fn")}},
        "val": doc.get("val"),
        "splits": ing.get("splits"),
        "patients": ing.get("patients"),
        "train_s": round(walls["train"], 1),
        "train_epoch_s": train.get("train_seconds"),
        "best_epoch": train.get("best_epoch"),
        "best_val_auc": train.get("best_val_auc"),
        "epochs_run": train.get("epochs_run"),
        "images_per_second": train.get("images_per_second"),
        "stage_s": {k: round(v, 1) for k, v in walls.items()},
        "mlflow_run_id": train.get("run_id"),
    }
    if unseen is not None:
        row["unseen"] = score_unseen(
            settings.paths.model_dir / "model.keras",
            settings.paths.ingest_dir / "classes.json",
            unseen[0],
            unseen[1],
            threshold,
            n_boot,
        )
    row["load1_after"] = load1()
    return row


def mean_sd(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def print_table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    cols = [("test", m) for m in METRICS] + [("unseen", m) for m in METRICS if rows and "unseen" in rows[0]]
    head = (
        "seed".rjust(5)
        + "".join(f"{('t ' if s == 'test' else 'u ') + SHORT[m]:>8}" for s, m in cols)
        + f"{'thr':>8}{'train s':>9}{'epoch s':>9}{'gates':>7}"
    )
    print("\n" + head)
    for r in rows:
        line = f"{r['seed']:5d}" + "".join(f"{r[s][m]:8.3f}" for s, m in cols)
        print(
            line + f"{r['threshold']:8.3f}{r['train_s']:9.1f}{r['train_epoch_s'] or 0:9.1f}"
            f"{'pass' if r['gates_passed'] else 'FAIL':>7}"
        )
    summary: dict[str, Any] = {}
    cells = []
    for s, m in cols:
        mu, sd = mean_sd([r[s][m] for r in rows])
        summary[f"{s}_{m}"] = {"mean": round(mu, 4), "sd": round(sd, 4)}
        cells.append(f"{mu:8.3f}")
    extra = {k: mean_sd([r[k] for r in rows]) for k in ("threshold", "train_s", "train_epoch_s")}
    summary.update({k: {"mean": round(mu, 4), "sd": round(sd, 4)} for k, (mu, sd) in extra.items()})
    print(
        " mean" + "".join(cells) + f"{extra['threshold'][0]:8.3f}{extra['train_s'][0]:9.1f}"
        f"{extra['train_epoch_s'][0]:9.1f}"
    )
    print(
        "   sd"
        + "".join(f"{summary[f'{s}_{m}']['sd']:8.3f}" for s, m in cols)
        + f"{extra['threshold'][1]:8.3f}{extra['train_s'][1]:9.1f}{extra['train_epoch_s'][1]:9.1f}"
    )
    print("t = internal test split (batch1, by patient); u = unseen release patients; thresholds from validation")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2], help="train.seed values")
    ap.add_argument(
        "--shared",
        type=Path,
        default=ROOT.parent / "shared" / "data" / "chest_xray",
        help="the Kermany release (train/{NORMAL,PNEUMONIA}); unseen-patient check skipped if absent",
    )
    ap.add_argument("--skip-unseen", action="store_true", help="only the internal test split")
    ap.add_argument("--salt", default="demo-quality-bench", help="MEDCLF_PATIENT_SALT for every stage")
    ap.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples for the unseen-set CIs")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the scratch projects here (default: temp)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON summary here")
    args = ap.parse_args()

    work = (args.workdir or Path(tempfile.mkdtemp(prefix="medclf-demo-quality-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    batch1 = (DEMO / "batch1").resolve()
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    env = {
        **os.environ,
        "MEDCLF_PATIENT_SALT": args.salt,
        "MLFLOW_TRACKING_URI": tracking,
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    }
    os.environ["MEDCLF_PATIENT_SALT"] = args.salt
    t_start, load_start = time.perf_counter(), load1()
    print(f"workdir {work}; tracking {tracking}; cores {os.cpu_count()}; load1 {load_start}", flush=True)

    unseen: tuple[np.ndarray, np.ndarray] | None = None
    unseen_info: dict[str, Any] | None = None
    if not args.skip_unseen and (args.shared / "train").is_dir():
        probe = write_params(work / "probe", batch1, args.seeds[0], tracking)  # ingest settings of the recipe
        x, y, unseen_info = unseen_set(regenerate_module(), args.shared, load_settings(probe))
        unseen = (x, y)
        print(f"unseen patients: {json.dumps(unseen_info)}", flush=True)
    elif not args.skip_unseen:
        print(f"{args.shared}/train not found: unseen-patient check skipped", flush=True)

    rows = []
    for seed in args.seeds:
        rows.append(one_seed(seed, work, batch1, env, unseen, args.bootstrap))
        r = rows[-1]
        print(
            f"  seed {seed}: test AUC {r['test']['roc_auc']:.3f}"
            + (f", unseen AUC {r['unseen']['roc_auc']:.3f}" if "unseen" in r else "")
            + f", threshold {r['threshold']:.3f}",
            flush=True,
        )
    summary = print_table(rows)
    if unseen_info:
        n, pos = unseen_info["images"], unseen_info["images_per_class"].get("PNEUMONIA", 0)
        print(
            f"unseen set: {n} images ({pos} PNEUMONIA, {n - pos} NORMAL; prevalence "
            f"{unseen_info['prevalence']}), {unseen_info['patients']} patients {unseen_info['patients_per_class']}"
        )
    doc = {
        "seeds": args.seeds,
        "recipe": "params.yaml (committed) with paths/source/seed/tracking overridden",
        "salt": args.salt,
        "rows": rows,
        "summary": summary,
        "unseen_set": unseen_info,
        "load1_start": load_start,
        "load1_end": load1(),
        "cores": os.cpu_count(),
        "total_s": round(time.perf_counter() - t_start, 1),
        "workdir": str(work) if args.workdir else None,
    }
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1, default=str))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(doc, default=str))


if __name__ == "__main__":
    main()
