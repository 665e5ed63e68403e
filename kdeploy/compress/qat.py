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

And one to its weight quantization: TFMOT's default scheme gives Dense one weight scale for the
whole kernel, and DepthwiseConv2D one per depth multiplier (the kernel's last axis, of size 1 in
almost every model: one scale), where post-training int8 gives each output channel its own. A
model whose weight magnitudes differ between channels then loses more to QAT than to post-
training int8 (a digits MLP with one unit scaled x300: 0.57 top-1 agreement post-training, 0.10
after QAT). `annotate` gives Dense and DepthwiseConv2D per-output-channel symmetric scales, as
TFMOT does for Conv2D; the converter keeps them (FULLY_CONNECTED: one scale per output unit,
DEPTHWISE_CONV_2D: one per channel; `tests/test_qat.py` reads them back from the `.tflite`).
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
    per_channel = per_channel_configs()
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
        config = per_channel[cls](["depthwise_kernel" if cls == "DepthwiseConv2D" else "kernel"], ["activation"],
                                  False) if cls in per_channel else None
        return tfmot.quantization.keras.quantize_annotate_layer(layer, quantize_config=config)

    return tf_keras.models.clone_model(model, clone_function=clone_fn), done, floats


def apply(annotated: Any) -> Any:
    """`quantize_apply`: the annotated model with fake-quantization ops."""
    import tensorflow_model_optimization as tfmot

    scope = {c.__name__: c for c in per_channel_configs().values()}
    with tfmot.quantization.keras.quantize_scope(scope):
        return tfmot.quantization.keras.quantize_apply(annotated)


_CONFIGS: dict[str, type] = {}


def per_channel_configs() -> dict[str, type]:
    """Layer class name -> a TFMOT QuantizeConfig with one symmetric weight scale per output channel.

    Dense: the kernel rounded to max|w|/127 per unit (its last axis, TFLite's FULLY_CONNECTED output
    dimension) with a straight-through gradient and no FakeQuant op (`KdeployDenseWeightsQuantizer`:
    the converter refuses a per-channel FakeQuant there and re-quantizes the rounded constant per unit
    with the same scale). DepthwiseConv2D: the kernel (kh, kw, channels, multiplier) is
    fake-quantized as (kh, kw, 1, channels * multiplier), the DEPTHWISE_CONV_2D filter's layout, one
    scale per output channel. Activations as TFMOT's default (MovingAverageQuantizer, per tensor).
    """
    if _CONFIGS:
        return _CONFIGS
    import tensorflow as tf
    import tf_keras
    from tensorflow_model_optimization.python.core.quantization.keras import quant_ops, quantizers
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit.default_8bit_quantize_registry \
        import Default8BitQuantizeConfig

    class KdeployDepthwiseWeightsQuantizer(quantizers.LastValueQuantizer):
        """Per-output-channel weights of a DepthwiseConv2D (channels x multiplier scales)."""

        def __init__(self, **_):
            super().__init__(num_bits=8, per_axis=True, symmetric=True, narrow_range=True)

        def build(self, tensor_shape, name, layer):
            n = int(tensor_shape[-2]) * int(tensor_shape[-1])
            const = tf_keras.initializers.Constant
            return {"min_var": layer.add_weight(name + "_min", shape=(n,), initializer=const(-6.0), trainable=False),
                    "max_var": layer.add_weight(name + "_max", shape=(n,), initializer=const(6.0), trainable=False)}

        def __call__(self, inputs, training, weights, **kwargs):
            kh, kw, c, m = inputs.shape
            flat = tf.reshape(inputs, (kh, kw, 1, c * m))
            q = quant_ops.LastValueQuantize(flat, weights["min_var"], weights["max_var"], is_training=training,
                                            num_bits=8, per_channel=True, symmetric=True, narrow_range=True)
            return tf.reshape(q, (kh, kw, c, m))

        def get_config(self):
            return {}

    class KdeployDenseWeightsQuantizer(quantizers.Quantizer):
        """Per-output-unit symmetric int8 weights of a Dense kernel, without a FakeQuant op.

        `LastValueQuantizer(per_axis=True)` puts a FakeQuantWithMinMaxVarsPerChannel on the (in, units)
        kernel, which the converter refuses (its MatMul -> FULLY_CONNECTED transpose: "mismatched quantized
        axes"). Here the kernel is rounded to scale max|w|/127 per unit with a straight-through gradient;
        the exported kernel is a constant already on that grid, which the converter quantizes per unit
        with the same scale (max|w|/127), so the int8 weights are the trained ones.
        """

        def build(self, tensor_shape, name, layer):
            return {}

        def __call__(self, inputs, training, weights, **kwargs):
            scale = tf.maximum(tf.reduce_max(tf.abs(inputs), axis=0), 1e-30) / 127.0
            q = tf.clip_by_value(tf.round(inputs / scale), -127.0, 127.0) * scale
            return inputs + tf.stop_gradient(q - inputs)

        def get_config(self):
            return {}

    class KdeployPerChannelDenseConfig(Default8BitQuantizeConfig):
        def __init__(self, weight_attrs, activation_attrs, quantize_output):
            super().__init__(weight_attrs, activation_attrs, quantize_output)
            self.weight_quantizer = KdeployDenseWeightsQuantizer()

    class KdeployPerChannelDepthwiseConfig(Default8BitQuantizeConfig):
        def __init__(self, weight_attrs, activation_attrs, quantize_output):
            super().__init__(weight_attrs, activation_attrs, quantize_output)
            self.weight_quantizer = KdeployDepthwiseWeightsQuantizer()

    _CONFIGS.update(Dense=KdeployPerChannelDenseConfig, DepthwiseConv2D=KdeployPerChannelDepthwiseConfig)
    return _CONFIGS


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
