"""TFLite tensor names back to Keras layer names.

The TFLite converter names tensors after the TensorFlow name scopes of the traced model, e.g.
`cancer_mlp_1/dense_1_2/MatMul;cancer_mlp_1/dense_1_2/Relu` for the Keras layer `dense_1` of
the model `cancer_mlp`: Keras 3 traces under the model's name and uniquifies every scope with
`_N` suffixes (here one suffix level, read off the model's own scope). Nested models add one
path segment per level; their layers are named `outer/inner`.
"""

from __future__ import annotations

import re
from typing import Any

_SUFFIX = re.compile(r"_\d+$")


def layer_paths(model: Any, prefix: str = "") -> dict[str, Any]:
    """Keras layer path (`outer/inner` for nested models) -> layer, in the model's layer order."""
    out: dict[str, Any] = {}
    for layer in getattr(model, "layers", []):
        path = f"{prefix}{layer.name}"
        inner = getattr(layer, "layers", None)
        if inner and hasattr(layer, "inputs"):  # a nested functional/sequential model
            out.update(layer_paths(layer, path + "/"))
        else:
            out[path] = layer
    return out


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
        paths: Keras layer paths (`layer_paths`), with nested models as `outer/inner`.
    """

    def __init__(self, model_name: str, paths: list[str]):
        self.model_name = model_name
        self.paths = set(paths)
        self.groups = {p.split("/")[0] for p in paths} | {p.rsplit("/", 1)[0] for p in paths if "/" in p}

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
            choices = exact + [n for _, n in names if n not in exact]
            hit = next((n for n in choices if f"{path}{n}" in self.paths | self.groups), None)
            if hit is None:
                return None
            path = f"{path}{hit}"
            if path in self.paths:
                return path
            path += "/"
        return None
