"""Weight clustering with TFMOT, applied per layer to a bridged tf_keras model (TFMOT child only).

Each supported layer's kernel is replaced by `clusters` shared values (k-means++ initialised,
then fine-tuned); `strip_clustering` leaves an ordinary model whose kernels hold at most that many
distinct values, which compresses well (gzip) and survives int8 quantization per channel.
"""

from __future__ import annotations

from typing import Any

from kdeploy.compress.prune import MHA_KERNELS, RNN_CLASSES, kernel_size


def wrap(model: Any, *, clusters: int, min_layer_weights: int) -> tuple[Any, list[str], list[dict]]:
    """Wraps the clusterable layers of a tf_keras model.

    Args:
        model: a tf_keras functional model (a bridged copy; its layers are reused).
        clusters: number of shared values per kernel.
        min_layer_weights: layers with fewer kernel weights (or not more than `clusters`) are left alone.

    Returns:
        (wrapped model, names of the clustered layers, [{layer, class, reason}] for layers left alone).
    """
    import tensorflow_model_optimization as tfmot
    from tensorflow_model_optimization.python.core.clustering.keras.clustering_registry import ClusteringRegistry

    done: list[str] = []
    skipped: list[dict] = []
    init = tfmot.clustering.keras.CentroidInitialization.KMEANS_PLUS_PLUS

    def clone_fn(layer):
        cls = type(layer).__name__
        if not layer.trainable_weights:
            return layer  # nothing to prune or cluster (pooling, Normalization statistics ...)
        reason = None
        if cls in RNN_CLASSES:
            reason = "recurrent layers are left unclustered (their gate kernels lose too much)"
        elif not ClusteringRegistry.supports(layer):
            reason = "not supported by TFMOT's ClusteringRegistry"
        else:
            names = MHA_KERNELS if cls == "MultiHeadAttention" else ClusteringRegistry._LAYERS_WEIGHTS_MAP.get(type(layer), [])
            size = kernel_size(layer, names)
            if not names or size == 0:
                return layer
            if size < max(min_layer_weights, clusters + 1):
                reason = f"{size} weights < min_layer_weights {min_layer_weights}"
        if reason:
            skipped.append({"layer": layer.name, "class": cls, "reason": reason})
            return layer
        done.append(layer.name)
        return tfmot.clustering.keras.cluster_weights(layer, number_of_clusters=clusters, cluster_centroids_init=init)

    import tf_keras

    wrapped = tf_keras.models.clone_model(model, clone_function=clone_fn)
    return wrapped, done, skipped


def callbacks() -> list:
    return []


def strip(model: Any) -> Any:
    import tensorflow_model_optimization as tfmot

    return tfmot.clustering.keras.strip_clustering(model)
