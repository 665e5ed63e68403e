"""Last stage: the Report from what the run built, measured and selected (no I/O besides hashing inputs)."""

from __future__ import annotations

import hashlib
import os
import shlex
import time
from pathlib import Path
from typing import Any

from kdeploy import __version__
from kdeploy.report.model import Candidate, ModelInfo, Report, TensorSpecOut
from kdeploy.run.context import Built, Context
from kdeploy.util import file_sha256

def make_report(ctx: Context, candidates: list[Candidate], selection: dict[str, Any], built: Built,
                command: list[str] | None, started: float) -> Report:
    m = ctx.model
    selected = selection["selected"]
    return Report(
        tool={"name": "kdeploy", "version": __version__},
        ready=selected is not None,
        selected=selected,
        selection=selection,
        model=ModelInfo(
            path=str(m.path), sha256=m.sha256, format=m.format, keras_version=m.keras_version, params=m.params,
            inputs=[TensorSpecOut(**t.to_dict()) for t in m.inputs],
            outputs=[TensorSpecOut(**t.to_dict()) for t in m.outputs], output_kinds=m.output_kinds,
            trusted_package_classes=m.trusted_classes,
        ),
        target=ctx.profile.model_dump(mode="json"),
        host=ctx.host,
        data={"source": ctx.data.source, "synthetic": ctx.data.synthetic, "samples": len(ctx.data),
              "calibration_samples": len(ctx.calibration), "validation_samples": len(ctx.validation),
              "split": "disjoint random split (seeded)"},
        reference_artifacts=built.reference_artifacts,
        candidates=candidates,
        findings=ctx.findings,
        command=command or [],
        seed=ctx.seed,
        duration_s=round(time.perf_counter() - started, 3),
        reproducibility=_reproducibility(ctx, command, built.reference_artifacts),
        inspection=built.inspection,
        repair=_repair(ctx, candidates),
    )


def _repair(ctx: Context, candidates: list[Candidate]) -> dict[str, Any] | None:
    """The int8 repair ladder's record with each step's verdict after evaluation and its latency (`run.ladder`)."""
    from kdeploy.run.ladder import finish

    return finish(ctx.repair, candidates, ctx.profile.runtimes[0])


def _reproducibility(ctx: Context, command: list[str] | None, reference_artifacts: list[dict]) -> dict[str, Any]:
    """What a re-run needs (command, cwd, seed, input hashes) and what it gives back byte for byte."""

    data_sha = None if ctx.data.synthetic else file_sha256(Path(ctx.data.source))
    profile_json = ctx.profile.model_dump_json().encode()
    return {
        "rerun": shlex.join(command) if command else None,
        "cwd": os.getcwd(),
        "seed": ctx.seed,
        "model_sha256": ctx.model.sha256,
        "data_sha256": data_sha,
        "data": "synthetic, generated from the seed" if ctx.data.synthetic else ctx.data.source,
        "profile_sha256": hashlib.sha256(profile_json).hexdigest(),
        "byte_identical": "candidate artifacts (.tflite, .onnx) for the same model, data, profile, seed and library "
                          "versions (host.libraries)",
        "not_byte_identical": [{"path": a["path"], "why": a["note"]} for a in reference_artifacts
                               if a.get("byte_reproducible") is False],
        "varies_by_run": ["duration_s", "candidates[].latency", "candidates[].cold", "candidates[].memory",
                          "selection when candidates tie within the latency tolerance"],
    }
