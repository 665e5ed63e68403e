"""The ONNX lane's child side: converts a run's ONNX twins while the parent converts the `.tflite` files.

`python -m kdeploy.artifacts.onnx_worker JOB.json` (through `kdeploy.child.run_child`). The child
imports TensorFlow at once, then waits for the parent's reference SavedModel (`<markers>/reference.ready`,
holding its path and signature output keys). The job lists one task per recipe, in order: `route` "savedmodel" (tf2onnx from the reference SavedModel)
or "tflite" (tf2onnx from the recipe's `.tflite`). A "tflite" task waits until the parent marks
its source ready (`<markers>/<name>.ready`, written after the `.tflite` is complete) or skipped
(`<name>.skip`: the conversion failed, or it duplicated another recipe). The result maps each
task name to its artifact's fields or to the conversion error; tf2onnx's intermediates leave
with this process.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

from kdeploy.child import child_main, progress
from kdeploy.util import release_memory

POLL_S = 0.05
REFERENCE = "reference"  # marker: the SavedModel is exported (its content: path and signature output keys)


def _wait(markers: Path, name: str) -> bool:
    """True when the parent marked `name` ready, False when it marked it skipped (waits for either)."""
    while True:
        if (markers / f"{name}.ready").exists():
            return True
        if (markers / f"{name}.skip").exists():
            return False
        time.sleep(POLL_S)


def run(job: dict) -> dict:
    from kdeploy.artifacts import Artifact
    from kdeploy.artifacts import onnx as onnx_export
    from kdeploy.errors import ConversionError

    import tensorflow  # noqa: F401 - imported while the parent exports the SavedModel, not after

    markers = Path(job["markers"])
    if not _wait(markers, REFERENCE):
        return {"results": {t["name"]: {"skipped": True} for t in job["tasks"]}}
    ref = json.loads((markers / f"{REFERENCE}.ready").read_text())
    model = SimpleNamespace(inputs=[SimpleNamespace(name=n) for n in job["inputs"]])
    io = {"inputs": {n: n for n in job["inputs"]}, "outputs": list(ref["signature_outputs"])}
    results: dict[str, dict] = {}
    for task in job["tasks"]:
        name, out = task["name"], Path(task["out"])
        if task["route"] == "tflite" and not _wait(markers, name):
            results[name] = {"skipped": True}
            continue
        progress(f"ONNX {name}")
        try:
            if task["route"] == "savedmodel":
                art = onnx_export.from_saved_model(Path(ref["savedmodel"]), model, out, ref["signature_outputs"])
            else:
                src = Artifact(format="tflite", path=Path(task["src"]), precision=task["precision"],
                               source="tflite-converter", io=io)
                art = onnx_export.from_tflite(src, out)
        except ConversionError as e:
            results[name] = {"error": str(e)}
            continue
        results[name] = {"artifact": {**asdict(art), "path": str(art.path)}}
        release_memory()  # tf2onnx's freed graphs go back to the OS before the next twin
    return {"results": results}


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:], run))
