"""`train.tune`: an Optuna study over the `train.*` space declared in params.yaml, run by the train stage
before its final fit.

* **Objective:** the best-epoch validation AUC of a trial (the patient-level val split of ingest; the test
  split is never read by train). TPE sampling, seeded (`train.tune.seed`); median or Hyperband pruning on
  the per-epoch val AUC, so a hopeless trial stops after its first epochs.
* **Budget:** `trials` and/or `timeout_minutes`, whichever ends first.
* **Resumable:** the study lives in SQLite under `paths.cache_dir` (`catalog.TUNE_STUDY`), named by a hash
  of everything that defines it except the budget (the data, `augment`, the base `train` values, the space),
  so a killed train resumes it, a larger budget extends it, and other data or another space starts afresh.
  A trial that was running when the process died is marked failed and does not count.
* **Tracked:** each trial is an MLflow run nested under the train run, with its params, per-epoch metrics and
  final state (complete or pruned).
* **Reproducible through DVC:** the search runs inside the train stage, so it reruns exactly when train's
  declared params or data change, and the chosen values are in `train_run.json` (`tune.params`), which
  `dvc.lock` records. The final model is a fresh fit with the chosen values and the same seed: its val AUC
  reproduces the best trial's (both are reported).

Why inside train and not a stage of its own: off (the default) it costs nothing, not even a process per
retrain; on, it runs where training runs (the GPU pool) with no extra data transfer. docs/TUNING.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from typing import Any

from medclf.config import Paths, Train
from medclf.infra import catalog
from medclf.training import TrainError
from medclf.training.data import Data
from medclf.training.resume import Backup
from medclf.training.runtime import Runtime
from medclf.training.tracker import Tracker

log = logging.getLogger(__name__)


def study_name(cfg: Train, augment: Any, data_digests: list[str]) -> str:
    """`train-<hash>`: the data, augment, the base train values and the space; not the budget."""
    base = cfg.model_dump(mode="json")
    tune = base.pop("tune")
    blob = json.dumps(
        [base, augment.model_dump(mode="json"), data_digests, tune["space"], tune["pruner"], tune["seed"]],
        sort_keys=True,
    )
    return "train-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def suggest(trial: Any, cfg: Train) -> Train:
    """The trial's `train` section: the base values with the space's keys drawn by the sampler."""
    drawn: dict[str, Any] = {}
    for key, r in cfg.tune.space.items():
        if r.choices is not None:
            drawn[key] = trial.suggest_categorical(key, r.choices)
        elif (
            Train.model_fields[key].annotation in (int, "int")
            and float(r.low or 0).is_integer()
            and float(r.high or 0).is_integer()
        ):
            drawn[key] = trial.suggest_int(key, int(r.low or 0), int(r.high or 0), log=r.log)
        else:
            drawn[key] = trial.suggest_float(key, float(r.low or 0), float(r.high or 0), log=r.log)
    return with_values(cfg, drawn)


def with_values(cfg: Train, values: dict[str, Any]) -> Train:
    return Train.model_validate(cfg.model_dump() | values)


def _pruner(name: str) -> Any:
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def search(
    cfg: Train, augment: Any, data: Data, paths: Paths, rt: Runtime, tracker: Tracker, data_digests: list[str]
) -> dict[str, Any]:
    """Run (or resume) the study; returns its record: the chosen values, the best trial and the counts."""
    import keras
    import optuna

    from medclf.training.loop import fit_phases, prepare_fit

    t0 = time.perf_counter()
    name = study_name(cfg, augment, data_digests)
    db = catalog.TUNE_STUDY.path(paths)
    db.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=name,
        storage=f"sqlite:///{db}",
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=cfg.tune.seed),
        pruner=_pruner(cfg.tune.pruner),
        load_if_exists=True,
    )
    states = optuna.trial.TrialState
    for stale in study.get_trials(deepcopy=False, states=(states.RUNNING,)):  # its process was killed
        study.tell(stale.number, state=states.FAIL)
        log.warning("train.tune: trial %d of %s was interrupted; marked failed", stale.number, name)
    finished = len(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED)))
    remaining = max(cfg.tune.trials - finished, 0) if cfg.tune.trials else None
    policy = augment.policy()

    def objective(trial: Any) -> float:
        tcfg = suggest(trial, cfg)
        tpaths = paths.model_copy(update={"cache_dir": db.parent / f"trial-{trial.number:03d}"})
        child = tracker.child(f"trial-{trial.number:03d}")
        child.params({f"train.{k}": v for k, v in trial.params.items()} | {"trial": trial.number, "study": name})
        keras.utils.set_random_seed(tcfg.seed)
        trun, _, _ = prepare_fit(tcfg, data, tpaths, rt, Backup(tpaths, f"{name}-{trial.number}"), child, policy)

        def report(epoch: int, val_auc: float | None) -> None:
            if val_auc is None:
                return
            trial.report(val_auc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val AUC {val_auc:.4f} at epoch {epoch}")

        trun.on_epoch = report
        status = "FAILED"
        try:
            fit_phases(trun)
            value = trun.best.get("val_auc")
            if value is None:
                raise TrainError("train.tune: a trial produced no validation AUC (is the val split empty?)")
            child.metrics({"val/best_auc": value})
            status = "FINISHED"
            return float(value)
        except optuna.TrialPruned:
            status = "KILLED"  # MLflow's nearest state; the tag says pruned
            child.tags({"optuna.state": "pruned"})
            raise
        finally:
            trun.close()
            child.end(status)
            shutil.rmtree(tpaths.cache_dir, ignore_errors=True)
            del trun
            # each trial builds a new model: without this, 20 trials keep 20 graphs' state in this process,
            # and the final fit starts from a different global state than the first trial did
            keras.utils.clear_session(free_memory=True)

    if remaining is None or remaining > 0:
        timeout = cfg.tune.timeout_minutes * 60 or None
        log.info(
            "train.tune: study %s, %s trial(s) to run%s (%d done before)",
            name,
            remaining if remaining is not None else "unbounded",
            f", budget {timeout:.0f} s" if timeout else "",
            finished,
        )
        study.optimize(objective, n_trials=remaining, timeout=timeout)
    done = study.get_trials(deepcopy=False, states=(states.COMPLETE,))
    if not done:
        raise TrainError(f"train.tune: no trial of study {name} completed ({db}); see the train log")
    best = study.best_trial
    counts = {
        s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
        for s in (states.COMPLETE, states.PRUNED, states.FAIL)
    }
    record = {
        "study": name,
        "storage": str(db),
        "params": best.params,
        "best_trial": best.number,
        "best_trial_val_auc": round(float(best.value or 0.0), 6),
        "trials": counts,
        "sampler": "tpe",
        "pruner": cfg.tune.pruner,
        "seed": cfg.tune.seed,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info("train.tune: best trial %d, val AUC %.4f, %s (%s)", best.number, best.value, best.params, counts)
    return record
