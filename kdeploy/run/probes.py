"""Robustness probe inputs and Keras' outputs on them, made once per run (`probe_inputs`).

The evaluation feeds them to the runtime workers; the build stage makes them early while the
conversion lane finishes (the parent would otherwise wait idle), so they are memoized in the
Context.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdeploy.memory import REFERENCE_BATCH, batch_size_for
from kdeploy.robustness import make_probes
from kdeploy.run.context import Context
from kdeploy.util import release_memory

Probes = tuple[dict[str, tuple[str, dict, list]], Path | None]


def probe_inputs(ctx: Context) -> Probes:
    """probe name -> (description, inputs, Keras outputs), and the `.npz` the workers read (None: no probes).

    Computed on the first call and kept in `ctx.probes`.
    """
    if ctx.probes is None:
        ctx.probes = _make(ctx)
    return ctx.probes


def _make(ctx: Context) -> Probes:
    prof = ctx.profile
    fixed_batch = ctx.model.inputs[0].shape[0]
    if not prof.robustness.enabled:
        return {}, None
    if fixed_batch not in (None, 1):
        ctx.finding("info", "robustness-skipped",
                    f"robustness probes need batch 1 or a dynamic batch; the model's batch is fixed at {fixed_batch}")
        return {}, None
    if any(not np.all(np.isfinite(r)) for r in ctx.reference):
        return {}, None  # the reference itself is broken; a finding already says so
    sets = make_probes(ctx.validation.inputs, ctx.data.inputs, prof.robustness, ctx.seed)
    if not sets:
        return {}, None
    ctx.progress("probe", f"Keras outputs on robustness probes {', '.join(sets)}")
    # one predict for all of them: Keras' per-call cost, and its batches the size of the reference's (`LoadedModel`)
    names = [t.name for t in ctx.model.inputs]
    joined = {k: np.concatenate([feeds[k] for _, feeds in sets.values()]) for k in names}
    outs = ctx.model.predict(joined, batch_size=batch_size_for(joined, REFERENCE_BATCH))
    probes, flat, start = {}, {}, 0
    for name, (desc, feeds) in sets.items():
        n = len(feeds[names[0]])
        probes[name] = (desc, feeds, [o[start:start + n] for o in outs])
        flat.update({f"{name}/{k}": v for k, v in feeds.items()})
        start += n
    release_memory()  # Keras' batch activations, before the runtime children start
    path = ctx.work / "probes.npz"
    np.savez(path, **flat)
    return probes, path
