"""Evaluation: every artifact on every runtime of the target, compared with Keras and with each other.

Verdicts against Keras come from the target's deployed runtimes; cross-check runtimes are
reported with their figures and held to the deployed one as consistency (`kdeploy.acceptance`).

Fidelity and probe runs happen in child processes (two at a time on a multi-core host); latency
is timed afterwards, alone (`kdeploy.run.timing`); checks turn the figures into verdicts
(`kdeploy.run.checks`).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from kdeploy.acceptance import gates_consistency
from kdeploy.artifacts import Artifact
from kdeploy.compare import compare
from kdeploy.memory import batch_size_for
from kdeploy.profiles import TargetProfile
from kdeploy.report.figures import budget_row
from kdeploy.report.model import ArtifactOut, Candidate, Check, RobustnessOut
from kdeploy.robustness import agreement
from kdeploy.run.checks import add_consistency, add_fidelity, budget_checks, is_latency_check, latency_check
from kdeploy.run.context import Build, Context, run_key
from kdeploy.run.diagnose import task_checks
from kdeploy.run.lock import timing_lock
from kdeploy.run.probes import probe_inputs
from kdeploy.run.timing import LATENCY_FINDINGS, latency_findings, settle_budget_latency, time_candidates
from kdeploy.runtimes import RUNTIME_FORMATS
from kdeploy.runtimes.jobs import RunJob
from kdeploy.runtimes.worker import RuntimeFailure, run_isolated
from kdeploy.util import release_memory

FIDELITY_BATCH = 64  # at most; fewer for large inputs (`memory.batch_size_for`)
# Fidelity/probe child processes run at most this many at a time (never more than the host's
# cores). Latency is never timed while anything else runs.
PARALLEL_RUNS = 2


def evaluate(ctx: Context, builds: list[Build]) -> list[Candidate]:
    """Runs every artifact on its runtime(s), compares, measures and applies the budgets.

    1. Each artifact runs in a child process per runtime (two at a time on a multi-core host):
       fidelity against Keras, memory, and the robustness probes on the target's first runtime.
    2. Latency is measured afterwards, alone: one child process per deployed runtime loads every
       artifact that ran and times them round-robin (cold load and first inference, then warm
       runs per thread count and batch size), so changes in host load hit all candidates alike.
    3. Fidelity against Keras gates on the deployed runtimes (`profile.runtimes`); cross-check
       runtimes are held to the deployed one (`consistency`: gates for fp32, and for quantized
       graphs where `[consistency] gate_quantized`). Every budget becomes a check, and a
       candidate passes when all its checks pass. Selection is the caller's
       (`kdeploy.run.select.select`).
    """
    m, prof = ctx.model, ctx.profile
    ctx.stop_ahead(runs_only=True)  # the runs made ahead (`RunsAhead`): their results are taken below
    feeds_path = _write_feeds(ctx)
    batches = _batches(ctx, finding=True)
    names = [t.name for t in m.outputs]
    measured_on = _measured_on(ctx)
    probes, probes_path = probe_inputs(ctx)
    counted = _count_compute(builds)
    candidates: list[Candidate] = []
    runs = []  # (candidate, build, artifact, runtime, job, job dir)
    sized: list[tuple[ArtifactOut, Artifact]] = []
    for b in builds:
        c = Candidate(name=b.name, recipe=b.recipe, passed=False, errors=list(b.errors), optimization=b.optimization)
        candidates.append(c)
        for art in b.artifacts:
            c.artifacts.append(ArtifactOut(format=art.format, path=str(art.path.relative_to(ctx.staging)),
                                           precision=art.precision, source=art.source, size_bytes=art.size_bytes,
                                           gzip_bytes=0, sha256=art.sha256, pairing=art.pairing))
            sized.append((c.artifacts[-1], art))  # gzip sizes read after the runs: the last ones are still measured
            for runtime in (rt for rt in ctx.wanted_runtimes if RUNTIME_FORMATS[rt] == art.format):
                runs.append((c, b, art, runtime, fidelity_job(ctx, art, runtime), _job_dir(ctx, b, runtime)))
    labels = [f"{c.name} on {rt} ({_role(ctx, rt)})" for c, _, _, rt, _, _ in runs]
    ahead = [ctx.prefetched.get(run_key(art, rt)) for _, _, art, rt, _, _ in runs]
    todo = [i for i, got in enumerate(ahead) if got is None]
    fresh = iter(_run_parallel(ctx, [(labels[i], runs[i][4], runs[i][5]) for i in todo]))
    results = [next(fresh) if got is None else got for got in ahead]
    outputs: dict[str, dict[str, list[np.ndarray]]] = {c.name: {} for c in candidates}
    ran: dict[str, list[tuple[Candidate, Artifact]]] = {rt: [] for rt in prof.runtimes}
    peak_not_reset = False
    for (c, b, art, runtime, _, _), res in zip(runs, results):
        if isinstance(res, RuntimeFailure):
            res = RuntimeFailure(str(res) + _located(ctx, c, art, runtime, str(res)))
        if isinstance(res, RuntimeFailure) and runtime not in prof.runtimes:  # a cross-check: not the deployed one
            ctx.finding("warning", "crosscheck-failed",
                        f"candidate {b.name}: not cross-checked on {runtime}, which failed to run it "
                        f"({str(res).replace(str(ctx.staging) + os.sep, '')}); judged on {', '.join(prof.runtimes)}")
            continue
        if isinstance(res, RuntimeFailure):
            c.checks.append(Check(name=f"runs on {runtime}", value="failed", limit="runs", passed=False, detail=str(res)))
            ctx.finding("error", "runtime-failure", f"candidate {b.name}: {res}")
            if runtime == "tflm":
                _tflm_finding(ctx, b.name, str(res))
            continue
        outs, result = res
        outputs[c.name][runtime] = outs
        c.memory[runtime] = result["memory"]
        peak_not_reset |= not result.get("peak_reset", True)
        if runtime in ran:
            ran[runtime].append((c, art))
        tol = ctx.tolerance(b, art.precision)
        for f in fidelity(ctx, b, art, runtime, outs):
            add_fidelity(c, f, tol, gates=runtime in prof.runtimes)
        for probe, got in result.get("probes", {}).items():
            desc, _, ref = probes[probe]
            c.robustness += [RobustnessOut(**row) for row in
                             agreement(probe, desc, runtime, ref, got, names, m.output_kinds, prof.robustness)]
    for out, art in sized:
        out.gzip_bytes = art.gzip_bytes
    release_memory()  # the fidelity runs' outputs and the parent's freed heap, before the timing child loads every artifact
    # Without labels no task budget can accept a failed fidelity check afterwards (`task_checks`): such a
    # candidate is out of the selection, and its latency is timed for the report only.
    failed = set() if ctx.validation.labels else {c.name for c in candidates if any(not k.passed for k in c.checks)}
    ctx.stop_ahead()  # a diagnosis made ahead ends before the timing, which runs alone
    with timing_lock() as waited:  # batch jobs on one host time (and re-measure) one at a time
        for runtime, entries in ran.items():
            time_candidates(ctx, runtime, entries, batches, feeds_path, measured_on, failed)
        for c, b in zip(candidates, builds):
            _cross_compare(ctx, c, b, outputs[c.name], names)
            c.compute = counted.get(b.name, {})
            task_checks(ctx, c, b, outputs[c.name])
            budget_checks(c, b, prof, settle_budget_latency(ctx, c, b))
            c.estimate = _estimate(c, b, prof, measured_on)
            c.passed = _passes(c)
    if waited is not None:
        ctx.finding("info", "timing-serialized",
                    f"batch job: latency was timed holding the host's timing lock (waited {waited:.1f} s for it), so "
                    "no other batch job timed meanwhile; their builds and fidelity runs may have loaded the host")
    if peak_not_reset:
        ctx.finding("warning", "memory-peak-not-reset",
                    "the kernel refused to reset the peak-RSS counter (/proc/self/clear_refs): memory figures may "
                    "include the runtime's import-time peak")
    latency_findings(ctx, candidates, measured_on)
    return candidates


def retime(ctx: Context, candidates: list[Candidate], io: dict[str, dict]) -> list[Candidate]:
    """Times cached candidates again (`--retime`): their artifacts are in `ctx.staging`, their other figures kept.

    Latency rows, cold figures, the latency budget check and the latency findings are measured
    and derived again exactly as `evaluate` does; fidelity, robustness, memory and the other
    checks are the cached run's.

    Args:
        io: artifact path relative to the output folder -> its io map (stored with the entry).
    """
    prof = ctx.profile
    feeds_path = _write_feeds(ctx)
    measured_on = _measured_on(ctx)
    ctx.findings = [f for f in ctx.findings if f.code not in LATENCY_FINDINGS]
    builds = []
    for c in candidates:
        c.latency, c.cold = [], {}
        c.checks = [k for k in c.checks if not is_latency_check(k.name)]
        arts = [Artifact(format=a.format, path=ctx.staging / a.path, precision=a.precision, source=a.source,
                         io=io.get(a.path, {}), size_bytes=a.size_bytes, gzip_bytes=a.gzip_bytes, sha256=a.sha256)
                for a in c.artifacts]
        builds.append(Build(c.name, c.recipe.get("precision", ""), c.recipe, arts, errors=list(c.errors)))
    with timing_lock():  # as in `evaluate`: batch jobs on one host time one at a time
        for runtime in prof.runtimes:
            entries = []
            for c, b in zip(candidates, builds):
                art = next((a for a in b.artifacts if a.format == RUNTIME_FORMATS[runtime]), None)
                if art is not None and runtime in c.memory:  # it ran on this runtime in the cached run
                    entries.append((c, art))
            time_candidates(ctx, runtime, entries, _batches(ctx, finding=False), feeds_path, measured_on)
        for c, b in zip(candidates, builds):
            latency_check(c, prof, settle_budget_latency(ctx, c, b))
            c.estimate = _estimate(c, b, prof, measured_on)
            c.passed = _passes(c)
    latency_findings(ctx, candidates, measured_on)
    return candidates


def _passes(c: Candidate) -> bool:
    return bool(c.checks) and all(k.passed for k in c.checks) and not c.errors


def _write_feeds(ctx: Context) -> Path:
    """The validation inputs as the workers read them (written once)."""
    path = ctx.work / "validation.npz"
    if not path.is_file():
        np.savez(path, **ctx.validation.inputs)
    return path


def _measured_on(ctx: Context) -> str:
    return f"host: {ctx.host['cpu']}, {ctx.host['cores']} cores"


def _batches(ctx: Context, finding: bool) -> list[int]:
    """The profile's batch sizes the model accepts (a fixed batch reduces them, with a finding)."""
    prof = ctx.profile
    fixed_batch = ctx.model.inputs[0].shape[0]
    batches = [b for b in prof.batch_sizes if fixed_batch is None or b == fixed_batch]
    if fixed_batch is not None and batches != list(prof.batch_sizes):
        if finding:
            ctx.finding("warning", "fixed-batch",
                        f"the model has a fixed batch size of {fixed_batch}; batch sizes {prof.batch_sizes} of the "
                        f"profile were reduced to {batches or [fixed_batch]}")
        batches = batches or [fixed_batch]
    return batches


def fidelity(ctx: Context, b: Build, art: Artifact, runtime: str, outs: list[np.ndarray]) -> list:
    """The `FidelityResult`s of `art`'s outputs on `runtime` against Keras, at the build's tolerance."""
    tol = ctx.tolerance(b, art.precision)
    return compare(ctx.reference, outs, names=[t.name for t in ctx.model.outputs], kinds=ctx.model.output_kinds,
                   tol=tol, runtime=runtime, reference="keras", precision=art.precision)


def fidelity_job(ctx: Context, art: Artifact, runtime: str, probes: bool = True, fidelity: bool = True) -> RunJob:
    """Evaluation's run of `art` on `runtime`: fidelity on the validation inputs, memory, and the robustness probes
    on the target's first runtime (the ladder's judge makes the same run, or its parts: `probes`, `fidelity` off)."""
    probes_path = probe_inputs(ctx)[1]
    return RunJob(runtime=runtime, artifact_path=str(art.path), io=art.io, feeds_path=str(_write_feeds(ctx)),
                  fidelity=fidelity,
                  fidelity_batch=ctx.model.inputs[0].shape[0] or batch_size_for(ctx.validation.inputs, FIDELITY_BATCH),
                  probes_path=str(probes_path) if probes and runtime == ctx.profile.runtimes[0] and probes_path
                  else None)


def _job_dir(ctx: Context, b: Build, runtime: str) -> Path:
    return ctx.work / f"{b.name}-{runtime}"


def _role(ctx: Context, runtime: str) -> str:
    """What a run on `runtime` is for: fidelity (a deployed runtime) or cross-check."""
    return "fidelity" if runtime in ctx.profile.runtimes else "cross-check"


AHEAD_NICE = 10  # the runs made ahead yield the CPU to the build they run beside (`os.setpriority`)
AHEAD_POLL_S = 0.5  # how often the runs made ahead look for an artifact the build has just added


class RunsAhead:
    """Evaluation's runs of the artifacts built so far, made in a background thread while the build goes on.

    Once the conversion lane has its work (`run.build`), one child at a time runs each artifact
    already in `builds` as `evaluate` would (`fidelity_job`, deployed runtimes first), at a lower
    CPU priority: it takes what the build leaves idle (this process waiting for the lane, the
    selective search's single-process per-layer dump, an ONNX twin's conversion) rather than
    competing with it. Artifacts the build adds later (the lane's ONNX twins) are picked up as
    they come. `evaluate` stops it first (the run in progress finishes) and takes the results
    from `Context.prefetched` (keyed by artifact path, sha256 and runtime) instead of running
    them again. Latency is never measured here: the timing runs alone, after. A repair step hands its
    candidate over (`add`, `Context.run_ahead`): its `.tflite` runs while its ONNX twin converts.

    As soon as a quantized `.tflite`'s fidelity run on the deployed runtime fails, its per-layer errors
    are measured (`diagnose.layer_errors`, cached: the diagnosis after the timing takes them) on a thread
    of their own, at the build's priority: the repair ladder's search and the timing wait for them.
    The runs go on beside it (one dump at a time): made after it, the runs left the failures they find
    unknown until the search's tries, and the diagnosis of MobileNetV2-224's dynamic range started
    after the search and kept evaluation waiting 2 s. Without labels only: with them a task budget may
    still accept the candidate, which then needs no diagnosis.
    """

    def __init__(self, ctx: Context, builds: list[Build]):
        self.ctx, self.builds = ctx, builds
        self._added: list[Build] = []  # builds made after these (`add`)
        self._stop = threading.Event()
        self._skip: set[tuple[str, str, str]] = set()  # runs that raised something other than a RuntimeFailure
        self._child = None  # the run in progress (its Popen), so that `stop(kill=True)` can end it
        self._dump_child = None  # the diagnosis' tensor dump in progress (its Popen), likewise
        self._diagnosed: set[str] = set()  # sha256 of the artifacts whose fidelity was looked at for `_failing`
        self._killed = False
        _write_feeds(ctx)
        probe_inputs(ctx)  # Keras' probe outputs and their inputs file, made here before the thread reads them
        self._thread = threading.Thread(target=self._work, name="kdeploy-runs-ahead", daemon=True)
        self._thread.start()
        self._diagnosis = threading.Thread(target=self._diagnose_failing, name="kdeploy-diagnose-ahead", daemon=True)
        if self._diagnoses():
            self._diagnosis.start()

    def stop(self, kill: bool = False, runs_only: bool = False) -> None:
        """Nothing new; waits for the work in progress (its result is kept), or with `kill` (the run failed or was
        interrupted) ends it. With `runs_only`, a diagnosis in progress goes on (evaluation's own runs go beside it;
        the timing, which runs alone, calls `stop()` again first)."""
        self._stop.set()
        for child in (self._child, self._dump_child) if kill else ():
            if child is not None and child.poll() is None:
                self._killed = True
                child.kill()
        self._thread.join()
        if not runs_only and self._diagnosis.is_alive():
            self._diagnosis.join()

    def add(self, b: Build) -> None:
        """`b` (made after the builds given, e.g. by a repair step) is run too: its artifacts as they are added."""
        self._added.append(b)

    def _all(self) -> list[Build]:
        return [*self.builds, *self._added]

    def _next(self, deployed_only: bool = False) -> tuple[Build, Artifact, str] | None:
        wanted = self.ctx.profile.runtimes if deployed_only else self.ctx.wanted_runtimes
        for runtime in [rt for rt in self.ctx.wanted_runtimes if rt in wanted]:
            for b in self._all():
                for a in list(b.artifacts):
                    key = run_key(a, runtime)
                    if (RUNTIME_FORMATS[runtime] == a.format and a.sha256 and key not in self.ctx.prefetched
                            and key not in self._skip and a.path.is_file()):
                        return b, a, runtime
        return None

    def _diagnoses(self) -> bool:
        """Whether a failing run gets its per-layer errors here: without labels, where a `.tflite` is deployed."""
        return not self.ctx.validation.labels and RUNTIME_FORMATS[self.ctx.profile.runtimes[0]] == "tflite"

    def _failing(self) -> tuple[Build, Artifact] | None:
        """A quantized `.tflite` whose deployed fidelity run (made ahead) fails and whose layers are not measured."""
        ctx = self.ctx
        deployed = ctx.profile.runtimes[0]
        if not self._diagnoses() or ctx.lane_busy() or ctx.searching or ctx.dump_lock.locked():
            return None  # (beside the lane's tf2onnx or the search's tries, a dump would set the run's peak memory:
            # MobileNetV2-224 2.37 GB PSS, 1.19x the bare script's, beside the tries; while the search's ranking dumps,
            # waiting for it would idle this thread: runs meanwhile, the diagnosis after)
        for b in self._all():
            for a in list(b.artifacts):
                got = ctx.prefetched.get(run_key(a, deployed))
                if (a.format != "tflite" or a.precision == "fp32" or a.sha256 in self._diagnosed
                        or got is None or isinstance(got, RuntimeFailure)):
                    continue
                self._diagnosed.add(a.sha256)
                if not all(fidelity(ctx, b, a, deployed, got[0])):
                    return b, a
        return None

    def _diagnose(self, b: Build, art: Artifact) -> None:
        from kdeploy.child import ChildFailure
        from kdeploy.run.diagnose import float_tflite, has_layer_errors, layer_errors

        ref, tol = float_tflite(self.ctx), self.ctx.tolerance(b, art.precision)
        if ref is None or has_layer_errors(self.ctx, ref, art.path, tol, art.precision):
            return
        self.ctx.progress("diagnose", f"{b.name}: per-layer error (ahead)")
        try:
            layer_errors(self.ctx, ref, art.path, art.io, tol, art.precision,
                         on_start=lambda proc: setattr(self, "_dump_child", proc))
        except ChildFailure:
            pass  # the diagnosis measures it again and reports why not
        except Exception:  # e.g. the memory guard's stop (raised by progress): the diagnosis runs it, and reports
            self._stop.set()

    def _diagnose_failing(self) -> None:
        """The per-layer errors of what a deployed run fails, as soon as it fails (beside the runs)."""
        while not self._stop.is_set():
            failing = self._failing()
            if failing is None:
                self._stop.wait(AHEAD_POLL_S)
                continue
            self._diagnose(*failing)

    def _work(self) -> None:
        ctx = self.ctx
        while not self._stop.is_set():  # the deployed runtimes' runs, then the cross-checks
            todo = self._next(deployed_only=True) or self._next()
            if todo is None:
                self._stop.wait(AHEAD_POLL_S)
                continue
            b, art, runtime = todo
            key = run_key(art, runtime)
            try:
                ctx.progress("run", f"{b.name} on {runtime} ({_role(ctx, runtime)}, ahead)")
                got = run_isolated(fidelity_job(ctx, art, runtime), _job_dir(ctx, b, runtime),
                                   timeout_s=ctx.profile.timing.timeout_s, nice=AHEAD_NICE,
                                   on_start=lambda proc: setattr(self, "_child", proc))
            except RuntimeFailure as e:
                if self._killed:
                    return  # ended by `stop`: no verdict
                got = e
            except Exception:  # e.g. the memory guard's stop (raised by progress): evaluation runs it itself and
                self._skip.add(key)  # meets the error where it can report it
                return
            ctx.prefetched[key] = got


def _run_parallel(ctx: Context, jobs: list[tuple[str, RunJob, Path]]) -> list:
    """Runs worker jobs, up to PARALLEL_RUNS at a time; returns (outputs, result) or the RuntimeFailure, in order.

    One at a time while a per-layer dump runs (a diagnosis made ahead, `RunsAhead`): the dump takes a core and
    the run's largest memory (MobileNetV2-224's 0.8 GB beside two runs set the run's peak). Progress is
    reported from the calling thread, as each job starts.
    """
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    timeout = ctx.profile.timing.timeout_s

    def one(job, job_dir):
        try:
            return run_isolated(job, job_dir, timeout_s=timeout)
        except RuntimeFailure as e:
            return e

    width = max(1, min(PARALLEL_RUNS, os.cpu_count() or 1))
    results: list = [None] * len(jobs)
    pending = list(enumerate(jobs))
    with ThreadPoolExecutor(width) as pool:
        running: dict = {}
        while pending or running:
            while pending and len(running) < (1 if ctx.dump_lock.locked() else width):
                i, (label, job, job_dir) = pending.pop(0)
                ctx.progress("run", label)
                running[pool.submit(one, job, job_dir)] = i
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                results[running.pop(f)] = f.result()
    return results


def _cross_compare(ctx: Context, c: Candidate, b: Build, outputs: dict[str, list[np.ndarray]], names: list[str]) -> None:
    """Holds every other runtime to the first one that ran (the deployed one when it ran), at the precision's tolerance.

    For fp32 the runtimes run two conversions of one float model: a disagreement is a converter
    bug and gates. A quantized graph's integer kernels round differently on each runtime (LiteRT
    vs ONNX Runtime), so there it gates only where the profile's `[consistency] gate_quantized`
    asks; otherwise the figures are reported and a disagreement is a note.
    """
    order = [rt for rt in ctx.wanted_runtimes if rt in outputs]
    if len(order) < 2:
        return
    tol = ctx.profile.tolerances[b.precision]
    gates = gates_consistency(b.precision, ctx.profile.consistency.gate_quantized)
    for rt in order[1:]:
        for f in compare(outputs[order[0]], outputs[rt], names=names, kinds=ctx.model.output_kinds, tol=tol,
                         runtime=rt, reference=order[0], precision=b.precision):
            row = add_consistency(c, f, tol, gates)
            if not row.passed and not gates:
                ctx.finding("info", "crosscheck-disagrees",
                            f"candidate {b.name}: {rt} disagrees with {order[0]} on the same {b.precision} graph "
                            f"[{f.output}] ({f.summary}); not a verdict: integer kernels round differently per "
                            "runtime (set [consistency] gate_quantized = true to gate on it)")


def _count_compute(builds: list[Build]) -> dict[str, dict[str, Any]]:
    """Candidate name -> compute figures, counted from its own `.tflite` (else the model's, said so)."""
    from kdeploy.compute import tflite_compute

    counted: dict[str, dict[str, Any]] = {}
    for b in builds:
        tfl = next((a for a in b.artifacts if a.format == "tflite"), None)
        if tfl is None:
            continue
        try:
            counted[b.name] = tflite_compute(tfl.path)
        except (ValueError, OSError, AttributeError, IndexError) as e:
            counted[b.name] = {"source": f"tflite op list ({tfl.path.name})", "macs": None, "flops": None,
                               "notes": [f"could not read the op list: {e}"]}
    fallback = next((counted[b.name] for b in sorted(builds, key=lambda b: b.precision != "fp32")
                     if counted.get(b.name, {}).get("macs") is not None), None)
    for b in builds:
        if b.name in counted or not b.artifacts:
            continue
        if fallback is None:
            counted[b.name] = {"source": None, "macs": None, "flops": None,
                               "notes": ["no .tflite artifact to count operations from"]}
        else:
            own = b.artifacts[0]
            counted[b.name] = {**fallback, "source": f"{fallback['source']}: the same model graph; this candidate's "
                                                     f"own artifact is {own.format}",
                               "weight_bytes": own.size_bytes,
                               "notes": [*fallback["notes"], f"weight_bytes is the size of {own.path.name}"]}
    return counted


def _estimate(c: Candidate, b: Build, prof: TargetProfile, measured_on: str) -> dict[str, Any] | None:
    """The profile device's analytic lower bound, next to the host measurement it is not."""
    from kdeploy.compute import estimate_latency

    est = estimate_latency(c.compute, b.precision, prof.device)
    if est is None:
        return None
    lat = budget_row(c.latency, prof.runtimes[0], prof.budgets.latency_percentile)
    est["host_measurement"] = None if lat is None else {
        "p50_ms": round(lat.p50_ms, 6), "runtime": lat.runtime, "threads": lat.threads, "batch": lat.batch,
        "measured_on": measured_on}
    return est


def _located(ctx: Context, c: Candidate, art: Artifact, runtime: str, message: str) -> str:
    """Records where the runtime failed in `art` (`candidates[].crash_sites`); the text to append to its message."""
    from kdeploy.debug.locate import describe
    from kdeploy.run.diagnose import locate_failure

    site = locate_failure(ctx, art.path, art.format, runtime, message)
    if site is None:
        return ""
    c.crash_sites.append(site)
    return f" [at {describe(site, ctx.model.keras_model is not None)}]"


def _tflm_finding(ctx: Context, name: str, message: str) -> None:
    from kdeploy.runtimes.tflm import unsupported_ops

    ops = unsupported_ops(message)
    if ops:
        ctx.finding("error", "tflm-unsupported-ops",
                    f"candidate {name}: TensorFlow Lite Micro cannot run op(s) {', '.join(ops)} of this artifact "
                    "(as built here); a microcontroller build would fail the same way")
