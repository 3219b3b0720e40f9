"""The train stage's parts; `medclf.stages.train.run` wires them.

* `data`: the balanced train set and the val split through the catalog, class weights, the exact val scores;
* `runtime`: backend, devices, precision, jit;
* `resume`: the state a killed run leaves for its retry (`paths.cache_dir`);
* `tracker`: the optional MLflow run; `callbacks`: the Keras callbacks;
* `state`: one attempt's shared state and per-epoch bookkeeping (`TrainingRun`);
* `tuning`: the Optuna search over train params on val;
* `loop`: the phases, the export and its reload check.

The model itself (backbone registry, preprocessing layers, freezing, compiling) is `medclf.modeling.network`;
where `train.weights` comes from and how it loads is `medclf.modeling.pretrained`.
Nothing here imports Keras, TensorFlow or MLflow at module level.
"""


class TrainError(RuntimeError):
    """Training cannot start or produced no usable model; the message says why."""
