"""Backend, devices, precision and jit for the installed Keras backend (TensorFlow or JAX)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from medclf.config import Paths, Train
from medclf.infra import catalog
from medclf.training import TrainError


@dataclass
class Runtime:
    backend: str
    devices: list[str]
    policy: str
    jit_compile: bool
    strategy: Any = None

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        with self.strategy.scope() if self.strategy is not None else contextlib.nullcontext():
            yield


def _has_gpu(backend: str) -> bool:
    if backend == "jax":
        import jax

        return jax.default_backend() in ("gpu", "cuda", "rocm")
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    return False


def setup_runtime(cfg: Train, paths: Paths) -> Runtime:
    """Pick precision, jit and data parallelism for the installed backend; >1 device -> data parallel."""
    import keras

    backend = keras.backend.backend()
    gpu = _has_gpu(backend)
    policy = {"off": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}.get(
        cfg.mixed_precision, "mixed_bfloat16" if gpu else "float32"
    )
    strategy, devices = None, []
    if backend == "jax":
        import jax

        if cfg.compile_cache:
            jax.config.update("jax_compilation_cache_dir", str(catalog.JAX_CACHE.path(paths).resolve()))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        devs = jax.devices()
        devices = [str(d) for d in devs]
        if len(devs) > 1:
            keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devs))
    elif backend == "tensorflow":
        import tensorflow as tf

        logical = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        devices = [d.name for d in logical]
        if len(logical) > 1:
            strategy = tf.distribute.MirroredStrategy([d.name for d in logical])
    else:
        raise TrainError(f"KERAS_BACKEND={backend} is not supported for training (use tensorflow or jax)")
    if len(devices) > 1 and cfg.batch_size % len(devices):
        raise TrainError(f"train.batch_size={cfg.batch_size} must be a multiple of the {len(devices)} devices")
    # XLA on a CPU-only TF build compiles slowly for little gain on small models; JAX is always jitted.
    jit = cfg.jit_compile if cfg.jit_compile != "auto" else (backend == "jax" or gpu)
    return Runtime(backend, devices, policy, bool(jit), strategy)
