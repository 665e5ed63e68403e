"""Memory of the whole process tree, and the --max-memory guard."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from kdeploy.memory import BATCH_INPUT_BYTES, batch_size_for, descendants, tree_memory_mb

from conftest import FIXTURES, ROOT


def test_tree_memory_counts_child_processes_too():
    alone = tree_memory_mb()
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; b = bytearray(300 << 20); b[::4096] = b'x' * "
                              "len(b[::4096]); print('ok', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ok"  # its 300 MB are resident now
        assert child.pid in descendants(__import__("os").getpid())
        assert tree_memory_mb() >= alone + 250
    finally:
        child.kill()
        child.wait()


def test_tree_memory_counts_the_fork_server_s_children_not_a_child_before_its_exec():
    """A fork server's child never execs (same command line as the server) and runs a job: counted. Any other child
    with its parent's command line is between fork and exec, still showing its parent's pages: not counted."""
    code = ("import os, sys, time; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); pid = os.fork(); "
            "b[::4096] = b'y' * len(b[::4096]) if pid == 0 else b''; print('ok', flush=True) if pid else None; "
            "time.sleep(60)")  # the child writes its pages: 300 MB of its own
    rss = {}
    for tag in ("kdeploy.forkserver", "other"):
        proc = subprocess.Popen([sys.executable, "-c", code, tag], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ok"
            __import__("time").sleep(1.0)  # the child's writes
            rss[tag] = tree_memory_mb(proc.pid, "rss")
        finally:
            for pid in descendants(proc.pid):
                __import__("os").kill(pid, 9)
            proc.kill()
            proc.wait()
    assert rss["kdeploy.forkserver"] >= rss["other"] + 250, rss


def test_max_memory_stops_the_run_with_exit_3_and_the_figure(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "kdeploy", "optimize", str(FIXTURES / "cancer_mlp.keras"),
                          "--target", "cpu-edge", "--data", str(FIXTURES / "cancer.npz"), "--out", str(out),
                          "--max-memory", "20"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 3
    assert "above --max-memory 20 MB" in res.stderr and "reached" in res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()  # nothing half-written


def test_batch_size_for_bounds_the_bytes_of_one_batch_and_keeps_small_inputs_whole():
    big = {"image": np.zeros((64, 224, 224, 3), np.float32)}
    n = batch_size_for(big, cap=64)
    assert 1 <= n < 64 and n * 224 * 224 * 3 * 4 <= BATCH_INPUT_BYTES
    assert batch_size_for({"x": np.zeros((300, 8, 8), np.float32)}, cap=64) == 64
    assert batch_size_for({"x": np.zeros((2, 4000, 4000), np.float32)}, cap=64) == 1  # one sample, however large


def test_layer_samples_for_bounds_the_per_layer_tensors_kept():
    from kdeploy.memory import DUMP_ARTIFACTS, LAYER_TENSOR_BYTES, layer_samples_for

    assert layer_samples_for(1_000, 64) == 64  # small layers: the profile's count
    big = 27 << 20  # one sample's activations of MobileNetV2 at 224x224 (26.9 MB)
    n = layer_samples_for(big, 64)
    # the float reference's and the candidate's tensors together fit, and one more sample would not
    assert 1 <= n < 64 and n * big * DUMP_ARTIFACTS <= LAYER_TENSOR_BYTES < (n + 1) * big * DUMP_ARTIFACTS
    assert layer_samples_for(LAYER_TENSOR_BYTES * 4, 64) == 1  # never none


def test_the_run_freezes_what_it_loaded_for_the_collector_and_thaws_it_after(tmp_path):
    """`util.freeze_heap`: during the build the collector skips the frameworks and the model (frozen after
    `prepare`); once the run returns, nothing stays frozen (a caller's later garbage is collectable)."""
    import gc

    from kdeploy.run import optimize

    frozen_during: list[int] = []
    optimize(FIXTURES / "iris_legacy.h5", target="cpu-edge", data=FIXTURES / "iris.npz", out=tmp_path / "out",
             cache=False, progress=lambda stage, detail="": frozen_during.append(gc.get_freeze_count())
             if stage == "convert" else None)
    assert frozen_during and min(frozen_during) > 10_000, frozen_during[:3]
    assert gc.get_freeze_count() == 0
