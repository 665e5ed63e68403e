"""The conversion lane's child side: converts some recipes' `.tflite` files and the ONNX twins beside the parent.

`python -m kdeploy.artifacts.lane_worker JOB.json` (through `kdeploy.child.run_child`). The child
imports TensorFlow at once (the parent may start it before loading the model), then waits for its
tasks (`<markers>/tasks.ready`) and for the parent's reference SavedModel (`<markers>/reference.ready`,
holding its path and signature output keys). The tasks are one per recipe:

- `tflite` true: the child converts the recipe's `.tflite` itself (precisions without
  calibration data), then its ONNX twin when `route` is set;
- `tflite` false: the parent converts the `.tflite`; the child makes the twin (`route`
  "savedmodel": tf2onnx from the reference SavedModel, at once; "tflite": from the recipe's
  `.tflite`, once the parent marks it ready, `<markers>/<name>.ready`, or skipped, `<name>.skip`).

The child takes a twin whose source is ready before its next own `.tflite`, so the parent's
candidates are never kept waiting behind a long conversion. The result maps each task name to
the fields of its `.tflite` (own tasks) and ONNX artifacts, or to the conversion errors;
converter intermediates leave with this process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

from kdeploy.child import child_main, progress
from kdeploy.debug.names import LayerNamer
from kdeploy.util import release_memory

POLL_S = 0.05
REFERENCE = "reference"  # marker: the SavedModel is exported (its content: path and signature output keys)
TASKS = "tasks"  # marker: the tasks (its content: input names, layer namer, one task per recipe)


def _marked(markers: Path, name: str) -> bool | None:
    """True when the parent marked `name` ready, False when skipped, None while neither."""
    if (markers / f"{name}.ready").exists():
        return True
    if (markers / f"{name}.skip").exists():
        return False
    return None


def _wait(markers: Path, name: str) -> bool:
    """True when the parent marked `name` ready, False when it marked it skipped (waits for either)."""
    while (state := _marked(markers, name)) is None:
        time.sleep(POLL_S)
    return state


def _next(pending: list[dict], markers: Path) -> dict | None:
    """A twin whose source the parent has settled, else the next own `.tflite`, else None (wait)."""
    for task in pending:
        if not task["tflite"] and (task["route"] == "savedmodel" or _marked(markers, task["name"]) is not None):
            return task
    return next((t for t in pending if t["tflite"]), None)


def _fields(art) -> dict:
    return {**asdict(art), "path": str(art.path)}


def _test_fault(name: str) -> None:
    """Test-only: the child kills itself with SIGSEGV on task `name` when KDEPLOY_TEST_LANE_FAULT names it.

    Honoured only while pytest runs a test (PYTEST_CURRENT_TEST is set), so the tests can prove
    that a crashed lane costs no candidate.
    """
    if os.environ.get("KDEPLOY_TEST_LANE_FAULT") == name and "PYTEST_CURRENT_TEST" in os.environ:
        import signal

        os.kill(os.getpid(), signal.SIGSEGV)


def run(job: dict) -> dict:
    from kdeploy.artifacts import Artifact, gzip_elsewhere
    from kdeploy.artifacts import onnx as onnx_export
    from kdeploy.artifacts import tflite
    from kdeploy.errors import ConversionError

    import tensorflow  # noqa: F401 - imported while the parent exports the SavedModel, not after

    from kdeploy.util import freeze_heap

    freeze_heap()  # this process' frameworks: each conversion's `release_memory` collects only what it made
    gzip_elsewhere()  # the parent measures the gzip sizes of what this process makes, beside its own work
    markers = Path(job["markers"])
    if not _wait(markers, TASKS):  # started before the model loaded: its tasks come once it has
        return {"results": {}}
    job = {**job, **json.loads((markers / f"{TASKS}.ready").read_text())}
    if not _wait(markers, REFERENCE):
        return {"results": {t["name"]: {"skipped": True} for t in job["tasks"]}}
    ref = json.loads((markers / f"{REFERENCE}.ready").read_text())
    model = SimpleNamespace(inputs=[SimpleNamespace(name=n) for n in job["inputs"]])
    namer = None if not job.get("namer") else LayerNamer(job["namer"]["model_name"], job["namer"]["layers"])
    io = {"inputs": {n: n for n in job["inputs"]}, "outputs": list(ref["signature_outputs"])}
    results: dict[str, dict] = {}
    pending = list(job["tasks"])
    while pending:
        task = _next(pending, markers)
        if task is None:
            time.sleep(POLL_S)
            continue
        pending.remove(task)
        _test_fault(task["name"])
        name, res = task["name"], results.setdefault(task["name"], {})
        src = Path(task["src"])
        if task["tflite"]:
            progress(f"TFLite {name}")
            try:
                art = tflite.convert(Path(ref["savedmodel"]), task["precision"], src, None, job["inputs"],
                                     ref["signature_outputs"])
            except ConversionError as e:
                res["tflite_error"] = str(e)
                continue
            res["tflite"] = _fields(art)
            release_memory()
        elif task["route"] == "tflite" and not _marked(markers, name):
            res["skipped"] = True
            continue
        if task["route"] is None:
            continue
        progress(f"ONNX {name}")

        def tflite_of(task: dict = task, src: Path = src) -> Artifact | None:
            """The task's `.tflite` (waiting for the parent's, when its twin falls back to it); None when skipped."""
            if not task["tflite"] and not _wait(markers, task["name"]):
                return None
            return Artifact(format="tflite", path=src, precision=task["precision"], source="tflite-converter", io=io)

        try:
            art = onnx_export.twin(task["route"], Path(task["out"]), tflite_of, Path(ref["savedmodel"]), model,
                                   ref["signature_outputs"], namer)
        except ConversionError as e:
            res["error"] = str(e)
            continue
        res["artifact"] = _fields(art)
        release_memory()  # tf2onnx's freed graphs go back to the OS before the next conversion
    return {"results": results}


if __name__ == "__main__":
    child_main(sys.argv[1:], run)
