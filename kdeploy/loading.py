"""Safe model loading: Keras 3 `.keras`, legacy `.h5`, SavedModel directories.

Before anything deserializes a file, `kdeploy.scan` reads it as data (zip entries, `config.json`,
the `.h5` `model_config` attribute, SavedModel op types) and refuses Lambda layers, bytecode,
custom classes and hostile archives the user did not trust. Keras files are then loaded with Keras 3
`load_model(safe_mode=True)` as a second line of defence. `.h5` files are never routed through
tf_keras (its legacy loader executes Lambda bytecode). Code from a model file runs only with
`trust_custom_code`; custom classes only from the user's own `--custom-objects` module.
"""

from __future__ import annotations

import importlib.util
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from kdeploy.errors import ModelLoadError, UnsafeModelError, UsageError
from kdeploy.util import file_sha256, native_section, natural_key

KERAS_SUFFIXES = (".keras",)
H5_SUFFIXES = (".h5", ".hdf5")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int | None, ...]  # batch dimension first, None where dynamic
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class LoadedModel:
    """A model ready to serve as the reference: signature, kind of each output, a predict function."""

    path: Path
    format: str  # "keras" | "h5" | "savedmodel"
    sha256: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    output_kinds: list[str]  # per output: "multiclass" | "binary" | "multilabel" | "regression"
    keras_model: Any = None  # Keras 3 model, when the file was a Keras model
    saved_model: Any = None  # tf.saved_model.load result, for SavedModel directories
    signature_outputs: list[str] = field(default_factory=list)  # SavedModel signature output keys, model order
    keras_version: str | None = None
    params: int | None = None
    findings: list[tuple[str, str, str]] = field(default_factory=list)  # (severity, code, message)
    trusted_classes: list[dict] = field(default_factory=list)  # classes of trusted packages (ModelInfo field)
    # False for a model without symbolic inputs (a subclassed model: `kdeploy.subclassed`): its signature came
    # from --data / --input-shape, and no `keras.Model(m.inputs, ...)` can be built on it.
    symbolic: bool = True
    takes_dict: bool = False  # such a model with several inputs takes them as a dict keyed by input name
    # Keras' predict traces its step for the first batch shape it meets, and again (relaxed) for the next one:
    # every later call feeds batches of the first call's size, the last one padded (`_predict`)
    predict_batch: int | None = None

    def predict(self, feeds: dict[str, np.ndarray], batch_size: int = 256) -> list[np.ndarray]:
        """Reference outputs (inference mode), in model output order (a `native_section`)."""
        with native_section():
            return self._predict(feeds, batch_size)

    def _predict(self, feeds: dict[str, np.ndarray], batch_size: int) -> list[np.ndarray]:
        import tensorflow as tf

        if self.keras_model is not None:
            # Keras' compiled predict loop: one trace, then graph execution (eager op-by-op calls
            # took 2-5x longer on MobileNetV2 here). Inference mode, as in call_keras.
            xs = [feeds[t.name] for t in self.inputs]
            n = len(xs[0])
            if self.symbolic and any(t.shape[0] is not None for t in self.keras_model.inputs):
                out = self.keras_model.predict(keras_args(self.keras_model, xs, self), batch_size=batch_size, verbose=0)
                return [np.asarray(o) for o in flatten_outputs(out)]
            # the first call's batch for every call: the probes' 16 samples after the reference's 64 cost MobileNetV2
            # a second trace (1.4 s); padded to 64 (the last sample repeated) they cost 0.2 s of compute
            b = self.predict_batch if self.predict_batch and self.predict_batch <= batch_size else min(batch_size, n)
            self.predict_batch = self.predict_batch or b
            pad = -n % b
            if pad:
                xs = [np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) for a in xs]
            out = self.keras_model.predict(keras_args(self.keras_model, xs, self), batch_size=b, verbose=0)
            return [np.asarray(o)[:n] for o in flatten_outputs(out)]
        n = len(next(iter(feeds.values())))
        chunks: list[list[np.ndarray]] = []
        for start in range(0, n, batch_size):
            part = {k: v[start : start + batch_size] for k, v in feeds.items()}
            res = self.saved_model.signatures["serving_default"](**{k: tf.constant(v) for k, v in part.items()})
            chunks.append([np.asarray(res[k]) for k in self.signature_outputs])
        return [np.concatenate([c[i] for c in chunks]) for i in range(len(self.outputs))]


def import_frameworks() -> None:
    """Imports TensorFlow and Keras once, with their start-up log chatter on fd 2 silenced."""
    from kdeploy.util import native_quiet

    with native_quiet():
        import keras  # noqa: F401
        import tensorflow  # noqa: F401


def call_keras(keras_model: Any, args: list, model: "LoadedModel") -> list:
    """Calls a Keras model in inference mode with inputs in model order; outputs in model order.

    Models built with dict inputs get dicts (keyed by input name), others lists; dict and nested
    outputs are flattened (`flatten_outputs`).
    """
    return flatten_outputs(keras_model(keras_args(keras_model, args, model), training=False))


def takes_dict(keras_model: Any, model: "LoadedModel") -> bool:
    """True when the Keras model takes its inputs as a dict keyed by input name."""
    struct = getattr(keras_model, "_inputs_struct", None)
    return isinstance(struct, dict) or (struct is None and model.takes_dict)


def keras_args(keras_model: Any, args: list, model: "LoadedModel") -> Any:
    """The inputs (in model order) arranged as the Keras model takes them: a dict, a list, or the one array."""
    if takes_dict(keras_model, model):
        return {t.name: a for t, a in zip(model.inputs, args)}
    return list(args) if len(args) > 1 else args[0]


def is_nested(struct: Any) -> bool:
    """True for an output structure that is a dict, or a list/tuple holding dicts or lists."""
    return isinstance(struct, dict) or (
        isinstance(struct, (list, tuple)) and any(isinstance(s, (dict, list, tuple)) for s in struct))


def flatten_outputs(out: Any) -> list:
    """A model's outputs (a tensor, a list, a dict or a nested structure) in `model.outputs` order.

    Keras flattens a model's output structure with `keras.tree.flatten` (dict keys sorted) to
    build `model.outputs`; the same flattening of a call's or `predict`'s result lines up with it.
    """
    if is_nested(out):
        import keras

        return keras.tree.flatten(out)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def detect_format(path: Path) -> str:
    """Returns "keras", "h5" or "savedmodel" for a path, or raises ModelLoadError saying why not."""
    if not path.exists():
        raise ModelLoadError(f"model not found: {path} (expected a .keras or .h5 file or a SavedModel directory)")
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "savedmodel"
        raise ModelLoadError(f"directory {path} is not a SavedModel (no saved_model.pb inside)")
    suffix = path.suffix.lower()
    if suffix not in KERAS_SUFFIXES + H5_SUFFIXES:
        raise ModelLoadError(
            f"unsupported model file extension '{suffix or '(none)'}' for {path}; "
            "allowed: .keras, .h5, .hdf5, or a SavedModel directory"
        )
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ModelLoadError(f"cannot read model file {path}: {e.strerror or e}") from None
    if size == 0:
        raise ModelLoadError(f"model file {path} is empty (0 bytes); allowed: a .keras zip archive or an HDF5 .h5 file")
    if suffix in KERAS_SUFFIXES:
        if head == HDF5_MAGIC:
            raise ModelLoadError(f"{path} is an HDF5 file named .keras; rename it to .h5 (a .keras model is a zip archive)")
        if not zipfile.is_zipfile(path):
            if head[:4] == b"PK\x03\x04":
                raise ModelLoadError(
                    f"{path} is a truncated or damaged zip archive ({size:,} bytes, no central directory); "
                    "a .keras model is a complete zip archive with config.json"
                )
            raise ModelLoadError(
                f"{path} is not a zip archive (first bytes {head!r}); a .keras model is a zip archive with config.json"
            )
        return "keras"  # entries, sizes, CRCs and config are checked by kdeploy.scan before loading
    if head != HDF5_MAGIC:
        kind = "a zip archive (a .keras model?)" if head[:4] == b"PK\x03\x04" else f"not HDF5 (first bytes {head!r})"
        raise ModelLoadError(f"{path} is {kind}; a .h5 model is an HDF5 file")
    return "h5"


def load_custom_objects(module_path: str | Path) -> dict[str, Any]:
    """Imports a user's Python file and returns its public classes and functions by name.

    This runs the user's code: only reached with --custom-objects (an explicit trust decision).
    """
    module_path = Path(module_path)
    if not module_path.is_file() or module_path.suffix != ".py":
        raise UsageError(f"--custom-objects must be a .py file (received {module_path})")
    spec = importlib.util.spec_from_file_location(f"kdeploy_custom_{module_path.stem}", module_path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # the user's module: report, do not crash
        raise UsageError(f"--custom-objects {module_path} failed to import: {type(e).__name__}: {e}") from None
    explicit = getattr(mod, "CUSTOM_OBJECTS", None)
    if isinstance(explicit, dict):
        return dict(explicit)
    return {k: v for k, v in vars(mod).items() if not k.startswith("_") and callable(v)}


def load_model(
    path: str | Path,
    *,
    trust_custom_code: bool = False,
    custom_objects: dict[str, Any] | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    trusted_packages: Sequence[str] = (),
    allow_dynamic: bool = False,
    data_signature: Callable[[], Sequence[TensorInfo]] | None = None,
) -> LoadedModel:
    """Loads a model safely and derives its signature.

    Args:
        path: `.keras`/`.h5` file or SavedModel directory.
        trust_custom_code: allow Lambda layers / code from the file (Keras safe_mode off).
        custom_objects: classes the user chose to trust (from --custom-objects).
        input_shapes: per-input non-batch shapes for inputs with dynamic non-batch dimensions.
        seed: seeds Keras' random state before loading, so state the model creates on load
            (e.g. a Dropout layer's seed generator) and so every export is the same each run.
        allow_dynamic: keep dynamic non-batch dimensions instead of refusing them (`kdeploy
            inspect` reports them as a hazard).
        trusted_packages: installed packages whose registered classes load without
            `custom_objects`, besides `kdeploy.scan.DEFAULT_TRUSTED_PACKAGES` (`keras_hub`).
        data_signature: returns the data's arrays (`kdeploy.data.data_signature`); called only for a
            Keras model without symbolic inputs (`kdeploy.subclassed`), whose input signature they give
            (with `input_shapes`).

    Returns:
        The LoadedModel; `findings` holds the pre-load scan's findings (`kdeploy.scan`).

    Raises:
        ModelLoadError: not a model, truncated or corrupt.
        UnsafeModelError: the file would run code or import classes the user did not trust
            (found by the pre-load scan, before any deserialization), or is a hostile archive.
        UsageError: `input_shapes` do not fit, or an input dtype kdeploy cannot feed; a trusted
            package is not installed, or does not register a class the model names for it; a model
            without symbolic inputs and neither `input_shapes` nor `data_signature`.
    """
    from kdeploy.scan import DEFAULT_TRUSTED_PACKAGES, scan_model

    path = Path(path)
    fmt = detect_format(path)
    # Read as data before anything deserializes it: refuses code the user did not trust.
    verdict = scan_model(path, fmt, trust_custom_code=trust_custom_code, custom_names=set(custom_objects or {}),
                         trusted_packages=dict.fromkeys([*DEFAULT_TRUSTED_PACKAGES, *trusted_packages]))
    sha = file_sha256(path)
    import_frameworks()
    _seed_frameworks(seed)
    trusted = verify_trusted_classes(path, verdict.trusted)
    if fmt == "savedmodel":
        model = _load_savedmodel(path, sha)
    else:
        model = _load_keras(path, fmt, sha, trust_custom_code, custom_objects)
        if not model.symbolic:
            model = _signature_from_call(model, input_shapes or {}, data_signature)
    model.trusted_classes = trusted
    model.findings = verdict.findings + model.findings
    model.inputs = _resolve_input_shapes(model.inputs, input_shapes or {}, allow_dynamic)
    return model


# pip extras that install a trusted package with what it needs (pyproject.toml).
PACKAGE_EXTRAS = {"keras_hub": "keras-hub"}


def verify_trusted_classes(path: Path, trusted: Sequence[Any]) -> list[dict]:
    """Imports each trusted package the model uses and checks it registers every class named for it.

    Importing the package runs its registration decorators, so Keras' `safe_mode` finds the
    classes in its registry. A name the package does not register (a typo, an older version, or
    a config claiming the package for a class of its own) is refused.

    Args:
        path: the model file, for messages.
        trusted: `kdeploy.scan.TrustedClass` entries from the pre-load scan.

    Returns:
        One dict per registered name: package, package_version, registered_name, module, used_by.

    Raises:
        ModelLoadError: the package is not installed (says what to install).
        UnsafeModelError: the package does not register a name the model claims it does.
    """
    import importlib
    from importlib import metadata

    import keras

    out: dict[str, dict] = {}
    for t in trusted:
        try:
            package = importlib.import_module(t.package)
        except ImportError as e:
            extra = PACKAGE_EXTRAS.get(t.package)
            how = f"pip install 'kdeploy[{extra}]'" if extra else f"pip install {t.package}"
            raise ModelLoadError(f"{path} uses {t.where} of package {t.package!r}, which cannot be imported "
                                 f"({type(e).__name__}: {e}); install it: {how}") from None
        obj = keras.saving.get_registered_object(t.registered_name)
        owner = getattr(obj, "__module__", "") or ""
        if obj is None or owner.split(".", 1)[0] != t.package:
            raise UnsafeModelError(
                f"refused to load {path}: {t.where} names {t.registered_name!r}, which the installed {t.package} "
                f"{getattr(package, '__version__', '')} does not register; allowed: classes {t.package} registers"
            )
        row = out.setdefault(t.registered_name, {
            "package": t.package, "package_version": _dist_version(metadata, t.package, package),
            "registered_name": t.registered_name, "module": t.module, "used_by": []})
        row["used_by"].append(t.where)
    return list(out.values())


def _dist_version(metadata: Any, name: str, module: Any) -> str | None:
    try:
        return metadata.version(name.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return getattr(module, "__version__", None)


def _seed_frameworks(seed: int) -> None:
    """Seeds Python, NumPy, TensorFlow and Keras: seed generators created on load get fixed state."""
    import keras

    keras.utils.set_random_seed(seed)


_UNSAFE_PATTERNS = ("safe_mode", "Lambda", "lambda", "arbitrary code", "unsafe")


def _load_keras(path: Path, fmt: str, sha: str, trust: bool, custom_objects: dict | None) -> LoadedModel:
    import keras

    try:
        m = keras.saving.load_model(path, compile=False, safe_mode=not trust, custom_objects=custom_objects)
    except Exception as e:  # Keras raises ValueError/TypeError/OSError/... for bad files
        msg = " ".join(str(e).split())
        if not trust and any(p in msg for p in _UNSAFE_PATTERNS):
            raise UnsafeModelError(
                f"refused to load {path}: it needs code execution ({msg[:300]}); "
                "pass --trust-custom-code only if you trust this file"
            ) from None
        if "Unknown layer" in msg or "Could not locate class" in msg or "custom" in msg.lower():
            raise ModelLoadError(
                f"cannot load {path}: it uses a class Keras does not know ({msg[:300]}); "
                "pass --custom-objects module.py with that class if you trust it"
            ) from None
        raise ModelLoadError(f"cannot load {path} as a Keras model: {type(e).__name__}: {msg[:400]}") from None
    if isinstance(m, keras.Model) is False:
        raise ModelLoadError(f"{path} did not load as a Keras model (got {type(m).__name__})")
    from kdeploy.subclassed import has_symbolic_inputs

    if not has_symbolic_inputs(m):  # signature: `_signature_from_call`
        return LoadedModel(path=path, format=fmt, sha256=sha, inputs=[], outputs=[], output_kinds=[], keras_model=m,
                           keras_version=keras.__version__, symbolic=False)
    inputs = [
        TensorInfo(_tensor_name(t, i, "input"), tuple(t.shape), str(t.dtype)) for i, t in enumerate(m.inputs)
    ]
    out_names = _output_names(m)
    outputs = [TensorInfo(n, tuple(t.shape), str(t.dtype)) for n, t in zip(out_names, m.outputs)]
    return LoadedModel(
        path=path,
        format=fmt,
        sha256=sha,
        inputs=inputs,
        outputs=outputs,
        output_kinds=[_keras_output_kind(m, t) for t in m.outputs],
        keras_model=m,
        signature_outputs=[f"output_{i}" for i in range(len(outputs))],
        keras_version=keras.__version__,
        params=int(m.count_params()),
    )


def _signature_from_call(model: LoadedModel, overrides: dict[str, tuple[int, ...]],
                         data: Callable[[], Sequence[TensorInfo]] | None) -> LoadedModel:
    """Inputs from `--input-shape`/`--data`, outputs from calling the model (`kdeploy.subclassed`)."""
    from kdeploy.subclassed import has_symbolic_inputs, input_signature, trace_outputs

    m = model.keras_model
    what = f"{model.path.name} (a {'subclassed ' if type(m).__name__ not in ('Sequential', 'Functional') else ''}" \
           f"{type(m).__name__} model)"
    arrays = data() if data else None
    inputs = [TensorInfo(*s) for s in input_signature(overrides, arrays, what)]
    if not m.weights:  # saved before it was ever called: the call below creates fresh weights
        model.findings.append(("warning", "unbuilt-model", (
            f"{what} was saved before it was built: the file holds no weights, so they are initialised at random "
            "when kdeploy calls it (seed --seed); save the model after calling or training it")))
    as_dict, outputs, kinds = trace_outputs(m, [(t.name, t.shape, t.dtype) for t in inputs], what)
    model.inputs, model.outputs, model.output_kinds = inputs, [TensorInfo(*s) for s in outputs], kinds
    model.takes_dict = as_dict
    model.symbolic = has_symbolic_inputs(m)  # a Sequential never built has a layer graph once called
    model.signature_outputs = [f"output_{i}" for i in range(len(outputs))]
    model.params = int(m.count_params())
    model.findings.append(("info", "signature-from-call", (
        f"{what} has no symbolic inputs: inputs {', '.join(f'{t.name} {_fmt_shape(t.shape)} {t.dtype}' for t in inputs)} "
        f"taken from {' and '.join(f for f, used in (('--data', arrays), ('--input-shape', overrides)) if used)}; "
        "outputs from calling it once")))
    return model


def _tensor_name(t: Any, i: int, prefix: str) -> str:
    name = getattr(t, "name", None) or f"{prefix}_{i}"
    return re.sub(r":\d+$", "", name)


def _output_names(m: Any) -> list[str]:
    """Output names in `m.outputs` order: dict keys (nested paths joined by '_'), else the layers' names.

    Keras' `output_names` are the producing layers' names, while a dict-output model's `predict`
    returns its own keys (KerasHub's BertBackbone: layer `pooled_dense`, key `pooled_output`):
    the keys are what a user knows the outputs by, and what the SavedModel signature uses.
    """
    struct = getattr(m, "_outputs_struct", None)
    if is_nested(struct):
        import keras

        names = ["_".join(str(p) for p in path) for path, _ in keras.tree.flatten_with_path(struct)]
        if len(names) == len(m.outputs) and len(set(names)) == len(names):
            return names
    names = list(getattr(m, "output_names", None) or [])
    if len(names) != len(m.outputs) or len(set(names)) != len(names):
        names = [f"output_{i}" for i in range(len(m.outputs))]
    return names


def _keras_output_kind(m: Any, tensor: Any) -> str:
    """The output's kind from the layer that makes it.

    A softmax is "multiclass" whatever the rank: its decision is the top-1 along the last axis, per
    sample for (N, C) and per location for a map (N, H, W, C) (`acceptance.decisions`). A Softmax
    layer over another axis is none of that (judged as regression).
    """
    hist = getattr(tensor, "_keras_history", None)
    layer = hist[0] if hist else None
    act = None
    if layer is not None:
        cls = type(layer).__name__
        if cls == "Softmax":
            axis = getattr(layer, "axis", -1)
            act = "softmax" if axis in (-1, len(tensor.shape) - 1) else None
        elif cls == "Activation" or hasattr(layer, "activation"):
            a = getattr(layer, "activation", None)
            act = getattr(a, "__name__", None) or (a if isinstance(a, str) else None)
    width = tensor.shape[-1] if len(tensor.shape) >= 2 else 1
    if act == "softmax" and (width or 0) > 1:
        return "multiclass"
    if act == "sigmoid":
        return "binary" if width == 1 else "multilabel"
    return "regression"


def resolve_kinds(model: LoadedModel, producers: dict[str, list[str]]) -> list[str]:
    """Kinds of a SavedModel's outputs ("unknown" when loaded) from the ops that write them in its converted
    `.tflite` (`flatbuffer.output_producers`): a SOFTMAX writing the output itself is multiclass; a
    LOGISTIC, also behind reshapes (element-wise), binary or multilabel; any other output stays
    "unknown" (its values decide, `compare.output_kind`). A sigmoid output guessed from its values
    alone is a regression: basic-pitch's three sigmoid maps were judged by relative error instead of
    their 0.5 decisions."""
    kinds = list(model.output_kinds)
    for i, t in enumerate(model.outputs):
        ops = [op for op in producers.get(t.name, []) if op not in ("QUANTIZE", "DEQUANTIZE")]
        if kinds[i] != "unknown" or not ops:
            continue
        width = t.shape[-1] if len(t.shape) >= 2 and t.shape[-1] else 1
        if ops == ["SOFTMAX"] and width > 1:
            kinds[i] = "multiclass"
        elif ops[-1] == "LOGISTIC":
            kinds[i] = "binary" if width == 1 else "multilabel"
    return kinds


def _load_savedmodel(path: Path, sha: str) -> LoadedModel:
    import tensorflow as tf

    try:
        sm = tf.saved_model.load(str(path))
    except Exception as e:
        raise ModelLoadError(f"cannot load SavedModel {path}: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    sigs = getattr(sm, "signatures", {})
    if "serving_default" not in sigs:
        raise ModelLoadError(
            f"SavedModel {path} has no 'serving_default' signature (has: {list(sigs)}); export it with a serving signature"
        )
    fn = sigs["serving_default"]
    in_specs = fn.structured_input_signature[1]
    out_specs = fn.structured_outputs
    out_keys = sorted(out_specs, key=natural_key)
    inputs = [TensorInfo(k, tuple(s.shape), s.dtype.name) for k, s in sorted(in_specs.items())]
    outputs = [TensorInfo(k, tuple(out_specs[k].shape), out_specs[k].dtype.name) for k in out_keys]
    params = sum(int(np.prod(v.shape)) for v in getattr(sm, "variables", []) if v.trainable) or None
    return LoadedModel(
        path=path,
        format="savedmodel",
        sha256=sha,
        inputs=inputs,
        outputs=outputs,
        output_kinds=["unknown"] * len(outputs),
        saved_model=sm,
        signature_outputs=out_keys,
        params=params,
    )


def _resolve_input_shapes(inputs: list[TensorInfo], overrides: dict[str, tuple[int, ...]],
                          allow_dynamic: bool = False) -> list[TensorInfo]:
    names = [t.name for t in inputs]
    unknown = [k for k in overrides if k not in names]
    if unknown:
        raise UsageError(f"--input-shape names unknown input(s) {unknown}; model inputs: {names}")
    dynamic = [t for t in inputs if t.name not in overrides and any(d is None for d in t.shape[1:])]
    if dynamic and not allow_dynamic:  # all of them in one line (KerasHub backbones have two or three, all of dynamic length)
        flags = " ".join(f"--input-shape {t.name}={','.join('D' if d is None else str(d) for d in t.shape[1:])}"
                         for t in dynamic)
        raise UsageError(
            f"input(s) {', '.join(f'{t.name!r} {_fmt_shape(t.shape)}' for t in dynamic)} have dynamic non-batch "
            f"dimensions; fix them for conversion with {flags} (D: the size to convert for)"
        )
    out = []
    for t in inputs:
        if t.name in overrides:
            shape = (t.shape[0],) + tuple(overrides[t.name])
            if len(shape) != len(t.shape) or any(a is not None and a != b for a, b in zip(t.shape[1:], shape[1:])):
                raise UsageError(
                    f"--input-shape {t.name}={','.join(map(str, shape[1:]))} does not fit the model's input shape "
                    f"{_fmt_shape(t.shape)}"
                )
            t = TensorInfo(t.name, shape, t.dtype)
        if t.dtype not in ("float32", "float16", "float64", "int32", "int64", "uint8", "int8", "bool"):
            raise UsageError(f"input '{t.name}' has dtype {t.dtype}; supported: float, integer and bool inputs")
        out.append(t)
    return out


def _fmt_shape(shape: tuple) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"
