"""Typed config: bad keys and values fail with the dotted key; the CLI answers instantly."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from medclf.config import ConfigError, load_settings, settings_from_dict
from tests.conftest import ROOT


def test_repository_params_parse():
    s = load_settings(ROOT / "params.yaml")
    # the default is the embedded REAL data, tracked by DVC as ingest's input
    assert s.ingest.source.kind == "folder" and s.ingest.source.uri == s.paths.raw_data == "data/raw/chest_xray"
    assert "- ${paths.raw_data}" in (ROOT / "dvc.yaml").read_text()
    assert s.registry.model_name and s.validation.drift_psi_max > 0


@pytest.mark.parametrize("data, key", [
    ({"ingest": {"imgae_size": 64}}, "ingest.imgae_size"),
    ({"ingest": {"image_size": 4}}, "ingest.image_size"),
    ({"ingest": {"source": {"kind": "ftp"}}}, "ingest.source.kind"),
    ({"train": {"optimizer": "lion"}}, "train.optimizer"),
    ({"evaluate": {"gates": {"min_f1": 1.5}}}, "evaluate.gates.min_f1"),
    ({"augment": {"preset": "cardiac_mri"}}, "augment.preset"),
    ({"augment": {"overrides": {"rotation_deg": 500}}}, None),
])
def test_bad_values_name_the_key(data, key):
    if key is None:  # overrides are validated when the policy is built
        with pytest.raises(ValueError, match="rotation_deg"):
            settings_from_dict(data).augment.policy()
        return
    with pytest.raises(ConfigError) as err:
        settings_from_dict(data, "params.yaml")
    assert key in str(err.value)


def test_folder_source_needs_uri(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"ingest": {"source": {"kind": "folder"}}}))
    with pytest.raises(ConfigError, match="source.uri is required"):
        load_settings(p)


def test_cli_help_is_instant_and_bad_config_exits_2(tmp_path):
    exe = [sys.executable, "-m", "medclf.cli"]
    t0 = time.perf_counter()
    out = subprocess.run(exe + ["--help"], capture_output=True, text=True, check=True)
    assert "ingest" in out.stdout and "Not for clinical use" in out.stdout
    assert time.perf_counter() - t0 < 5  # generous: the point is no TF/MLflow/GX import (~20 s)
    mods = subprocess.run([sys.executable, "-c", ("import sys, medclf.cli, medclf.config;"
                           "print([m for m in ('tensorflow','keras','mlflow','great_expectations','prefect')"
                           " if m in sys.modules])")], capture_output=True, text=True, check=True)
    assert mods.stdout.strip() == "[]"
    bad = tmp_path / "p.yaml"
    bad.write_text("ingest: {channels: 2}\n")
    r = subprocess.run(exe + ["--params", str(bad), "ingest"], check=False, capture_output=True, text=True)
    assert r.returncode == 2 and "ingest.channels" in r.stderr


# --------------------------------------------------------------------------- issue 12, rows 3-5
@pytest.mark.parametrize("classes", [[], ["NORMAL"], ["NORMAL", "PNEUMONIA", "NORMAL"]])
def test_classes_must_be_null_or_at_least_two_distinct_names(classes):
    """Row 3: `classes: []` used to pass (and classes were silently inferred)."""
    with pytest.raises(ConfigError) as err:
        settings_from_dict({"ingest": {"classes": classes}}, "params.yaml")
    assert "ingest.classes" in str(err.value)
    assert settings_from_dict({"ingest": {"classes": ["NORMAL", "PNEUMONIA"]}}).ingest.classes == [
        "NORMAL", "PNEUMONIA"]


def test_positive_class_must_be_one_of_the_classes():
    """Row 4: `positive_class: COVID` with classes NORMAL/PNEUMONIA used to pass."""
    with pytest.raises(ConfigError) as err:
        settings_from_dict({"ingest": {"classes": ["NORMAL", "PNEUMONIA"], "positive_class": "COVID"}},
                           "params.yaml")
    assert "ingest.positive_class" in str(err.value) and "COVID" in str(err.value)
    ok = settings_from_dict({"ingest": {"classes": ["NORMAL", "PNEUMONIA"], "positive_class": "NORMAL"}})
    assert ok.ingest.positive_class == "NORMAL"
    # with classes inferred (null) the check happens at ingest, against the classes found
    assert settings_from_dict({"ingest": {"positive_class": "COVID"}}).ingest.positive_class == "COVID"


@pytest.mark.parametrize("text", ["", "\n", "# all commented out\n# ingest: {}\n", "{}\n", "null\n"])
def test_empty_params_file_is_an_error(tmp_path, text):
    """Row 5: an empty params.yaml used to run the built-in synthetic defaults."""
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=r"params\.yaml.*(empty|no sections)"):
        load_settings(p)
    p.write_text("train: {batch_size: 8}\n")  # one section is enough: the others take their defaults
    assert load_settings(p).train.batch_size == 8
