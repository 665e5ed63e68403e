"""Batch manifest: a TOML file listing `kdeploy optimize` jobs, expanded into one `Job` per run.

```toml
[[jobs]]                                  # one table per model (or glob) with its data
model = "models/digits_v*.keras"          # a path, a glob, a models:/ or runs:/ URI, or a list
data = "data/digits.npz"
targets = ["cpu-edge", "mcu"]             # built-in targets and/or `profiles = ["my.toml"]`
input_shapes = { rows = [8, 8] }          # --input-shape rows=8,8
seed = 0
```

Every entry expands to the cross product of its models and its targets (and profile files).
Relative paths are relative to the manifest's folder. A glob that matches nothing, a missing
file or an unknown target is a manifest error (exit 2, before any job runs); a model file that
exists but cannot be loaded fails in its own job.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from kdeploy.errors import KdeployError, ManifestError
from kdeploy.util import one_line, read_toml

# Files and folders of a batch output that job folders must not shadow.
RESERVED_NAMES = ("logs", "summary.json", "summary.md", "summary.junit.xml")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_GLOB_CHARS = re.compile(r"[*?\[]")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JobEntry(_Strict):
    """One `[[jobs]]` table: models × targets with shared options."""

    name: str | None = Field(None, description="Job name (folder under --out); only for an entry that makes one job.")
    model: str | list[str] = Field(description="Model path, glob, or MLflow URI (models:/NAME/VERSION, runs:/...); or a list.")
    data: str | None = Field(None, description="--data file for every model of this entry (none: synthetic inputs).")
    targets: list[str] = Field([], description="Built-in target names (see `kdeploy targets`).")
    profiles: list[str] = Field([], description="Target profile files (TOML).")
    input_shapes: dict[str, list[PositiveInt]] = Field({}, description="--input-shape NAME=D1,D2,... per input name.")
    seed: int = Field(0, description="--seed.")
    trust_custom_code: bool = Field(False, description="--trust-custom-code.")
    custom_objects: str | None = Field(None, description="--custom-objects module.py.")
    num_cpus: float = Field(1.0, gt=0, le=256, description="CPUs the job's Ray task declares.")
    timeout_s: float | None = Field(None, gt=0, description="Stop the job after this many seconds (default: --timeout).")


class Manifest(_Strict):
    jobs: list[JobEntry] = Field(min_length=1, description="The job entries.")


@dataclass(frozen=True)
class Job:
    """One `kdeploy optimize` run of a batch."""

    name: str
    model: str  # absolute path or MLflow URI
    model_label: str  # as the manifest wrote it (a glob's match relative to the manifest folder)
    target: str  # the resolved profile's name
    target_arg: tuple[str, str]  # ("--target", NAME) or ("--profile", absolute path)
    data: str | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    seed: int = 0
    trust_custom_code: bool = False
    custom_objects: str | None = None
    num_cpus: float = 1.0
    timeout_s: float | None = None

    @property
    def is_registry(self) -> bool:
        from kdeploy.registry import is_registry_uri

        return is_registry_uri(self.model)

    def optimize_args(self) -> list[str]:
        """Arguments of `kdeploy optimize` for this job, without `--out`, `--format` and MLflow options.

        A job that declares fewer than two CPUs converts in one process: the conversion lane would
        be a second busy process beside the other jobs' (`run.convert.ConversionLane`).
        """
        args = [self.model, *self.target_arg, "--seed", str(self.seed)]
        if self.num_cpus < 2:
            args.append("--no-parallel")
        if self.data is not None:
            args += ["--data", self.data]
        for name, dims in self.input_shapes.items():
            args += ["--input-shape", f"{name}={','.join(map(str, dims))}"]
        if self.trust_custom_code:
            args.append("--trust-custom-code")
        if self.custom_objects is not None:
            args += ["--custom-objects", self.custom_objects]
        return args


def load_manifest(path: str | Path) -> list[Job]:
    """Reads, validates and expands a batch manifest.

    Args:
        path: the manifest file (TOML).

    Returns:
        The jobs, in manifest order (models, then targets, then profiles within an entry).

    Raises:
        ManifestError: unreadable file, bad TOML, unknown key, invalid value, a glob matching
            nothing, a missing file, an unknown target, or duplicate job names (the message
            names the file and the key).
    """
    path = Path(path)
    raw = read_toml(path, "manifest", ManifestError,
                    f"manifest not found: {path} (allowed: a TOML file with [[jobs]] tables)")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        raise ManifestError(f"invalid manifest {path}: {_validation_message(e)}") from None
    jobs = [job for i, entry in enumerate(manifest.jobs) for job in _expand(path, i, entry)]
    seen: dict[str, int] = {}
    for job in jobs:
        seen[job.name] = seen.get(job.name, 0) + 1
    dupes = sorted(n for n, k in seen.items() if k > 1)
    if dupes:
        raise ManifestError(f"invalid manifest {path}: duplicate job name(s) {', '.join(dupes)}; give each entry "
                            "a distinct `name`, or models/targets that differ")
    return jobs


def _validation_message(e: ValidationError) -> str:
    err = e.errors()[0]
    key = _key(err["loc"])
    if err["type"] == "extra_forbidden":
        model = JobEntry if len(err["loc"]) > 1 and err["loc"][0] == "jobs" else Manifest
        msg = f"unknown key '{key}' (allowed: {', '.join(model.model_fields)})"
    elif err["type"] == "missing":
        msg = f"key '{key}' is required"
    else:
        received = repr(err.get("input"))
        received = received if len(received) <= 80 else received[:77] + "..."
        msg = f"key '{key}': {one_line(err['msg'])} (received {received})"
    more = f" [+{e.error_count() - 1} more problem(s)]" if e.error_count() > 1 else ""
    return msg + more


def _key(loc: tuple) -> str:
    """`jobs[2].model` from pydantic's ('jobs', 2, 'model', ...) (union branch names dropped)."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in ("str", "list[str]") or part.startswith(("list[", "function-")):
            continue
        else:
            text += f".{part}" if text else part
    return text


def _expand(path: Path, i: int, entry: JobEntry) -> list[Job]:
    from kdeploy.profiles import resolve_profile

    where = f"manifest {path}: jobs[{i}]"
    base = path.resolve().parent
    models = _models(base, where, [entry.model] if isinstance(entry.model, str) else entry.model)
    if not entry.targets and not entry.profiles:
        raise ManifestError(f"{where}: give `targets` (built-in names) and/or `profiles` (files); received neither")
    targets: list[tuple[str, tuple[str, str]]] = []
    for key, values in (("targets", entry.targets), ("profiles", entry.profiles)):
        for value in values:
            arg = ("--target", value) if key == "targets" else ("--profile", str(_file(base, where, key, value)))
            try:
                prof = resolve_profile(**({"target": value} if key == "targets" else {"profile_file": arg[1]}))
            except KdeployError as e:
                raise ManifestError(f"{where}.{key}: {e}") from None
            targets.append((prof.name, arg))
    data = str(_file(base, where, "data", entry.data)) if entry.data is not None else None
    custom = str(_file(base, where, "custom_objects", entry.custom_objects)) if entry.custom_objects else None
    count = len(models) * len(targets)
    if entry.name is not None:
        if count != 1:
            raise ManifestError(f"{where}.name: {entry.name!r} names one job, but this entry makes {count} "
                                "(models × targets); drop `name` to get <model>-<target> names")
        _check_name(where, entry.name)
    jobs = []
    for model, label in models:
        for target, arg in targets:
            name = entry.name or _safe_name(f"{_stem(label)}-{target}")
            jobs.append(Job(name=name, model=model, model_label=label, target=target, target_arg=arg, data=data,
                            input_shapes={k: tuple(v) for k, v in entry.input_shapes.items()}, seed=entry.seed,
                            trust_custom_code=entry.trust_custom_code, custom_objects=custom, num_cpus=entry.num_cpus,
                            timeout_s=entry.timeout_s))
    return jobs


def _models(base: Path, where: str, values: list[str]) -> list[tuple[str, str]]:
    """(model argument, label) per model: URIs as given, globs expanded (sorted), paths checked."""
    from kdeploy.registry import is_registry_uri

    if not values:
        raise ManifestError(f"{where}.model: an empty list; allowed: a path, a glob or an MLflow URI, or a list of them")
    models = []
    for value in values:
        if is_registry_uri(value):
            models.append((value, value))
        elif _GLOB_CHARS.search(value):
            pattern = value if Path(value).is_absolute() else str(base / value)
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise ManifestError(f"{where}.model: the glob {value!r} matches nothing (looked in {base})")
            models += [(str(Path(m).resolve()), _label(base, Path(m))) for m in matches]
        else:
            models.append((str(_file(base, where, "model", value)), value))
    return models


def _file(base: Path, where: str, key: str, value: str) -> Path:
    p = Path(value).expanduser()
    p = p if p.is_absolute() else base / p
    if not p.exists():
        raise ManifestError(f"{where}.{key}: {value!r} does not exist (looked for {p})")
    return p.resolve()


def _label(base: Path, p: Path) -> str:
    try:
        return str(p.resolve().relative_to(base))
    except ValueError:
        return str(p)


def _stem(label: str) -> str:
    if label.startswith(("models:/", "runs:/")):
        return label.split(":/", 1)[1].strip("/").replace("/", "-").replace("@", "-")
    return Path(label.rstrip("/")).stem


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip("._-") or "job"
    return name + "_" if name in RESERVED_NAMES else name


def _check_name(where: str, name: str) -> None:
    if not _NAME.fullmatch(name) or name in RESERVED_NAMES:
        raise ManifestError(f"{where}.name: {name!r} is not a usable folder name; allowed: letters, digits, '.', '_', "
                            f"'-' (not starting with '.', '_' or '-'), and not one of {', '.join(RESERVED_NAMES)}")

