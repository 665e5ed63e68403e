"""MLflow model-registry gate: gate a registered model version and record the verdict on it.

`kdeploy optimize models:/NAME/VERSION --target T --mlflow-uri URI`:
1. resolves the URI (`models:/NAME/VERSION`, `models:/NAME@ALIAS`, `runs:/RUN_ID/PATH`) and
   downloads the artifact to a temporary folder; the model file in it (`.keras`, `.h5` or a
   SavedModel folder) then goes through the normal safe loading path;
2. logs an MLflow run (in the source run's experiment, or `experiment`): params, metrics,
   tags and the whole output folder (report, artifacts) as run artifacts;
3. for a model version, sets tags `kdeploy.ready`, `kdeploy.target`, `kdeploy.selected`,
   `kdeploy.report_run` (and `kdeploy.<target>.ready` / `.selected`, so several targets can be
   gated on one version), and the alias `deploy-ready-<target>` when ready; when not ready, the
   alias is removed if it points at this version (an alias on another, earlier gated version is
   left alone).

MLflow is an optional extra (`pip install 'kdeploy[mlflow]'`) imported only here, lazily.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdeploy.errors import KdeployError, UsageError
from kdeploy.util import one_line

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
ALIAS_PREFIX = "deploy-ready-"


REGISTRY_SCHEMES = ("models:/", "runs:/")


def is_registry_uri(model: Any) -> bool:
    """True for an MLflow model URI (`models:/NAME/VERSION`, `models:/NAME@ALIAS`, `runs:/RUN/PATH`)."""
    return isinstance(model, str) and model.startswith(REGISTRY_SCHEMES)


class RegistryError(KdeployError):
    """The MLflow store failed while recording a verdict (exit 3)."""

    exit_code = 3


@dataclass
class ModelRef:
    """What an MLflow model URI points at."""

    uri: str
    download_uri: str | None = None  # where the artifact is (a version's source), resolved against the store
    name: str | None = None  # registered model name (models:/ only)
    version: str | None = None
    run_id: str | None = None  # run that produced the artifact, when known
    experiment_id: str | None = None


@dataclass
class GateRecord:
    """What was written to MLflow for one gated model."""

    run_id: str
    experiment_id: str
    tags: dict[str, str] = field(default_factory=dict)
    alias: str | None = None
    alias_set: bool = False
    alias_removed: bool = False


def _mlflow():
    try:
        import mlflow
        from mlflow import MlflowClient
    except ImportError:
        raise UsageError("an MLflow URI was given but mlflow is not installed; install the extra: "
                         "pip install 'kdeploy[mlflow]'") from None
    return mlflow, MlflowClient


@contextlib.contextmanager
def _quiet_mlflow():
    """No download progress bars or store-migration INFO lines from MLflow (library code prints nothing)."""
    old_env = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    loggers = [logging.getLogger(n) for n in ("mlflow", "alembic")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if old_env is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = old_env


def alias_for(target: str) -> str:
    """The alias a ready version gets: `deploy-ready-<target>` (characters MLflow refuses become '-')."""
    return ALIAS_PREFIX + re.sub(r"[^A-Za-z0-9_-]", "-", target)


def client(tracking_uri: str | None):
    """An MlflowClient on `tracking_uri` (also the registry URI), else `$MLFLOW_TRACKING_URI`.

    Raises:
        UsageError: no URI, or mlflow missing.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UsageError("an MLflow model URI needs --mlflow-uri (or $MLFLOW_TRACKING_URI), e.g. "
                         "--mlflow-uri sqlite:///mlflow.db")
    _, MlflowClient = _mlflow()
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def resolve(uri: str, c) -> ModelRef:
    """Parses and resolves a `models:/` or `runs:/` URI against the store.

    Raises:
        UsageError: malformed URI, unknown model, version, alias or run.
    """
    from mlflow.exceptions import MlflowException

    ref = ModelRef(uri=uri)
    try:
        if uri.startswith("models:/"):
            rest = uri[len("models:/"):].strip("/")
            if "@" in rest:
                ref.name, alias = rest.split("@", 1)
                mv = c.get_model_version_by_alias(ref.name, alias)
            else:
                parts = rest.split("/")
                if len(parts) != 2 or not parts[0] or not parts[1].isdigit():
                    raise UsageError(f"model URI {uri!r} is not models:/NAME/VERSION or models:/NAME@ALIAS "
                                     "(VERSION a number)")
                ref.name = parts[0]
                mv = c.get_model_version(ref.name, parts[1])
            ref.version, ref.run_id = str(mv.version), mv.run_id or None
            ref.download_uri = c.get_model_version_download_uri(ref.name, ref.version)
        elif uri.startswith("runs:/"):
            parts = uri[len("runs:/"):].strip("/").split("/", 1)
            if not parts[0]:
                raise UsageError(f"model URI {uri!r} is not runs:/RUN_ID/PATH")
            ref.run_id, ref.download_uri = parts[0], uri
        else:
            raise UsageError(f"model URI {uri!r}: allowed schemes are models:/ and runs:/")
        if ref.run_id:
            ref.experiment_id = c.get_run(ref.run_id).info.experiment_id
    except MlflowException as e:
        raise UsageError(f"MLflow cannot resolve {uri}: {one_line(e)}") from None
    return ref


def download(ref: ModelRef, tracking_uri: str, dest: Path) -> Path:
    """Downloads the artifact of `ref` into `dest`; returns the model file (or SavedModel folder) in it.

    Raises:
        UsageError: the download fails, or the artifact holds no model file or several.
    """
    mlflow, _ = _mlflow()
    from mlflow.exceptions import MlflowException

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.download_uri or ref.uri, dst_path=str(dest),
                                                         tracking_uri=tracking_uri))
    except (MlflowException, OSError) as e:
        raise UsageError(f"cannot download {ref.uri} from MLflow: {one_line(e)}") from None
    if local.is_file():
        found = [local] if local.suffix.lower() in MODEL_SUFFIXES else []
    elif (local / "saved_model.pb").is_file():
        found = [local]
    else:
        found = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES)
        found += sorted(p.parent for p in local.rglob("saved_model.pb"))
    if len(found) != 1:
        listing = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())[:10]
        raise UsageError(f"{ref.uri}: expected exactly one model file ({', '.join(MODEL_SUFFIXES)} or a SavedModel "
                         f"folder) in the artifact, found {len(found)} (files: {listing})")
    return found[0]


def record(report, ref: ModelRef, c, *, out: Path | None, experiment: str | None = None) -> GateRecord:
    """Logs the gate run and sets the version's tags and alias.

    Args:
        report: the `Report` of the gate.
        ref: the resolved model URI.
        c: the MlflowClient.
        out: the output folder to log as run artifacts (None: the report files only).
        experiment: experiment name for the run; default the source run's experiment, else "kdeploy".

    Returns:
        The GateRecord of what was written.

    Raises:
        RegistryError: the store refused a write.
    """
    from mlflow.exceptions import MlflowException

    from kdeploy.report.figures import as_dict, budget_latency_ms, latency_percentile, primary_artifact

    rd = as_dict(report)
    target = rd["target"]["name"]
    ready = bool(rd["ready"])
    selected = rd.get("selected") or "none"
    try:
        exp_id = ref.experiment_id
        if experiment is not None or exp_id is None:
            name = experiment or "kdeploy"
            exp = c.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else c.create_experiment(name)
        label = f"{ref.name} v{ref.version}" if ref.name else ref.uri
        run = c.create_run(exp_id, run_name=f"kdeploy {target}: {label}", tags={
            "kdeploy.target": target, "kdeploy.ready": str(ready).lower(), "kdeploy.selected": selected,
            "kdeploy.model_uri": ref.uri, "kdeploy.model_sha256": rd["model"]["sha256"],
            "kdeploy.version": (rd.get("tool") or {}).get("version", "?"),
            **({"kdeploy.source_run": ref.run_id} if ref.run_id else {}),
        })
        rid = run.info.run_id
        for k, v in {"target": target, "selected": selected, "model_uri": ref.uri,
                     "candidates": len(rd.get("candidates") or [])}.items():
            c.log_param(rid, k, v)
        pct = latency_percentile(rd)
        c.log_metric(rid, "ready", 1.0 if ready else 0.0)
        for cd in rd.get("candidates") or []:
            prefix = f"{cd['name']}."
            art = primary_artifact(rd, cd)
            lat = budget_latency_ms(rd, cd)
            c.log_metric(rid, prefix + "passed", 1.0 if cd.get("passed") else 0.0)
            if art is not None:
                c.log_metric(rid, prefix + "size_bytes", float(art["size_bytes"]))
                c.log_metric(rid, prefix + "gzip_bytes", float(art["gzip_bytes"]))
            if lat is not None:
                c.log_metric(rid, prefix + f"latency_{pct}_ms", float(lat))
            if cd["name"] == rd.get("selected"):
                if art is not None:
                    c.log_metric(rid, "selected.size_bytes", float(art["size_bytes"]))
                if lat is not None:
                    c.log_metric(rid, f"selected.latency_{pct}_ms", float(lat))
        if out is not None:
            c.log_artifacts(rid, str(out), artifact_path="kdeploy")
        else:
            from kdeploy.report.render import write_formats

            with tempfile.TemporaryDirectory(prefix="kdeploy-mlflow-") as tmp:
                write_formats(report, Path(tmp), ("json", "md", "html"))
                c.log_artifacts(rid, tmp, artifact_path="kdeploy")
        c.set_terminated(rid, "FINISHED")
        rec = GateRecord(run_id=rid, experiment_id=str(exp_id))
        if ref.name and ref.version:
            rec.tags = {"kdeploy.ready": str(ready).lower(), "kdeploy.target": target, "kdeploy.selected": selected,
                        "kdeploy.report_run": rid, f"kdeploy.{target}.ready": str(ready).lower(),
                        f"kdeploy.{target}.selected": selected}
            for k, v in rec.tags.items():
                c.set_model_version_tag(ref.name, ref.version, k, v)
            rec.alias = alias_for(target)
            if ready:
                c.set_registered_model_alias(ref.name, rec.alias, ref.version)
                rec.alias_set = True
            else:
                current = _alias_version(c, ref.name, rec.alias)
                if current == ref.version:
                    c.delete_registered_model_alias(ref.name, rec.alias)
                    rec.alias_removed = True
        return rec
    except MlflowException as e:
        raise RegistryError(f"MLflow refused to record the verdict for {ref.uri}: {one_line(e)}") from None


def _alias_version(c, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(c.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None
