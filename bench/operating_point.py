"""Sensitivity and specificity at a high-sensitivity operating point, for finished recipe_bench.py runs.

    .venv/bin/python bench/operating_point.py /tmp/rb/full128/seed1234 /tmp/rb/full128/seed1 ... [--target 0.95]

Issue 13's target is "specificity >= 0.95 at sensitivity >= 0.95". Two readings, both printed per run and as
mean +- sd:
- **val-chosen** (the honest one): `medclf evaluate` again with `evaluate.target_sensitivity = --target`, so the
  threshold is chosen on the validation split, then applied to the test split; test sensitivity and specificity.
- **test ROC** (descriptive, optimistic): the best test specificity among thresholds whose test sensitivity is
  >= --target, read from evaluate's test_predictions.csv. It says what the ranking allows, not what a
  threshold chosen without the test labels achieves.

The run's params.yaml is copied (params-op.yaml) with only the target changed; the evaluate reports of the run
are overwritten by this evaluate (the model and the splits are untouched).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def roc_point(predictions: Path, positive: str, target: float) -> tuple[float, float]:
    """(sensitivity, specificity) of the test threshold with the best specificity at sensitivity >= target."""
    rows = list(csv.DictReader(predictions.open()))
    scored = sorted(((float(r[f"p_{positive}"]), r["label"] == positive) for r in rows), reverse=True)
    n_pos = sum(1 for _, y in scored if y)
    n_neg = len(scored) - n_pos
    tp = fp = 0
    for i, (score, y) in enumerate(scored):
        tp, fp = tp + y, fp + (not y)
        tie = i + 1 < len(scored) and scored[i + 1][0] == score
        if not tie and tp / n_pos >= target:
            return tp / n_pos, 1 - fp / n_neg
    return 1.0, 0.0


def val_chosen(run: Path, target: float) -> tuple[float, float, float]:
    """Re-run evaluate with the threshold chosen on val for sensitivity `target`: (test sens, spec, threshold)."""
    data = yaml.safe_load((run / "params.yaml").read_text())
    data["evaluate"]["target_sensitivity"] = target
    data["evaluate"]["threshold_rule"] = "target_sensitivity"
    data["evaluate"]["gates"].update(min_f1=0.0, min_recall=0.0)  # a report, not a release decision
    params = run / "params-op.yaml"
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": data["mlflow"]["tracking_uri"],
        "MEDCLF_PATIENT_SALT": "bench-salt",
        "PYTHONPATH": str(ROOT / "src"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    out = subprocess.run(
        [sys.executable, "-m", "medclf.cli", "--params", str(params), "evaluate"],
        env=env,
        cwd=run,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        sys.exit(f"evaluate failed in {run}:\n{out.stderr[-3000:]}")
    doc = json.loads((run / "reports" / "metrics.json").read_text())
    return float(doc["test"]["recall"]), float(doc["test"]["specificity"]), float(doc["threshold"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="recipe_bench.py seed folders (WORKDIR/seedN)")
    ap.add_argument("--target", type=float, default=0.95)
    args = ap.parse_args()
    rows = []
    for run in args.runs:
        positive = json.loads((run / "models" / "train_run.json").read_text())["positive_class"]
        r_sens, r_spec = roc_point(run / "reports" / "evaluate" / "test_predictions.csv", positive, args.target)
        v_sens, v_spec, thr = val_chosen(run, args.target)
        rows.append((v_sens, v_spec, r_sens, r_spec))
        print(
            f"{run}: val-chosen threshold {thr:.4f}: test sens {v_sens:.3f} spec {v_spec:.3f}; "
            f"test ROC at sens >= {args.target}: sens {r_sens:.3f} spec {r_spec:.3f}",
            flush=True,
        )
    names = ("val-chosen sens", "val-chosen spec", "test-ROC sens", "test-ROC spec")
    summary = {}
    for i, name in enumerate(names):
        vals = [r[i] for r in rows]
        summary[name] = {
            "mean": round(statistics.fmean(vals), 4),
            "sd": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0,
        }
    print("mean ± sd: " + ", ".join(f"{k} {v['mean']:.3f} ± {v['sd']:.3f}" for k, v in summary.items()))
    print(json.dumps({"target": args.target, **summary}))


if __name__ == "__main__":
    main()
