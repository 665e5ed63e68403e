"""tf2onnx the lean way (`kdeploy.artifacts.tf2onnx_lean`): the same ONNX, without the memory tf2onnx leaves behind."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT

# Converts a one-layer model with a 16 MB weight from its SavedModel, either as tf2onnx does it or
# inside `lean()`, in a fresh process; prints the ONNX's sha256 and how much the process grew.
_CHILD = r"""
import hashlib, json, os, sys, tempfile
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf
from tf2onnx import tf_loader
from tf2onnx.convert import _convert_common
from kdeploy.artifacts.tf2onnx_lean import lean

def rss_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024

tmp = tempfile.mkdtemp()
w = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
class M(tf.Module):
    def __init__(self):
        self.w = tf.Variable(w)
    @tf.function(input_signature=[tf.TensorSpec((None, 2048), tf.float32, name="x")])
    def serve(self, x):
        return {"y": tf.nn.relu(tf.matmul(x, self.w))}
m = M()
tf.saved_model.save(m, tmp + "/sm", signatures={"serving_default": m.serve})
graph_def, inputs, outputs, tables, rename = tf_loader.from_saved_model(
    tmp + "/sm", None, None, None, ["serving_default"], None, False,
    return_initialized_tables=True, return_tensors_to_rename=True)
before = rss_mb()
def convert():
    return _convert_common(graph_def, name="m", opset=17, input_names=inputs, output_names=outputs,
                           tensors_to_rename=rename, initialized_tables=tables)[0]
if sys.argv[1] == "lean":
    with lean():
        proto = convert()
else:
    proto = convert()
grown = rss_mb() - before
print(json.dumps({"sha256": hashlib.sha256(proto.SerializeToString()).hexdigest(), "grown_mb": grown}))
"""


def _convert(mode: str) -> dict:
    res = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def both():
    return _convert("plain"), _convert("lean")


def test_lean_conversion_writes_the_same_onnx(both):
    plain, lean = both
    assert plain["sha256"] == lean["sha256"]


def test_lean_conversion_does_not_keep_copies_of_the_weights(both):
    plain, lean = both
    # The weight is 16 MB: tf2onnx's own way keeps a copy per optimizer pass (and a deep copy of
    # the graph per optimizer); the lean way needs a few copies at most (graph, ONNX proto).
    assert lean["grown_mb"] < 100, lean
    assert plain["grown_mb"] > 3 * lean["grown_mb"], (plain, lean)


def test_lean_restores_tf2onnx_when_it_ends():
    import os

    from tf2onnx import graph

    from kdeploy.artifacts.tf2onnx_lean import CATCH_ERRORS_ENV, lean

    original = graph.Node.update_proto
    env = os.environ.get(CATCH_ERRORS_ENV)
    with pytest.raises(RuntimeError):
        with lean():
            assert graph.Node.update_proto is not original
            assert os.environ[CATCH_ERRORS_ENV] == "FALSE"
            raise RuntimeError("a conversion failed")
    assert graph.Node.update_proto is original
    assert os.environ.get(CATCH_ERRORS_ENV) == env
