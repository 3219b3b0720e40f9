"""What a reviewer sees in Prefect (issue 16, point 5): the run's outcome line, tags, summary, metrics table,
the validate report, and quiet logs.

The wording is built by pure functions (flows/summary.py, medclf.validation.report), tested here on
realistic `reports/*.json` contents. Real components where something runs: the Great Expectations
suite on a small dataset, a real `dvc repro` relaying a stage's output into a logger, and two short
flow runs against the Prefect test API (ingest of a tiny synthetic project; an ingest that fails).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from flows.summary import (
    NO_CHANGE,
    data_tag,
    failure_outcome,
    gate_failure,
    headline,
    metrics_table,
    non_inferiority,
    render_summary,
    run_tags,
)

# reports/metrics.json and reports/gates.json of a real run (trimmed to what the functions read)
CI = {
    "f1": (0.9323843416370107, 0.8970690747782003, 0.9586206896551724),
    "recall": (0.8972602739726028, 0.8467153284671532, 0.9424460431654677),
    "specificity": (0.9722222222222222, 0.9409477124183007, 0.9931751467710371),
    "roc_auc": (0.9945300608828006, 0.989101151065449, 0.998311185262078),
    "brier": (0.030628504076092196, 0.01898142093412362, 0.04602736927107731),
}


def _flat(shift: float = 0.0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, (v, lo, hi) in CI.items():
        out.update({k: v + shift, f"{k}_ci_low": lo, f"{k}_ci_high": hi})
    return out


METRICS = {
    "threshold": 0.7123258113861084,
    "val": {"f1": 0.9433962264150944, "n": 219, "sensitivity": 0.9009009009009009, "specificity": 0.9907407407407407},
    "test": {**_flat(), "tp": 131, "fp": 4, "fn": 15, "tn": 140, "n": 290},
    "test_default_threshold": {**_flat(0.01), "tp": 140, "fp": 5, "fn": 6, "tn": 139, "threshold": 0.5},
}
GATES_NO_CHAMPION = {
    "passed": True,
    "failures": [],
    "threshold": 0.7123258113861084,
    "threshold_rule": "target_sensitivity",
    "threshold_source": "validation",
    "gates": [
        {"name": "min_f1", "metric": "f1", "value": 0.9323843416370107, "bound": 0.7, "op": ">=", "passed": True},
        {
            "name": "min_recall",
            "metric": "recall",
            "value": 0.8972602739726028,
            "bound": 0.8,
            "op": ">=",
            "passed": True,
        },
    ],
    "non_inferiority": {"skipped": True, "note": "no champion registered"},
    "champion": {"alias": "champion"},
}
DATASET = {
    "path": "data/ingest",
    "dvc_md5": "9f8e7d6c5b4a39281706f5e4d3c2b1a0.dir",
    "raw_data": {"path": "data/raw", "md5": "0123456789abcdef0123456789abcdef.dir", "nfiles": 1441},
    "images": 1441,
    "patients": 961,
    "quarantined": 0,
    "splits": {"test": 290, "train": 932, "val": 219},
    "classes": ["NORMAL", "PNEUMONIA"],
    "changes": {"first": False, "added": 241},
}
REGISTER = {
    "model_name": "medclf-demo",
    "version": 2,
    "alias": "challenger",
    "created": True,
    "model_uri": "models:/medclf-demo/2",
    "run_id": "2cd0aff27b074b4585ef37d596e428e3",
}
STAGES = ("ingest", "validate", "augment", "train", "evaluate", "register")


def _ran(*stages: str) -> list[dict[str, Any]]:
    return [
        {"stage": s, "status": "ran" if s in stages else "skipped", "reason": "changed", "seconds": 1.25, "attempt": 1}
        for s in STAGES
    ]


def _failed_gates() -> dict[str, Any]:
    g = json.loads(json.dumps(GATES_NO_CHAMPION))
    g["gates"][1].update(value=0.7731, passed=False)
    g["passed"] = False
    return g


# --------------------------------------------------------------------------- outcome line and tags
def test_outcome_line_says_challenger_no_change_or_the_failing_gate_with_values():
    assert (
        headline(_ran(*STAGES), REGISTER, DATASET["changes"])
        == "retrained on new data (+241 images): challenger v2 (medclf-demo)"
    )
    assert headline(_ran(), REGISTER) == NO_CHANGE
    assert "no change" in NO_CHANGE
    same = {**REGISTER, "created": False, "version": 1}
    assert headline(_ran(*STAGES), same) == "retrained: identical to medclf-demo v1, not registered again"
    assert headline(_ran("validate"), REGISTER) == "updated validate; model unchanged"
    # a failed gate: the metric, its value and the bound, at 3 decimals
    assert gate_failure(_failed_gates()) == "gate failed: recall 0.773 < 0.800"
    assert gate_failure(GATES_NO_CHAMPION) is None
    err = "medclf evaluate: GateFailed: release gates failed: recall 0.7731 < min_recall 0.800 (see reports)"
    assert failure_outcome("evaluate", err, _failed_gates(), "GateFailed") == "gate failed: recall 0.773 < 0.800"
    # rounding never hides why a gate failed
    close = _failed_gates()
    close["gates"][1]["value"] = 0.79996
    assert gate_failure(close) == "gate failed: recall 0.79996 < 0.8"
    # a non-inferiority failure names the champion's value and the margin
    ni = {
        **GATES_NO_CHAMPION,
        "passed": False,
        "champion": {"version": "1"},
        "non_inferiority": {
            "skipped": False,
            "margin": 0.02,
            "entries": [
                {"metric": "recall", "value": 0.85, "champion": 0.9, "margin": 0.02, "bound": 0.88, "passed": False}
            ],
        },
    }
    assert gate_failure(ni) == "gate failed: recall 0.850 < 0.880 (non-inferiority: champion 0.900 − margin 0.020)"
    # any other failure: the stage and its own error line, without the "medclf <stage>: " prefix
    other = "medclf ingest: IngestError: no images under data/raw\n  more detail"
    assert failure_outcome("ingest", other) == "failed at ingest: IngestError: no images under data/raw"


def test_run_tags_carry_the_outcome_and_the_data_version():
    assert data_tag(DATASET) == "data:01234567"
    assert data_tag({"dvc_md5": "abcdef0123.dir"}) == "data:abcdef01"  # no raw hash: the processed data's
    assert data_tag({}) is None
    assert run_tags(_ran(*STAGES), REGISTER, DATASET) == [
        "data:01234567",
        "retrained",
        "model-v2",
        "challenger-v2",
        "new-data",
    ]
    assert run_tags(_ran(), REGISTER, DATASET) == ["data:01234567", "no-change"]
    assert run_tags(_ran("ingest", "validate"), REGISTER, DATASET) == ["data:01234567", "updated", "new-data"]
    assert run_tags(_ran("ingest"), None, DATASET, failed_stage="evaluate", gate_failed=True) == [
        "failed:evaluate",
        "gate-failed",
        "data:01234567",
    ]


# --------------------------------------------------------------------------- summary and metrics table
def test_summary_opens_with_one_outcome_line_then_metrics_with_cis_threshold_and_non_inferiority():
    line = headline(_ran(*STAGES), REGISTER, DATASET["changes"])
    md = render_summary(
        outcomes=_ran(*STAGES),
        dataset=DATASET,
        gates=GATES_NO_CHAMPION,
        register=REGISTER,
        links={"MLflow model version": "http://mlflow/#/models/medclf-demo/versions/2"},
        push=None,
        wall_seconds=12.0,
        planned=list(STAGES),
        metrics=METRICS,
        outcome=line,
    )
    lines = md.splitlines()
    assert lines[0] == f"# {line}" and "medclf retrain" not in md and "retrained: retrained" not in md
    head = md.split("## Dataset")[0]  # the metrics come before everything else
    for text in (
        "**F1**: 0.932 (0.897–0.959)",
        "**sensitivity (recall)**: 0.897 (0.847–0.942)",
        "**specificity**: 0.972 (0.941–0.993)",
        "**ROC-AUC**: 0.995 (0.989–0.998)",
        "**threshold**: 0.712 (target sensitivity, chosen on validation)",
        "**non-inferiority**: skipped: no champion registered",
        "**gates**: passed",
    ):
        assert text in head, (text, head)
    # splits and classes as text, not Python syntax; every number at most 3 decimals
    assert "**splits**: train 932 · val 219 · test 290" in md and "**classes**: NORMAL, PNEUMONIA" in md
    assert not re.search(r"[{\[]'", md), md
    assert not re.search(r"\d\.\d{4,}", md), re.findall(r"\S*\d\.\d{4,}\S*", md)
    assert "| min_recall | recall | 0.897 | >= | 0.800 | pass |" in md
    # a failed gate: the outcome line, then the stage's error, and the gate verdict in prose
    failed = render_summary(
        outcomes=_ran("ingest"),
        dataset=DATASET,
        gates=_failed_gates(),
        register=None,
        links={},
        push=None,
        wall_seconds=1.0,
        failure="stage 'evaluate' failed: medclf evaluate: ...",
        metrics=METRICS,
        outcome="gate failed: recall 0.773 < 0.800",
    )
    assert failed.splitlines()[0] == "# gate failed: recall 0.773 < 0.800"
    assert "**gates**: gate failed: recall 0.773 < 0.800" in failed and "## Gates (FAILED)" in failed
    champion = {
        **GATES_NO_CHAMPION,
        "champion": {"version": "1"},
        "non_inferiority": {
            "skipped": False,
            "margin": 0.02,
            "entries": [
                {"metric": "f1", "value": 0.93, "champion": 0.94, "margin": 0.02, "bound": 0.92, "passed": True}
            ],
        },
    }
    assert non_inferiority(champion) == "passed against champion v1 (margin 0.020): f1 0.930 ≥ 0.920 (champion 0.940)"


def test_metrics_table_has_one_narrow_row_per_metric_at_three_decimals():
    rows = metrics_table(METRICS)
    names = [r["metric"] for r in rows]
    assert names == ["threshold", "f1", "recall", "specificity", "roc_auc", "brier", "tp", "fp", "fn", "tn", "n"]
    assert len(rows[0]) <= 6  # few columns: fits 1,200 px
    by = {r["metric"]: r for r in rows}
    assert by["f1"] == {
        "metric": "f1",
        "test": "0.932",
        "95 % CI": "0.897–0.959",
        "test at 0.500": "0.942",
        "95 % CI at 0.500": "0.897–0.959",
        "validation": "0.943",
    }
    assert by["recall"]["validation"] == "0.901"  # validation sensitivity, where the threshold was chosen
    assert by["threshold"]["test"] == "0.712" and by["tp"]["test"] == "131" and by["n"]["test"] == "290"
    cells = [v for r in rows for v in r.values()]
    assert all(isinstance(v, str) and not re.search(r"\d\.\d{4,}", v) for v in cells), cells
    assert max(len(" | ".join(r.values())) for r in rows) < 100, rows
    assert metrics_table(None) == []


# --------------------------------------------------------------------------- validate report
def test_validate_report_shows_observed_values_and_links_data_docs(tmp_path):
    from medclf.validation.report import docs_url
    from tests.test_validate import clean_specs, run_validate

    result = run_validate(tmp_path, clean_specs())
    checks = result["checks"]
    passing = {n: c for n, c in checks.items() if c["status"] == "pass"}
    assert passing and not [n for n, c in passing.items() if c["observed"] in ("ok", "", None)], passing
    # the values GX saw (column-map checks: its count) and the evidence tables' values (bounded checks)
    assert checks["blank"]["observed"].startswith("0 of 48 images"), checks["blank"]
    assert checks["image_size"]["observed"] == "0 of 48 images; orig_height 128; orig_width 128"
    assert checks["split_fractions"]["observed"] == "train: fraction 0.667; val: fraction 0.167; test: fraction 0.167"
    assert checks["prevalence_gap"]["observed"] == "gap 0.000"  # every split exactly half 'opacity'
    assert checks["prevalence_bounds"]["observed"] == "share 0.500"
    md = result["markdown"]
    assert "| ok |" not in md
    index = Path(result["data_docs"]).resolve()
    assert index.exists() and f"]({index.as_uri()})" in md and index.as_uri().startswith("file:///")
    assert docs_url("http://docs.example/index.html") == "http://docs.example/index.html"
    assert "{'" not in md and not re.search(r"\d\.\d{4,}", md)


# --------------------------------------------------------------------------- quiet logs
STAGE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    print("env TF_CPP_MIN_LOG_LEVEL=" + os.environ.get("TF_CPP_MIN_LOG_LEVEL", "unset"))
    print("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR")
    print("I0000 00:00:1796022692.690488    9749 port.cc:153] oneDNN custom operations are on.")
    print("E0000 00:00:1796022692.690488    9749 cuda_dnn.cc:8310] a real C++ error")
    print("Downloading artifacts:  12%|#         | 1/8 [00:00<00:00, 53.99it/s]")
    print("UserWarning: \\x1b[33mAdd type hints to the `predict` method\\x1b[0m")
    print("epoch 1: loss 0.5")
    print(json.dumps({"passed": False, "f1": 0.1}, indent=2))  # stdout is for people: never read as the result
    result = {"passed": True, "f1": 0.9323843416370107, "n": 290, "markdown": "x" * 7000,
              "checks": {f"c{i}": {"observed": "y" * 50} for i in range(50)}}
    with open(os.environ["MEDCLF_STAGE_RESULT"], "w") as fh:  # what `medclf <stage>` writes (medclf/cli.py)
        json.dump({"stage": "chatty", "token": os.environ["MEDCLF_RUN_TOKEN"], "exit_code": 0, "result": result}, fh)
""")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _dvc_project(root: Path) -> Path:
    import subprocess

    root.mkdir()
    (root / "stage.py").write_text(STAGE_SCRIPT)
    (root / "dvc.yaml").write_text("stages:\n  chatty:\n    cmd: python stage.py\n    deps: [stage.py]\n")
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "--no-scm", "-q"], cwd=root, check=True)
    return root


@pytest.mark.parametrize("user_level", [None, "0"], ids=["default", "user-setting-wins"])
def test_stage_output_is_relayed_quietly(tmp_path, monkeypatch, user_level):
    """Real `dvc repro` of a stage that prints what TensorFlow, absl, MLflow and tqdm print."""
    from tasks.common import run_stage_via_dvc

    if user_level is None:
        monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", user_level)
    log = logging.getLogger(f"medclf.test.quiet.{tmp_path.name}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    handler = _Records()
    log.addHandler(handler)
    outcome = run_stage_via_dvc("chatty", _dvc_project(tmp_path / "p"), logger=log)
    info = [r.getMessage() for r in handler.records if r.levelno >= logging.INFO]
    debug = [r.getMessage() for r in handler.records if r.levelno < logging.INFO]
    text = "\n".join(info)
    assert f"chatty | env TF_CPP_MIN_LOG_LEVEL={user_level or '2'}" in info
    assert "\x1b" not in text and "[33m" not in text and "chatty | UserWarning: Add type hints" in text
    assert "absl::InitializeLog" not in text and "oneDNN" not in text and "12%|" not in text
    assert any("absl::InitializeLog" in m for m in debug) and any("oneDNN" in m for m in debug)
    assert "a real C++ error" in text and "chatty | epoch 1: loss 0.5" in info  # errors and progress stay
    (res,) = [m for m in info if "| result:" in m]
    assert len(res) < 400 and "xxxx" not in res and "f1=0.932" in res and "passed=true" in res, res
    assert outcome.result is not None and len(outcome.result["markdown"]) == 7000  # the full result is kept
    assert all("\x1b" not in ln for ln in outcome.tail)


# --------------------------------------------------------------------------- flow runs (Prefect test API)
def _tags(flow_run_id: Any) -> set[str]:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return set(client.read_flow_run(flow_run_id).tags or [])


@pytest.mark.slow
def test_flow_state_message_tags_and_artifacts(tmp_path, prefect_api, monkeypatch):
    """Ingest of a tiny synthetic project, then an ingest that fails: what the runs list shows."""
    import yaml

    from tasks.common import StageFailed
    from tests.test_flow import flow_artifacts, make_checkout, run_flow, set_params

    monkeypatch.delenv("MEDCLF_GPU_DEPLOYMENT", raising=False)
    checkout = make_checkout(tmp_path / "co")
    (checkout / "reports").mkdir()
    (checkout / "reports/metrics.json").write_text(json.dumps(METRICS))  # a previous model's, stale here
    state = run_flow(checkout, until="ingest", push=False)
    assert state.is_completed(), state.message
    result = state.result()
    assert state.message == result["headline"] == "updated ingest (first ingest: 80 images); model unchanged"
    md5 = result["dataset"]["raw_data"]["md5"]
    assert md5 in [
        d.get("md5") for d in yaml.safe_load((checkout / "dvc.lock").read_text())["stages"]["ingest"]["deps"]
    ]
    tags = _tags(state.state_details.flow_run_id)
    assert {"medclf:updated", f"medclf:data:{md5.removesuffix('.dir')[:8]}"} <= tags, tags
    arts = flow_artifacts(state.state_details.flow_run_id)
    summary = arts["medclf-retrain-summary"].data
    assert summary.splitlines()[0] == f"# {state.message}"
    assert "Headline metrics" not in summary and "0.932" not in summary  # nothing evaluated: no stale metrics
    assert "medclf-metrics" not in arts

    set_params(checkout, {"ingest": {"positive_class": "no-such-class"}})  # IngestError in the stage
    failed = run_flow(checkout, until="ingest", push=False)
    assert failed.is_failed()
    first, _, rest = (failed.message or "").partition("\n")
    assert first.startswith("failed at ingest: ") and "stage 'ingest' failed" in rest, failed.message
    with pytest.raises(StageFailed):
        failed.result()
    assert "medclf:failed:ingest" in _tags(failed.state_details.flow_run_id)
    assert flow_artifacts(failed.state_details.flow_run_id)["medclf-retrain-summary"].data.startswith(f"# {first}\n")
