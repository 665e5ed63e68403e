"""Pre-load scan of untrusted model files: read them as data, refuse what would run code.

Nothing here deserializes a model. `.keras` archives are checked entry by entry (names, sizes,
compression ratios, required members) and their `config.json` is parsed with `json` only; `.h5`
files give up their `model_config` attribute through h5py, never through a Keras loader;
SavedModel graphs are parsed as protobuf and their op types listed. The config walk looks for
what Keras' `safe_mode` guards against and more: Lambda layers, functions serialized as Python
bytecode, classes from modules outside Keras, custom classes, and non-modeling Keras APIs
(`get_file`, `load_model`, ...). What a user did not explicitly trust is refused with
`UnsafeModelError`; everything else becomes findings for the report.

Classes an allow-listed installed package registers (`keras_hub` by default, more with
`trusted_packages`) pass when the config's module and registered name agree on that package
(`module: keras_hub.src...`, `registered_name: keras_hub>BertBackbone`); the loader then imports
the package and checks that it really registers each of them (`kdeploy.loading`).

Run it as `scan_model(path, fmt, trust_custom_code=..., custom_names=..., trusted_packages=...)`;
it returns a `ScanVerdict`: findings as `(severity, code, message)` tuples and the
trusted-package classes the model uses.
"""

from __future__ import annotations

import io
import json
import re
import stat
import struct
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from kdeploy.errors import ModelLoadError, UnsafeModelError, UsageError
from kdeploy.scan_config import Hazard, ScanLimits, ScanResult, walk_config

DEFAULT_TRUSTED_PACKAGES = ("keras_hub",)  # installed packages whose registered classes load without --custom-objects
KERAS_ENTRIES = ("config.json", "metadata.json", "model.weights.h5", "model.weights.npz")
WEIGHT_ENTRIES = ("model.weights.h5", "model.weights.npz")
# SavedModel ops that act outside the tensor graph when the serving signature runs.
SAVEDMODEL_UNSAFE_OPS = frozenset({"WriteFile", "PyFunc", "PyFuncStateless", "EagerPyFunc"})
SAVEDMODEL_READ_OPS = frozenset({
    "ReadFile", "MatchingFiles", "ImmutableConst", "TFRecordDataset", "TextLineDataset",
    "FixedLengthRecordDataset", "LoadAndRemapMatrix",
})


@dataclass(frozen=True)
class TrustedClass:
    """A class (or function) of a trusted package the model uses; the loader verifies it is registered."""

    package: str
    registered_name: str  # "keras_hub>BertBackbone"
    module: str | None  # the module the config names, None for functions
    where: str  # "layer 'bert_backbone' (BertBackbone)"


@dataclass
class ScanVerdict:
    """What the scan let through: findings for the report and the trusted-package classes used."""

    findings: list[tuple[str, str, str]]
    trusted: list[TrustedClass] = field(default_factory=list)


def scan_model(
    path: str | Path,
    fmt: str,
    *,
    trust_custom_code: bool = False,
    custom_names: Iterable[str] = (),
    trusted_packages: Iterable[str] = DEFAULT_TRUSTED_PACKAGES,
    limits: ScanLimits | None = None,
) -> ScanVerdict:
    """Scans a model file as data and refuses what the user did not trust.

    Args:
        path: `.keras` / `.h5` file or SavedModel directory (format already detected).
        fmt: "keras", "h5" or "savedmodel".
        trust_custom_code: accept Python code from the file (Lambda layers, bytecode, unsafe ops).
        custom_names: names of the classes/functions the user provides (`--custom-objects`).
        trusted_packages: installed packages whose registered classes are accepted (checked
            with `check_package_names`).
        limits: size limits; `ScanLimits()` when None.

    Returns:
        The `ScanVerdict`: findings `(severity, code, message)` and trusted-package classes used.

    Raises:
        UnsafeModelError: the file would run code or import modules it was not trusted to, or
            its archive is hostile (path traversal, decompression bomb, symlinks, duplicates).
        ModelLoadError: the file cannot be read as a model (corrupt, truncated, malformed config).
    """
    path = Path(path)
    limits = limits or ScanLimits()
    result = inspect_model(path, fmt, limits)
    return enforce(path, result, trust_custom_code=trust_custom_code, custom_names=set(custom_names),
                   trusted_packages=set(check_package_names(trusted_packages)))


def check_package_names(names: Iterable[str]) -> list[str]:
    """Validates trusted-package names: top-level import names of installed packages, not the standard library.

    Raises:
        UsageError: a name that is not a top-level package name, or a standard-library module
            (`os`, `builtins`, ... would let a config call arbitrary functions).
    """
    out = []
    for name in names:
        if not isinstance(name, str) or not name.isidentifier():
            raise UsageError(f"trusted package {name!r} is not a top-level import name; allowed: e.g. keras_hub")
        if name in sys.stdlib_module_names or name in ("__main__", "builtins"):
            raise UsageError(f"trusted package {name!r} is part of the Python standard library, whose functions "
                             "act outside the model; allowed: installed packages of Keras layers, e.g. keras_hub")
        out.append(name)
    return out


def inspect_model(path: Path, fmt: str, limits: ScanLimits) -> ScanResult:
    """Reads the file as data and lists its hazards; refuses only hostile archives.

    Raises:
        UnsafeModelError: hostile archive structure (never overridable).
        ModelLoadError: unreadable or malformed file.
    """
    if fmt == "keras":
        return _inspect_keras(path, limits)
    if fmt == "h5":
        return _inspect_h5(path, limits)
    if fmt == "savedmodel":
        return _inspect_savedmodel(path, limits)
    raise ModelLoadError(f"cannot scan model format {fmt!r}; allowed: keras, h5, savedmodel")


def enforce(path: Path, result: ScanResult, *, trust_custom_code: bool, custom_names: set[str],
            trusted_packages: set[str] = frozenset()) -> ScanVerdict:
    """Applies the trust policy to a scan result.

    Code (Lambda, bytecode), non-modeling APIs and unsafe SavedModel ops need `trust_custom_code`;
    custom classes need their definition in `custom_names`, a package in `trusted_packages` that
    both their module and registered name name (verified by the loader), or `trust_custom_code`.

    Raises:
        UnsafeModelError: one line naming the first refused item, how many more, and the way out.
    """
    refused: list[Hazard] = []
    trusted: list[TrustedClass] = []
    findings = list(result.findings)
    # One entry per place and kind: a Lambda layer also holds bytecode, reported once.
    hazards = list({(h.kind, h.where): h for h in reversed(result.hazards)}.values())[::-1]
    for h in hazards:
        provided = h.kind == "custom" and any(n in custom_names for n in h.names)
        if provided:
            findings.append(("info", "custom-object", f"{h.text()}; provided by --custom-objects"))
        elif h.kind == "custom" and h.package in trusted_packages:
            trusted.append(TrustedClass(h.package, h.names[0], h.module, h.where))
            findings.append(("info", "trusted-package-class", f"{h.where} is {h.names[0]!r} of trusted package {h.package}"))
        elif trust_custom_code:
            findings.append(("warning", "trusted-code", f"{h.text()}; allowed by --trust-custom-code"))
        else:
            refused.append(h)
    if refused:
        first = refused[0]
        more = f" [+{len(refused) - 1} more: {'; '.join(h.where for h in refused[1:4])}]" if len(refused) > 1 else ""
        if first.kind == "custom":
            way = (f"allowed: Keras built-in classes; pass --custom-objects module.py defining "
                   f"{' or '.join(repr(n) for n in first.names[:2])} if you trust that code")
        else:
            way = "allowed: Keras built-in layers only; pass --trust-custom-code only if you trust this file"
        raise UnsafeModelError(f"refused to load {path}: {first.text()}{more}; {way}")
    summary = (f"pre-load scan of the {result.format} model"
               + (f": {result.layers} layer(s)" if result.format != "savedmodel" else "")
               + (f", {result.entries} archive entries" if result.entries else "")
               + (f", {len(hazards)} item(s) needing trust" if hazards else ", no code or custom classes found"))
    findings.insert(0, ("info", "model-scan", summary))
    return ScanVerdict(findings, trusted)


# ----------------------------------------------------------------------------------------------
# .keras archives
# ----------------------------------------------------------------------------------------------
def _inspect_keras(path: Path, limits: ScanLimits) -> ScanResult:
    result = ScanResult("keras")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ModelLoadError(f"{path} is not a readable .keras archive: {_one_line(e)}") from None
    with zf:
        infos = zf.infolist()
        result.entries = len(infos)
        _check_entries(path, infos, limits)
        names = [i.filename for i in infos]
        missing = [n for n in ("config.json",) if n not in names]
        if missing or not any(w in names for w in WEIGHT_ENTRIES):
            raise ModelLoadError(
                f"{path} is not a complete Keras archive: missing "
                f"{missing[0] if missing else ' or '.join(WEIGHT_ENTRIES)} (entries: {names[:6]}); "
                "a .keras file holds config.json, metadata.json and model.weights.h5"
            )
        if "metadata.json" not in names:
            result.findings.append(("warning", "archive-metadata-missing",
                                    f"{path.name} has no metadata.json (Keras writes one); the saving Keras version is unknown"))
        else:
            meta = _read_json(path, zf, "metadata.json", limits)
            version = meta.get("keras_version") if isinstance(meta, dict) else None
            if isinstance(version, str):
                result.findings.append(("info", "saved-keras-version", f"{path.name} was saved with Keras {version[:32]}"))
        extra = [n for n in names if n not in KERAS_ENTRIES and not n.startswith("assets/")]
        if extra:
            result.findings.append(("warning", "archive-extra-entries",
                                    f"{path.name} holds entries Keras does not write and will not read: {extra[:5]}"))
        bad = _test_crc(path, zf)
        if bad:
            raise ModelLoadError(f"{path} is a corrupt .keras archive: {bad}")
        config = _read_json(path, zf, "config.json", limits)
        if "model.weights.h5" in names:
            info = zf.getinfo("model.weights.h5")
            if info.compress_type == zipfile.ZIP_STORED:  # readable in place; Keras writes it stored
                with _StoredMember(path, info) as f:
                    _check_h5_structure(path, f, "model.weights.h5", limits)
    walk_config(config, result, limits, legacy=False, path=path)
    return result


class _StoredMember(io.RawIOBase):
    """A stored (uncompressed) zip member read in place from the archive file, with O(1) seeks.

    zipfile's own reader rewinds to the member's start for every backward seek, and HDF5 reads
    at scattered offsets: walking MobileNetV2's weights took 0.8 s that way here.
    """

    def __init__(self, path: Path, info: zipfile.ZipInfo):
        super().__init__()
        self._f = open(path, "rb")
        try:
            self._f.seek(info.header_offset)
            head = self._f.read(30)
            if len(head) < 30 or head[:4] != b"PK\x03\x04" or info.compress_size != info.file_size:
                raise zipfile.BadZipFile(f"bad local header for {info.filename}")
            name_len, extra_len = struct.unpack("<HH", head[26:30])
        except BaseException:
            self._f.close()
            raise
        self._start, self._size, self._pos = info.header_offset + 30 + name_len + extra_len, info.file_size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buffer).cast("B")[:n]) or 0
        self._pos += got
        return got

    def close(self) -> None:
        self._f.close()
        super().close()


def _check_entries(path: Path, infos: list[zipfile.ZipInfo], limits: ScanLimits) -> None:
    if len(infos) > limits.max_entries:
        raise UnsafeModelError(f"refused to load {path}: {len(infos)} archive entries (allowed: at most {limits.max_entries})")
    seen: set[str] = set()
    total = 0
    for i in infos:
        name = i.filename
        parts = re.split(r"[/\\]", name)
        if (name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts or "\0" in name):
            raise UnsafeModelError(
                f"refused to load {path}: archive entry {name!r} points outside the archive "
                "(absolute path or '..'); allowed: relative names such as config.json"
            )
        if name in seen:
            raise UnsafeModelError(f"refused to load {path}: archive entry {name!r} appears twice; a Keras archive has unique names")
        seen.add(name)
        if stat.S_ISLNK(i.external_attr >> 16):
            raise UnsafeModelError(f"refused to load {path}: archive entry {name!r} is a symbolic link; Keras archives hold none")
        if i.flag_bits & 0x1:
            raise ModelLoadError(f"{path}: archive entry {name!r} is encrypted; a .keras archive is not")
        if i.file_size > limits.max_entry_bytes:
            raise UnsafeModelError(
                f"refused to load {path}: entry {name!r} unpacks to {i.file_size:,} bytes "
                f"(allowed: at most {limits.max_entry_bytes:,})"
            )
        if i.file_size > limits.ratio_floor_bytes and i.file_size > limits.max_ratio * max(i.compress_size, 1):
            raise UnsafeModelError(
                f"refused to load {path}: entry {name!r} unpacks {i.compress_size:,} bytes to {i.file_size:,} "
                f"(ratio {i.file_size / max(i.compress_size, 1):.0f}, allowed: at most {limits.max_ratio:.0f}); "
                "a decompression bomb"
            )
        total += i.file_size
    if total > limits.max_total_bytes:
        raise UnsafeModelError(
            f"refused to load {path}: entries unpack to {total:,} bytes in all (allowed: at most {limits.max_total_bytes:,})"
        )


def _test_crc(path: Path, zf: zipfile.ZipFile) -> str | None:
    try:
        bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as e:
        return _one_line(e)
    return f"bad CRC in entry {bad!r}" if bad is not None else None


def _read_json(path: Path, zf: zipfile.ZipFile, name: str, limits: ScanLimits) -> Any:
    info = zf.getinfo(name)
    if info.file_size > limits.max_config_bytes:
        raise UnsafeModelError(
            f"refused to load {path}: {name} is {info.file_size:,} bytes (allowed: at most {limits.max_config_bytes:,})"
        )
    try:
        with zf.open(info) as f:
            raw = f.read(limits.max_config_bytes + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as e:
        raise ModelLoadError(f"{path} is a corrupt .keras archive: cannot read {name}: {_one_line(e)}") from None
    return _parse_json(raw, f"{path}:{name}")


def _parse_json(raw: bytes | str, where: str) -> Any:
    """Parses JSON as plain data; duplicate keys are refused (two parsers could disagree on them)."""

    def pairs(items: list[tuple[str, Any]]) -> dict:
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise UnsafeModelError(f"refused to load {where}: key {dup!r} appears twice in one object; allowed: unique keys")
        return dict(items)

    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, object_pairs_hook=pairs)
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{where} is not UTF-8 JSON: {_one_line(e)}") from None
    except RecursionError:
        raise ModelLoadError(f"{where} is nested too deeply to be a model config") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{where} is not valid JSON: {_one_line(e)}") from None


# ----------------------------------------------------------------------------------------------
# .h5 files
# ----------------------------------------------------------------------------------------------
def _inspect_h5(path: Path, limits: ScanLimits) -> ScanResult:
    import h5py

    result = ScanResult("h5")
    try:
        f = h5py.File(path, "r")
    except Exception as e:  # h5py raises OSError for most damage, other types for odd files
        raise ModelLoadError(f"{path} is not a readable HDF5 file: {_one_line(e)}") from None
    with f:
        if "model_config" not in f.attrs:
            raise ModelLoadError(
                f"{path} holds no model_config (a weights-only .h5?); allowed: a full model saved with model.save()"
            )
        try:
            raw = f.attrs["model_config"]
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot read its model_config attribute: {_one_line(e)}") from None
        if hasattr(raw, "tobytes") and not isinstance(raw, (bytes, str)):
            raw = raw.tobytes()
        if not isinstance(raw, (bytes, str)):
            raise ModelLoadError(f"{path}: model_config is a {type(raw).__name__}; allowed: a JSON string")
        if len(raw) > limits.max_config_bytes:
            raise UnsafeModelError(
                f"refused to load {path}: model_config is {len(raw):,} bytes (allowed: at most {limits.max_config_bytes:,})"
            )
        version = f.attrs.get("keras_version")
        if isinstance(version, (bytes, str)):
            version = version.decode("utf-8", "replace") if isinstance(version, bytes) else version
            result.findings.append(("info", "saved-keras-version", f"{path.name} was saved with Keras {version[:32]}"))
        _check_h5_structure(path, f, None, limits)
    config = _parse_json(raw, f"{path}:model_config")
    walk_config(config, result, limits, legacy=True, path=path)
    return result


def _check_h5_structure(path: Path, source: Any, inner: str | None, limits: ScanLimits) -> None:
    """Refuses HDF5 links to other files, external or virtual datasets, and shape bombs."""
    import h5py

    where = f"{path}:{inner}" if inner else str(path)
    try:
        f = source if isinstance(source, h5py.File) else h5py.File(source, "r")
    except Exception as e:
        raise ModelLoadError(f"{where} is not a readable HDF5 file: {_one_line(e)}") from None
    problems: list[str] = []
    declared = stored = 0

    def visit(name: str, link: Any) -> None:
        nonlocal declared, stored
        if isinstance(link, h5py.ExternalLink):
            problems.append(f"'{name}' is a link to another file ({link.filename})")
            return
        if isinstance(link, h5py.SoftLink):
            return  # resolves inside this file
        obj = f.get(name)
        if isinstance(obj, h5py.Dataset):
            if obj.external:
                problems.append(f"dataset '{name}' stores its data in another file")
            elif obj.is_virtual:
                problems.append(f"dataset '{name}' is virtual (maps other files)")
            else:
                declared += int(obj.size) * obj.dtype.itemsize
                stored += int(obj.id.get_storage_size())

    try:
        f.visititems_links(visit)
    except Exception as e:
        raise ModelLoadError(f"{where} is a corrupt HDF5 file: {_one_line(e)}") from None
    finally:
        if f is not source:
            f.close()
    if problems:
        raise UnsafeModelError(f"refused to load {where}: {problems[0]}; allowed: self-contained HDF5 weights")
    if declared > limits.max_total_bytes or (declared > limits.ratio_floor_bytes and declared > limits.max_ratio * 10 * max(stored, 1)):
        raise UnsafeModelError(
            f"refused to load {where}: datasets declare {declared:,} bytes but store {stored:,} "
            f"(allowed: at most {limits.max_total_bytes:,} bytes, expansion at most {limits.max_ratio * 10:.0f}x)"
        )


# ----------------------------------------------------------------------------------------------
# SavedModel directories
# ----------------------------------------------------------------------------------------------
def _inspect_savedmodel(path: Path, limits: ScanLimits) -> ScanResult:
    result = ScanResult("savedmodel")
    pb = path / "saved_model.pb"
    size = pb.stat().st_size
    if size > 2 << 30:  # protobuf's own limit
        raise UnsafeModelError(f"refused to load {path}: saved_model.pb is {size:,} bytes (allowed: at most 2 GiB)")
    links = [p for p in path.rglob("*") if p.is_symlink()]
    outside = [p for p in links if not p.resolve().is_relative_to(path.resolve())]
    if outside:
        raise UnsafeModelError(
            f"refused to load {path}: {outside[0].relative_to(path)} is a symbolic link to "
            f"{outside[0].resolve()} outside the SavedModel; allowed: files inside the directory"
        )
    from kdeploy.util import native_quiet

    with native_quiet():
        from tensorflow.core.protobuf import saved_model_pb2
        from google.protobuf.message import DecodeError

    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString(pb.read_bytes())
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{pb} is not a SavedModel protobuf: {_one_line(e)}") from None
    ops: dict[str, list[str]] = {}
    for mg in proto.meta_graphs:
        for n in mg.graph_def.node:
            ops.setdefault(n.op, []).append(n.name)
        for fn in mg.graph_def.library.function:
            for n in fn.node_def:
                ops.setdefault(n.op, []).append(f"{fn.signature.name}/{n.name}")
    for op in sorted(SAVEDMODEL_UNSAFE_OPS & set(ops)):
        result.hazards.append(Hazard("op", f"op {ops[op][0]!r} ({op})",
                                     "acts outside the tensor graph (writes files or calls Python) when the model runs"))
    reads = sorted(SAVEDMODEL_READ_OPS & set(ops))
    if reads:
        result.findings.append(("warning", "savedmodel-reads-files",
                                f"the SavedModel graph reads files when it runs (ops {reads}); check what it reads"))
    assets = [p for p in (path / "assets").rglob("*") if p.is_file()] if (path / "assets").is_dir() else []
    result.findings.append((
        "info", "savedmodel-not-fully-inspected",
        f"a SavedModel is a TensorFlow program: kdeploy checked its {len(ops)} op types for file writes and Python "
        f"calls, but cannot vouch for op attributes, restore functions or its {len(assets)} asset file(s)",
    ))
    return result


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__
