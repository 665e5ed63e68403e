"""Stage 1: validate the cheap things, load the model safely, read and split the data, take Keras' outputs."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import numpy as np

from kdeploy.data import data_signature, hold_back, load_data, split, synthetic_data
from kdeploy.errors import UsageError
from kdeploy.forkserver import SERVER
from kdeploy.inspection.rules import input_spread, static_batch_inputs
from kdeploy.loading import load_custom_objects, load_model
from kdeploy.memory import REFERENCE_BATCH, batch_size_for
from kdeploy.profiles import TargetProfile, resolve_profile
from kdeploy.report.model import check_out_dir, discard_staging, make_staging
from kdeploy.run.context import Context, Progress, RunOptions, no_progress
from kdeploy.run.convert import ConversionLane
from kdeploy.run.host import describe_host
from kdeploy.util import first_error_line, release_memory

SYNTHETIC_SAMPLES = 128


def check_inputs(opts: RunOptions) -> tuple[TargetProfile, Path | None]:
    """Validates everything cheap (profile, --out, formats, data file) before any model is read.

    Returns:
        The resolved profile and the output folder (None: keep the report in staging).

    Raises:
        UsageError: bad profile, output folder, format or data file (exit 2).
    """
    from kdeploy.report.render import validate_formats

    prof = resolve_profile(opts.target, opts.profile)
    validate_formats(opts.formats)
    out_path = Path(opts.out) if opts.out is not None else None
    if out_path is not None:
        check_out_dir(out_path)
    if opts.data is not None and not Path(opts.data).is_file():
        raise UsageError(f"data file not found: {opts.data} (allowed: .npz, .npy, .csv)")
    return prof, out_path


def prepare(opts: RunOptions, prof: TargetProfile, out_path: Path | None, lane: bool = False) -> Context:
    """Loads the model safely, reads and splits the data (after `check_inputs`); Keras' outputs are taken on first
    use (`Context.reference`).

    Args:
        lane: start the conversion lane before loading, where it will likely be wanted (`ConversionLane.early`;
            `optimize`'s build takes it as `Context.lane`).

    Returns:
        The run context (its staging and work folders exist; the caller removes them, and closes `lane`).

    Raises:
        UsageError: bad data or model (exit 2).
    """
    progress = opts.progress or no_progress
    custom = load_custom_objects(opts.custom_objects) if opts.custom_objects else None
    work = Path(tempfile.mkdtemp(prefix="kdeploy-work-"))
    early = None
    SERVER.warm()  # the runtime children's fork server imports its runtimes while this process loads the model
    try:
        if lane:
            early = ConversionLane.early(Path(opts.model), prof, opts.parallel, work)
        ctx = _load(opts, prof, out_path, custom, work, progress)
    except BaseException:
        if early is not None:
            early.close()
        shutil.rmtree(work, ignore_errors=True)
        raise
    ctx.lane = early
    return ctx


def _load(opts: RunOptions, prof: TargetProfile, out_path: Path | None, custom, work: Path,
          progress: Progress) -> Context:
    progress("load", str(opts.model))
    m = load_model(opts.model, trust_custom_code=opts.trust_custom_code, custom_objects=custom,
                   input_shapes=opts.input_shapes, seed=opts.seed,
                   trusted_packages=[*prof.trusted_packages, *opts.trusted_packages],
                   data_signature=(lambda: data_signature(opts.data)) if opts.data is not None else None)
    m = dataclasses.replace(m, inputs=static_batch_inputs(m.inputs, prof))
    ds = load_data(opts.data, m.inputs) if opts.data is not None else synthetic_data(m.inputs, SYNTHETIC_SAMPLES,
                                                                                     opts.seed)
    cal, val = split(ds, prof.calibration_samples, opts.seed)
    spare = None
    if "int8" in prof.precisions and prof.calibration.enabled:  # the calibration repair's extra samples (run.calibrate)
        spare, val = hold_back(val, prof.calibration.extra_samples, prof.calibration.min_validation_samples, opts.seed)
    staging = make_staging(out_path)
    try:  # from here on the caller cleans up through ctx; until then, this does (Ctrl-C, SIGTERM)
        ctx = Context(m, prof, ds, cal, val, _reference, staging, work, opts.seed, progress, describe_host(),
                      parallel=opts.parallel, spare=spare)
        _findings(ctx)
    except BaseException:
        discard_staging(staging)
        raise
    return ctx


def _reference(ctx: Context) -> list[np.ndarray]:
    """Keras' outputs on the validation inputs (`Context.reference`), and a finding where they are not finite."""
    m, val = ctx.model, ctx.validation
    ctx.progress("reference", f"Keras outputs on {len(val)} validation samples")
    try:
        reference = m.predict(val.inputs, batch_size=batch_size_for(val.inputs, REFERENCE_BATCH))
    except Exception as e:  # the model refuses these inputs (an index out of range, a shape it cannot take)
        where = ("synthetic inputs (no --data given); pass --data with real inputs" if ctx.data.synthetic
                 else f"the inputs of {ctx.data.source}; check their ranges and shapes")
        raise UsageError(f"the Keras model failed on {where}: {first_error_line(e)}") from None
    release_memory()  # the batch activations are freed; hand their pages back before the next conversion
    bad = [t.name for t, r in zip(m.outputs, reference) if not np.all(np.isfinite(r))]
    if bad:
        ctx.finding("error", "reference-non-finite",
                    f"the Keras model itself produces NaN/Inf on the validation inputs (outputs {bad}); "
                    "no candidate can be judged against it")
    return reference


def _findings(ctx: Context) -> None:
    m, ds, prof = ctx.model, ctx.data, ctx.profile
    for sev, code, msg in m.findings:
        ctx.finding(sev, code, msg)
    if ds.synthetic:
        ctx.finding("warning", "synthetic-data",
                    f"no --data given: {len(ds)} synthetic inputs (uniform [0, 1)) were used, so fidelity figures "
                    "and int8 calibration are not representative of real inputs")
    if not ds.synthetic and {"int8", "int16x8"} & set(prof.precisions):
        input_spread_findings(ctx)


def input_spread_findings(ctx: Context) -> None:
    """Warns when an input's features have ranges orders of magnitude apart (rule: `inspection.rules.input_spread`)."""
    for name, ratio, lo, hi in input_spread(ctx.model.inputs, ctx.data.inputs):
        ctx.finding("warning", "input-scale-spread",
                    f"input '{name}' has features whose ranges differ {ratio:.1e}x ({lo:.3g} to {hi:.3g}); "
                    "int8/int16x8 quantize the input tensor with one scale, so small-range features lose "
                    "resolution — normalize inputs before the model if those candidates fail")
