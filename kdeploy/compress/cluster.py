"""Weight clustering with TFMOT, applied per layer to a bridged tf_keras model (TFMOT child only).

Each supported layer's kernel is replaced by `clusters` shared values (k-means++ initialised,
then fine-tuned); `strip_clustering` leaves an ordinary model whose kernels hold at most that many
distinct values, which compresses well (gzip) and survives int8 quantization per channel.
"""

from __future__ import annotations

from typing import Any

from kdeploy.compress.prune import MHA_KERNELS, RNN_CLASSES, WRAP, kernel_size, wrap_per_layer


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

    init = tfmot.clustering.keras.CentroidInitialization.KMEANS_PLUS_PLUS

    def decide(layer):
        cls = type(layer).__name__
        if cls in RNN_CLASSES:
            return "recurrent layers are left unclustered (their gate kernels lose too much)"
        if not ClusteringRegistry.supports(layer):
            return "not supported by TFMOT's ClusteringRegistry"
        names = MHA_KERNELS if cls == "MultiHeadAttention" else ClusteringRegistry._LAYERS_WEIGHTS_MAP.get(type(layer), [])
        size = kernel_size(layer, names)
        if not names or size == 0:
            return None
        if size < max(min_layer_weights, clusters + 1):
            return f"{size} weights < min_layer_weights {min_layer_weights}"
        return WRAP

    return wrap_per_layer(model, decide, lambda layer: tfmot.clustering.keras.cluster_weights(
        layer, number_of_clusters=clusters, cluster_centroids_init=init))


def callbacks() -> list:
    return []


def strip(model: Any) -> Any:
    import tensorflow_model_optimization as tfmot

    return tfmot.clustering.keras.strip_clustering(model)
