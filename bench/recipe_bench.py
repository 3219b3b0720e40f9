"""Quality of a training recipe on a small real subsample, over seeds: the before/after measure of issue 13.

    .venv/bin/python bench/recipe_bench.py --images 500 --size 28 --seeds 1234 1 2 \
        [--set train.input_size=96 --set train.finetune_lr=1e-5 ...] [--label NAME] [--out FILE.json]
    .venv/bin/python bench/recipe_bench.py --raw ../shared/data/chest_xray/train --size 128   # the full set

The subsample is bench/tune_bench.py's: whole patients of the embedded real demo (`data/demo/batch1`), in the
order of their pseudonyms, classes alternating, until `--images` images; ingest splits it by patient at
`--size` px. With `--raw DIR` the whole class-folder set in DIR is used instead (Kermany file names: the patient
is the `person<N>` / `IM-<N>` prefix), read in place.
The recipe is the repository's `params.yaml` with each `--set dotted.key=value` (YAML value) applied.
For each seed, the stages run as `medclf` processes (ingest, validate, augment, train, evaluate) in a scratch
project with a local SQLite MLflow store. Printed: the test split's ROC-AUC, accuracy, sensitivity, specificity and
F1 at the threshold chosen on validation, per seed and mean +- sd, the train stage's wall time, and the machine's
1-minute load average; a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from tune_bench import ROOT, _demo_quality, subsample  # bench/ is on sys.path when run as a script

METRICS = (("roc_auc", "AUC"), ("accuracy", "ACC"), ("recall", "sens"), ("specificity", "spec"), ("f1", "F1"))


def apply(data: dict[str, Any], dotted: str) -> None:
    key, _, raw = dotted.partition("=")
    *parents, leaf = key.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = yaml.safe_load(raw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    ap.add_argument("--raw", type=Path, help="a whole class-folder set (Kermany names) instead of the subsample")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--label", default="")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dq = _demo_quality()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="medclf-recipe-bench-"))
    if args.raw:
        sys.path.insert(0, str(ROOT))
        from tests.conftest import KERMANY_REGEX

        raw = args.raw.resolve()
        counts = {d.name: sum(1 for _ in d.glob("*.jpeg")) for d in sorted(raw.iterdir()) if d.is_dir()}
    else:
        raw = work / "raw"
        counts = subsample(raw, args.images) if not raw.exists() else {}
    label = args.label or (" ".join(args.set) or "params.yaml")
    print(
        f"recipe: {label}; {sum(counts.values()) if args.raw else args.images} images at {args.size} px {counts}; "
        f"seeds {args.seeds}; load {dq.load1()}",
        flush=True,
    )
    rows = []
    for seed in args.seeds:
        uri = f"sqlite:///{work / 'mlflow.db'}"
        params = dq.write_params(work / f"seed{seed}", raw, seed, uri)
        data = yaml.safe_load(params.read_text())
        data["ingest"]["image_size"] = args.size
        if args.raw:
            data["ingest"]["source"]["patient_id_regex"] = KERMANY_REGEX
        for s in args.set:
            apply(data, s)
        params.write_text(yaml.safe_dump(data, sort_keys=False))
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": uri,
            "MEDCLF_PATIENT_SALT": "bench-salt",
            "PYTHONPATH": str(ROOT / "src"),
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        walls = {s: dq.run_stage(params, s, env)[0] for s in ("ingest", "validate", "augment", "train", "evaluate")}
        doc = json.loads((work / f"seed{seed}" / "reports" / "metrics.json").read_text())
        test = doc["test"]
        row = {
            "seed": seed,
            **{k: test.get(k) for k, _ in METRICS},
            "threshold": doc.get("threshold"),
            "n_test": test.get("n"),
            "train_s": round(walls["train"], 1),
            "load": dq.load1(),
        }
        rows.append(row)
        print(
            f"  seed {seed:<5d} "
            + "  ".join(f"{short} {row[k]:.3f}" for k, short in METRICS)
            + f"  (n={row['n_test']}, train {row['train_s']:.0f} s, load {row['load']})",
            flush=True,
        )
    summary: dict[str, Any] = {
        "recipe": label,
        "images": sum(counts.values()) if args.raw else args.images,
        "size": args.size,
        "seeds": args.seeds,
    }
    parts = []
    for k, short in METRICS:
        vals = [r[k] for r in rows if r[k] is not None]
        mean, sd = statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)
        summary[k] = {"mean": round(mean, 4), "sd": round(sd, 4)}
        parts.append(f"{short} {mean:.3f} ± {sd:.3f}")
    summary["train_s_mean"] = round(statistics.fmean(r["train_s"] for r in rows), 1)
    print(f"mean ± sd over {len(rows)} seeds: " + ", ".join(parts) + f"; train {summary['train_s_mean']:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
