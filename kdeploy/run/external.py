"""Builds for `check`: one candidate per artifact built elsewhere, its outputs paired with the model's.

Names, shapes and `--output-map` pair most outputs without running anything
(`kdeploy.artifacts.external`). Outputs of equal shapes that names do not tell apart are paired by
values: the artifact runs once on the validation inputs, in a child process on its runtime
(`runtimes.worker.run_isolated`, as evaluation runs it), and the assignment that agrees best
with Keras is taken when it is unambiguous. An ambiguous one is a UsageError naming
`--output-map` where the pairing could change the verdict; where no pairing passes the target's
fidelity tolerance, the candidate fails (its pairing `unverified`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from kdeploy.compare import compare
from kdeploy.errors import UsageError
from kdeploy.memory import batch_size_for
from kdeploy.profiles import TargetProfile, builtin_names, resolve_profile
from kdeploy.run.context import Build, Context
from kdeploy.runtimes import RUNTIME_FORMATS

# The runtime that runs an artifact of each format for the value pairing (any runtime of the
# format would do: the pairing is about which tensor is which, not about the deployed runtime).
PAIRING_RUNTIME = {"tflite": "litert", "onnx": "onnxruntime"}
PAIRING_BATCH = 64  # at most, as evaluation's fidelity runs


def check_formats(prof: TargetProfile, paths: list[Path]) -> None:
    """Refuses, before any work, an artifact that a deployed runtime of the target cannot run.

    A candidate must run on every runtime in `runtimes` (`checks.budget_checks`): an `.onnx` on
    cpu-edge (LiteRT only) could never pass, and the report would say only "artifact for litert".

    Raises:
        UsageError: naming the target's runtimes, the format each runs, and the built-in targets
            (or the runtimes for a profile) that run the artifact's format.
    """
    for p in paths:
        fmt = p.suffix.lower().lstrip(".")
        if all(RUNTIME_FORMATS[rt] == fmt for rt in prof.runtimes):
            continue
        deploys = ", and ".join(f"{rt}, which runs .{RUNTIME_FORMATS[rt]}" for rt in prof.runtimes)
        each = " (a candidate must run on each)" if len(prof.runtimes) > 1 else ""
        targets = [n for n in builtin_names() if all(RUNTIME_FORMATS[rt] == fmt for rt in resolve_profile(n).runtimes)]
        runners = ", ".join(rt for rt, f in RUNTIME_FORMATS.items() if f == fmt)
        use = f"--target {' / '.join(targets)} or " if targets else ""
        raise UsageError(
            f"artifact {p.name} is .{fmt}, which target {prof.name} cannot run: {prof.name} deploys {deploys}{each}; "
            f"for .{fmt} use {use}a profile whose runtimes all run .{fmt} ({runners})"
        )


def external_builds(ctx: Context, paths: list[Path], precision: str | None,
                    output_map: dict[str, str] | None = None) -> list[Build]:
    """One candidate per artifact file, copied into the staging folder, its outputs paired with the model's.

    Raises:
        UsageError: an artifact that does not fit the model (see `external_artifact`), a precision
            the target has no tolerance for, or outputs that neither names, shapes nor values pair.
    """
    from kdeploy.artifacts.external import external_artifact

    shapes = {t.name: tuple(ctx.validation.inputs[t.name].shape[1:]) for t in ctx.model.inputs}
    shapes.update({t.name: tuple(r.shape[1:]) for t, r in zip(ctx.model.outputs, ctx.reference)})
    builds: list[Build] = []
    for i, p in enumerate(paths):
        art, plan = external_artifact(p, ctx.model, precision, shapes=shapes, output_map=output_map)
        if art.precision not in ctx.profile.tolerances:
            raise UsageError(
                f"artifact {p.name} has precision {art.precision}, which target {ctx.profile.name} gives no "
                f"tolerance for (allowed: {', '.join(ctx.profile.tolerances)})"
            )
        dest = ctx.staging / "artifacts" / f"{i}-{p.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)
        art.path = dest
        errors = [] if plan.complete else _pair_by_values(ctx, art, plan, i, p.name)
        art.io["outputs"] = plan.ordered()
        art.pairing = plan.report()
        name = p.stem if p.stem not in [b.name for b in builds] else f"{p.stem}-{i}"
        builds.append(Build(name, art.precision, {"precision": art.precision, "source": str(p)}, [art], errors=errors))
    return builds


def _pair_by_values(ctx: Context, art, plan, i: int, label: str) -> list[str]:
    """Runs the artifact once (every output, artifact order) and settles the plan's groups by their values.

    Returns:
        Problems that fail the candidate (it did not run, or its outputs are not finite): those
        outputs are then paired in artifact order, marked `unverified`.
    """
    import numpy as np

    from kdeploy.artifacts.external import Pairing
    from kdeploy.runtimes.jobs import RunJob
    from kdeploy.runtimes.worker import RuntimeFailure, run_isolated

    feeds = ctx.work / "pairing-feeds.npz"
    if not feeds.is_file():
        np.savez(feeds, **ctx.validation.inputs)
    runtime = PAIRING_RUNTIME[art.format]
    job = RunJob(runtime=runtime, artifact_path=str(art.path), io={**art.io, "outputs": plan.tensors},
                 feeds_path=str(feeds), fidelity_batch=batch_size_for(ctx.validation.inputs, PAIRING_BATCH))
    ctx.progress("pair", f"{label}: outputs of equal shapes by their values on {runtime}")
    try:
        outs, _ = run_isolated(job, ctx.work / f"pairing-{i}", timeout_s=ctx.profile.timing.timeout_s)
    except RuntimeFailure as e:
        left = [(o, t) for outs_, tensors in plan.groups for o, t in zip(outs_, tensors)]
        for o, t in left:
            plan.paired[o] = Pairing(o, t, "unverified", f"artifact order: the artifact failed to run on {runtime}")
        plan.groups = []
        return [f"outputs {[o for o, _ in left]} could not be paired by values: the artifact failed to run on "
                f"{runtime} ({e})"]
    names = [t.name for t in ctx.model.outputs]
    reference = dict(zip(names, ctx.reference))
    kinds = dict(zip(names, ctx.model.output_kinds))
    tol = ctx.profile.tolerances[art.precision]

    def passes(output: str, values) -> bool:  # the fidelity check evaluation would make of this pairing
        return compare([reference[output]], [values], names=[output], kinds=[kinds[output]], tol=tol,
                       runtime=runtime, reference="keras", precision=art.precision)[0].passed

    return plan.settle_by_values(dict(zip(plan.tensors, outs)), reference, passes)
