"""Full int8 calibrated from the fp32 `.tflite` is the converter's own int8, byte for byte (`tflite.calibrated`)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FIXTURES

keras = pytest.importorskip("keras")
from kdeploy.artifacts.flatbuffer import read_tflite_file  # noqa: E402
from kdeploy.artifacts.tflite import convert  # noqa: E402


def _attention_model():
    """Conv, depthwise conv, batch norm, attention (batch matmul), layer norm, gelu, two outputs."""
    keras.utils.set_random_seed(0)
    i = keras.Input((16, 12), name="seq")
    h = keras.layers.Conv1D(16, 3, padding="same")(i)
    h = keras.layers.DepthwiseConv1D(3, padding="same")(h)
    h = keras.layers.BatchNormalization()(h)
    a = keras.layers.MultiHeadAttention(2, 8)(h, h)
    h = keras.layers.LayerNormalization()(h + a)
    h = keras.layers.Dense(16, activation="gelu")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(i, [keras.layers.Dense(4, activation="softmax", name="cls")(h),
                           keras.layers.Dense(1, name="reg")(h)])


@pytest.mark.parametrize("which", ["digits_cnn", "attention"])
def test_int8_from_the_fp32_tflite_equals_the_converters_int8(tmp_path, which):
    if which == "digits_cnn":
        model = keras.saving.load_model(FIXTURES / "digits_cnn.keras")
        x = np.load(FIXTURES / "digits.npz")["x"][:32].astype(np.float32)
    else:
        model = _attention_model()
        x = np.random.default_rng(0).normal(size=(32, 16, 12)).astype(np.float32)
    sm = tmp_path / "sm"
    model.export(str(sm), format="tf_saved_model", verbose=False)
    name = model.inputs[0].name
    cal = {name: x}
    fp32 = convert(sm, "fp32", tmp_path / "fp32.tflite", None, [name], ["output_0"])
    conv = convert(sm, "int8", tmp_path / "int8-converter.tflite", cal, [name], ["output_0"],
                   calibrated_out=tmp_path / "cal-converter.tflite")
    mine = convert(sm, "int8", tmp_path / "int8-float.tflite", cal, [name], ["output_0"],
                   calibrated_out=tmp_path / "cal-float.tflite", float_model=fp32.path)

    graph = read_tflite_file(mine.path)
    assert any(t.dtype == "int8" for t in graph.tensors)  # quantized, not the float model passed through
    assert (tmp_path / "cal-float.tflite").read_bytes() == (tmp_path / "cal-converter.tflite").read_bytes()
    assert mine.path.read_bytes() == conv.path.read_bytes()
    assert mine.sha256 == conv.sha256 and mine.size_bytes == conv.size_bytes
