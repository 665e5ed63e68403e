"""The result cache: content addressing, verification before use, and what a run reports about it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdeploy.cache import Cache, cache_root, run_key

from conftest import FIXTURES, ROOT, make_profile


def _staging(tmp_path: Path) -> Path:
    s = tmp_path / "staging"
    (s / "artifacts").mkdir(parents=True)
    (s / "artifacts" / "fp32.tflite").write_bytes(b"\x00tflite bytes" * 100)
    (s / "artifacts" / "fp32.onnx").write_bytes(b"onnx bytes" * 100)
    return s


def test_cache_lookup_returns_a_stored_entry_after_verifying_every_file(tmp_path):
    cache = Cache(tmp_path / "cache")
    cache.store("ab" * 32, _staging(tmp_path), '{"r": 1}', extra={"io": {"a": 1}})
    entry, why = cache.lookup("ab" * 32)
    assert why == "verified" and entry is not None
    assert entry.report_json == '{"r": 1}' and entry.extra == {"io": {"a": 1}}
    out = tmp_path / "restored"
    out.mkdir()
    entry.restore(out)
    assert (out / "artifacts" / "fp32.onnx").read_bytes() == b"onnx bytes" * 100


@pytest.mark.parametrize("damage,expected", [
    (lambda e: (e / "staging" / "artifacts" / "fp32.tflite").write_bytes(b"tampered"), "fp32.tflite sha256 mismatch"),
    (lambda e: (e / "staging" / "artifacts" / "fp32.onnx").unlink(), "fp32.onnx missing"),
    (lambda e: (e / "staging" / "artifacts" / "extra.bin").write_bytes(b"x"), "unexpected file"),
    (lambda e: (e / "manifest.json").write_text("{not json"), "manifest.json missing or unreadable"),
    (lambda e: (e / "report.json").write_text('{"r": 2}'), "report.json sha256 mismatch"),
])
def test_cache_lookup_deletes_a_corrupt_entry_instead_of_trusting_it(tmp_path, damage, expected):
    cache = Cache(tmp_path / "cache")
    key = "cd" * 32
    path = cache.store(key, _staging(tmp_path), '{"r": 1}')
    damage(path)
    entry, why = cache.lookup(key)
    assert entry is None
    assert expected in why and "deleted and rebuilt" in why
    assert not path.exists()


def test_run_key_is_the_same_for_equal_inputs_and_differs_when_any_input_changes():
    base = {"model_sha256": "m", "data_sha256": "d", "profile": {"name": "cpu-edge"}, "seed": 0}
    assert run_key(base) == run_key(dict(base))
    for k, v in [("model_sha256", "m2"), ("data_sha256", None), ("profile", {"name": "mcu"}), ("seed", 1)]:
        assert run_key({**base, k: v}) != run_key(base), k


def test_cache_root_is_the_env_var_else_the_platform_user_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("KDEPLOY_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("KDEPLOY_CACHE_DIR")
    import platformdirs

    assert cache_root() == Path(platformdirs.user_cache_dir("kdeploy", appauthor=False))
    if sys.platform.startswith("linux") and not os.environ.get("XDG_CACHE_HOME"):
        assert cache_root() == Path.home() / ".cache" / "kdeploy"


def _optimize(profile: Path, out: Path, *flags: str) -> tuple[int, dict, str]:
    res = subprocess.run([sys.executable, "-m", "kdeploy", "optimize", str(FIXTURES / "digits_cnn.keras"),
                          "--profile", str(profile), "--data", str(FIXTURES / "digits.npz"), "--out", str(out),
                          "-q", *flags], capture_output=True, text=True, cwd=ROOT, timeout=600)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    return res.returncode, report, res.stderr


def _verdicts(r: dict) -> dict:
    return {c["name"]: (c["passed"], [a["sha256"] for a in c["artifacts"]],
                        [(f["runtime"], f["output"], f["max_abs_err"]) for f in c["fidelity"]]) for c in r["candidates"]}


def test_optimize_reuses_verified_results_rebuilds_a_corrupt_entry_and_retimes_on_request(tmp_path):
    """miss → hit → corrupt entry rebuilt (with --parallel) → --retime, on one small model."""
    profile = make_profile(tmp_path, precisions=["fp32", "dynamic"], robustness={"enabled": False})
    code1, first, _ = _optimize(profile, tmp_path / "o1")
    assert first["cache"]["status"] == "miss" and first["cache"]["stored"] is True

    code2, hit, _ = _optimize(profile, tmp_path / "o2")
    assert (code2, hit["ready"], hit["selected"]) == (code1, first["ready"], first["selected"])
    assert hit["cache"]["status"] == "hit" and hit["cache"]["key"] == first["cache"]["key"]
    assert {"artifacts", "fidelity", "latency"} <= set(hit["cache"]["from_cache"])
    assert _verdicts(hit) == _verdicts(first)
    for c in hit["candidates"]:  # the artifacts are really there, with the bytes the report names
        for a in c["artifacts"]:
            import hashlib

            assert hashlib.sha256((tmp_path / "o2" / a["path"]).read_bytes()).hexdigest() == a["sha256"]

    entry = Cache().entry_dir(first["cache"]["key"])
    victim = next((entry / "staging" / "artifacts").iterdir())
    victim.write_bytes(b"not the artifact")
    # Rebuilt with --parallel: the ONNX twins come from the second process, byte for byte the same.
    code3, rebuilt, _ = _optimize(profile, tmp_path / "o3", "--parallel")
    assert rebuilt["cache"]["status"] == "rebuilt" and "sha256 mismatch" in rebuilt["cache"]["detail"]
    assert rebuilt["cache"]["stored"] is True
    assert _verdicts(rebuilt) == _verdicts(first)
    assert {a["format"] for c in rebuilt["candidates"] for a in c["artifacts"]} == {"tflite", "onnx"}

    code4, retimed, _ = _optimize(profile, tmp_path / "o4", "--retime")
    assert retimed["cache"]["status"] == "retimed" and "latency" not in retimed["cache"]["from_cache"]
    assert all(c["latency"] for c in retimed["candidates"] if c["passed"])
    assert {k: v[1:] for k, v in _verdicts(retimed).items()} == {k: v[1:] for k, v in _verdicts(first).items()}


def test_retime_with_no_cache_is_a_usage_error(tmp_path):
    code, _, err = _optimize(make_profile(tmp_path), tmp_path / "o", "--retime", "--no-cache")
    assert code == 2 and "--retime" in err and "Traceback" not in err
