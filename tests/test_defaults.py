"""One source of defaults (issue 23): params.yaml and the schema's defaults agree on every key, so a user who deletes a
key from params.yaml gets the value params.yaml documents, not another one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d
            for k in sorted(set(a) | set(b))
            for d in _differences(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}.{k}" if path else k)
        ]
    return [] if a == b else [f"{path}: params.yaml {a!r}, schema default {b!r}"]


def test_params_yaml_equals_the_schema_defaults_on_every_key():
    from medclf.config import Settings, load_settings

    file, schema = load_settings(ROOT / "params.yaml").model_dump(mode="json"), Settings().model_dump(mode="json")
    assert _differences(file, schema) == []


def test_a_deleted_key_falls_back_to_the_documented_value(tmp_path):
    """Deleting keys from params.yaml changes nothing: the same settings as the full file."""
    import yaml

    from medclf.config import load_settings

    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, key in (
        ("train", "finetune_epochs"),
        ("train", "weights"),
        ("ingest", "image_size"),
        ("train", "early_stopping_patience"),
        ("ingest", "source"),
    ):
        del data[section][key]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    assert load_settings(tmp_path / "params.yaml") == load_settings(ROOT / "params.yaml")


def test_the_comparison_sees_a_difference():
    assert _differences({"train": {"a": 1, "b": 2}}, {"train": {"a": 1, "b": 3, "c": 0}}) == [
        "train.b: params.yaml 2, schema default 3",
        "train.c: params.yaml '<absent>', schema default 0",
    ]
