"""Quantization-aware training with TFMOT on a bridged tf_keras model (TFMOT child only).

The layers TFMOT's default 8-bit registry supports are annotated (`quantize_annotate_layer`,
through `clone_model`'s clone_function) and `quantize_apply` inserts the fake-quantization ops;
the rest stay float in training (the converter quantizes them from the calibration data, as post-
training int8 does). The QAT model is written as a SavedModel with its FakeQuant ops; the parent
converts it with the int8 recipe's own converter settings, which take the trained ranges.

Two adjustments to TFMOT's defaults, both for fine-tuning runs of tens to hundreds of steps:

- Activation ranges start at [-6, 6] and follow batches with an EMA of decay 0.999, so after a
  short run they are still about [-6, 6] (seen on the digits CNN: outputs at 0.013 mean error vs
  0.0014 for post-training int8). `init_ranges` sets them first, on the training inputs, to the
  mean of per-batch min/max (the EMA's steady state), and training then uses `TRAIN_EMA_DECAY`.
- BatchNormalization statistics are frozen (the layer runs in inference mode) and Dropout is
  off: the model is fitted to match its float self, not regularised on a few samples.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import numpy as np

TRAIN_EMA_DECAY = 0.99  # activation-range EMA during fine-tuning (TFMOT's 0.999 needs thousands of steps)


def annotate(model: Any) -> tuple[Any, list[str], list[dict]]:
    """Annotates the layers TFMOT's default 8-bit scheme supports.

    Args:
        model: a tf_keras functional model (a bridged copy; its layers are reused and changed:
            BatchNormalization frozen, Dropout rate 0).

    Returns:
        (annotated model, names of the annotated layers, [{layer, class, reason}] for layers left float).
    """
    import tf_keras
    import tensorflow_model_optimization as tfmot
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import \
        default_8bit_quantize_registry as registry

    reg = registry.Default8BitQuantizeRegistry()
    done: list[str] = []
    floats: list[dict] = []

    def clone_fn(layer):
        cls = type(layer).__name__
        if cls == "BatchNormalization":
            layer.trainable = False  # tf_keras runs a non-trainable BatchNormalization in inference mode
        if cls == "Dropout":
            layer.rate = 0.0
        if isinstance(layer, tf_keras.layers.InputLayer):
            return layer
        if isinstance(layer, tf_keras.Model):
            floats.append({"layer": layer.name, "class": cls, "reason": "a nested model (quantize_apply takes flat models)"})
            return layer
        if not reg.supports(layer):
            floats.append({"layer": layer.name, "class": cls, "reason": "not supported by TFMOT's default 8-bit registry"})
            return layer
        done.append(layer.name)
        return tfmot.quantization.keras.quantize_annotate_layer(layer)

    return tf_keras.models.clone_model(model, clone_function=clone_fn), done, floats


def apply(annotated: Any) -> Any:
    """`quantize_apply`: the annotated model with fake-quantization ops."""
    import tensorflow_model_optimization as tfmot

    with tfmot.quantization.keras.quantize_scope():
        return tfmot.quantization.keras.quantize_apply(annotated)


@contextlib.contextmanager
def ema_decay(decay: Callable[[], float]) -> Iterator[None]:
    """Makes TFMOT's MovingAverageQuantizer use `decay()` instead of its fixed 0.999 while inside.

    `MovingAverageQuantizer.__call__` passes `ema_decay=0.999` to `quant_ops.MovingAvgQuantize`,
    which it looks up at call (trace) time; this swaps that function for one call site's value.
    """
    from tensorflow_model_optimization.python.core.quantization.keras import quant_ops

    original = quant_ops.MovingAvgQuantize

    def patched(*args, **kwargs):
        kwargs["ema_decay"] = decay()
        return original(*args, **kwargs)

    quant_ops.MovingAvgQuantize = patched
    try:
        yield
    finally:
        quant_ops.MovingAvgQuantize = original


def init_ranges(model: Any, inputs: list[np.ndarray], batch_size: int) -> int:
    """Sets every activation range to the mean of its per-batch min/max over `inputs`.

    Batch k (from 1) is run in training mode with EMA decay (k - 1) / k, which leaves each range
    variable at the running mean. Weights do not change (no optimizer step); BatchNormalization
    is frozen by `annotate`.

    Returns:
        The number of batches.
    """
    import tensorflow as tf

    n = len(inputs[0])
    batch = max(1, min(batch_size, n))
    step = {"k": 0}
    with ema_decay(lambda: (step["k"] - 1) / step["k"]):
        for s in range(0, n, batch):
            step["k"] += 1
            part = [tf.constant(a[s : s + batch]) for a in inputs]
            model(part if len(part) > 1 else part[0], training=True)  # eager: each call reads the decay anew
    return step["k"]


def time_limit(seconds: float, tf_keras: Any) -> Any:
    """A callback that stops training after `seconds` (checked after every batch); `.stopped` says if it did."""

    class _Limit(tf_keras.callbacks.Callback):
        stopped = False

        def on_train_begin(self, logs=None):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if time.perf_counter() - self.t0 > seconds:
                self.model.stop_training = True
                _Limit.stopped = True

    return _Limit()
