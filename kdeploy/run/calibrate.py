"""Calibration repair (`int8-calibrated`): when full int8 fails, calibrate it again, cheapest method first.

The first step of the int8 repair ladder. Full int8's ranges come from the TFLite converter's
min/max over the calibration split: a range stretched by one outlier sample leaves the other
samples a few integer levels, and a small split can miss the range real inputs reach. The
methods of `[calibration] methods`, in order, until one passes the judge (`run.selective.judge`:
LiteRT, the int8 tolerance and the task budgets, as evaluation judges):

- more-samples: the converter again, on the calibration split plus the samples `data.hold_back`
  kept out of validation (`ctx.spare`; none where validation would drop below
  `min_validation_samples`): validation samples never calibrate;
- moving-average, mean-min-max, octav: ai-edge-quantizer's static int8 of the fp32 `.tflite`
  with that range estimator (`kdeploy.artifacts.aeq`), on the same samples; one calibration
  pass serves all three. Without the `quantizer` extra they are skipped (a finding says so).

The passing `.tflite` is candidate `int8-calibrated` (`recipe.calibration`: the method, every
attempt with its result, seconds and size); evaluation, checks and selection treat it like every
other candidate. When none passes, a finding lists the attempts and the next repair runs.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np

from kdeploy.artifacts import Artifact
from kdeploy.errors import ConversionError
from kdeploy.recipes import CALIBRATED_INT8, CALIBRATION_METHODS, calibration_recipe
from kdeploy.run.context import Build, Context
from kdeploy.run.convert import (ReferenceModel, add_onnx_twin, keeps_tflite, new_build, reference_float,
                                 release_tflite)
from kdeploy.run.judge import judge

CONVERTER_METHOD = "more-samples"


def calibration_builds(ctx: Context, ref: ReferenceModel, builds: list[Build],
                       verdict: tuple[bool, str] | None = None) -> list[Build]:
    """The `int8-calibrated` candidate when full int8 fails and a method of `[calibration]` repairs it; else [].

    Args:
        verdict: full int8's (passed, detail) from `judge` when the caller has it (else judged here).
    """
    prof = ctx.profile
    int8 = next((a for b in builds if b.name == "int8" for a in b.artifacts if a.format == "tflite"), None)
    if int8 is None or calibration_recipe(prof, CONVERTER_METHOD) is None:
        return []
    if verdict is None:
        ctx.progress("calibrate", "judging full int8 on litert")
        verdict = judge(ctx, int8)
    passed, detail = verdict
    if passed:
        return []
    started = time.perf_counter()
    samples = _samples(ctx)
    attempts: list[dict] = []
    stats: list = []  # the quantizer's per-sample statistics, collected by the first quantizer method
    for method in dict.fromkeys(prof.calibration.methods):
        ctx.progress("calibrate", f"full int8 recalibrated: {method}")
        row, art = _attempt(ctx, ref, method, samples, stats)
        attempts.append(row)
        if row.get("passed"):
            return [_candidate(ctx, ref, method, art, attempts, detail, started)]
    ctx.finding("info", "calibration-failed",
                f"full int8 fails ({detail}); recalibrating did not repair it: {summary(attempts)} "
                f"({time.perf_counter() - started:.1f} s)")
    return []


def _samples(ctx: Context) -> dict[str, np.ndarray]:
    """The calibration split plus the spare samples held back from validation (never validation samples)."""
    if ctx.spare is None:
        return ctx.calibration.inputs
    return {k: np.concatenate([v, ctx.spare.inputs[k]]) for k, v in ctx.calibration.inputs.items()}


def _attempt(ctx: Context, ref: ReferenceModel, method: str, samples: dict[str, np.ndarray], stats: list,
             ) -> tuple[dict, Artifact | None]:
    """One method: its `.tflite` (in work) judged on LiteRT. Returns (its record, the artifact when it passed)."""
    converter, how = CALIBRATION_METHODS[method]
    n = len(next(iter(samples.values())))
    row: dict = {"method": method, "converter": converter, "ranges": how, "samples": n}
    why = _skip(ctx, method)
    if why is not None:
        row["skipped"] = why
        return row, None
    started = time.perf_counter()
    out = ctx.work / f"{CALIBRATED_INT8}-{method}.tflite"
    try:
        if method == CONVERTER_METHOD:
            from kdeploy.artifacts import tflite

            art = tflite.convert(ref.savedmodel, "int8", out, samples, [t.name for t in ctx.model.inputs],
                                 ref.signature_outputs, float_model=reference_float(ctx, ref))
        else:
            art = _quantized(ctx, ref, method, samples, stats, out)
    except ConversionError as e:
        row.update(passed=False, detail=str(e), seconds=round(time.perf_counter() - started, 3))
        return row, None
    passed, detail = judge(ctx, art, skip_probes_on_failure=True)
    row.update(passed=passed, detail=detail, seconds=round(time.perf_counter() - started, 3),
               size_bytes=art.size_bytes)
    if not passed:
        art.path.unlink(missing_ok=True)
        return row, None
    return row, art


def _skip(ctx: Context, method: str) -> str | None:
    """Why `method` cannot run here, or None."""
    if method == CONVERTER_METHOD:
        if ctx.spare is None:
            c = ctx.profile.calibration
            return (f"no samples besides the calibration split outside validation ({len(ctx.data)} samples: "
                    f"{len(ctx.calibration)} calibration, {len(ctx.validation)} validation; extra samples are held "
                    f"back only where validation keeps [calibration] min_validation_samples = "
                    f"{c.min_validation_samples}, and extra_samples = {c.extra_samples})")
        return None
    from kdeploy.artifacts.aeq import missing

    why = missing()
    if why is not None and not any(f.code == "calibration-quantizer-missing" for f in ctx.findings):
        methods = ", ".join(m for m in ctx.profile.calibration.methods if m != CONVERTER_METHOD)
        ctx.finding("info", "calibration-quantizer-missing", f"calibration methods {methods} skipped: {why}")
    return why


def _quantized(ctx: Context, ref: ReferenceModel, method: str, samples: dict[str, np.ndarray], stats: list,
               out: Path) -> Artifact:
    """ai-edge-quantizer's full int8 by `method`, from the fp32 `.tflite` (statistics collected once, in `stats`)."""
    from kdeploy.artifacts import aeq

    float_path = reference_float(ctx, ref)
    if not stats:
        stats.append(aeq.collect(float_path.read_bytes(), _by_signature(float_path, samples)))
    return aeq.quantize(float_path, stats[0], method, out, list(samples), ref.signature_outputs)


def _by_signature(float_path: Path, samples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`samples` keyed by the float `.tflite`'s serving-signature input names (the model input names).

    Raises:
        ConversionError: the signature does not name the model inputs.
    """
    from kdeploy.artifacts.flatbuffer import read_tflite_file

    names = set(read_tflite_file(float_path).signature.get("inputs", {}))
    if names != set(samples):
        raise ConversionError(f"the fp32 .tflite's signature inputs {sorted(names)} are not the model inputs "
                              f"{sorted(samples)}; ai-edge-quantizer feeds by signature name")
    return samples


def _candidate(ctx: Context, ref: ReferenceModel, method: str, art: Artifact, attempts: list[dict], why: str,
               started: float) -> Build:
    """The passing attempt as candidate `int8-calibrated` (its `.tflite` in the artifacts, its ONNX twin)."""
    recipe = calibration_recipe(ctx.profile, method)
    b = new_build(ctx, recipe)
    last = attempts[-1]
    b.recipe = {"precision": "int8", "converter": last["converter"], "calibration_samples": last["samples"],
                "calibration": {"method": method, "ranges": last["ranges"], "repairs": f"full int8 fails ({why})",
                                "attempts": attempts, "seconds": round(time.perf_counter() - started, 3)}}
    dest = ctx.staging / "artifacts" / f"{CALIBRATED_INT8}.tflite"
    dest.parent.mkdir(parents=True, exist_ok=True)
    judged = dataclasses.replace(art)
    shutil.move(art.path, dest)
    art.path = dest
    art.measure()
    ctx.reuse_runs(judged, art)  # the attempt judged these bytes: evaluation takes those runs
    if keeps_tflite(ctx):
        b.artifacts.append(art)
    ctx.finding("info", "int8-calibrated",
                f"full int8 fails ({why}); recalibrated ({method}: {last['ranges']}, {last['samples']} samples) it "
                f"passes on litert ({last['detail']}): candidate {CALIBRATED_INT8}. Tried: {summary(attempts)}")
    ctx.run_ahead(b)  # its .tflite runs while its ONNX twin converts
    add_onnx_twin(ctx, b, recipe, art, ref)
    release_tflite(ctx, b, art)
    return b


def summary(attempts: list[dict]) -> str:
    """The attempts in one line: 'METHOD passes|fails (detail, N s)' or 'METHOD skipped (why)', in order."""
    parts = []
    for a in attempts:
        if "skipped" in a:
            parts.append(f"{a['method']} skipped ({a['skipped']})")
        else:
            parts.append(f"{a['method']} {'passes' if a['passed'] else 'fails'} ({a['detail']}; {a['seconds']:.1f} s)")
    return "; ".join(parts)
