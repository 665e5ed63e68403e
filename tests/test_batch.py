"""`kdeploy batch`: real optimize jobs on real fixture models on a real local Ray (2 workers)."""

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kdeploy.batch.manifest import load_manifest
from kdeploy.batch.summary import worst_exit
from kdeploy.errors import ManifestError

from conftest import FIXTURES, make_profile
from test_optimize import contract_problems

if os.environ.get("CI") != "true":  # in CI the test extra has both: a missing one fails there
    pytest.importorskip("ray", reason="the batch extra (ray) is not installed")
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")


def kdeploy(*args, cwd=None, prelude: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CI="true")
    code = f"{prelude}import sys; from kdeploy.cli import main; sys.argv = ['kdeploy', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_manifest_expands_globs_and_models_times_targets(tmp_path):
    (tmp_path / "models").mkdir()
    for v in ("v1", "v2"):
        (tmp_path / "models" / f"digits_{v}.keras").write_bytes((FIXTURES / "digits_cnn.keras").read_bytes())
    profile = make_profile(tmp_path, "mcu")
    manifest = write(tmp_path / "m.toml", f"""
[[jobs]]
model = "models/digits_*.keras"
data = "{FIXTURES / 'digits.npz'}"
targets = ["cpu-edge"]
profiles = ["{profile.name}"]
seed = 3

[[jobs]]
name = "gru"
model = "{FIXTURES / 'digits_gru.keras'}"
targets = ["cpu-server"]
input_shapes = {{ rows = [8, 8] }}
num_cpus = 2
""")
    jobs = load_manifest(manifest)
    assert [j.name for j in jobs] == ["digits_v1-cpu-edge", "digits_v1-mcu", "digits_v2-cpu-edge", "digits_v2-mcu", "gru"]
    assert jobs[1].target_arg == ("--profile", str(profile.resolve())) and jobs[1].target == "mcu"
    assert jobs[0].model_label == "models/digits_v1.keras"
    assert jobs[0].optimize_args() == [str((tmp_path / "models" / "digits_v1.keras").resolve()), "--target", "cpu-edge",
                                       "--seed", "3", "--no-parallel", "--data", str(FIXTURES / "digits.npz")]
    assert jobs[4].optimize_args()[-2:] == ["--input-shape", "rows=8,8"]
    assert "--no-parallel" not in jobs[4].optimize_args()  # two CPUs declared: the conversion lane may run
    assert worst_exit([0, 1, 0]) == 1 and worst_exit([1, 3, 2, 0]) == 3 and worst_exit([0, 0]) == 0


@pytest.mark.parametrize("body, says", [
    ('[[jobs]]\nmodel = "x.keras"\ntarget = "cpu-edge"\n', "unknown key 'jobs[0].target' (allowed: name, model, data, targets"),
    ('[[jobs]]\nmodel = "nope/*.keras"\ntargets = ["cpu-edge"]\n', "jobs[0].model: the glob 'nope/*.keras' matches nothing"),
    ('[[jobs]]\nmodel = "missing.keras"\ntargets = ["cpu-edge"]\n', "jobs[0].model: 'missing.keras' does not exist"),
    (f'[[jobs]]\nmodel = "{FIXTURES / "digits_cnn.keras"}"\ntargets = ["fpga"]\n', "jobs[0].targets: unknown target 'fpga'; allowed: cpu-edge"),
    (f'[[jobs]]\nmodel = "{FIXTURES / "digits_cnn.keras"}"\ntargets = ["mcu"]\nnum_cpus = 0\n', "key 'jobs[0].num_cpus': Input should be greater than 0 (received 0)"),
    (f'[[jobs]]\nmodel = "{FIXTURES / "digits_cnn.keras"}"\ntargets = ["mcu"]\n[[jobs]]\nmodel = "{FIXTURES / "digits_cnn.keras"}"\ntargets = ["mcu"]\n',
     "duplicate job name(s) digits_cnn-mcu"),
    ("jobs = 3\n", "key 'jobs': Input should be a valid list (received 3)"),
])
def test_load_manifest_names_file_key_received_and_allowed(tmp_path, body, says):
    manifest = write(tmp_path / "m.toml", body)
    with pytest.raises(ManifestError) as e:
        load_manifest(manifest)
    assert str(manifest) in str(e.value) and says in str(e.value)


def test_batch_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path):
    manifest = write(tmp_path / "m.toml", '[[jobs]]\nmodel = "x.keras"\ntargets = ["cpu-edge"]\nsed = 1\n')
    res = kdeploy("batch", manifest, "--out", tmp_path / "out")
    assert res.returncode == 2 and "unknown key 'jobs[0].sed'" in res.stderr and str(manifest) in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    good = write(tmp_path / "g.toml", f'[[jobs]]\nmodel = "{FIXTURES / "digits_cnn.keras"}"\ntargets = ["mcu"]\n')
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    res = kdeploy("batch", good, "--out", tmp_path / "mine")
    assert res.returncode == 2 and "no summary.json" in res.stderr and (tmp_path / "mine" / "notes.txt").is_file()
    res = kdeploy("batch", good, "--out", tmp_path / "out", "--workers", "2", "--address", "auto")
    assert res.returncode == 2 and "--workers 2 sizes a local Ray instance" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.toml", "m.toml", "mine"], "nothing else written"


def test_batch_without_ray_says_how_to_install(tmp_path):
    good = write(tmp_path / "g.toml", f'[[jobs]]\nmodel = "{FIXTURES / "digits_cnn.keras"}"\ntargets = ["mcu"]\n')
    # sys.modules["ray"] = None makes `import ray` raise ImportError, as on an install without the extra.
    res = kdeploy("batch", good, "--out", tmp_path / "out", prelude="import sys; sys.modules['ray'] = None; ")
    assert res.returncode == 2 and "pip install 'kdeploy[batch]'" in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """One batch on local Ray with 2 workers: a ready job, a registry version that is not ready (a 1 KB
    budget), a corrupt model and a job that times out."""
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("batch")
    edge = make_profile(tmp, "cpu-edge", precisions=["fp32", "int8"], crosscheck_runtimes=[], threads=[1])
    tiny = make_profile(tmp, "mcu", crosscheck_runtimes=[], budgets={"max_size_bytes": 1000})
    (tmp / "broken.keras").write_bytes((FIXTURES / "digits_cnn.keras").read_bytes()[:3000])
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("training", artifact_location=(tmp / "artifacts").as_uri()))
    client.log_artifact(run.info.run_id, str(FIXTURES / "digits_cnn.keras"), artifact_path="model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("digits")
    client.create_model_version("digits", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    manifest = write(tmp / "batch.toml", f"""
[[jobs]]
model = "{FIXTURES / 'digits_cnn.keras'}"
data = "{FIXTURES / 'digits.npz'}"
profiles = ["{edge.name}"]

[[jobs]]
model = "models:/digits/1"
data = "{FIXTURES / 'digits.npz'}"
profiles = ["{tiny.name}"]

[[jobs]]
model = "broken.keras"
targets = ["cpu-edge"]

[[jobs]]
name = "slow"
model = "{FIXTURES / 'diabetes_reg.keras'}"
targets = ["cpu-edge"]
timeout_s = 2
""")
    res = kdeploy("batch", manifest, "--out", tmp / "out", "--workers", "2", "--format", "json,md,junit",
                  "--mlflow-uri", uri, cwd=tmp)
    return tmp, res, client


def test_batch_runs_every_job_and_failures_stay_in_their_rows(batch):
    tmp, res, _ = batch
    out = tmp / "out"
    assert res.returncode == 3, res.stdout + res.stderr  # worst of 0, 1, 2, 3
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["name"]: r for r in summary["jobs"]}
    assert list(rows) == ["digits_cnn-cpu-edge", "digits-1-mcu", "broken-cpu-edge", "slow"]
    assert summary["ray"]["address"] == "local" and summary["ray"]["cpus"] == 2
    assert summary["counts"] == {"ready": 1, "not_ready": 1, "bad_input": 1, "internal": 1}
    for name in ("digits_cnn-cpu-edge", "digits-1-mcu"):
        row = rows[name]
        rd = json.loads((out / row["report"]).read_text())
        contract_problems(out / name)
        assert row["exit_code"] == (0 if rd["ready"] else 1) and row["ready"] == rd["ready"]
        assert row["selected"] == rd["selected"] and row["target"] == rd["target"]["name"]
        assert (out / name / "report.junit.xml").is_file(), "--format reaches every job"
        assert any(f["code"] == "timing-serialized" for f in rd["findings"]), "the report says how it was timed"
    ready = rows["digits_cnn-cpu-edge"]
    assert ready["ready"], ready["message"]
    rd = json.loads((out / ready["report"]).read_text())
    chosen = next(c for c in rd["candidates"] if c["name"] == rd["selected"])
    tflite = next(a for a in chosen["artifacts"] if a["format"] == "tflite")
    assert ready["size_bytes"] == tflite["size_bytes"] == (out / "digits_cnn-cpu-edge" / tflite["path"]).stat().st_size
    p90 = [r["p90_ms"] for r in chosen["latency"] if r["runtime"] == "litert"]
    assert ready["latency_percentile"] == "p90" and ready["latency_ms"] == pytest.approx(min(p90), rel=1e-4)
    broken = rows["broken-cpu-edge"]
    assert broken["exit_code"] == 2 and "broken.keras" in broken["message"] and broken["report"] is None
    assert rows["slow"]["exit_code"] == 3 and "timed out after 2 s" in rows["slow"]["message"]
    assert not (out / "broken-cpu-edge").exists() and not (out / "slow").exists(), "no half-written job folder"
    assert "damaged zip" in (out / broken["log"]).read_text()


def test_batch_registry_job_records_its_verdict_on_the_model_version(batch):
    tmp, _, client = batch
    row = next(r for r in json.loads((tmp / "out" / "summary.json").read_text())["jobs"] if r["name"] == "digits-1-mcu")
    assert row["exit_code"] == 1 and row["model"] == "models:/digits/1" and row["message"].startswith("not ready")
    rd = json.loads((tmp / "out" / row["report"]).read_text())
    assert rd["model"]["path"] == "models:/digits/1"
    assert any(k["name"] == "size_bytes" and not k["passed"] for c in rd["candidates"] for k in c["checks"])
    tags = client.get_model_version("digits", "1").tags
    assert tags["kdeploy.ready"] == "false" and tags["kdeploy.target"] == "mcu" and tags["kdeploy.selected"] == "none"
    assert client.get_run(tags["kdeploy.report_run"]).data.tags["kdeploy.ready"] == "false"


def test_batch_writes_markdown_junit_and_a_final_table(batch):
    tmp, res, _ = batch
    out = tmp / "out"
    md = (out / "summary.md").read_text()
    assert "1 ready, 1 not ready, 1 bad input, 1 internal" in md and "| broken-cpu-edge |" in md
    suite = ET.parse(out / "summary.junit.xml").getroot()
    cases = suite.findall(".//testcase")
    assert [c.get("name") for c in cases] == ["digits_cnn-cpu-edge", "digits-1-mcu", "broken-cpu-edge", "slow"]
    assert [c.find("failure") is None for c in cases] == [True, False, False, False]
    assert cases[2].find("failure").get("type") == "bad-input"
    assert suite.get("tests") == "4" and suite.get("failures") == "3"
    assert "digits_cnn-cpu-edge" in res.stdout and "exit 3" in res.stdout
    assert not [p for p in tmp.iterdir() if p.name.startswith(".out.")], "no staging folder left beside --out"


@pytest.mark.slow
def test_ctrl_c_stops_the_batch_and_leaves_out_as_it_was(tmp_path):
    model = tmp_path / "unique_model_for_sigint.keras"
    model.write_bytes((FIXTURES / "digits_cnn.keras").read_bytes())
    profile = make_profile(tmp_path, "cpu-edge")
    manifest = write(tmp_path / "m.toml", f'[[jobs]]\nmodel = "{model.name}"\ndata = "{FIXTURES / "digits.npz"}"\n'
                                          f'profiles = ["{profile.name}"]\ntargets = ["mcu"]\n')
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CI="true")
    proc = subprocess.Popen([sys.executable, "-m", "kdeploy", "batch", str(manifest), "--out", str(tmp_path / "out"),
                             "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def children() -> list[str]:
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if model.name in text and "optimize" in text:
                found.append(text)
        return found

    deadline = time.monotonic() + 120
    while not children() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert children(), "the jobs' kdeploy optimize processes started"
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    time.sleep(2)
    assert not children(), "no job process outlives the batch"
