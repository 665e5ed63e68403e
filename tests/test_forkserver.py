"""The fork server (`kdeploy.forkserver`): runtime children forked from a process that imported their modules once
must behave as the `python -m` children did — same outputs, crashes contained and named, the job's environment."""

import os

import numpy as np
import pytest

from kdeploy.forkserver import SERVER
from kdeploy.runtimes.jobs import RunJob
from kdeploy.runtimes.worker import RuntimeFailure, run_isolated


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory):
    import keras
    import tensorflow as tf

    d = tmp_path_factory.mktemp("fork")
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((8,), name="x"), keras.layers.Dense(4, activation="softmax", name="y")])
    path = d / "tiny.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(m).convert())
    feeds = d / "feeds.npz"
    np.savez(feeds, x=np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32))
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_runner()
    (inp,), (out,) = runner.get_input_details(), runner.get_output_details()
    return path, feeds, {"inputs": {"x": inp}, "outputs": [out]}


def _run(tiny, job_dir, **env):
    path, feeds, io = tiny
    kinds = []
    job = RunJob(runtime="litert", artifact_path=str(path), io=io, feeds_path=str(feeds))
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        outs, _ = run_isolated(job, job_dir, timeout_s=120, on_start=lambda p: kinds.append(type(p).__name__))
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return outs, kinds


@pytest.mark.skipif(os.name != "posix", reason="fork")
def test_a_forked_runtime_child_gives_what_a_started_one_gives_and_a_crash_stays_its_own(tiny_tflite, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.delenv("KDEPLOY_NO_FORKSERVER", raising=False)
    forked, kinds = _run(tiny_tflite, tmp_path / "forked")
    assert kinds == ["ForkedChild"]
    started, kinds = _run(tiny_tflite, tmp_path / "started", KDEPLOY_NO_FORKSERVER="1")
    assert kinds == ["Popen"]
    assert len(forked) == len(started) == 1 and np.array_equal(forked[0], started[0]) and forked[0].shape == (16, 4)
    # the job's environment reaches the fork (the fault hook reads it there): a SIGSEGV is that job's failure only
    with pytest.raises(RuntimeFailure, match=r"signal 11 \(SIGSEGV\) on tiny.tflite"):
        _run(tiny_tflite, tmp_path / "segv", KDEPLOY_TEST_WORKER_FAULT="segv:litert:tiny.tflite")
    again, kinds = _run(tiny_tflite, tmp_path / "again")
    assert kinds == ["ForkedChild"] and np.array_equal(again[0], forked[0])
    assert SERVER._proc is not None and SERVER._proc.poll() is None  # the server outlived its child's crash
