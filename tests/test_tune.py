"""train.tune: an Optuna study inside the train stage, on validation only, nested in MLflow, resumable.

Real Keras training (tiny from-scratch net, 32 px synthetic phantoms), a real MLflow server, the study in
SQLite under paths.cache_dir.
"""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from medclf.config import ConfigError, Train

SPACE = {
    "head_lr": {"low": 1e-4, "high": 3e-2, "log": True},
    "dropout": {"low": 0.0, "high": 0.5},
    "batch_size": {"choices": [8, 16]},
}
TUNE = {
    "head_epochs": 2,
    "finetune_epochs": 0,
    "batch_size": 16,
    "early_stopping_patience": 0,
    "tune": {"trials": 3, "pruner": "median", "seed": 7, "space": SPACE},
}


def test_space_keys_are_checked(make_settings):
    with pytest.raises(ConfigError, match=r"train\.tune\.space: seed, wieght_decay cannot be tuned"):
        make_settings(
            {"train": {"tune": {"space": {"seed": {"choices": [1, 2]}, "wieght_decay": {"low": 0, "high": 1}}}}}
        )
    with pytest.raises(ConfigError, match="log: true needs low > 0"):
        make_settings({"train": {"tune": {"space": {"head_lr": {"low": 0, "high": 1, "log": True}}}}})
    with pytest.raises(ValidationError, match="space is empty"):
        Train.model_validate({"tune": {"trials": 3, "space": {}}})
    # no space given: params.yaml's documented space (one source of defaults, issue 23)
    assert set(Train.model_validate({"tune": {"trials": 3}}).tune.space) == {
        "head_lr",
        "finetune_lr",
        "dropout",
        "unfreeze_top",
    }
    assert (
        not Train().tune.enabled and Train.model_validate({"tune": {"timeout_minutes": 1, "space": SPACE}}).tune.enabled
    )


@pytest.mark.slow
def test_tune_searches_on_val_nests_trials_in_mlflow_and_resumes(make_settings, mlflow_server, monkeypatch):
    import optuna
    from mlflow import MlflowClient

    from medclf.infra import catalog
    from medclf.stages import augment, ingest, train
    from medclf.training import tuning

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    s = make_settings(
        {"train": TUNE, "mlflow": {"tracking_uri": mlflow_server}, "register": {"experiment": "medclf-tune-tests"}}
    )
    ingest.run(s)
    augment.run(s)
    res = train.run(s)
    tune = res["tune"]
    assert tune is not None and tune["trials"]["complete"] + tune["trials"]["pruned"] == 3, tune
    assert set(tune["params"]) == set(s.train.tune.space) >= set(SPACE)  # params.yaml's space, these merged in
    assert 1e-4 <= tune["params"]["head_lr"] <= 3e-2 and tune["params"]["batch_size"] in (8, 16)
    study = optuna.load_study(study_name=tune["study"], storage=f"sqlite:///{catalog.TUNE_STUDY.path(s.paths)}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value)
    assert tune["best_trial"] == best.number and tune["best_trial_val_auc"] == pytest.approx(best.value)
    # the final fit IS the chosen values (not params.yaml's). Whether its val AUC reproduces the chosen trial's is
    # measured on real data (bench/tune_bench.py: identical); on ~10 synthetic val images CPU nondeterminism moves it
    saved = json.loads(catalog.TRAIN_RUN.path(s.paths).read_text())
    assert saved["tune"]["params"] == tune["params"]
    assert tune["final_val_auc"] == res["best_val_auc"]
    # MLflow: each trial a run nested under the train run, with its drawn values; the parent has the chosen ones
    client = MlflowClient(tracking_uri=mlflow_server)
    kids = client.search_runs([res["experiment_id"]], f"tags.mlflow.parentRunId = '{res['run_id']}'")
    assert len(kids) == 3 and {r.info.run_name for r in kids} == {f"trial-{i:03d}" for i in range(3)}
    by_trial = {int(r.data.params["trial"]): r for r in kids}
    for t in study.trials:
        assert float(by_trial[t.number].data.params["train.head_lr"]) == pytest.approx(t.params["head_lr"])
    assert by_trial[best.number].data.metrics["val/best_auc"] == pytest.approx(best.value)
    parent = client.get_run(res["run_id"])
    assert float(parent.data.params["tuned.head_lr"]) == pytest.approx(tune["params"]["head_lr"])
    assert float(parent.data.params["train.head_lr"]) == pytest.approx(tune["params"]["head_lr"])  # what ran
    assert not (s.paths.cache_dir / "tune" / "trial-000").exists()  # a trial's backup goes with it

    # resumable: a trial left RUNNING by a killed process is marked failed and not counted; a larger budget
    # runs only the missing trials of the SAME study, and the same budget runs none
    study.ask()  # as a killed process leaves it
    more = make_settings({"train": {**TUNE, "tune": {**TUNE["tune"], "trials": 4}}, "mlflow": {"tracking_uri": "off"}})
    from medclf.training.data import load_data
    from medclf.training.runtime import setup_runtime
    from medclf.training.tracker import Tracker

    data, digests = load_data(more.paths), [v["data_digest"] for v in res["data_version"].values()]
    rt = setup_runtime(more.train, more.paths)
    again = tuning.search(more.train, more.augment, data, more.paths, rt, Tracker(), digests)
    assert again["study"] == tune["study"], "a larger budget must extend the study, not start another"
    assert again["trials"]["fail"] == 1 and again["trials"]["complete"] + again["trials"]["pruned"] == 4, again
    same = tuning.search(more.train, more.augment, data, more.paths, rt, Tracker(), digests)
    assert same["trials"] == again["trials"] and same["params"] == again["params"]
    other = tuning.study_name(more.train, more.augment, [*digests[:1], "other-data"])
    assert other != tune["study"]  # other data: a new study
