"""A `train.tune` study on a small real subsample: does it finish, are its trials in MLflow, and does the final
fit reproduce the chosen trial's validation AUC?

    .venv/bin/python bench/tune_bench.py [--images 500] [--size 64] [--trials 20] [--timeout-minutes 0]
                                         [--head-epochs 2] [--finetune-epochs 3] [--workdir DIR] [--out tune.json]

A patient-level subsample of the embedded real demo (`data/demo/batch1`, Kermany chest X-rays): whole patients,
taken in the order of their pseudonym, alternating classes, until `--images` images. The repository's
`params.yaml` otherwise (the demo recipe, offline ImageNet MobileNetV2), with `ingest.image_size = --size`, the
epochs above, and `train.tune.trials = --trials` over params.yaml's own space. The stages run as `medclf`
processes (bench/demo_quality.py's `run_stage`) against a local SQLite MLflow store in the work folder.
Prints every trial (state, val AUC, drawn values) read back from MLflow's nested runs, then the chosen trial's
val AUC against the final fit's, and a final JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BATCH1 = ROOT / "data" / "demo" / "batch1"


def _demo_quality() -> Any:
    spec = importlib.util.spec_from_file_location("medclf_bench_demo_quality", ROOT / "bench" / "demo_quality.py")
    if spec is None or spec.loader is None:
        sys.exit("cannot import bench/demo_quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def subsample(dst: Path, n_images: int) -> dict[str, int]:
    """Whole patients from batch1 (sorted pseudonyms, classes alternating) until n_images; returns counts."""
    by_class: dict[str, dict[str, list[Path]]] = {}
    for f in sorted(BATCH1.rglob("*.jpeg")):
        by_class.setdefault(f.parent.name, {}).setdefault(f.name.split("_")[0], []).append(f)
    queues = {c: sorted(p.items()) for c, p in sorted(by_class.items())}
    counts = dict.fromkeys(queues, 0)
    taken = 0
    while taken < n_images and any(queues.values()):
        for c, q in queues.items():
            if q and taken < n_images:
                _, files = q.pop(0)
                (dst / c).mkdir(parents=True, exist_ok=True)
                for f in files:
                    shutil.copy2(f, dst / c / f.name)
                counts[c] += len(files)
                taken += len(files)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--timeout-minutes", type=float, default=0)
    ap.add_argument("--head-epochs", type=int, default=2)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dq = _demo_quality()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="medclf-tune-bench-"))
    raw = work / "raw"
    counts = subsample(raw, args.images)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    params = dq.write_params(work / "project", raw, args.seed, uri)
    data = yaml.safe_load(params.read_text())
    data["ingest"]["image_size"] = args.size
    data["train"].update(head_epochs=args.head_epochs, finetune_epochs=args.finetune_epochs)
    data["train"]["tune"].update(trials=args.trials, timeout_minutes=args.timeout_minutes)
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "MEDCLF_PATIENT_SALT": "bench-salt",
        "PYTHONPATH": str(ROOT / "src"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    print(
        f"subsample: {counts} ({sum(counts.values())} images) at {args.size} px; {args.trials} trials; "
        f"work {work}; load {dq.load1()}",
        flush=True,
    )
    walls = {}
    for stage in ("ingest", "validate", "augment", "train"):
        walls[stage], _, _ = dq.run_stage(params, stage, env)
        print(f"{stage}: {walls[stage]:.1f} s", flush=True)
    train = json.loads((work / "project" / "models" / "train_run.json").read_text())
    tune = train["tune"]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    kids = client.search_runs(
        [train["experiment_id"]], f"tags.mlflow.parentRunId = '{train['run_id']}'", max_results=1000
    )
    rows = sorted(
        (
            {
                "trial": int(r.data.params["trial"]),
                "state": r.data.tags.get("optuna.state") or r.info.status,
                "val_auc": r.data.metrics.get("val/best_auc"),
                "values": {
                    k.removeprefix("train."): r.data.params[k] for k in sorted(r.data.params) if k.startswith("train.")
                },
            }
            for r in kids
        ),
        key=lambda r: r["trial"],
    )
    print(f"\n{'trial':>5} {'state':>9} {'val AUC':>8}  drawn values")
    for r in rows:
        auc = f"{r['val_auc']:.4f}" if r["val_auc"] is not None else "-"
        print(f"{r['trial']:>5} {r['state']:>9} {auc:>8}  {r['values']}")
    diff = train["best_val_auc"] - tune["best_trial_val_auc"]
    print(f"\nMLflow: {len(rows)} nested trial runs under train run {train['run_id']} ({uri})")
    print(
        f"chosen trial {tune['best_trial']}: val AUC {tune['best_trial_val_auc']:.4f}; final fit with its values: "
        f"{train['best_val_auc']:.4f} (diff {diff:+.4f}); trials {tune['trials']}; study {tune['seconds']:.0f} s, "
        f"train stage {walls['train']:.0f} s; load {dq.load1()}"
    )
    summary = {
        "images": counts,
        "size": args.size,
        "trials": tune["trials"],
        "mlflow_trial_runs": len(rows),
        "best_trial": tune["best_trial"],
        "best_trial_val_auc": tune["best_trial_val_auc"],
        "final_val_auc": train["best_val_auc"],
        "diff": round(diff, 4),
        "params": tune["params"],
        "study_seconds": tune["seconds"],
        "train_stage_seconds": round(walls["train"], 1),
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "trials": rows}, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
