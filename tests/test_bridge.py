"""The Keras 3 → tf_keras bridge: outputs equal on every fixture model kind, clear refusals otherwise."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import FIXTURES

keras = pytest.importorskip("keras")
from kdeploy.compress.bridge import BRIDGE_ATOL, BridgeError, to_tf_keras, verify  # noqa: E402
from kdeploy.compress.tfmot_worker import weights_sha256  # noqa: E402

MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())["models"]


def _fixture(name):
    entry = MANIFEST[name]
    model = keras.saving.load_model(FIXTURES / entry["file"], safe_mode=True, compile=False)
    with np.load(FIXTURES / entry["data"]) as z:
        inputs = [z[t.name] if t.name in z.files else z["x"] for t in model.inputs]
    return model, inputs


@pytest.mark.parametrize("name", ["digits_cnn", "cancer_mlp", "diabetes_reg", "digits_gru", "multi_io", "iris_legacy"])
def test_bridge_outputs_equal_original_on_fixture(name):
    model, inputs = _fixture(name)
    before = weights_sha256(model)

    bridged, info = to_tf_keras(model)
    diff = verify(model, bridged, inputs)

    assert diff <= BRIDGE_ATOL, f"{name}: max abs diff {diff:.2e}"
    assert len(bridged.outputs) == len(model.outputs)
    assert weights_sha256(model) == before  # the bridge copies values, never writes to the original
    out = bridged(inputs if len(inputs) > 1 else inputs[0], training=False)
    first = np.asarray(out[0] if isinstance(out, list) else out)
    assert np.ptp(first, axis=0).max() > 1e-3  # outputs vary across samples: the comparison is not vacuous
    if name == "cancer_mlp":
        assert "Normalization" in info.classes
    if name == "digits_gru":
        assert info.unrolled == ["gru"]  # static time steps: unrolled so LiteRT gets builtin ops


def _randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        ws = layer.get_weights()
        if not ws:
            continue
        if type(layer).__name__ == "BatchNormalization":  # positive variances, non-trivial statistics
            layer.set_weights([(rng.random(w.shape) + 0.5).astype(w.dtype) for w in ws])
        else:
            layer.set_weights([rng.normal(0, 0.3, w.shape).astype(w.dtype) for w in ws])


def _image_model():
    L = keras.layers
    x = keras.Input((12, 12, 3), name="img")
    h = L.Rescaling(1 / 255.0, offset=-0.5)(x)
    h = L.ZeroPadding2D(1)(h)
    h = L.Conv2D(8, 3, activation="relu")(h)
    h = L.BatchNormalization()(h)
    d = L.ReLU(max_value=6.0)(L.DepthwiseConv2D(3, padding="same")(h))
    s = L.SeparableConv2D(8, 3, padding="same")(h)
    h = L.Add()([d, s])
    h = L.Multiply()([h, L.Activation("sigmoid")(h)])
    h = L.Concatenate()([L.AveragePooling2D(2)(h), L.MaxPooling2D(2)(h)])
    h = L.Concatenate()([L.GlobalAveragePooling2D()(h), L.GlobalMaxPooling2D()(h)])
    h = L.Dropout(0.3)(L.LayerNormalization()(h))
    h = L.Flatten()(L.Reshape((4, 8))(h))
    return keras.Model(x, L.Softmax()(L.Dense(5)(h)))


def _sequence_model():
    L = keras.layers
    t = keras.Input((6,), dtype="int32", name="tokens")
    e = L.Embedding(20, 8)(t)
    c = L.AveragePooling1D(1)(L.MaxPooling1D(2, padding="same")(L.Conv1D(8, 3, padding="same", activation="relu")(e)))
    att = L.MultiHeadAttention(num_heads=2, key_dim=4)(c, c)
    merged = L.Concatenate()([L.LSTM(6)(att), L.GRU(4)(c), L.GlobalAveragePooling1D()(att), L.GlobalMaxPooling1D()(c)])
    return keras.Model(t, L.Dense(3)(merged))


def _nested_model():
    L = keras.layers
    inner = keras.Sequential([keras.Input((5,)), L.Dense(4, activation="tanh")], name="inner")
    f = keras.Input((5,), name="f")
    norm = L.Normalization(mean=[1, 2, 3, 4, 5], variance=[1, 2, 3, 4, 5])(f)
    return keras.Model(f, L.Dense(2)(inner(norm)))


CASES = {
    "image": (_image_model, lambda rng: [rng.random((16, 12, 12, 3), dtype=np.float32) * 255],
              {"Rescaling", "ZeroPadding2D", "Conv2D", "BatchNormalization", "DepthwiseConv2D", "ReLU", "SeparableConv2D",
               "Add", "Multiply", "Activation", "AveragePooling2D", "MaxPooling2D", "Concatenate", "GlobalAveragePooling2D",
               "GlobalMaxPooling2D", "LayerNormalization", "Dropout", "Reshape", "Flatten", "Dense", "Softmax"}),
    "sequence": (_sequence_model, lambda rng: [rng.integers(0, 20, (16, 6)).astype(np.int32)],
                 {"Embedding", "Conv1D", "MaxPooling1D", "AveragePooling1D", "MultiHeadAttention", "LSTM", "GRU",
                  "GlobalAveragePooling1D", "GlobalMaxPooling1D", "Concatenate", "Dense"}),
    "nested": (_nested_model, lambda rng: [rng.random((16, 5), dtype=np.float32) * 4],
               {"Normalization", "Sequential", "Dense"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bridge_covers_layer_classes(case):
    build, make_inputs, classes = CASES[case]
    keras.utils.set_random_seed(0)
    model = build()
    _randomize(model)
    inputs = make_inputs(np.random.default_rng(1))

    bridged, info = to_tf_keras(model)

    assert classes <= set(info.classes)
    assert verify(model, bridged, inputs) <= BRIDGE_ATOL


def test_verify_detects_a_changed_weight():
    model, inputs = _fixture("digits_cnn")
    bridged, _ = to_tf_keras(model)
    dense = bridged.get_layer("dense")
    kernel, bias = dense.get_weights()
    kernel[0, 0] += 0.5

    dense.set_weights([kernel, bias])

    assert verify(model, bridged, inputs) > BRIDGE_ATOL


def test_bridge_refuses_layer_without_tf_keras_counterpart():
    x = keras.Input((8,))
    h = keras.layers.Dense(8, name="proj")(x)
    model = keras.Model(x, keras.layers.RMSNormalization(name="rms")(h))

    with pytest.raises(BridgeError) as e:
        to_tf_keras(model)

    assert (e.value.layer, e.value.cls) == ("rms", "RMSNormalization")
    assert "rms" in str(e.value) and "RMSNormalization" in str(e.value)


def test_bridge_refuses_custom_layer_class():
    class Doubler(keras.layers.Layer):
        def call(self, x):
            return x * 2.0

    x = keras.Input((3,))
    model = keras.Model(x, Doubler(name="twice")(keras.layers.Dense(3)(x)))

    with pytest.raises(BridgeError, match=r"layer 'twice' \(Doubler\): a custom class"):
        to_tf_keras(model)


def test_bridge_refuses_raw_ops_in_the_graph():
    x = keras.Input((3,))
    model = keras.Model(x, keras.ops.exp(keras.layers.Dense(3)(x)))

    with pytest.raises(BridgeError, match="raw keras.ops operation"):
        to_tf_keras(model)
