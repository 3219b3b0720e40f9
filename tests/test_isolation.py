"""Tests do not leak MLflow's process-wide state into the next test on the same worker.

CI, 2026-12-07: test_promotion_audit's promotions ran `tracking.configure` against a server of its own, which
exported MLFLOW_TRACKING_URI; after that module stopped its server, 7 tests on the same xdist worker (the
environment wins over params.yaml) failed with "connection refused" on a port none of them had started.
The two tests below run in this order on one worker (`--dist loadfile`): the first leaves the URIs and an
active experiment pointing at a dead server, the second must not see them.
"""

from __future__ import annotations

import os

from tests.conftest import MLFLOW_ENV

DEAD = "http://127.0.0.1:9"  # the discard port: nothing answers there
BEFORE: dict[str, str | None] = {}  # what the first test started with (a fixture of another module may have set
# MLFLOW_EXPERIMENT_ID before it; what matters is that the first test's own changes do not reach the second)


def test_a_test_that_points_mlflow_at_its_own_server():
    import mlflow
    from mlflow.tracking import fluent

    BEFORE.update({name: os.environ.get(name) for name in MLFLOW_ENV})
    mlflow.set_tracking_uri(DEAD)  # what tracking.configure does
    mlflow.set_registry_uri(DEAD)
    fluent._active_experiment_id = "424242"
    os.environ["MLFLOW_EXPERIMENT_ID"] = "424242"
    assert os.environ["MLFLOW_TRACKING_URI"] == DEAD  # MLflow exports it: the leak this file is about


def test_the_next_test_does_not_inherit_it():
    import mlflow
    from mlflow.tracking import fluent

    assert BEFORE, "runs after test_a_test_that_points_mlflow_at_its_own_server (same file, same worker)"
    assert {name: os.environ.get(name) for name in MLFLOW_ENV} == BEFORE
    assert mlflow.get_tracking_uri() != DEAD and mlflow.get_registry_uri() != DEAD
    assert fluent._active_experiment_id != "424242"


def test_restored_mlflow_globals_puts_back_what_a_block_changed():
    import mlflow

    from tests.conftest import restored_mlflow_globals

    before = (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
    with restored_mlflow_globals():
        mlflow.set_tracking_uri(DEAD)
        assert mlflow.get_tracking_uri() == DEAD
    assert (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == before
