"""Each task family's test figures on the shared real sets, over seeds (issue 24): mean ± sd and the train time.

    .venv/bin/python bench/family_bench.py cxr3 ham10000 retinamnist odir_dr odir [--seeds 1234 1 2] \
        [--set train.finetune_epochs=8 ...] [--workdir DIR] [--out FILE.json]
    .venv/bin/python bench/family_bench.py --emit ham10000 > params.yaml     # the family's params, for dvc repro

A family is the repository's `params.yaml` with `configs/families/<family>.yaml` merged over it (params changes
only: the same stages, the same code), then each `--set dotted.key=value` (YAML value). The sets are read in
place from `../shared/data` (its README: development parts, so every figure is internal). For each family the
data stages (ingest, validate, augment) run once, then train and evaluate once per seed (`train.seed`; the
patient- or lesion-level split is the same for every seed), each as a `medclf` process in a scratch project with
a local SQLite MLflow store. Printed: per seed and mean ± sd, the family's headline test metrics at the decision
rule fitted on validation (argmax with critical-class flags, or ordinal cut-points with the referable view),
the issue's target for each where it has one, the train stage's wall time and the 1-minute load average; a final
JSON line per family.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from demo_quality import ROOT, load1, run_stage  # bench/ is on sys.path when run as a script
from recipe_bench import apply

FAMILIES = ROOT / "configs" / "families"
DATA_STAGES = ("ingest", "validate", "augment")
# family -> [(metrics.json test key, short name, target or None)]: the targets of issue 24 on internal splits
REPORTED: dict[str, list[tuple[str, str, float | None]]] = {
    "cxr3": [
        ("balanced_accuracy", "bal acc", 0.80),
        ("macro_auc", "macro AUC", None),
        ("accuracy", "acc", None),
        ("per_class.VIRUS.recall", "viral recall", 0.70),
        ("critical.VIRUS.sensitivity", "viral flag sens", None),
        ("critical.VIRUS.specificity", "viral flag spec", None),
    ],
    "ham10000": [
        ("macro_auc", "macro AUC", 0.94),
        ("balanced_accuracy", "bal acc", 0.72),
        ("accuracy", "acc", None),
        ("per_class.mel.recall", "mel recall (argmax)", None),
        ("critical.mel.sensitivity", "mel flag sens", 0.80),
        ("critical.mel.specificity", "mel flag spec", None),
    ],
    "retinamnist": [
        ("accuracy", "acc", 0.56),
        ("macro_auc", "macro AUC", 0.76),
        ("qwk", "QWK", 0.60),
        ("mae", "MAE", None),
        ("referable.auc", "referable AUC", None),
        ("referable.sensitivity", "referable sens", None),
        ("referable.specificity", "referable spec", None),
    ],
    "odir": [  # issue 25's targets (multi-label findings, internal patient split)
        ("macro_auc", "macro AUC", 0.87),
        ("per_class.cataract.auc", "cataract AUC", 0.97),
        ("per_class.myopia.auc", "myopia AUC", 0.97),
        ("per_class.diabetic_retinopathy.auc", "DR AUC", 0.88),
        ("per_class.glaucoma.auc", "glaucoma AUC", 0.85),
        ("per_class.amd.auc", "AMD AUC", 0.85),
        ("per_class.hypertensive_retinopathy.auc", "hypertensive AUC", None),
        ("per_class.normal.auc", "normal AUC", None),
        ("per_class.other.auc", "other AUC", None),
        ("map", "mAP", None),
        ("macro_f1", "macro F1", None),
        ("hamming_loss", "Hamming loss", None),
    ],
    "odir_dr": [
        ("referable.auc", "referable AUC", 0.90),
        ("qwk", "QWK", None),
        ("accuracy", "acc", None),
        ("macro_auc", "macro AUC", None),
        ("referable.sensitivity", "referable sens", None),
        ("referable.specificity", "referable spec", None),
    ],
}


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into a copy of `base`, mapping by mapping (a list or scalar replaces)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def family_params(family: str) -> dict[str, Any]:
    """params.yaml with the family's file merged over it (paths as the family file gives them)."""
    preset = FAMILIES / f"{family}.yaml"
    if not preset.exists():
        known = sorted(p.stem for p in FAMILIES.glob("*.yaml"))
        sys.exit(f"{preset}: no such family (known: {', '.join(known)})")
    return merge(yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load(preset.read_text()))


def _absolute(data: dict[str, Any]) -> None:
    """The family's relative data paths (`../shared/data/...`) made absolute from the repository root."""
    src = data["ingest"]["source"]
    for node, key in ((data["paths"], "raw_data"), (src, "uri"), (src, "manifest")):
        value = node.get(key)
        if value and "://" not in value and not Path(value).is_absolute():
            node[key] = str((ROOT / value).resolve())


def write_family_params(
    family: str, scratch: Path, data_dir: Path, seed: int, uri: str, sets: list[str]
) -> tuple[Path, dict[str, Any]]:
    data = family_params(family)
    _absolute(data)
    data["paths"].update(
        {
            "ingest_dir": str(data_dir / "ingest"),
            "augment_dir": str(data_dir / "augment"),
            "model_dir": str(scratch / "models"),
            "reports_dir": str(scratch / "reports"),
            "cache_dir": str(scratch / ".cache"),
        }
    )
    data["train"]["seed"] = seed
    data["mlflow"]["tracking_uri"] = uri
    for s in sets:
        apply(data, s)
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, data


def _fmt(v: float | None) -> str:
    return "  n/a" if v is None else f"{v:.3f}"


def bench_family(family: str, seeds: list[int], work: Path, sets: list[str], data_only: bool = False) -> dict[str, Any]:
    reported = REPORTED.get(family, [])
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "MEDCLF_PATIENT_SALT": "bench-salt",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONPATH": str(ROOT / "src"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    data_dir = work / family / "data"
    rows, walls = [], {}
    for n, seed in enumerate(seeds):
        params, data = write_family_params(family, work / family / f"seed{seed}", data_dir, seed, uri, sets)
        if n == 0:
            walls = {s: run_stage(params, s, env)[0] for s in DATA_STAGES}
            print(
                f"{family}: {data['task']['type']}, classes {data['ingest']['classes'] or data['task']['labels']}, "
                f"{data['ingest']['image_size']} px, "
                f"data stages {', '.join(f'{s} {w:.0f} s' for s, w in walls.items())}",
                flush=True,
            )
            if data_only:
                return {"data_stages_s": walls}
        t_train = run_stage(params, "train", env)[0]
        t_eval, rc, _ = run_stage(params, "evaluate", env)
        doc = json.loads((params.parent / "reports" / "metrics.json").read_text())
        test = doc["test"]
        row: dict[str, Any] = {
            "seed": seed,
            **{k: test.get(k) for k, _, _ in reported},
            "n_test": test.get("n"),
            "gates_passed": rc == 0,
            "train_s": round(t_train, 1),
            "evaluate_s": round(t_eval, 1),
            "load": load1(),
        }
        rows.append(row)
        print(
            f"  seed {seed:<5d} "
            + "  ".join(f"{short} {_fmt(row[k])}" for k, short, _ in reported)
            + f"  (n={row['n_test']}, gates {'passed' if rc == 0 else 'FAILED'}, train {t_train:.0f} s, "
            f"evaluate {t_eval:.0f} s, load {row['load']})",
            flush=True,
        )
    summary: dict[str, Any] = {"family": family, "seeds": seeds, "set": sets, "n_test": rows[0]["n_test"]}
    parts = []
    for k, short, target in reported:
        vals = [float(r[k]) for r in rows if r[k] is not None]
        if not vals:
            continue
        mean, sd = statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)
        summary[k] = {"mean": round(mean, 4), "sd": round(sd, 4), "target": target}
        verdict = "" if target is None else (f" (target ≥ {target}: {'met' if mean >= target else 'NOT met'})")
        parts.append(f"{short} {mean:.3f} ± {sd:.3f}{verdict}")
    summary["train_s_mean"] = round(statistics.fmean(r["train_s"] for r in rows), 1)
    summary["data_stages_s"] = {s: round(w, 1) for s, w in walls.items()}
    print(
        f"{family}, mean ± sd over {len(rows)} seeds: " + "; ".join(parts) + f"; train {summary['train_s_mean']:.0f} s"
    )
    print(json.dumps(summary), flush=True)
    return {"summary": summary, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("families", nargs="*", help=f"of {sorted(REPORTED)}")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--emit", metavar="FAMILY", help="print the family's params.yaml and exit")
    ap.add_argument("--data-only", action="store_true", help="stop after ingest, validate and augment")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.emit:
        data = family_params(args.emit)
        for s in args.set:
            apply(data, s)
        print(f"# params.yaml + configs/families/{args.emit}.yaml (bench/family_bench.py --emit)")
        print(yaml.safe_dump(data, sort_keys=False), end="")
        return
    if not args.families:
        ap.error("name at least one family, or --emit FAMILY")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="medclf-family-bench-"))
    print(f"work dir {work}; seeds {args.seeds}; set {args.set}; load {load1()}", flush=True)
    results = {f: bench_family(f, args.seeds, work, args.set, args.data_only) for f in args.families}
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
