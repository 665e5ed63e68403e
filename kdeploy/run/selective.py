"""Selective int8: when full int8 fails, find a small set of Keras layers to keep in float.

The search ranks the layers by full int8's per-layer error (`kdeploy.run.diagnose`), measured
once, and keeps the worst-ranked ones in float by groups (`_group_search`): the worst 1 and 2,
then the worst half of the layers, then every layer but one (when that still fails, nothing smaller
will: the search stops), then 4, 8, ... up to the first set that passes, bisected back down and thinned. Each try quantizes
post-training int8's calibrated model again with its set in float (`artifacts.tflite.quantize_calibrated`:
no calibration per try) and is judged by `run.judge` with exactly the gates
evaluation applies to an int8 candidate on this profile, so a set the search accepts passes
evaluation's fidelity, consistency, task and robustness checks. Bounded by `selective.max_tries`
conversions and `selective.max_seconds`. The candidate (`int8-mixed`, `recipe.float_layers`,
`recipe.search`) then goes through evaluation, checks and selection like every other one.

Targets that run integer kernels only (`full_integer`, the `mcu` profile) get no float layers:
the layers that break int8 are named in a finding, with the fix a user can make.

A full int8 that crashes its runtime (e.g. LiteRT's int8 DIV refusing a divisor that quantizes
to its zero point) is repaired first, by the crash: the failing op's Keras layer (for a
SavedModel, which has no Keras layers, its name scope; an op in neither, the op alone) is kept
in float and the model converted and judged again, until it runs (`_repair_crash`); the search
above then goes on from there if it still disagrees. For a SavedModel the layers of that search
are name scopes too, and the denylist is always by node (`QuantizationDebugOptions(
denylisted_nodes=...)`, the float `.tflite`'s output tensor names).
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from kdeploy.artifacts import Artifact
from kdeploy.debug.attribution import ranked_layers
from kdeploy.debug.locate import crash_site, describe, matching_node, parse_failure
from kdeploy.errors import ConversionError
from kdeploy.recipes import selective_recipe
from kdeploy.run.context import Build, Context
from kdeploy.run.convert import CALIBRATED_INT8, ReferenceModel, add_onnx_twin, keeps_tflite, reference_float
from kdeploy.run.diagnose import layer_errors, layer_namer, layer_order, layer_tensors
from kdeploy.run.judge import failed_text, judge, runs_tflite_only  # noqa: F401 (judge: calibrate imports it here)
from kdeploy.util import release_memory

_QUANTIZER = threading.Lock()

LITERT_FAILED = failed_text("litert")  # how `judge` words a try that LiteRT did not run
INPUT_LAYERS = ("Normalization", "Rescaling")  # in-model preprocessing a user can move before the model


def selective_builds(ctx: Context, ref: ReferenceModel, builds: list[Build],
                     verdict: tuple[bool, str] | None = None, log: dict | None = None) -> list[Build]:
    """The `int8-mixed` candidate when full int8 fails and some float layers fix it; else none (with a finding).

    Args:
        verdict: full int8's (passed, detail) from `judge`, when the caller has it (else judged here).
        log: filled with the search's `tries` (each conversion, passing or not) for the caller's record.
    """
    prof = ctx.profile
    int8 = next((a for b in builds if b.name == "int8" for a in b.artifacts if a.format == "tflite"), None)
    if int8 is None or "int8" not in prof.precisions or not prof.selective.enabled:
        return []
    started = time.perf_counter()
    if verdict is None:
        ctx.progress("selective", f"judging full int8 on {', '.join(prof.runtimes)}")
        verdict = judge(ctx, int8)
    passed, detail = verdict
    if passed:
        return []
    crashed = parse_failure(detail) is not None
    if _did_not_run(ctx, detail) and not crashed:
        ctx.finding("warning", "selective-int8-failed", f"full int8 fails ({detail}): the runtime names no node, so "
                                                        "there is no op to keep in float")
        return []
    float_path = reference_float(ctx, ref)
    # the figures are the report's sensitivity of full int8 too (`diagnose`: one dump, at the same tolerance)
    tol = ctx.tolerance(next(b for b in builds if b.name == "int8"), "int8")
    if crashed:  # the crashing int8 has no tensors to dump
        (float_t,) = layer_tensors(ctx, [float_path], int8.io)
    else:
        errors = layer_errors(ctx, float_path, int8.path, int8.io, tol, "int8")
        float_t = errors.reference
    order = layer_order(ctx, float_t)
    first_detail = detail
    sites: list[dict] = []  # where full int8 (and each try after it) crashed
    tries: list[dict] = []
    if log is not None:
        log["tries"] = tries
    kept: list[str] = []  # Keras layers (name scopes for a SavedModel) kept in float
    nodes: list[str] = []  # single ops kept in float: crashing ops outside any layer or scope
    best: Artifact | None = None
    start = int8
    if crashed:
        if prof.full_integer:
            site = crash_site(int8.path, "tflite", detail, layer_namer(ctx))
            ctx.finding("error", "int8-crash", _crash_text(ctx, site, detail))
            return []
        start, ok, detail = _repair_crash(ctx, ref, float_path, float_t, int8, detail, kept, nodes, tries, sites)
        if start is None:
            _failed(ctx, detail, kept + nodes, tries, started)
            return []
        best = start if ok else None
    crash_kept = list(kept)
    if best is None:
        if start is not int8:
            errors = layer_errors(ctx, float_path, start.path, start.io, tol, "int8")
        rows = errors.sensitivity
        if prof.full_integer:
            ctx.finding("error", "int8-breaking-layers", _breaking(ctx, rows, errors.candidate.meta, detail))
            return []
    else:
        rows = []
    recipe = selective_recipe(prof)
    search: dict = {}
    if best is None:
        ranking = [x for x in ranked_layers(rows) if x not in kept and float_t.meta.get(x, {}).get("nodes")]
        cap = len(order) - 1 - len(kept)  # every layer in float is the fp32 candidate: one stays int8
        ctx.searching = True  # no per-layer dump made ahead beside the tries (`evaluate.RunsAhead._failing`)
        try:
            best, chosen, search = _group_search(ctx, ref, float_t, ranking[:max(cap, 0)], list(kept), nodes, tries,
                                                 started)
        finally:
            ctx.searching = False
            release_memory()  # the tries' quantizer heaps (+0.2 GB on MobileNetV2-224), before the diagnosis made ahead
        kept += chosen
    seconds = round(time.perf_counter() - started, 3)
    if best is None:
        _failed(ctx, detail, kept + nodes, tries, started, search.get("stopped", ""))
        return []
    kept = [layer for layer in order if layer in kept]
    b = Build(recipe.name, recipe.precision, recipe.describe(len(ctx.calibration)), spec=recipe)
    worst = {r["layer"]: r["value"] for r in rows if r["metric"] == "cosine_mean"}
    b.recipe.update({
        "converter": "tflite quantizer on int8's calibrated model (denylisted_nodes)",
        "float_layers": kept,
        "why": _why(ctx, first_detail, kept, crash_kept, nodes, sites, worst),
        "search": {"tries": tries, "max_tries": prof.selective.max_tries, "max_seconds": prof.selective.max_seconds,
                   "seconds": seconds, "conversions": len(tries), **search,
                   "ranking": "per-layer error of full int8 against the float .tflite (LiteRT, all tensors kept), "
                              "measured once"},
    })
    if ctx.model.keras_model is None:  # a SavedModel: no Keras layers; name scopes, and the nodes denylisted
        b.recipe.update({"float_layers": [], "float_scopes": kept,
                         "float_nodes": [n for k in kept for n in float_t.meta.get(k, {}).get("nodes", [])] + nodes})
    elif nodes:  # ops kept in float outside any layer: the crash repair's, by node
        b.recipe["float_nodes"] = list(nodes)
    if sites:
        b.recipe["search"]["crash_sites"] = sites
    tfl = Artifact(format="tflite", path=ctx.staging / "artifacts" / f"{recipe.name}.tflite", precision="int8",
                   source=best.source, io=best.io)
    tfl.path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best.path, tfl.path)
    tfl.measure()
    ctx.reuse_runs(best, tfl)  # the search judged these bytes: evaluation takes those runs
    if keeps_tflite(ctx):
        b.artifacts.append(tfl)
    ctx.run_ahead(b)  # its .tflite runs while its ONNX twin converts
    add_onnx_twin(ctx, b, recipe, tfl, ref)
    release_memory()  # tf2onnx's freed graphs
    if not keeps_tflite(ctx):
        tfl.path.unlink(missing_ok=True)
    return [b]


def _group_search(ctx: Context, ref: ReferenceModel, float_t, ranking: list[str], base: list[str],
                  nodes: list[str], tries: list[dict], started: float) -> tuple[Artifact | None, list[str], dict]:
    """The fewest of the worst-ranked layers (a prefix of `ranking`, kept in float on top of `base`) that pass.

    The ranking is full int8's per-layer error, measured once (no dump after a try). Prefix sizes
    are tried in this order: 1 and 2 (one or two broken layers are the common case), then the worst
    half of `ranking`, then all of it (every layer but one: when that still fails, no prefix passes
    and the search stops there; a real model's repair may need more than half, e.g. MTCNN's ONet
    kept six of its first seven layers float), then 4, 8, ... up to the first that passes, then the sizes between
    the largest failing and the smallest passing one are bisected; last, each layer of the passing
    set but its last is dropped again if the candidate still passes (thinning). Every step stops
    when `selective.max_tries` or `selective.max_seconds` would be exceeded; the smallest passing
    set found so far is the result.

    Where a core is free (`_width`), two tries run side by side: 1 and 2, half and all, two
    doublings, the two thirds of a bisection, and in thinning the set without the next layer beside the
    set without the next two. Each verdict is read as the one-at-a-time search would: the smallest passing
    size of a pair wins; the second drop counts only where the first passed (then it was tried on the set
    the one-at-a-time search would try next), else it is tried again.

    Returns:
        (the passing `.tflite` or None, the layers chosen from `ranking`, the search record:
        `half` and `all` (those sizes and whether they passed), `stopped` (why, when nothing passed)).
    """
    half = max(1, len(ranking) // 2)
    record: dict = {"half": {"layers": half}, "all": {"layers": len(ranking)}}
    if not ranking:
        return None, [], {"stopped": "no layer with ops left to keep in float"}
    verdicts: dict[int, bool] = {}
    width = _width(ctx)

    def attempt(plan: list[tuple[str, list[str]]]) -> list[tuple[Artifact | None, bool | None]]:
        """Tries each (phase, layers from `ranking`), side by side; (None, None) where the budget ran out."""
        room = min(len(plan), ctx.profile.selective.max_tries - len(tries)) if _budget_left(ctx, tries, started) else 0
        done = _side_by_side(ctx, ref, float_t, [([*base, *chosen], phase) for phase, chosen in plan[:room]], tries,
                             nodes) if room else []
        for (_, chosen), (_, ok) in zip(plan, done):
            if chosen == ranking[:len(chosen)]:
                verdicts[len(chosen)] = ok
        return done + [(None, None)] * (len(plan) - room)

    def sizes(ks: list[int], lo: int, hi: int | None) -> tuple[int, int | None, Artifact | None, bool]:
        """Prefix sizes `ks` (ascending), `width` at a time, up to the first that passes: (largest failing, smallest
        passing, its artifact, whether the budget ran out)."""
        for i in range(0, len(ks), width):
            chunk = ks[i:i + width]
            phases = ["half" if k == half else "all" if k == len(ranking) else "grow" if hi is None else "bisect"
                      for k in chunk]
            for k, (art, ok) in zip(chunk, attempt([(ph, ranking[:k]) for ph, k in zip(phases, chunk)])):
                if ok is None:
                    return lo, hi, None, True
                if ok:
                    return lo, k, art, False
                lo = k
        return lo, hi, None, False

    lo, hi, art, out = sizes(list(dict.fromkeys(k for k in (1, 2, half, len(ranking)) if k <= len(ranking))), 0, None)
    best: tuple[Artifact | None, list[str]] = (art, ranking[:hi]) if hi is not None else (None, [])
    for key in ("half", "all"):
        if record[key]["layers"] in verdicts:
            record[key]["passed"] = verdicts[record[key]["layers"]]
    if hi is None:
        if verdicts.get(len(ranking)) is False:
            record["stopped"] = (f"keeping every ranked layer but one ({len(ranking)}) in float still fails: no "
                                 "smaller set passes by this ranking, so the search stopped")
        else:
            record["stopped"] = _budget_text(ctx, tries, started)
        return None, [], record
    k = max(lo * 2, 4)
    doublings = []
    while k < hi:
        doublings.append(k)
        k *= 2
    if doublings and not out:
        lo, found, art, out = sizes(doublings, lo, None)
        if found is not None and found < hi:
            hi, best = found, (art, ranking[:found])
    while hi - lo > 1 and not out:  # bisect (in thirds, two at a time) between the failing and the passing size
        mids = sorted({lo + (hi - lo) * j // (width + 1) for j in range(1, width + 1)} - {lo, hi})
        lo, found, art, out = sizes(mids, lo, hi)
        if found is not None and found < hi:
            hi, best = found, (art, ranking[:found])
    chosen = best[1]
    queue = list(reversed(chosen[:-1]))  # thinning: the ranking is a heuristic
    while queue and not out:
        # side by side: the set without the next layer, and without the next two (what one at a time tries second
        # when the first drop passes); the second verdict counts only where the first drop passed
        sets = [[x for x in chosen if x not in queue[:j]] for j in range(1, min(width, len(queue)) + 1)]
        done = attempt([("thin", fewer) for fewer in sets])
        out = any(ok is None for _, ok in done)
        decided = 0
        for fewer, (art, ok) in zip(sets, done):
            if ok is None:
                break
            decided += 1
            if not ok:
                break
            chosen, best = fewer, (art, fewer)
        queue = queue[decided:]  # a failed drop keeps its layer float and ends the round's verdicts
    return best[0], best[1], record


def _width(ctx: Context) -> int:
    """Tries side by side: two where a core is free (a multi-core host whose conversion lane is done) and the judge
    converts nothing (`runs_tflite_only`), else one."""
    import os

    return 2 if (os.cpu_count() or 1) >= 2 and not ctx.lane_busy() and runs_tflite_only(ctx) else 1


def _side_by_side(ctx: Context, ref: ReferenceModel, float_t, plan: list[tuple[list[str], str]], tries: list[dict],
                  nodes: list[str]) -> list[tuple[Artifact | None, bool]]:
    """Runs the tries of `plan` ((layers, phase)) in threads (the quantizer one at a time, the judges' LiteRT children
    side by side); recorded in `tries` in plan order."""
    from concurrent.futures import ThreadPoolExecutor

    _calibrated(ctx, ref)  # made once, before any thread reads it
    first = len(tries)
    rows: list[list[dict]] = [[] for _ in plan]

    def one(i: int) -> tuple[Artifact | None, bool]:
        art, ok, _ = _try(ctx, ref, float_t, plan[i][0], first + i, rows[i], nodes, plan[i][1])
        return art, ok

    if len(plan) <= 1:
        done = [one(i) for i in range(len(plan))]
    else:
        with ThreadPoolExecutor(len(plan), thread_name_prefix="kdeploy-try") as pool:
            done = list(pool.map(one, range(len(plan))))
    for r in rows:
        tries.extend(r)
    return done


def _budget_left(ctx: Context, tries: list[dict], started: float) -> bool:
    """Whether one more conversion fits in `selective.max_tries` and, at the mean try's duration so far, in
    `selective.max_seconds`."""
    s = ctx.profile.selective
    if len(tries) >= s.max_tries:
        return False
    timed = [t["seconds"] for t in tries if "seconds" in t]
    per_try = sum(timed) / len(timed) if timed else 0.0
    return time.perf_counter() - started + per_try <= s.max_seconds


def _budget_text(ctx: Context, tries: list[dict], started: float) -> str:
    s = ctx.profile.selective
    return (f"the search's budget ran out (selective.max_tries = {s.max_tries}, max_seconds = {s.max_seconds:g}; "
            f"{len(tries)} conversion(s) in {time.perf_counter() - started:.1f} s)")


def _try(ctx: Context, ref: ReferenceModel, float_t, layers: list[str], n: int,
         tries: list[dict], extra_nodes: list[str] = (), phase: str = "crash") -> tuple[Artifact | None, bool, str]:
    """Converts with `layers` (and the single ops `extra_nodes`) in float and judges it; records the try
    (with its `phase`: crash, grow, half, bisect, thin, and its seconds)."""
    from kdeploy.artifacts.tflite import quantize_calibrated

    t0 = time.perf_counter()
    nodes = [node for layer in layers for node in float_t.meta.get(layer, {}).get("nodes", [])] + list(extra_nodes)
    ctx.progress("selective", f"try {n + 1} ({phase}): {len(layers) + len(extra_nodes)} in float: "
                              f"{_short([*layers, *extra_nodes])}")
    row: dict = {"phase": phase, "float_layers": list(layers), **_nodes_row(extra_nodes)}
    try:
        with _QUANTIZER:  # TensorFlow's quantizer reports errors through process-wide state: one call at a time
            art = quantize_calibrated(_calibrated(ctx, ref), ctx.work / f"int8-mixed-{n}.tflite",
                                      [t.name for t in ctx.model.inputs], ref.signature_outputs, nodes)
    except ConversionError as e:
        tries.append({**row, "passed": False, "detail": str(e), "seconds": round(time.perf_counter() - t0, 3)})
        return None, False, str(e)
    ok, detail = judge(ctx, art, skip_probes_on_failure=phase != "crash")  # a crash repair must see probe crashes
    tries.append({**row, "passed": ok, "size_bytes": art.size_bytes, "detail": detail,
                  "seconds": round(time.perf_counter() - t0, 3)})
    return art, ok, detail


def _short(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _nodes_row(nodes) -> dict:
    return {"float_nodes": list(nodes)} if nodes else {}


def _repair_crash(ctx: Context, ref: ReferenceModel, float_path: Path, float_t, int8: Artifact, detail: str,
                  kept: list[str], nodes: list[str], tries: list[dict], sites: list[dict],
                  ) -> tuple[Artifact | None, bool, str]:
    """Keeps each op that crashes LiteRT in float (its Keras layer; for a SavedModel its name scope; else the op
    alone) and converts again, until the model runs.

    `kept`, `nodes`, `tries` and `sites` are filled in place.

    Returns:
        (the first try that runs, whether it passes, its judge detail), or (None, False, why not):
        the failing node was not found, kept in float it still failed, or `selective.max_tries` ran out.
    """
    from kdeploy.artifacts.flatbuffer import read_tflite_file
    from kdeploy.debug.names import ScopeNamer

    namer = layer_namer(ctx)
    graph = read_tflite_file(float_path)
    current, text = int8, detail
    while len(tries) < ctx.profile.selective.max_tries:
        site = crash_site(current.path, "tflite", text, namer)
        if site is None:
            return None, False, f"{text} (the failing node is not in {current.path.name})"
        if any(x["node_name"] == site["node_name"] for x in sites):
            return None, False, f"{text} (kept in float, the op failed again)"
        sites.append({"runtime": "litert", "artifact": current.path.name, **site})
        group = site["layer"] if namer is not None else ScopeNamer().layer_of(site["node_name"])
        if group and group in float_t.meta and group not in kept:
            kept.append(group)
        else:
            node = matching_node(graph.ops, graph.tensors, site["op"], site["node_name"])
            if node is None:
                return None, False, f"{text} (no op {site['op']} '{site['node_name']}' in the float model to keep)"
            nodes.append(node)
        art, ok, text = _try(ctx, ref, float_t, kept, len(tries), tries, nodes)
        if art is None or (_did_not_run(ctx, text) and parse_failure(text) is None):
            return None, False, text  # not converted, or a failure that names no node (a signal)
        if parse_failure(text) is None:
            return art, ok, text
        current = art
    return None, False, f"still failing after selective.max_tries = {ctx.profile.selective.max_tries}: {text}"


def _failed(ctx: Context, detail: str, kept: list[str], tries: list[dict], started: float, stopped: str = "") -> None:
    seconds = round(time.perf_counter() - started, 3)
    s = ctx.profile.selective
    ctx.finding("warning", "selective-int8-failed",
                f"full int8 fails ({detail}); " + (f"{stopped}; " if stopped else "")
                + f"no set of float layers passed within {len(tries)} conversion(s) and {seconds} s (selective."
                f"max_tries = {s.max_tries}, max_seconds = {s.max_seconds:g}); tries: "
                + " | ".join(f"{t.get('phase', '')} {len(t['float_layers']) + len(t.get('float_nodes', []))} float "
                             f"({_short(t['float_layers'] + t.get('float_nodes', []), 3)}): {t['detail']}"
                             for t in tries))


def _why(ctx: Context, detail: str, kept: list[str], crash_kept: list[str], nodes: list[str], sites: list[dict],
         worst: dict[str, float]) -> str:
    """`recipe.why` of int8-mixed: the crash sites kept in float, then the layers the per-layer error chose."""
    keras_layers = ctx.model.keras_model is not None
    parts = []
    if sites:
        parts.append("crashes LiteRT at " + "; ".join(f"{describe(s, keras_layers)} ({s['reason']})" for s in sites)
                     + "; kept in float for that: " + ", ".join([*crash_kept, *nodes]))
    chosen = [k for k in kept if k not in crash_kept]
    if chosen:
        parts.append("kept in float, by per-layer error: " + ", ".join(
            f"{k} (int8 output cosine {worst.get(k, float('nan')):.3f} vs float)" for k in chosen))
    return ("full int8 " if sites else f"full int8 fails ({detail}); ") + "; ".join(parts)


def _crash_text(ctx: Context, site: dict | None, detail: str) -> str:
    """The finding for a full-integer target whose int8 crashes: where, and what a user can change."""
    where = f"at {describe(site, ctx.model.keras_model is not None)} " if site else ""
    fix = ("give the divisor a range whose int8 steps never round to zero (e.g. add an epsilon of at least one "
           "quantization step, or clip it away from zero) or move the division out of the model"
           if site and site["op"] == "DIV" else "change that op so its int8 kernel accepts the calibrated ranges")
    return (f"full int8 crashes LiteRT {where}({detail}); target {ctx.profile.name} runs integer kernels only, so the "
            f"op is not kept in float. Fix: {fix}, or a target with float kernels (selective int8 keeps it in float "
            "there)")


def _calibrated(ctx: Context, ref: ReferenceModel) -> Path:
    """Post-training int8's calibrated model (kept by its conversion; calibrated here once when it was reused
    from the cache): every try quantizes it again with other ops in float, without calibrating again."""
    from kdeploy.artifacts.tflite import calibrated

    path = ctx.work / CALIBRATED_INT8
    if not path.is_file():
        ctx.progress("selective", "calibrating int8 once for the search")
        path.write_bytes(calibrated(reference_float(ctx, ref), ctx.calibration.inputs))
    return path


def _did_not_run(ctx: Context, detail: str) -> bool:
    """Whether a judge's detail says a deployed runtime failed to run the model (`judge.failed_text`)."""
    return any(detail.startswith(failed_text(rt)) for rt in ctx.profile.runtimes)


def _breaking(ctx: Context, rows: list[dict], meta: dict, detail: str) -> str:
    """The finding for a full-integer target: which layers break int8, and what a user can change."""
    cos = {r["layer"]: r["value"] for r in rows if r["metric"] == "cosine_mean"}
    added = {r["layer"]: r["value"] for r in rows if r["metric"] == "added_cosine_loss"}
    worst = [layer for layer in ranked_layers(rows) if added.get(layer, 0) > 0.01][:3] or ranked_layers(rows)[:1]
    from kdeploy.debug.names import layer_paths

    kinds = {p: type(layer).__name__ for p, layer in layer_paths(ctx.model.keras_model).items()}
    fixes, trained = [], []
    for layer in worst:
        if kinds.get(layer) in INPUT_LAYERS and not meta.get(layer, {}).get("fed_by"):
            fixes.append(f"normalize the inputs before the model and remove its {kinds[layer]} layer '{layer}' (the "
                         "int8 input tensor has one scale, so small-range features are quantized to a few levels)")
        else:
            trained.append(f"'{layer}'")
    if trained:  # quantization-aware training (`run.qat`) runs after this finding and appends its result to it
        qat = ("quantization-aware training, which kdeploy tries next as candidate qat-int8 (result below)"
               if ctx.profile.qat.enabled else "quantization-aware training ([qat] enabled = true in the profile)")
        fixes.append(f"{qat}, for {', '.join(trained)}; or a target with float kernels (selective int8 keeps "
                     f"{'it' if len(trained) == 1 else 'them'} in float there)")
    return (f"full int8 fails ({detail}); target {ctx.profile.name} runs integer kernels only, so no layer is kept "
            "in float. Layers that break int8, worst first: "
            + ", ".join(f"{k} ({kinds.get(k, '?')}, {meta.get(k, {}).get('op', '?')}; int8 output cosine "
                        f"{cos.get(k, float('nan')):.3f} vs float)" for k in worst)
            + ". Fix: " + "; ".join(fixes))
