"""The `task` section (issue 24): the task type and its options agree with `ingest.classes`, and every mistake is a
config error that names its dotted key."""

from __future__ import annotations

import pytest

from medclf.config import ConfigError

CXR3 = ["BACTERIA", "NORMAL", "VIRUS"]
DR = ["0", "1", "2", "3", "4"]


def test_auto_is_binary_for_two_classes_and_multiclass_for_more(make_settings):
    assert make_settings({}).task.resolved(2) == "binary"
    assert make_settings({"ingest": {"classes": CXR3}}).task.resolved(3) == "multiclass"
    s = make_settings({"ingest": {"classes": DR}, "task": {"type": "ordinal", "referable_from": "2"}})
    assert s.task.resolved(5) == "ordinal" and s.task.referable_from == "2"


@pytest.mark.parametrize(
    ("overrides", "key", "says"),
    [
        ({"ingest": {"classes": CXR3, "positive_class": "VIRUS"}}, "ingest.positive_class", "binary tasks only"),
        ({"task": {"type": "ordinal"}}, "task.type", "grade order"),
        ({"ingest": {"classes": CXR3}, "task": {"type": "binary"}}, "task.type", "needs 2 classes"),
        ({"ingest": {"classes": ["a", "b"]}, "task": {"type": "multiclass"}}, "task.type", "at least 3"),
        (
            {"ingest": {"classes": CXR3}, "task": {"critical_classes": ["FUNGUS"]}},
            "task.critical_classes",
            "not among ingest.classes",
        ),
        (
            {"ingest": {"classes": CXR3}, "task": {"critical_classes": ["VIRUS", "VIRUS"]}},
            "task.critical_classes",
            "listed twice",
        ),
        (
            {"ingest": {"classes": DR}, "task": {"type": "ordinal", "critical_classes": ["4"]}},
            "task.critical_classes",
            "multiclass tasks only",
        ),
        (
            {"ingest": {"classes": CXR3}, "task": {"referable_from": "VIRUS"}},
            "task.referable_from",
            "ordinal tasks only",
        ),
        (
            {"ingest": {"classes": DR}, "task": {"type": "ordinal", "referable_from": "5"}},
            "task.referable_from",
            "not among ingest.classes",
        ),
        (
            {"ingest": {"classes": DR}, "task": {"type": "ordinal", "referable_from": "0"}},
            "task.referable_from",
            "lowest grade",
        ),
        ({"task": {"type": "regression"}}, "task.type", "Input should be"),
    ],
)
def test_task_mistakes_are_config_errors_naming_the_dotted_key(make_settings, overrides, key, says):
    with pytest.raises(ConfigError) as err:
        make_settings(overrides)
    assert f"  - {key}: " in str(err.value) and says in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("overrides", "ok"),
    [
        ({"ingest": {"classes": CXR3}, "evaluate": {"gates": {"bounds": {"recall[VIRUS]": 0.7}}}}, True),
        ({"ingest": {"classes": CXR3}, "evaluate": {"gates": {"bounds": {"sensitivity[VIRUS]": 0.7}}}}, True),
        ({"ingest": {"classes": CXR3}, "evaluate": {"gates": {"bounds": {"balanced_accuracy": 0.7}}}}, True),
        ({"ingest": {"classes": CXR3}, "evaluate": {"gates": {"bounds": {"qwk": 0.6}}}}, False),  # not ordinal
        ({"ingest": {"classes": CXR3}, "evaluate": {"gates": {"bounds": {"recall[FUNGUS]": 0.6}}}}, False),
        ({"ingest": {"classes": CXR3}, "evaluate": {"gates": {"bounds": {"f1": 0.6}}}}, False),  # binary name
        (
            {
                "ingest": {"classes": DR},
                "task": {"type": "ordinal", "referable_from": "2"},
                "evaluate": {"gates": {"bounds": {"qwk": 0.6, "referable.sensitivity": 0.9}}},
            },
            True,
        ),
        (
            {
                "ingest": {"classes": DR},
                "task": {"type": "ordinal"},
                "evaluate": {"gates": {"bounds": {"referable.sensitivity": 0.9}}},
            },
            False,
        ),  # no referable view declared
        ({"ingest": {"classes": ["N", "P"]}, "evaluate": {"gates": {"bounds": {"auc": 0.9}}}}, True),  # alias
        ({"ingest": {"classes": ["N", "P"]}, "evaluate": {"gates": {"bounds": {"brier": 0.9}}}}, False),  # lower-better
        ({"ingest": {"classes": CXR3}, "evaluate": {"gates": {"bounds": {"macro_f1": 1.5}}}}, False),
    ],
)
def test_gates_name_only_metrics_the_task_has(make_settings, overrides, ok):
    if ok:
        make_settings(overrides)
        return
    with pytest.raises(ConfigError, match=r"evaluate\.gates\.bounds"):
        make_settings(overrides)
