"""Magnitude pruning with TFMOT, applied per layer to a bridged tf_keras model (TFMOT child only).

`prune_low_magnitude` is applied through `clone_model(clone_function=...)` to the layers TFMOT
supports, so models with layers it refuses (Rescaling, Normalization, ...) still get their
Dense/Conv layers pruned. The wrapped layers belong to a throwaway bridged copy: TFMOT's wrapper
writes masked values into the weights it wraps, and the original model never is one of them.
"""

from __future__ import annotations

from typing import Any

# LSTM/GRU: TFMOT 0.8's wrapper accepts them but never advances their pruning step with tf_keras
# 2.21, so their weights stay dense (measured on the digits GRU fixture); they are left alone.
RNN_CLASSES = ("LSTM", "GRU", "SimpleRNN", "RNN", "Bidirectional")
M_BY_N_CLASSES = ("Dense", "Conv2D")
MHA_KERNELS = ["_query_dense.kernel", "_key_dense.kernel", "_value_dense.kernel", "_output_dense.kernel"]


def kernel_size(layer: Any, weight_names: list[str]) -> int:
    """Number of values in the weights TFMOT would prune/cluster in `layer`."""
    total = 0
    for name in weight_names:
        obj = layer
        for part in name.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "shape"):
            total += int(_prod(obj.shape))
    return total


def _prod(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def wrap(model: Any, *, sparsity: float | None, m_by_n: tuple[int, int] | None, end_step: int,
         min_layer_weights: int) -> tuple[Any, list[str], list[dict]]:
    """Wraps the prunable layers of a tf_keras model.

    Args:
        model: a tf_keras functional model (a bridged copy; its layers are reused).
        sparsity: target sparsity for unstructured magnitude pruning.
        m_by_n: (2, 4) for structured 2:4 sparsity (then `sparsity` is 0.5).
        end_step: the optimizer step at which the PolynomialDecay schedule reaches the target.
        min_layer_weights: layers with fewer prunable weights stay dense.

    Returns:
        (wrapped model, names of the pruned layers, [{layer, class, reason}] for layers left dense).
    """
    import tensorflow_model_optimization as tfmot
    from tensorflow_model_optimization.python.core.sparsity.keras.prune_registry import PruneRegistry

    target = 0.5 if m_by_n else float(sparsity)
    schedule = tfmot.sparsity.keras.PolynomialDecay(initial_sparsity=0.0, final_sparsity=target, begin_step=0,
                                                    end_step=max(1, end_step), frequency=1)

    def decide(layer):
        cls = type(layer).__name__
        if cls in RNN_CLASSES:
            return "TFMOT's pruning wrapper leaves recurrent weights dense with tf_keras 2.21"
        if not PruneRegistry.supports(layer):
            return "not supported by TFMOT's PruneRegistry"
        names = MHA_KERNELS if PruneRegistry._is_mha_layer(layer) else PruneRegistry._weight_names(layer)
        size = kernel_size(layer, names)
        if not names or size == 0:
            return None  # nothing to prune (BatchNormalization, DepthwiseConv2D ...)
        if size < min_layer_weights:
            return f"{size} weights < min_layer_weights {min_layer_weights}"
        if m_by_n and (cls not in M_BY_N_CLASSES or int(layer.kernel.shape[-2]) % m_by_n[1]):
            return (f"{m_by_n[0]}:{m_by_n[1]} sparsity needs a Dense/Conv2D kernel whose input channels are a "
                    f"multiple of {m_by_n[1]}")
        return WRAP

    kwargs = {"sparsity_m_by_n": m_by_n} if m_by_n else {}
    return wrap_per_layer(model, decide,
                          lambda layer: tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule, **kwargs))


WRAP = "wrap"


def wrap_per_layer(model: Any, decide, wrap_layer) -> tuple[Any, list[str], list[dict]]:
    """Clones a tf_keras model, wrapping each layer with trainable weights that `decide` accepts.

    Args:
        decide: layer -> WRAP, None (leave it alone: nothing to wrap) or a reason to leave it alone
            (reported in the skipped list).
        wrap_layer: layer -> the TFMOT-wrapped layer.

    Returns:
        (wrapped model, names of the wrapped layers, [{layer, class, reason}] for layers left alone).
    """
    import tf_keras

    done: list[str] = []
    skipped: list[dict] = []

    def clone_fn(layer):
        if not layer.trainable_weights:
            return layer  # nothing to prune or cluster (pooling, Normalization statistics ...)
        verdict = decide(layer)
        if verdict is None:
            return layer
        if verdict != WRAP:
            skipped.append({"layer": layer.name, "class": type(layer).__name__, "reason": verdict})
            return layer
        done.append(layer.name)
        return wrap_layer(layer)

    return tf_keras.models.clone_model(model, clone_function=clone_fn), done, skipped


def callbacks() -> list:
    import tensorflow_model_optimization as tfmot

    return [tfmot.sparsity.keras.UpdatePruningStep()]


def strip(model: Any) -> Any:
    import tensorflow_model_optimization as tfmot

    return tfmot.sparsity.keras.strip_pruning(model)
