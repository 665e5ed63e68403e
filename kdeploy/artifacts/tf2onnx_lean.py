"""tf2onnx without its two memory sinks, for kdeploy's conversions (same ONNX, a fraction of the memory and time).

Both were measured on ResNet50V2 (25 M parameters, a 100 MB graph) converted from its SavedModel,
tf2onnx 1.17 with protobuf's upb backend, in one process:

1. `tf2onnx.graph.Node.update_proto` empties and refills a node's NodeProto after every optimizer
   pass (`del op.attribute[:]`, then `extend`). upb keeps a cleared sub-message's bytes in the
   message's arena until the message itself is freed, so every pass left one more copy of every
   constant behind: the optimizers grew the process from 2.4 to 5.3 GB and took 7.2 s. A fresh
   NodeProto per update (same fields) lets the old one, arena and all, be freed: 2.2 GB, 1.4 s.
2. `optimize_graph(catch_errors=True)`, tf2onnx's default below 2 GB, deep-copies the whole graph
   before each of its twelve optimizers, in every iteration, so that one that raises can be
   skipped; the copies are reference cycles that wait for the garbage collector (peak 7.6 GB,
   15.7 s with the first fix in). `converting` runs the optimizers on the graph itself
   (`TF2ONNX_CATCH_ERRORS=FALSE`); should that raise, the caller converts again in tf2onnx's own
   mode (`fallback`), which skips a failing optimizer as before.

`tests/test_tf2onnx_lean.py` checks that the ONNX is the same either way and that the memory is not.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, TypeVar

T = TypeVar("T")
CATCH_ERRORS_ENV = "TF2ONNX_CATCH_ERRORS"  # tf2onnx.constants.ENV_TF2ONNX_CATCH_ERRORS, read by _convert_common
PATCHED_VERSIONS = ("1.17.",)  # the tf2onnx releases whose Node.update_proto the replacement below mirrors


def _update_proto(self, external_tensor_storage=None) -> None:
    """`Node.update_proto` of tf2onnx 1.17, writing into a new NodeProto instead of clearing the old one."""
    import onnx

    old, op = self._op, onnx.NodeProto()
    for fd, value in old.ListFields():  # name, op_type, domain, doc_string, ...: all but what is rebuilt
        if fd.name in ("input", "output", "attribute"):
            continue
        if fd.is_repeated:
            getattr(op, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(op, fd.name).CopyFrom(value)
        else:
            setattr(op, fd.name, value)
    op.input.extend(self.input)
    op.output.extend(self.output)
    for attr_name, sub_graph in (self.get_body_graphs() or {}).items():
        graph_proto = sub_graph.make_graph("graph for " + self.name + " " + attr_name,
                                           external_tensor_storage=external_tensor_storage)
        self.set_attr(attr_name, graph_proto)
    attr = list(self.get_onnx_attrs(external_tensor_storage).values())
    if attr:
        op.attribute.extend(attr)
    self._op = op


@contextlib.contextmanager
def lean(catch_errors: bool = False):
    """tf2onnx calls inside this block use fresh NodeProtos and (unless `catch_errors`) no graph copies.

    The NodeProto replacement applies to the tf2onnx releases it mirrors (PATCHED_VERSIONS); with
    another release tf2onnx runs as it is.
    """
    import tf2onnx
    from tf2onnx import graph

    patch = tf2onnx.__version__.startswith(PATCHED_VERSIONS)
    original = graph.Node.update_proto
    saved_env = os.environ.get(CATCH_ERRORS_ENV)
    if patch:
        graph.Node.update_proto = _update_proto
    if not catch_errors:
        os.environ[CATCH_ERRORS_ENV] = "FALSE"
    try:
        yield
    finally:
        graph.Node.update_proto = original
        if saved_env is None:
            os.environ.pop(CATCH_ERRORS_ENV, None)
        else:
            os.environ[CATCH_ERRORS_ENV] = saved_env


def converting(convert: Callable[[], T]) -> T:
    """`convert()` (a tf2onnx conversion) the lean way; if it raises, once more with tf2onnx's own error handling."""
    try:
        with lean():
            return convert()
    except Exception:  # an optimizer (or a handler) raised: tf2onnx's default mode skips failing optimizers
        with lean(catch_errors=True):
            return convert()
