"""Input data: .npz / .npy / CSV, or synthetic inputs from the signature; disjoint splits."""

from __future__ import annotations

import csv
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdeploy.errors import DataError
from kdeploy.loading import TensorInfo

DATA_SUFFIXES = (".npz", ".npy", ".csv")


@dataclass
class Dataset:
    inputs: dict[str, np.ndarray]  # model input name -> (N, ...) array
    labels: dict[str, np.ndarray] | None  # "y" or "y_<output>" -> labels
    synthetic: bool
    source: str

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, idx: np.ndarray) -> "Dataset":
        labels = {k: v[idx] for k, v in self.labels.items()} if self.labels else None
        return Dataset({k: v[idx] for k, v in self.inputs.items()}, labels, self.synthetic, self.source)


def load_data(path: str | Path, inputs: list[TensorInfo]) -> Dataset:
    """Reads `--data` and checks it against the model inputs.

    Raises:
        DataError: unreadable file, unknown format, or arrays that do not fit the model inputs.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path} (allowed: {', '.join(DATA_SUFFIXES)})")
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise DataError(f"unsupported data file '{path.name}'; allowed: {', '.join(DATA_SUFFIXES)}")
    labels: dict[str, np.ndarray] | None = None
    try:
        if suffix == ".npz":
            arrays, labels = _read_npz(path, inputs)
        elif suffix == ".npy":
            arrays = {_single(inputs, path).name: _array(np.load(path, allow_pickle=False), path, "its content")}
        else:
            arrays = {_single(inputs, path).name: _read_csv(path)}
    except DataError:
        raise
    except _READ_ERRORS as e:  # damaged files surface as any of these from numpy, zipfile, zlib, csv
        raise DataError(f"cannot read data file {path} as {suffix}: {type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}") from None
    checked = {t.name: _check_array(arrays[t.name], t, path) for t in inputs}
    counts = {len(a) for a in checked.values()}
    if len(counts) != 1:
        raise DataError(f"data arrays in {path} have different sample counts {sorted(counts)}; they must match")
    n = counts.pop()
    if n < 2:
        raise DataError(f"data file {path} has {n} sample(s); at least 2 are needed (calibration + validation)")
    if labels:
        labels = {k: v for k, v in labels.items() if len(v) == n}
    return Dataset(checked, labels or None, synthetic=False, source=str(path))


def data_signature(path: str | Path) -> list[TensorInfo]:
    """The data's arrays as inputs, read cheaply (array headers only): the signature of a model without
    symbolic inputs (`kdeploy.subclassed`).

    A `.npz` gives one input per array that is not a label (`y`, `y_<output>`), named after it; a
    `.npy` or CSV one input named `input_0`. float64 becomes float32 (Keras' float type).

    Raises:
        DataError: unreadable file, unknown format, or no input arrays.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file() or suffix not in DATA_SUFFIXES:
        raise DataError(f"data file {path} is not a readable {'/'.join(DATA_SUFFIXES)} file")
    try:
        if suffix == ".npz":
            with zipfile.ZipFile(path) as z:
                found = []
                for entry in z.namelist():
                    name = entry[:-4] if entry.endswith(".npy") else entry
                    if name == "y" or name.startswith("y_"):
                        continue
                    with z.open(entry) as f:
                        fmt = np.lib.format
                        read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
                        shape, _, dtype = read(f)
                    found.append((name, tuple(shape), dtype))
        elif suffix == ".npy":
            a = np.load(path, mmap_mode="r", allow_pickle=False)
            found = [("input_0", a.shape, a.dtype)]
        else:
            found = [("input_0", _read_csv(path).shape, np.dtype(np.float32))]
    except DataError:
        raise
    except _READ_ERRORS as e:
        raise DataError(f"cannot read data file {path} as {suffix}: {type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}") from None
    if not found:
        raise DataError(f"data file {path} has no input arrays (only labels y / y_<output>)")
    out = []
    for name, shape, dtype in found:
        if dtype.kind not in "fiub" or len(shape) < 1:
            raise DataError(f"array '{name}' in {path.name} has dtype {dtype} and shape {shape}; "
                            "allowed: numeric arrays with a batch axis")
        out.append(TensorInfo(name, (None, *shape[1:]), "float32" if dtype == np.float64 else dtype.name))
    return out


_READ_ERRORS = (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError, IndexError, TypeError, zlib.error,
                struct.error, csv.Error, MemoryError, OverflowError, NotImplementedError, RuntimeError)


def _array(value: object, path: Path, what: str) -> np.ndarray:
    """The value numpy read, if it is an array (a .npz member that is not .npy comes back as bytes)."""
    if not isinstance(value, np.ndarray):
        raise DataError(f"{what} in {path.name} is not a NumPy array (got {type(value).__name__}); "
                        "allowed: arrays saved with numpy.save / numpy.savez")
    return value


def _single(inputs: list[TensorInfo], path: Path) -> TensorInfo:
    if len(inputs) != 1:
        raise DataError(
            f"{path.suffix} data holds one array but the model has {len(inputs)} inputs "
            f"({[t.name for t in inputs]}); use a .npz with one array per input name"
        )
    return inputs[0]


def _read_npz(path: Path, inputs: list[TensorInfo]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as z:
        keys = list(z.keys())
        arrays: dict[str, np.ndarray] = {}
        for i, t in enumerate(inputs):
            if t.name in keys:
                arrays[t.name] = _array(z[t.name], path, f"array '{t.name}'")
            elif len(inputs) == 1 and "x" in keys:
                arrays[t.name] = _array(z["x"], path, "array 'x'")
            else:
                wanted = f"'{t.name}'" + (" or 'x'" if len(inputs) == 1 else "")
                raise DataError(f"{path} has no array for model input {wanted} (arrays: {keys})")
        labels = {k: z[k] for k in keys if k == "y" or k.startswith("y_")}
        labels = {k: v for k, v in labels.items() if isinstance(v, np.ndarray) and v.ndim >= 1}
    return arrays, labels


def _read_csv(path: Path) -> np.ndarray:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"CSV data file {path} is empty")
    try:
        [float(c) for c in rows[0]]
    except ValueError:
        rows = rows[1:]  # header row
    if not rows:
        raise DataError(f"CSV data file {path} has a header row but no data rows; allowed: one row per sample")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise DataError(f"CSV rows in {path} have different lengths {sorted(widths)}; all rows need the same columns")
    try:
        return np.array([[float(c) for c in r] for r in rows], dtype=np.float32)
    except ValueError as e:
        raise DataError(f"CSV data file {path} has a non-numeric value: {e}") from None


def _check_array(a: np.ndarray, t: TensorInfo, path: Path) -> np.ndarray:
    want = t.shape[1:]
    if a.dtype.kind not in "fiub":
        raise DataError(f"data for input '{t.name}' in {path.name} has dtype {a.dtype}; allowed: numeric arrays")
    if a.ndim == len(want) and len(want) >= 1 and tuple(a.shape) == tuple(want):
        raise DataError(
            f"data for input '{t.name}' in {path.name} has shape {a.shape}, which looks like one sample without "
            f"the batch axis; expected (N, {', '.join(map(str, want))})"
        )
    if a.ndim != len(want) + 1 or tuple(a.shape[1:]) != tuple(want):
        raise DataError(
            f"data for input '{t.name}' in {path.name} has shape {a.shape}; "
            f"the model expects (N, {', '.join(map(str, want))})"
        )
    a = a.astype(t.dtype if t.dtype != "bool" else np.bool_, copy=False)
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise DataError(f"data for input '{t.name}' in {path.name} has {bad} NaN/Inf value(s); allowed: finite values")
    return a


def synthetic_data(inputs: list[TensorInfo], n: int, seed: int) -> Dataset:
    """Inputs drawn from the signature: floats uniform in [0, 1), integers in {0, 1} (valid ids for any
    embedding, segment or mask input: a wider range indexed out of a BERT's two segment embeddings)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for t in inputs:
        shape = (n,) + tuple(t.shape[1:])
        if t.dtype.startswith("float"):
            arrays[t.name] = rng.random(shape, dtype=np.float32).astype(t.dtype)
        elif t.dtype == "bool":
            arrays[t.name] = rng.random(shape) < 0.5
        else:
            arrays[t.name] = rng.integers(0, 2, shape).astype(t.dtype)
    return Dataset(arrays, None, synthetic=True, source="synthetic")


def split(ds: Dataset, calibration_samples: int, seed: int) -> tuple[Dataset, Dataset]:
    """Disjoint calibration and validation sets; validation gets at least half of the samples."""
    n = len(ds)
    idx = np.random.default_rng(seed).permutation(n)
    n_cal = max(1, min(calibration_samples, n // 2))
    return ds.take(np.sort(idx[:n_cal])), ds.take(np.sort(idx[n_cal:]))


def hold_back(val: Dataset, extra: int, min_validation: int, seed: int) -> tuple[Dataset | None, Dataset]:
    """Up to `extra` random samples of the validation split held back as spare calibration data, where validation
    keeps at least `min_validation` (`[calibration]`, the calibration repair's larger calibration set).

    Returns:
        (the spare samples or None, the validation samples left); both disjoint from calibration.
    """
    n = len(val)
    k = min(extra, n - min_validation)
    if k <= 0:
        return None, val
    idx = np.random.default_rng(seed + 1).permutation(n)
    return val.take(np.sort(idx[:k])), val.take(np.sort(idx[k:]))
