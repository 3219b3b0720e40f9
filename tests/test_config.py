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


@pytest.mark.parametrize(
    "data, key",
    [
        ({"ingest": {"imgae_size": 64}}, "ingest.imgae_size"),
        ({"ingest": {"image_size": 4}}, "ingest.image_size"),
        ({"ingest": {"source": {"kind": "ftp"}}}, "ingest.source.kind"),
        ({"train": {"optimizer": "lion"}}, "train.optimizer"),
        ({"evaluate": {"gates": {"min_f1": 1.5}}}, "evaluate.gates.min_f1"),
        ({"augment": {"preset": "cardiac_mri"}}, "augment.preset"),
        ({"augment": {"overrides": {"rotation_deg": 500}}}, None),
        ({"train": {"backbone": "resnet9000"}}, "train.backbone"),
        ({"train": {"preprocessing": "bgr"}}, "train.preprocessing"),
        ({"validate": {"severity": {"no_such_check": "warn"}}}, "validate.severity"),
    ],
)
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
    mods = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import sys, medclf.cli, medclf.config;"
                "print([m for m in ('tensorflow','keras','mlflow','great_expectations','prefect')"
                " if m in sys.modules])"
            ),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
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
        "NORMAL",
        "PNEUMONIA",
    ]


def test_positive_class_must_be_one_of_the_classes():
    """Row 4: `positive_class: COVID` with classes NORMAL/PNEUMONIA used to pass."""
    with pytest.raises(ConfigError) as err:
        settings_from_dict({"ingest": {"classes": ["NORMAL", "PNEUMONIA"], "positive_class": "COVID"}}, "params.yaml")
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


# --------------------------------------------------------------------------- issue 15: mutation survivors
# Each test below kills mutants that `make mutate` found surviving (docs/TESTING.md, "Mutation score").
def test_error_report_layout_names_the_source_and_explains_unknown_keys():
    with pytest.raises(ConfigError) as err:
        settings_from_dict({"ingest": {"imgae_size": 64}}, "params.yaml")
    assert str(err.value).split("\n") == [
        "invalid configuration in params.yaml:",
        "  - ingest.imgae_size: unknown key (check the spelling; see params.yaml in the repository for the schema)",
    ]
    with pytest.raises(ConfigError, match=r"^invalid configuration in <dict>:\n  - train.optimizer: "):
        settings_from_dict({"train": {"optimizer": "lion"}})  # default source name


def test_a_whole_settings_error_is_reported_at_root():
    """The source-under-raw_data check belongs to no single key: it is reported as `<root>`."""
    with pytest.raises(ConfigError) as err:
        settings_from_dict(
            {"paths": {"raw_data": "data/raw/xr"}, "ingest": {"source": {"kind": "folder", "uri": "elsewhere/xr"}}},
            "params.yaml",
        )
    lines = str(err.value).split("\n")
    assert lines[1].startswith("  - <root>: ") and "'elsewhere/xr', which is not under paths.raw_data" in lines[1]


def test_load_settings_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"^{missing}: no such parameters file"):
        load_settings(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: not valid YAML: "):
        load_settings(bad)
    bad.write_text("- ingest\n- train\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: the top level must be a mapping of sections"):
        load_settings(bad)
    bad.write_text("train: {optimizer: lion}\n")
    with pytest.raises(ConfigError, match=rf"^invalid configuration in {bad}:\n  - train.optimizer"):
        load_settings(bad)


def test_config_is_a_leaf_that_owns_the_vocabularies_its_validators_check():
    """config imports nothing from medclf but its own vocabulary
    (every stage's closure starts with it; it used to import modeling,
    validation.checks and sources.store lazily), so the names it validates are defined in it, once."""
    from medclf import config
    from medclf.modeling import network as modeling
    from medclf.validation import checks
    from tests.test_dvc_deps import import_closure

    assert import_closure("medclf.config") == {
        "src/medclf/__init__.py",
        "src/medclf/config/__init__.py",
        "src/medclf/config/tuning.py",
        "src/medclf/config/vocabulary.py",
    }
    assert checks.CHECKS is config.CHECKS and modeling.BACKBONES.keys() == config.BACKBONES.keys()
    assert modeling.BACKBONES["inception_v3"] == modeling.Backbone("InceptionV3", "tf", None, False, 75)
    for name in ("densenet121", "mobilenet_v3_small", "efficientnet_b7", "efficientnet_v2_s"):
        assert settings_from_dict({"train": {"backbone": name}}).train.backbone == name
    assert set(
        settings_from_dict({"validate": {"severity": dict.fromkeys(config.CHECKS, "off")}}).validation.severity
    ) == set(checks.severities({}, multilabel=True))
    assert set(checks.severities({})) == set(config.CHECKS) - set(checks.MULTILABEL_CHECKS)  # not run on one label


@pytest.mark.parametrize(
    "source, where",
    [
        ({"kind": "synthetic"}, None),
        ({"kind": "folder", "uri": "data/raw/xr"}, "data/raw/xr"),
        ({"kind": "medmnist", "uri": "data/raw/p.npz"}, "data/raw/p.npz"),
        ({"kind": "medmnist", "medmnist_flag": "pneumoniamnist"}, None),  # an MD5-checked download
        ({"kind": "manifest", "uri": "data/raw/m/labels.csv"}, "data/raw/m"),
        ({"kind": "manifest", "uri": "s3://bucket/raw/labels.csv"}, "s3://bucket/raw"),
        ({"kind": "dicom", "manifest": "data/raw/d/index.csv", "uri": "data/other/x.csv"}, "data/raw/d"),
        ({"kind": "dicom", "uri": "data/raw/d2/index.parquet"}, "data/raw/d2"),  # uri stands in for the manifest
    ],
)
def test_source_location(source, where):
    from medclf.config import Source, source_location

    assert source_location(Source(**source)) == where


@pytest.mark.parametrize(
    "path, root, under",
    [
        ("s3://b/raw", "s3://b/raw", True),
        ("s3://b/raw/x/", "s3://b/raw/", True),  # trailing slashes ignored on both sides
        ("s3://b/raw/", "s3://b/raw", True),
        ("s3://b/raw", "s3://b/raw/", True),
        ("s3://b/raw2/x", "s3://b/raw", False),  # a prefix of the name is not a parent folder
        ("s3://b/x/raw", "s3://b/raw", False),
        ("s3://b/rawX", "s3://b/rawX", True),
        ("s3://b/raw/X", "s3://b/raw/X", True),
        ("s3://b/raw ", "s3://b/raw", False),  # another name (trailing space), not the folder itself
        # an s3:// path is never under a local root, nor the reverse: as local paths both would normalise to
        # the same "s3:/b/raw/..." folder
        ("s3://b/raw/x", "s3:/b/raw", False),
        ("s3:/b/raw/x", "s3://b/raw", False),
        ("data/raw/xr", "data/raw/xr", True),
        ("data/raw/xr/", "data/raw/xr", True),
        ("data/raw/xr/sub/f.csv", "./data/raw", True),
        ("data/raw2", "data/raw", False),
        ("data", "data/raw", False),
    ],
)
def test_is_under(path, root, under):
    from medclf.config import is_under

    assert is_under(path, root) is under


def test_deep_merge_merges_nested_sections_without_touching_its_inputs():
    from medclf.config import deep_merge

    base = {"ingest": {"image_size": 64, "splits": {"seed": 1, "val_fraction": 0.1}}, "train": {"seed": 3}}
    over = {"ingest": {"splits": {"seed": 2}}, "train": 5, "evaluate": {"seed": 0}}
    out = deep_merge(base, over)
    assert out == {
        "ingest": {"image_size": 64, "splits": {"seed": 2, "val_fraction": 0.1}},
        "train": 5,
        "evaluate": {"seed": 0},
    }
    assert base == {"ingest": {"image_size": 64, "splits": {"seed": 1, "val_fraction": 0.1}}, "train": {"seed": 3}}
    assert deep_merge({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}  # a mapping replaces a scalar


def test_mlflow_uri_from_the_environment_first(monkeypatch):
    cfg = settings_from_dict({"mlflow": {"tracking_uri": "http://params:5000"}}).mlflow
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cfg.resolved_uri() == "http://params:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert cfg.resolved_uri() == "http://env:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # empty counts as unset
    assert cfg.resolved_uri() == "http://params:5000"
