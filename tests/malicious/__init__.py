"""Builders for hostile and broken model files. Every sample is built in the test's tmp_path.

Nothing here is committed as a binary: the builders take a benign fixture (or build a tiny
model with Keras) and tamper with it the way an attacker would.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Callable

from conftest import FIXTURES

BENIGN = FIXTURES / "cancer_mlp.keras"  # small Keras 3 archive: config.json, metadata.json, weights


def read_config(src: Path = BENIGN) -> dict:
    with zipfile.ZipFile(src) as z:
        return json.loads(z.read("config.json"))


def rewrite_keras(dst: Path, *, src: Path = BENIGN, config: Callable[[dict], dict] | None = None,
                  extra: dict[str, bytes] | None = None, drop: tuple[str, ...] = (),
                  compression: int = zipfile.ZIP_STORED) -> Path:
    """Copies a .keras archive entry by entry, with its config changed by `config`, entries dropped/added."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            if info.filename in drop:
                continue
            data = zin.read(info.filename)
            if info.filename == "config.json" and config is not None:
                data = json.dumps(config(json.loads(data))).encode()
            zout.writestr(info.filename, data)
        for name, data in (extra or {}).items():
            zout.writestr(name, data)
    return dst


def layer(cfg: dict, name: str) -> dict:
    """The layer entry called `name` in a functional/sequential config."""
    return next(l for l in cfg["config"]["layers"] if l.get("name", l["config"].get("name")) == name)


def first_dense(cfg: dict) -> dict:
    return next(l for l in cfg["config"]["layers"] if l["class_name"] == "Dense")


def lambda_writer_keras(path: Path, marker: Path, *, nested: bool = False) -> Path:
    """A .keras model whose Lambda layer writes `marker` when the model is rebuilt (i.e. on load).

    Keras runs the lambda once while building the model, so the marker is removed after saving:
    if it exists later, loading ran the model file's code. `nested` hides the Lambda inside an
    inner Sequential model (top-level-only scanners miss it).
    """
    import keras

    fn = eval(f"lambda t: (open({str(marker)!r}, 'w').write('pwned'), t)[1]")  # noqa: S307 - the payload
    inp = keras.Input((4,), name="x")
    lam = keras.layers.Lambda(fn, name="pwn")
    if nested:
        inner = keras.Sequential([keras.Input((4,)), lam, keras.layers.Dense(4)], name="inner")
        out = keras.layers.Dense(2)(inner(inp))
    else:
        out = keras.layers.Dense(2)(lam(inp))
    keras.Model(inp, out).save(path)
    marker.unlink(missing_ok=True)
    return path


def zip_with(dst: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(dst, "w", compression) as z:
        for name, data in entries:
            z.writestr(name, data)
    return dst


def benign_entries(src: Path = BENIGN) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(src) as z:
        return [(i.filename, z.read(i.filename)) for i in z.infolist()]


def h5_with_config(dst: Path, config: dict, *, external_link: Path | None = None) -> Path:
    """An .h5 file holding only a `model_config` attribute (as data), optionally an external link."""
    import h5py

    with h5py.File(dst, "w") as f:
        f.attrs["model_config"] = json.dumps(config)
        f.attrs["keras_version"] = "2.15.0"
        f.attrs["backend"] = "tensorflow"
        f.create_group("model_weights")
        if external_link is not None:
            f["model_weights/stolen"] = h5py.ExternalLink(str(external_link), "/")
    return dst


def tf_keras_lambda_config() -> dict:
    """A tf_keras-style (legacy .h5) Sequential config with a Lambda holding marshalled bytecode."""
    import base64
    import marshal

    code = base64.b64encode(marshal.dumps((lambda t: t * 2).__code__)).decode()
    return {"class_name": "Sequential", "config": {"name": "seq", "layers": [
        {"class_name": "InputLayer", "config": {"batch_input_shape": [None, 4], "dtype": "float32", "name": "in"}},
        {"class_name": "Lambda", "config": {"name": "double", "function": [code, None, None],
                                            "function_type": "lambda", "module": "__main__", "arguments": {}}},
    ]}}


def savedmodel_writer(path: Path, marker: Path) -> Path:
    """A SavedModel whose serving signature writes `marker` (tf.io.write_file) every time it runs."""
    import tensorflow as tf

    class Writer(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def serve(self, x):
            tf.io.write_file(str(marker), "pwned")
            return {"y": x * 2.0}

    w = Writer()
    tf.saved_model.save(w, str(path), signatures={"serving_default": w.serve})
    return path
