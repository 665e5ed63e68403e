"""The Python API: optimize / check / load_report as library calls (the CLI calls only these).

No ML framework is imported here: the orchestration (`kdeploy.run`) is imported on first use.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from kdeploy.registry import is_registry_uri

if TYPE_CHECKING:
    from kdeploy.report.model import Inspection, Report


def optimize(
    model: Any,
    *,
    target: str | None = None,
    profile: str | Path | None = None,
    data: Any = None,
    out: str | Path | None = None,
    formats: Sequence[str] = ("json", "md"),
    mlflow_uri: str | None = None,
    mlflow_experiment: str | None = None,
    **kwargs: Any,
) -> "Report":
    """Builds every candidate the target allows, checks and measures them, selects the best.

    Args:
        model: a `.keras` / `.h5` file or SavedModel folder; an in-memory Keras model (saved to
            a temporary `.keras` file first, then loaded the normal safe way); or an MLflow URI
            `models:/NAME/VERSION`, `models:/NAME@ALIAS` or `runs:/RUN_ID/PATH` (needs `mlflow_uri`,
            and the `mlflow` extra).
        target: built-in target name (or give `profile`).
        profile: path of a target profile file (TOML).
        data: inputs: a `.npz` / `.npy` / `.csv` path, a numpy array (single-input models), or a
            dict of arrays named after the model inputs (optionally `y` labels). None: synthetic.
        out: folder to write the report and artifacts to; None keeps them until `Report.save(out)`.
        formats: report formats to write besides `report.json` (`md`, `html`, `junit`).
        mlflow_uri: MLflow tracking and registry URI (e.g. `sqlite:///mlflow.db`) for MLflow URIs;
            defaults to `$MLFLOW_TRACKING_URI`.
        mlflow_experiment: experiment to log the gate run to (default: the source run's).
        **kwargs: passed to `kdeploy.run.optimize` (`seed`, `trust_custom_code`, `cache`, `retime`, `max_memory_mb`, `parallel`,
            `custom_objects`, `input_shapes`, `progress`, `command`).

    Returns:
        The `Report` (saved to `out` when given).

    Raises:
        UsageError: bad model, profile, data or options (CLI exit 2).
        KdeployError: internal or converter failure (CLI exit 3).
    """
    if is_registry_uri(model):
        return optimize_registered(model, tracking_uri=mlflow_uri, experiment=mlflow_experiment, target=target,
                                   profile=profile, data=data, out=out, formats=formats, **kwargs)
    if isinstance(model, (str, os.PathLike)) and (data is None or isinstance(data, (str, os.PathLike))):
        from kdeploy.run import optimize as run

        return run(model, target=target, profile=profile, data=data, out=out, formats=formats, **kwargs)
    with tempfile.TemporaryDirectory(prefix="kdeploy-api-") as tmp:
        label = None
        if not isinstance(model, (str, os.PathLike)):
            label, model = _save_in_memory(model, Path(tmp))
        data = _save_data(data, Path(tmp))
        return optimize_local(model, label=label, target=target, profile=profile, data=data, out=out,
                              formats=formats, **kwargs)


def optimize_local(model: str | Path, *, label: str | None, out: str | Path | None,
                   formats: Sequence[str] = ("json", "md"), **kwargs: Any) -> "Report":
    """Runs the pipeline on a local model file that stands for `label` (shown as the report's model path).

    `out` is checked before any work, and the report is saved there after its model path was set.
    """
    from kdeploy.run import optimize as run
    from kdeploy.report.model import check_out_dir
    from kdeploy.report.render import validate_formats

    validate_formats(formats)
    if out is not None:
        check_out_dir(Path(out))
    report = run(model, out=None, formats=formats, **kwargs)
    if label is not None:
        report.model.path = label
    if out is not None:
        report.save(out, tuple(formats))
    return report


def check(model: str | Path, artifacts: Sequence[str | Path], **kwargs: Any) -> "Report":
    """Gates artifacts built elsewhere against the reference model; see `kdeploy.run.check`."""
    from kdeploy.run import check as run

    return run(model, artifacts, **kwargs)


def inspect(model: str | Path, **kwargs: Any) -> "Inspection":
    """Readiness before any full conversion; see `kdeploy.inspection.inspect`.

    Returns:
        The `Inspection` (summary, `layers`, `hazards`, `ready`).
    """
    from kdeploy.inspection import inspect as run

    return run(model, **kwargs)


def load_report(path: str | Path) -> "Report":
    """Reads a `report.json` (or an output folder holding one) back into a `Report`.

    Raises:
        UsageError: missing or unreadable file, or not a report of this schema.
    """
    from pydantic import ValidationError

    from kdeploy.diff import load_report as load_dict
    from kdeploy.errors import UsageError
    from kdeploy.report.model import Report

    try:
        return Report.model_validate(load_dict(path))
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise UsageError(f"report {path} does not match this kdeploy's report schema: '{key}': {err['msg']}") from None


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _save_in_memory(model: Any, folder: Path) -> tuple[str, Path]:
    from kdeploy.errors import UsageError

    if not hasattr(model, "save") or not hasattr(model, "inputs"):
        raise UsageError(f"model must be a path, an MLflow URI or a Keras model; received {type(model).__name__}")
    path = folder / "model.keras"
    try:
        model.save(path)
    except Exception as e:
        raise UsageError(f"the in-memory Keras model could not be saved as .keras ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}); allowed: a Keras 3 model that saves to .keras") from None
    return f"<in-memory Keras model {getattr(model, 'name', '')!r}>", path


def _save_data(data: Any, folder: Path) -> Any:
    if data is None or isinstance(data, (str, os.PathLike)):
        return data
    import numpy as np

    from kdeploy.errors import DataError

    if _is_array(data):
        arrays = {"x": np.asarray(data)}
    elif isinstance(data, dict) and all(isinstance(k, str) and _is_array(v) for k, v in data.items()):
        arrays = {k: np.asarray(v) for k, v in data.items()}
    else:
        raise DataError(f"data must be a file path, a numpy array or a dict of arrays; received {type(data).__name__}")
    path = folder / "data.npz"
    np.savez(path, **arrays)
    return path


def optimize_registered(uri: str, *, tracking_uri: str | None = None, experiment: str | None = None,
                        out: str | Path | None = None, formats: Sequence[str] = ("json", "md"),
                        data: Any = None, **kwargs: Any):
    """Gates an MLflow model (download → normal safe path → report) and records the verdict in MLflow.

    Args:
        uri: `models:/NAME/VERSION`, `models:/NAME@ALIAS` or `runs:/RUN_ID/PATH`.
        tracking_uri: MLflow tracking and registry URI; default `$MLFLOW_TRACKING_URI`.
        experiment: experiment for the gate run (default: the source run's experiment).
        out, formats, data, **kwargs: as for `kdeploy.optimize`.

    Returns:
        The Report; `report.model.path` is the URI. The MLflow record is in `report._mlflow`.

    Raises:
        UsageError: bad URI, unknown model/version, no model file, mlflow missing (exit 2).
        RegistryError: the store refused a write (exit 3).
    """
    from kdeploy.registry import _quiet_mlflow, client, download, record, resolve
    from kdeploy.report.model import check_out_dir
    from kdeploy.report.render import validate_formats

    validate_formats(formats)
    if out is not None:
        check_out_dir(Path(out))
    progress = kwargs.get("progress")
    with _quiet_mlflow(), tempfile.TemporaryDirectory(prefix="kdeploy-mlflow-") as tmp:
        c, resolved_uri = client(tracking_uri)
        ref = resolve(uri, c)
        if progress:
            progress("mlflow", f"download {uri}")
        model_path = download(ref, resolved_uri, Path(tmp) / "model")
        data = _save_data(data, Path(tmp))
        report = optimize_local(model_path, label=uri, out=out, formats=formats, data=data, **kwargs)
        if progress:
            progress("mlflow", "log run, tag version" + (" and alias" if ref.name else ""))
        rec = record(report, ref, c, out=Path(out) if out is not None else None, experiment=experiment)
    report._mlflow = rec
    return report
