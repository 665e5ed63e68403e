"""The config walk of the pre-load scan: what a Keras config names, read as data (`kdeploy.scan`).

Lambda layers, functions serialized as Python bytecode, classes from modules outside Keras,
custom classes, non-modeling Keras APIs and classes of trusted packages become `Hazard`s in a
`ScanResult`; `kdeploy.scan` decides what to refuse.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdeploy.errors import ModelLoadError

_B64 = re.compile(r"^[A-Za-z0-9+/=\s]{24,}$")
KERAS_PACKAGES = ("keras", "keras_hub", "keras_cv", "keras_nlp", "keras_rs")  # Keras imports only these


# Class names Keras' own deserializer handles without importing anything.
SPECIAL_CLASSES = frozenset(
    {"__keras_tensor__", "__tensor__", "__numpy__", "__bytes__", "__ellipsis__", "__slice__", "__typespec__"}
)


# Keras APIs that are not modeling code (Keras 3.15 `NON_MODELING_APIS`, by short name): a
# config that names them is an attack (CVE-2025-1550 style), whatever the module says.
NON_MODELING_NAMES = frozenset({
    "clear_session", "enable_unsafe_deserialization", "load_model", "model_from_json", "save_model",
    "image_dataset_from_directory", "load_img", "save_img", "text_dataset_from_directory",
    "deserialize_keras_object", "load_weights", "register_keras_serializable", "save_weights",
    "serialize_keras_object", "audio_dataset_from_directory", "get_file", "timeseries_dataset_from_array",
})


_MARSHAL_CODE = (0x63, 0xE3)  # marshal TYPE_CODE, without / with FLAG_REF: a Python code object


@dataclass(frozen=True)
class ScanLimits:
    """Size limits for archives and configs. The defaults allow any model an edge target could hold."""

    max_entries: int = 10_000
    max_entry_bytes: int = 8 << 30  # 8 GiB uncompressed per archive entry
    max_total_bytes: int = 8 << 30  # 8 GiB uncompressed in all
    max_ratio: float = 100.0  # Keras stores entries uncompressed (ratio ~1); deflated float weights stay < 10
    ratio_floor_bytes: int = 1 << 20  # entries below 1 MiB are too small to be a bomb
    max_config_bytes: int = 64 << 20  # config.json / model_config
    max_depth: int = 200  # nesting of the config


@dataclass(frozen=True)
class Hazard:
    """One thing in a model file that would run or import code.

    `kind` is "code" (Python bytecode, Lambda), "custom" (a class or function Keras does not
    provide), "api" (a non-modeling Keras API) or "op" (a SavedModel op acting outside the graph).
    """

    kind: str
    where: str  # "layer 'double' (Lambda)"
    what: str  # what was found, for the message
    names: tuple[str, ...] = ()  # names a --custom-objects module could provide
    package: str | None = None  # the installed package the object claims (module and registered name agree)
    module: str | None = None  # the module the config names for it

    def text(self) -> str:
        return f"{self.where} {self.what}"


@dataclass
class ScanResult:
    """What the scan saw: hazards (to refuse or accept) and findings for the report."""

    format: str
    hazards: list[Hazard] = field(default_factory=list)
    findings: list[tuple[str, str, str]] = field(default_factory=list)
    layers: int = 0
    entries: int = 0


# ----------------------------------------------------------------------------------------------
# The config walk
# ----------------------------------------------------------------------------------------------
def walk_config(config: Any, result: ScanResult, limits: ScanLimits, *, legacy: bool, path: Path) -> None:
    """Walks a Keras config (as plain data) and records hazards, each named by its layer.

    `legacy` configs (`.h5`) name layers by class only (no `module`); Keras resolves those names
    among its own layers, so an unknown name there is a custom class.
    """
    if not isinstance(config, dict) or not isinstance(config.get("class_name"), str):
        raise ModelLoadError(f"{path}: the model config is not a Keras object (no class_name at the top level)")
    known = _keras_class_names() if legacy else frozenset()
    # (node, where: enclosing layer description, is_layer, depth)
    stack: list[tuple[Any, str, bool, int]] = [(config, "model", True, 0)]
    while stack:
        node, where, is_layer, depth = stack.pop()
        if depth > limits.max_depth:
            raise ModelLoadError(f"{path}: the model config is nested deeper than {limits.max_depth} levels")
        if isinstance(node, list):  # pushed reversed: hazards come out in document order
            stack.extend((v, where, False, depth + 1) for v in reversed(node))
            continue
        if isinstance(node, str):
            if _is_bytecode(node):
                result.hazards.append(Hazard("code", where, "holds Python bytecode (a serialized function)"))
            continue
        if not isinstance(node, dict):
            continue
        cls = node.get("class_name")
        if isinstance(cls, str):
            inner = node.get("config")
            name = inner.get("name") if isinstance(inner, dict) and isinstance(inner.get("name"), str) else None
            if is_layer:
                result.layers += depth > 0  # the model itself is not counted
                where = f"layer {name!r} ({cls})" if name else f"{cls} object"
            _check_object(node, cls, where, legacy, known, result)
        for key, value in reversed(node.items()):
            if key == "layers" and isinstance(value, list):
                stack.extend((v, where, True, depth + 2) for v in reversed(value))
            elif isinstance(value, (dict, list, str)):
                stack.append((value, where, key in ("layer", "backward_layer"), depth + 1))


def _check_object(node: dict, cls: str, where: str, legacy: bool, known: frozenset, result: ScanResult) -> None:
    module = node.get("module")
    registered = node.get("registered_name")
    inner = node.get("config")
    hazards = result.hazards
    if cls in ("Lambda", "TFOpLambda", "SlicingOpLambda") or cls.endswith(">Lambda"):
        if cls == "Lambda" or cls.endswith(">Lambda"):
            hazards.append(Hazard("code", where, "is a Lambda layer (Python code stored in the model file)"))
        else:
            hazards.append(Hazard("custom", where, f"is a tf_keras {cls} layer, which Keras 3 cannot load", (cls,)))
        return
    if cls == "__lambda__" or (isinstance(inner, dict) and inner.get("function_type") == "lambda"):
        hazards.append(Hazard("code", where, "holds a Python lambda serialized as bytecode"))
        return
    if cls in SPECIAL_CLASSES and cls != "__typespec__":
        return
    short = inner if cls == "function" and isinstance(inner, str) else cls
    if short.split(">")[-1] in NON_MODELING_NAMES:
        hazards.append(Hazard("api", where, f"names the non-modeling API {module or ''}.{short} (loading it runs file or network I/O)"))
        return
    if cls == "function":
        if module == "builtins":
            if isinstance(inner, str) and ">" in inner:  # a registered custom function ("package>name")
                hazards.append(Hazard("custom", where, f"calls custom function {inner!r}, which is not part of Keras", (inner,),
                                      package=inner.split(">", 1)[0]))
            return  # otherwise a Keras built-in function (relu, mse, ...) named by string
        provided = tuple(n for n in (registered, inner if isinstance(inner, str) else None) if isinstance(n, str))
        if not _keras_module(module):
            hazards.append(Hazard("custom", where, f"calls function {(registered or inner)!r} from module {module!r}, which is not Keras", provided,
                                  package=_package_of(module, registered), module=module))
        return
    if "module" in node:
        if module is None:
            names = tuple(dict.fromkeys(n for n in (registered, cls) if isinstance(n, str)))
            hazards.append(Hazard("custom", where, f"uses custom class {(registered or cls)!r}, which is not part of Keras", names))
        elif not _keras_module(module):
            names = tuple(dict.fromkeys(n for n in (registered, cls) if isinstance(n, str)))
            hazards.append(Hazard("custom", where, f"uses class {cls!r} from module {module!r}, which is not Keras", names,
                                  package=_package_of(module, registered), module=module))
        elif isinstance(registered, str) and ">" in registered:
            hazards.append(Hazard("custom", where, f"claims Keras module {module!r} but registers custom name {registered!r}", (registered, cls),
                                  package=_package_of(module, registered), module=module))
        return
    # No module key: a legacy (.h5) object resolved by class name among Keras' own, or a custom one.
    if legacy and (">" in cls or (known and cls not in known and _looks_like_layer(node))):
        hazards.append(Hazard("custom", where, f"uses custom class {cls!r}, which is not part of Keras", (cls, cls.split(">")[-1])))
    elif not legacy and _looks_like_layer(node):
        hazards.append(Hazard("custom", where, f"uses class {cls!r} without a module, which Keras resolves only from custom objects", (cls,)))


def _package_of(module: Any, registered: Any) -> str | None:
    """The package an object claims, when its module and its registered name ("pkg>Name") agree on it."""
    if not (isinstance(module, str) and isinstance(registered, str) and ">" in registered):
        return None
    package = module.split(".", 1)[0]
    return package if package == registered.split(">", 1)[0] else None


def _looks_like_layer(node: dict) -> bool:
    return isinstance(node.get("config"), dict) and ("name" in node["config"] or "inbound_nodes" in node)


def _keras_module(module: Any) -> bool:
    return isinstance(module, str) and module.split(".", 1)[0] in KERAS_PACKAGES


def _is_bytecode(s: str) -> bool:
    """True for base64 text that decodes to a marshalled Python code object (Keras' func_dump)."""
    if len(s) < 24 or not _B64.match(s):
        return False
    try:
        raw = base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError):
        try:
            raw = base64.decodebytes(s.encode("ascii"))
        except (binascii.Error, ValueError):
            return False
    return len(raw) >= 16 and raw[0] in _MARSHAL_CODE


def _keras_class_names() -> frozenset:
    """Class names a legacy `.h5` config may use without a module: Keras' layers and models."""
    from kdeploy.util import native_quiet

    with native_quiet():
        import keras

    names = {n for n in dir(keras.layers) if n[:1].isupper()}
    return frozenset(names | {"Functional", "Sequential", "Model"})
