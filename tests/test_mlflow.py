"""MLflow registry gate against a real local MLflow store (sqlite + local artifacts) created here."""

import json
import os
import subprocess
import sys

import pytest

import kdeploy

from conftest import FIXTURES, make_profile

if os.environ.get("CI") != "true":
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")


def kdeploy_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", CI="true")
    return subprocess.run([sys.executable, "-m", "kdeploy", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=900)


@pytest.fixture
def store(tmp_path):
    """A registry holding model 'digits' version 1 and 2: the digits CNN logged as a .keras run artifact."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("training", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp)
    client.log_artifact(run.info.run_id, str(FIXTURES / "digits_cnn.keras"), artifact_path="model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("digits")
    for _ in range(2):
        client.create_model_version("digits", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    return uri, client, exp


def test_ready_model_version_gets_tags_alias_and_a_logged_run(store, tmp_path):
    uri, client, exp = store
    profile = make_profile(tmp_path, "cpu-edge", precisions=["fp32", "int8"], crosscheck_runtimes=[], threads=[1])
    out = tmp_path / "out"
    res = kdeploy_cli("optimize", "models:/digits/1", "--mlflow-uri", uri, "--profile", profile,
                      "--data", FIXTURES / "digits.npz", "--out", out, "--format", "json,html", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    rd = json.loads((out / "report.json").read_text())
    assert rd["ready"] and rd["model"]["path"] == "models:/digits/1"
    tags = client.get_model_version("digits", "1").tags
    assert tags["kdeploy.ready"] == "true"
    assert tags["kdeploy.target"] == rd["target"]["name"] == "cpu-edge"
    assert tags["kdeploy.selected"] == rd["selected"]
    assert str(client.get_model_version_by_alias("digits", "deploy-ready-cpu-edge").version) == "1"
    run = client.get_run(tags["kdeploy.report_run"])
    assert run.info.experiment_id == exp, "the gate run sits next to the training run"
    assert run.data.tags["kdeploy.ready"] == "true" and run.data.metrics["ready"] == 1.0
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "kdeploy")}
    assert {"kdeploy/report.json", "kdeploy/report.html", "kdeploy/artifacts"} <= logged
    assert not (tmp_path / "mlruns").exists(), "nothing written outside the store's artifact location"


def test_not_ready_version_is_tagged_and_loses_only_its_own_alias(store, tmp_path):
    uri, client, _ = store
    alias = "deploy-ready-cpu-edge"
    # A 1 KB budget no digits CNN artifact fits in: every candidate fails, the version is not ready.
    profile = make_profile(tmp_path, "cpu-edge", precisions=["fp32"], crosscheck_runtimes=[], threads=[1],
                           budgets={"max_size_bytes": 1000})
    client.set_registered_model_alias("digits", alias, "1")
    report = kdeploy.optimize("models:/digits/2", mlflow_uri=uri, profile=profile, data=FIXTURES / "digits.npz")
    assert not report.ready
    assert client.get_model_version("digits", "2").tags["kdeploy.ready"] == "false"
    assert client.get_model_version("digits", "2").tags["kdeploy.selected"] == "none"
    assert str(client.get_model_version_by_alias("digits", alias).version) == "1", "another version's alias stays"
    assert report._mlflow.alias_removed is False

    report = kdeploy.optimize("models:/digits@" + alias, mlflow_uri=uri, profile=profile, data=FIXTURES / "digits.npz")
    assert not report.ready and report._mlflow.alias_removed
    assert client.get_model_version("digits", "1").tags["kdeploy.ready"] == "false"
    assert "deploy-ready-cpu-edge" not in client.get_registered_model("digits").aliases


def test_bad_registry_uris_are_one_line_errors_with_exit_2(store, tmp_path):
    uri, _, _ = store
    res = kdeploy_cli("optimize", "models:/nope/1", "--mlflow-uri", uri, "--target", "cpu-edge", "--out", tmp_path / "o")
    assert res.returncode == 2 and "MLflow cannot resolve models:/nope/1" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = kdeploy_cli("optimize", "models:/digits/x", "--mlflow-uri", uri, "--target", "cpu-edge")
    assert res.returncode == 2 and "models:/NAME/VERSION" in res.stderr
    res = kdeploy_cli("optimize", "models:/digits/1", "--target", "cpu-edge")
    assert res.returncode == 2 and "--mlflow-uri" in res.stderr
