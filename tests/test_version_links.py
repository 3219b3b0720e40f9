"""The version page (issue 27): every link in a registered version's description leads to something that exists on
the server the reviewer is on, the first screen carries the decision facts and the promotion checklist, and the
page says the same thing everywhere (calibration, columns).

A link is *followed*, not fetched: the MLflow UI is a single-page app that answers 200 for any `#/...` route, so
each link is resolved against the version page's own URL, its hash route parsed, and what it names (experiment,
run, artifact, model version) looked up through the server's REST API."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from medclf.release.model_card import (
    PROMOTION_CHECKLIST,
    checklist_rows,
    run_links,
    version_description,
)

ROOT = Path(__file__).resolve().parents[1]
MD_LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")
BARE_URL = re.compile(r"(?<![(\w])(?:https?|ftp)://[^\s)>\]]+")
"""showdown's GitHub flavour (the MLflow UI's markdown) also turns a bare URL into a link."""


# ----------------------------------------------------------------------------- following a link
def page_links(markdown: str) -> list[tuple[str, str]]:
    """Every (text, href) the MLflow UI renders as a link: markdown links and bare URLs."""
    return [(m[1], m[2]) for m in MD_LINK.finditer(markdown)] + [
        (u, u) for u in BARE_URL.findall(MD_LINK.sub("", markdown))
    ]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _api(server: str, endpoint: str, **query: str) -> dict | None:
    status, body = _get(f"{server}/ajax-api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}")
    return json.loads(body) if status == 200 else None


def follow(server: str, page: str, href: str) -> str | None:
    """None when `href`, clicked on the UI page `page` of `server`, opens something that exists; else why not."""
    url = urllib.parse.urljoin(page, href)
    parts = urllib.parse.urlsplit(url)
    origin = urllib.parse.urlsplit(server)
    if (parts.scheme, parts.netloc) != (origin.scheme, origin.netloc) or parts.path not in ("", "/"):
        return f"{href} leaves the UI the reviewer is on ({url})"
    route, _, _query = parts.fragment.partition("?")
    seg = [urllib.parse.unquote(s) for s in route.strip("/").split("/")]
    if seg[:1] == ["models"] and len(seg) == 4 and seg[2] == "versions":
        got = _api(server, "model-versions/get", name=seg[1], version=seg[3])
        return None if got else f"{href}: no version {seg[3]} of registered model {seg[1]!r}"
    if seg[:1] != ["experiments"] or len(seg) < 2:
        return f"{href}: not a route of the MLflow UI this test knows"
    if not _api(server, "experiments/get", experiment_id=seg[1]):
        return f"{href}: no experiment {seg[1]}"
    if len(seg) == 2:
        return None
    if seg[2] != "runs" or len(seg) < 4:
        return f"{href}: not a run route"
    run = _api(server, "runs/get", run_id=seg[3])
    if not run or run["run"]["info"]["experiment_id"] != seg[1]:
        return f"{href}: no run {seg[3]} in experiment {seg[1]}"
    if len(seg) == 4:
        return None
    if seg[4] != "artifacts" or len(seg) < 6:
        return f"{href}: not an artifact route"
    path = "/".join(seg[5:])
    status, body = _get(f"{server}/get-artifact?{urllib.parse.urlencode({'path': path, 'run_uuid': seg[3]})}")
    return None if status == 200 and body else f"{href}: run {seg[3]} has no artifact {path} (HTTP {status})"


def broken_links(server: str, name: str, version: str, description: str) -> list[str]:
    page = f"{server}/#/models/{urllib.parse.quote(name, safe='')}/versions/{version}"
    assert _get(page)[0] == 200  # the UI itself is served there
    return [why for _text, href in page_links(description) if (why := follow(server, page, href))]


# ----------------------------------------------------------------------------- real registered versions
@pytest.fixture(scope="module")
def registered(tmp_path_factory, mlflow_server):
    """v1 (calibrated, no champion), promoted; then v2, a nudged model evaluated against champion v1."""
    from mlflow import MlflowClient

    from medclf.release.registry import promote
    from medclf.stages import evaluate, register
    from tests.test_evaluate import build_project, write_train_run
    from tests.test_register import nudge_model

    overrides = {"evaluate": {"bootstrap": 30, "gradcam_n": 1, "gates": {"min_f1": 0.0, "min_recall": 0.0}}}
    settings = build_project(tmp_path_factory.mktemp("links"), mlflow_server, overrides, calibrate=True)
    evaluate.run(settings)
    v1 = str(register.run(settings)["version"])
    promote(settings, version=int(v1), by="links-test")
    write_train_run(settings, mlflow_server)  # retrained: a new training run
    nudge_model(settings)
    evaluate.run(settings)
    v2 = str(register.run(settings)["version"])
    cl = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    name = settings.registry.model_name
    return settings, {v: cl.get_model_version(name, v).description for v in (v1, v2)}


def test_every_link_on_a_version_page_leads_to_what_it_names(registered, mlflow_server):
    settings, pages = registered
    name = settings.registry.model_name
    (v1, first), (v2, second) = pages.items()
    for version, description in pages.items():
        assert broken_links(mlflow_server, name, version, description) == [], version
        assert "127.0.0.1" not in description and "http://" not in description  # relative: any host the UI is on
        texts = [t for t, _ in page_links(description)]
        assert {"training run", "model card", "Grad-CAM gallery", "metrics with 95 % CIs"} <= set(texts), texts
    assert "challenger vs champion" not in first and f"champion v{v1}" not in [t for t, _ in page_links(first)]
    assert {"challenger vs champion", f"champion v{v1}"} <= {t for t, _ in page_links(second)}  # v2 was compared


def test_a_broken_link_is_caught(registered, mlflow_server):
    """The follower is not a rubber stamp: a missing artifact, another run, a foreign host and a made-up route."""
    settings, pages = registered
    name = settings.registry.model_name
    version, description = next(iter(pages.items()))
    href = dict(page_links(description))["training run"]
    assert href.startswith("#/experiments/")
    planted = [
        f"[gone]({href}/artifacts/evaluate/no_such_figure.png)",
        f"[other run]({href.rsplit('/', 1)[0]}/0123456789abcdef0123456789abcdef)",
        f"[old host](http://127.0.0.1:5000/{href})",
        f"[no version](#/models/{name}/versions/999)",
        "[nonsense](#/nowhere)",
    ]
    found = broken_links(mlflow_server, name, version, description + "\n\n" + " · ".join(planted))
    assert len(found) == len(planted), found


# ----------------------------------------------------------------------------- the page's layout and wording
GATES = {
    "threshold": 0.25,
    "threshold_rule": "target_sensitivity",
    "gates": [{"name": "min_f1", "metric": "f1", "op": ">=", "bound": 0.5, "value": 0.8, "passed": True}],
    "non_inferiority": {"skipped": True, "entries": []},
    "champion": {"note": "no champion registered for m"},
}
TEST = {"n": 100, "roc_auc": 0.91, "roc_auc_ci_low": 0.85, "roc_auc_ci_high": 0.95, "f1": 0.8, "ece": 0.05}
PROV = {"raw_data_md5": "4deab90289cf8d06502afe821e154304.dir", "git_commit": "4d5eb174aa", "positive_class": "p"}


def test_first_screen_has_the_decision_facts_checklist_and_promote_meaning_before_the_tables():
    cal = {"temperature": 1.8, "ece_before": 0.12, "ece_after": 0.05, "brier_before": 0.1, "brier_after": 0.09}
    md = version_description(
        GATES, {"test": TEST, "calibration": cal}, PROV, "run9", None, run_links("http://h", "3", "run9")
    )
    lines = md.splitlines()
    table = next(i for i, x in enumerate(lines) if x.startswith("| metric"))
    head = "\n".join(lines[:table])
    for fact in (
        "**Gates: passed**",
        "ROC-AUC **0.910** (0.850–0.950)",
        "threshold 0.2500 on p(p)",
        "T = 1.800 fitted on the validation split; test ECE 0.120 → 0.050",
        "raw data md5 `4deab902`",
        "git commit `4d5eb174`",
        "leaves `champion` where it is",
        "`medclf promote --version N`",
        "[training run](#/experiments/3/runs/run9)",
    ):
        assert fact in head, fact
    assert checklist_rows() == [x for x in lines[:table] if x.startswith("- ☐ ")]
    assert len(checklist_rows()) == len(PROMOTION_CHECKLIST) == 6


def test_no_empty_column_without_champion_or_cis():
    md = version_description(GATES, {"test": TEST}, PROV, "r")
    assert "| metric (test split, n=100) | value | 95 % CI |\n|---|---|---|\n" in md and "champion |" not in md
    assert "| ROC-AUC | **0.910** | 0.850–0.950 |" in md and "| F1 | **0.800** |  |" in md
    bare = version_description(GATES, {"test": {"n": 5, "f1": 0.8}}, PROV, "r")
    assert "| metric (test split, n=5) | value |\n|---|---|\n| F1 | **0.800** |\n" in bare


@pytest.mark.parametrize(
    ("cal", "fitted", "says"),
    [
        ({"temperature": 1.8, "ece_before": 0.1, "ece_after": 0.05}, None, "Calibrated by temperature scaling"),
        ({"temperature": 1.0}, {"method": "none", "temperature": 1.0, "note": "train.calibration: none"}, "none"),
        ({"temperature": 1.0}, {"method": "temperature", "temperature": 1.0}, "T = 1 (no better fit)"),
        (None, None, "no calibration was applied"),
    ],
)
def test_calibration_wording_matches_what_was_done(cal, fitted, says):
    doc = {"test": TEST, **({"calibration": cal} if cal else {})}
    md = version_description(GATES, doc, PROV, "r", None, None, fitted)
    limits = md.split("**Limitations:**", 1)[1]
    assert says in md
    if "Calibrated" in says:
        assert "not a calibrated risk" not in md and "internal validation split only" in limits
        assert "another site" in limits
    else:
        assert "not a calibrated risk" in limits and "Not calibrated" in limits
        assert "temperature scaling, T =" not in md and "T = 1.000" not in md


def test_links_use_the_configured_ui_url_and_none_without_a_ui():
    links = run_links("http://127.0.0.1:5000", "7", "r", [], ui_url="https://mlflow.example.org/ml/")
    assert links["training run"] == "https://mlflow.example.org/ml/#/experiments/7/runs/r"
    assert run_links("http://10.0.0.5:5000", "7", "r")["training run"] == "#/experiments/7/runs/r"
    assert run_links("file:///tmp/mlruns", "7", "r") == {} and run_links("http://h", None, "r") == {}
    champ = run_links("http://h", "7", "r", [], model="my model", champion="3")
    assert champ["champion v3"] == "#/models/my%20model/versions/3"


def test_a_kclass_version_opens_with_its_decision_rule():
    gates = {"task": "multiclass", "threshold_rule": "argmax", "gates": [], "champion": {}}
    test = {"n": 60, "balanced_accuracy": 0.7, "balanced_accuracy_ci_low": 0.6, "balanced_accuracy_ci_high": 0.8}
    md = version_description(gates, {"task": "multiclass", "test": test, "classes": []}, {}, "r")
    head = md.split("\n---\n", 1)[0]
    assert "- **Decision rule (multiclass):** argmax" in head and "**0.700** (0.600–0.800)" in head


def test_the_checklist_is_docs_promotion_md_and_names_promotions_items():
    from medclf.release import promotion

    doc = (ROOT / "docs" / "PROMOTION.md").read_text()
    section = doc.split("## Before you promote", 1)[1].split("\n## ", 1)[0]
    for row in checklist_rows():
        assert row in section, row
    automatic = {item for item, _text, auto in PROMOTION_CHECKLIST if auto}
    assert automatic == {"gates", "data", "blocked"}  # promotion.check's items
    assert f"`{promotion.TAG_BLOCKED}`" in dict((i, t) for i, t, _ in PROMOTION_CHECKLIST)["blocked"]


def test_a_long_page_is_cut_to_the_registrys_5000_characters_keeping_the_first_screen():
    """PostgreSQL's model_versions.description is VARCHAR(5000): a 5,900-character page made register fail there
    (tests/test_postgres.py); the detail loses whole paragraphs, the first screen stays, a note names the card."""
    from medclf.release.model_card import DESCRIPTION_LIMIT, fit_description

    head = "**Research use only.**\n\n- **Gates: passed**\n- **Test split** ROC-AUC **0.991**"
    paragraphs = [f"**Section {i}:** " + "x" * 400 for i in range(20)]
    page = head + "\n---\n" + "\n\n".join(paragraphs)
    assert len(page) > DESCRIPTION_LIMIT
    cut = fit_description(page)
    assert len(cut) <= DESCRIPTION_LIMIT and cut.startswith(head + "\n---\n")
    kept = [p for p in paragraphs if p in cut]
    assert kept == paragraphs[: len(kept)] and 8 <= len(kept) < 20  # whole paragraphs, in order
    assert cut.endswith("the whole page is the training run's model card (`review/model_card.md`).*")
    assert fit_description("short") == "short"
    long_head = "\n".join(f"- fact {i} " + "y" * 100 for i in range(60))
    assert len(fit_description(long_head + "\n---\nrest")) <= DESCRIPTION_LIMIT
