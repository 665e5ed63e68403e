"""TFLite tensor names back to Keras layer names.

The TFLite converter names tensors after the TensorFlow name scopes of the traced model, e.g.
`cancer_mlp_1/dense_1_2/MatMul;cancer_mlp_1/dense_1_2/Relu` for the Keras layer `dense_1` of
the model `cancer_mlp`: Keras 3 traces under the model's name and uniquifies every scope with
`_N` suffixes (here one suffix level, read off the model's own scope). Nested models add one
path segment per level; their layers are named `outer/inner`.

A subclassed model (`class Net(keras.Model)`, no symbolic inputs) names its layers by attribute
path: `block1/conv_a` for `self.block1 = ResidualBlock()` holding `self.conv_a = Conv2D()`, walking
into the user's own layer classes (Keras' built-in layers are leaves). Its tensor scopes carry the
layers' names (`residual_block/conv2d_1`), so `layer_scopes` gives each path its scope path.
"""

from __future__ import annotations

import re
from typing import Any

_SUFFIX = re.compile(r"_\d+$")


def layer_paths(model: Any, prefix: str = "") -> dict[str, Any]:
    """Keras layer path (`outer/inner` for nested models; attribute paths in a subclassed model) -> layer,
    in the model's layer order."""
    if not prefix and not _symbolic(model):
        return {path: layer for path, (layer, _) in attribute_tree(model).items()}
    out: dict[str, Any] = {}
    for layer in getattr(model, "layers", []):
        path = f"{prefix}{layer.name}"
        inner = getattr(layer, "layers", None)
        if inner and hasattr(layer, "inputs"):  # a nested functional/sequential model
            out.update(layer_paths(layer, path + "/"))
        else:
            out[path] = layer
    return out


def layer_scopes(model: Any) -> dict[str, str]:
    """Layer path (`layer_paths`) -> the name-scope path its tensors carry (the same path unless subclassed)."""
    if _symbolic(model):
        return {p: p for p in layer_paths(model)}
    return {path: scope for path, (_, scope) in attribute_tree(model).items()}


def _symbolic(model: Any) -> bool:
    try:
        return bool(model.inputs)
    except (AttributeError, ValueError):
        return False


def attribute_tree(model: Any, inner: bool = False) -> dict[str, tuple[Any, str]]:
    """Layers of a model without symbolic inputs: attribute path -> (layer, scope path), tracking order.

    Walks into layers of the user's classes (and nested functional models, by layer name); a
    sublayer no public attribute holds keeps its layer name.

    Args:
        inner: also the layers that hold others (e.g. `block1` before `block1/conv_a`); else leaves only.
    """
    out: dict[str, tuple[Any, str]] = {}

    def walk(layer: Any, path: str, scope: str) -> None:
        kids = _children(layer)
        if path and (inner or not kids):
            out[path] = (layer, scope)
        for seg, kid in kids:
            walk(kid, f"{path}{seg}" if not path else f"{path}/{seg}",
                 kid.name if not scope else f"{scope}/{kid.name}")

    walk(model, "", "")
    return out


def _children(layer: Any) -> list[tuple[str, Any]]:
    """(path segment, sublayer) of the sublayers a layer tracks directly; none for Keras' built-in layers."""
    keras_class = type(layer).__module__.startswith("keras.")
    if _symbolic(layer) or (keras_class and isinstance(getattr(layer, "layers", None), list)):  # a Sequential
        return [(x.name, x) for x in layer.layers if type(x).__name__ != "InputLayer"]
    if keras_class or not hasattr(layer, "_flatten_layers"):
        return []
    subs = list(layer._flatten_layers(include_self=False, recursive=False))
    ids = {id(x): x for x in subs}
    named: dict[int, str] = {}
    for attr, v in vars(layer).items():
        if attr.startswith("_"):
            continue
        items = (v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, (list, tuple))
                 else [(None, v)])
        for key, x in items:
            if id(x) in ids and id(x) not in named:
                named[id(x)] = attr if key is None else f"{attr}/{key}"
    return [(named.get(id(x), x.name), x) for x in subs]


def _strips(segment: str) -> list[tuple[int, str]]:
    """(suffix groups removed, name) for a scope segment: `dense_1_2` -> (0, dense_1_2), (1, dense_1), (2, dense)."""
    out = [(0, segment)]
    while _SUFFIX.search(out[-1][1]):
        out.append((out[-1][0] + 1, _SUFFIX.sub("", out[-1][1])))
    return out


class LayerNamer:
    """Maps TFLite tensor names to Keras layer paths of one model.

    Args:
        model_name: the Keras model's name (its scope leads every tensor name).
        paths: Keras layer paths (`layer_paths`), with nested models as `outer/inner`; or a dict of
            them to their scope paths (`layer_scopes`: a subclassed model's attribute paths). A
            subclassed model's scopes are names Keras generated when this process built its layers
            (`conv2d_1`): an artifact exported in another process may carry others (`conv2d_4_1`).
            They are matched only at the suffix depth the model's own scope shows (tracing adds one
            `_1` to each), never by stripping more: `conv2d_4_1` is then no layer (unmapped) rather
            than the stem `conv2d` (which named the wrong layer as a first divergence).
    """

    def __init__(self, model_name: str, paths: list[str] | dict[str, str]):
        self.model_name = model_name
        self.exact = isinstance(paths, dict)  # a subclassed model's generated scopes (see Args)
        scopes = paths if isinstance(paths, dict) else {p: p for p in paths}
        self.path_of = {scope: path for path, scope in scopes.items()}
        paths = list(self.path_of)
        self.paths = set(paths)
        self.groups = {"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 1)}

    def layer_of(self, tensor_name: str) -> str | None:
        """The Keras layer path a TFLite tensor belongs to, or None (graph inputs, converter-made tensors)."""
        for part in tensor_name.split(";"):
            found = self._part(part.split(":")[0].split("/"))
            if found:
                return found
        return None

    def _part(self, segments: list[str]) -> str | None:
        if len(segments) < 2:
            return None
        depth = None
        for k, name in _strips(segments[0]):
            if name == self.model_name:
                depth, segments = k, segments[1:]
                break
        path = ""
        for seg in segments[:-1]:  # the last segment is the op (MatMul, BiasAdd, ...)
            names = _strips(seg)
            exact = [n for k, n in names if k == depth]
            choices = exact if self.exact and depth is not None else exact + [n for _, n in names if n not in exact]
            hit = next((n for n in choices if f"{path}{n}" in self.paths | self.groups), None)
            if hit is None:
                return None
            path = f"{path}{hit}"
            if path in self.paths:
                return self.path_of[path]
            path += "/"
        return None


class ScopeNamer:
    """Groups TFLite tensors of a SavedModel (no Keras layers to map to) by their top two name scopes.

    A Keras-made SavedModel names an op `model_1/normalized_log_1/div_no_nan`: the scope
    `model_1/normalized_log_1` is the layer that emitted it, as TensorFlow uniquified it. Names
    with fewer than three segments (graph inputs, `StatefulPartitionedCall:0`, converter-made
    `tfl.quantize`) belong to no scope.
    """

    def layer_of(self, tensor_name: str) -> str | None:
        """The `outer/inner` scope of a TFLite tensor's first name, or None."""
        segments = tensor_name.split(";")[0].split(":")[0].split("/")
        return "/".join(segments[:2]) if len(segments) >= 3 else None
