"""Artifacts built elsewhere (`kdeploy check`): how to feed a `.tflite` / `.onnx`, what precision it is,
and which of its tensors is which input and output of the model.

Artifacts from the wild rarely name their tensors as Keras does: a `.tflite` converted from a
concrete function or by another tool carries no SignatureDef (its tensors are then read in tensor
order, through the interpreter's input/output details), and tf2onnx calls a SavedModel's outputs
`StatefulPartitionedCall:0..N`, in an order of its own. Each model output is paired with one
artifact output of the same shape (batch aside), decided in this order:

1. `--output-map NAME=TENSOR,...` (the user's word);
2. by name: equal, else equal after dropping `:N` suffixes and `serving_default_` /
   `StatefulPartitionedCall` parts, else the model name is a path component of exactly one tensor;
3. by shape: the only remaining artifact output of the model output's shape;
4. by values, for the outputs left (groups of equal shapes): the caller runs the artifact once on
   the validation inputs and `OutputPlan.settle_by_values` takes the assignment that agrees best
   with Keras, when it is unambiguous (`PAIRING_MARGIN`).

Tensors of different shapes are never paired. Inputs are paired by name, else by a unique shape.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from kdeploy.artifacts import Artifact
from kdeploy.artifacts.flatbuffer import read_tflite_file, tflite_precision
from kdeploy.errors import UsageError
from kdeploy.loading import LoadedModel

# Pairing by values. Each model output's relative L2 error against each artifact output of its shape
# is measured; the assignment with the least product of errors is taken only when every other
# assignment is at least PAIRING_MARGIN times worse: per output, the other assignment's error over
# this one's, geometric mean over the outputs the two pair differently (errors below ERROR_FLOOR,
# fp32 rounding, count as ERROR_FLOOR). A right pairing is off by the artifact's precision (fp32
# ~1e-7 of the reference's norm, int8 up to ~0.1), a swap of two outputs by their difference
# (typically 0.3-1.4): 4x per output leaves room for int8 noise, and still refuses outputs that are
# nearly the same (identical heads, the flat sigmoid/softmax of a random-init model: ratios near
# 1), where a guess could hide a swap. The product (not the sum) lets an output that matches one
# tensor exactly settle the pairing even when another output of the group is far off (a
# perturbed head: the pairing is clear, and that head fails its fidelity check).
PAIRING_MARGIN = 4.0
ERROR_FLOOR = 1e-6
# Assignments tried within one group of equal-shaped outputs (8 outputs: 40,320); more needs --output-map.
MAX_ASSIGNMENTS = 40_320
_TINY = 1e-12


@dataclass(frozen=True)
class Edge:
    """One input or output tensor of an artifact."""

    name: str
    shape: tuple[int | None, ...] | None  # batch first; None where dynamic (the whole shape: rank unknown)

    @property
    def tail(self) -> tuple[int | None, ...] | None:
        """The shape without its batch dimension (None when unknown)."""
        return None if self.shape is None else self.shape[1:]


@dataclass
class Pairing:
    """Which artifact tensor one model output is compared with, and how that was decided."""

    output: str
    tensor: str
    how: str  # "output-map" | "name" | "shape" | "values" | "unverified"
    detail: str | None = None

    def to_dict(self) -> dict:
        return {"output": self.output, "tensor": self.tensor, "how": self.how, "detail": self.detail}


@dataclass
class OutputPlan:
    """The pairing of a model's outputs with an artifact's: settled ones, and groups left to the values."""

    path: Path
    outputs: list[str]  # model output names, model order
    shapes: dict[str, tuple]  # model output -> non-batch shape
    edges: list[Edge]  # artifact outputs, artifact order
    paired: dict[str, Pairing] = field(default_factory=dict)
    groups: list[tuple[list[str], list[str]]] = field(default_factory=list)  # (model outputs, tensors) left

    @property
    def complete(self) -> bool:
        return len(self.paired) == len(self.outputs)

    @property
    def tensors(self) -> list[str]:
        """Every artifact output, in artifact order (what a run for `settle_by_values` reads)."""
        return [e.name for e in self.edges]

    def ordered(self) -> list[str]:
        """Artifact output names in model output order (the artifact's `io["outputs"]`)."""
        return [self.paired[o].tensor for o in self.outputs]

    def report(self) -> list[dict]:
        return [self.paired[o].to_dict() for o in self.outputs]

    def settle_by_values(self, got: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                         passes: Callable[[str, np.ndarray], bool] | None = None) -> list[str]:
        """Pairs the outputs left by the assignment that agrees best with Keras, when it is unambiguous.

        An ambiguous group is an error only where the pairing could change the verdict: when under
        no assignment every output of the group passes its fidelity tolerance (`passes`), the
        candidate fails whichever way, and the group is paired by its best assignment, `unverified`.

        Args:
            got: artifact tensor name -> its outputs on the validation inputs.
            reference: model output name -> Keras' outputs on the same inputs.
            passes: (model output, artifact output values) -> whether they pass the fidelity
                tolerance; None: any pairing might.

        Returns:
            Problems that make the candidate fail (outputs not finite anywhere, or no pairing that
            passes), their pairing marked `unverified`; empty when every pairing is settled.

        Raises:
            UsageError: the values do not settle a group and the verdict depends on it (the
                message names `--output-map`).
        """
        problems = []
        for outs, tensors in self.groups:
            dead = [t for t in tensors if not np.isfinite(np.asarray(got[t], np.float64)).any()]
            if dead:
                for o, t in zip(outs, tensors):
                    self.paired[o] = Pairing(o, t, "unverified", "artifact order: the artifact's outputs "
                                             f"{dead} are not finite anywhere, so values cannot pair them")
                problems.append(f"outputs {outs} could not be paired with the artifact's: its outputs {dead} are NaN/Inf "
                                "on every validation sample")
                continue
            err = {(o, t): relative_error(reference[o], got[t]) for o in outs for t in tensors}
            ok = None if passes is None else {k: np.isfinite(v) and passes(k[0], got[k[1]]) for k, v in err.items()}
            problem = self._settle_group(outs, tensors, err, ok)
            if problem:
                problems.append(problem)
        self.groups = []
        return problems

    def _settle_group(self, outs: list[str], tensors: list[str], err: dict[tuple[str, str], float],
                      ok: dict[tuple[str, str], bool] | None) -> str | None:
        """Pairs one group by values; returns a problem that fails the candidate when no pairing passes."""
        name = self.path.name
        count = _permutations(len(tensors), len(outs))
        if count > MAX_ASSIGNMENTS:
            raise UsageError(f"artifact {name}: {len(outs)} outputs of equal shapes {outs} are too many to pair by "
                             f"values ({count:,} assignments, at most {MAX_ASSIGNMENTS:,}); give "
                             f"{_map_hint(outs, tensors)}")
        options = [a for a in itertools.permutations(tensors, len(outs))
                   if all(np.isfinite(err[o, t]) for o, t in zip(outs, a))]
        if not options:
            raise UsageError(f"artifact {name}: its outputs {tensors} cannot be compared with model outputs {outs} "
                             f"(shapes {[_fmt(self.shapes[o]) for o in outs]}); give {_map_hint(outs, tensors)}")
        log_err = {k: math.log(max(v, ERROR_FLOOR)) for k, v in err.items()}
        best = min(options, key=lambda a: sum(log_err[o, t] for o, t in zip(outs, a)))
        margin, rival = float("inf"), None
        for a in options:
            diff = [i for i, (t, b) in enumerate(zip(a, best)) if t != b]
            if diff:
                ratio = math.exp(sum(log_err[outs[i], a[i]] - log_err[outs[i], best[i]] for i in diff) / len(diff))
                if ratio < margin:
                    margin, rival = ratio, a
        if rival is not None and not margin >= PAIRING_MARGIN:
            differ = [i for i, (t, b) in enumerate(zip(rival, best)) if t != b]
            if ok is not None and not any(all(ok[o, t] for o, t in zip(outs, a)) for a in options):
                for o, t in zip(outs, best):
                    self.paired[o] = Pairing(o, t, "unverified", f"relative error {err[o, t]:.2e}; best of pairings "
                                             f"that all fail the tolerance (next {margin:.3g}x worse per output)")
                return (f"outputs {outs} fail their fidelity tolerance whichever way they are paired with the "
                        f"artifact's outputs {tensors} of their shape (the values settle no pairing: the best is "
                        f"only {margin:.3g}x better per output): the artifact disagrees with the model")
            raise UsageError(
                f"artifact {name}: outputs {[outs[i] for i in differ]} have the same shape "
                f"{_fmt(self.shapes[outs[differ[0]]])} and their values do not settle which artifact output is which "
                f"(best pairing {_pairs(outs, best, differ)} agrees with Keras only {margin:.3g}x better per output than "
                f"{_pairs(outs, rival, differ)}; {PAIRING_MARGIN:g}x needed); settle it with "
                f"{_map_hint([outs[i] for i in differ], sorted({best[i] for i in differ}))}")
        for o, t in zip(outs, best):
            detail = f"relative error {err[o, t]:.2e}"
            detail += (f", next-best pairing {margin:.3g}x worse" if rival is not None else
                       ", the only pairing of equal shapes")
            self.paired[o] = Pairing(o, t, "values", detail)
        return None


def external_artifact(path: Path, model: LoadedModel, precision: str | None, *,
                      shapes: dict[str, tuple] | None = None,
                      output_map: dict[str, str] | None = None) -> tuple[Artifact, OutputPlan]:
    """Describes a `.tflite` / `.onnx` built elsewhere: how to feed it, its precision, its output pairing.

    Args:
        shapes: non-batch shapes of the model's inputs and outputs by name, as the validation data
            and Keras' outputs have them (concrete); else the model's (None where dynamic).
        output_map: model output name -> artifact output name (`--output-map`).

    Returns:
        The Artifact (`io["outputs"]` in model order once the plan is complete; until then every
        artifact output in artifact order) and the output plan (`settle_by_values` completes it).

    Raises:
        UsageError: unreadable artifact; inputs or outputs that do not fit the model (counts,
            shapes, names), or an `output_map` naming unknown tensors or tensors of another shape.
    """
    shapes = dict(shapes or {})
    for t in [*model.inputs, *model.outputs]:
        shapes.setdefault(t.name, tuple(t.shape[1:]))
    fmt, detected, signature, ins, outs = _edges(path)
    io = {"inputs": _pair_inputs([(t.name, shapes[t.name]) for t in model.inputs], ins, path), "outputs": []}
    if fmt == "tflite":
        io["signature"] = signature
    plan = plan_outputs(path, [t.name for t in model.outputs], shapes, outs, output_map or {})
    io["outputs"] = plan.ordered() if plan.complete else plan.tensors
    art = Artifact(format=fmt, path=path, precision=precision or detected, source="external", io=io).measure()
    return art, plan


def _edges(path: Path) -> tuple[str, str, str | None, list[Edge], list[Edge]]:
    """(format, detected precision, tflite signature key or None, inputs, outputs) of an artifact file."""
    if path.suffix.lower() == ".tflite":
        from ai_edge_litert.interpreter import Interpreter

        try:
            it = Interpreter(model_path=str(path))
            sigs = it.get_signature_list()
            graph = read_tflite_file(path)
        except Exception as e:
            raise UsageError(f"artifact {path.name} is not a readable .tflite model: {' '.join(str(e).split())[:200]}") from None
        signature = "serving_default" if "serving_default" in sigs else (next(iter(sigs)) if len(sigs) == 1 else None)
        if signature is not None:
            runner = it.get_signature_runner(signature)
            ins = [_tfl_edge(k, d) for k, d in runner.get_input_details().items()]
            outs = [_tfl_edge(k, d) for k, d in runner.get_output_details().items()]
        else:  # no SignatureDef: the primary subgraph's inputs and outputs, in tensor order
            ins = [_tfl_edge(d["name"], d) for d in it.get_input_details()]
            outs = [_tfl_edge(d["name"], d) for d in it.get_output_details()]
        return "tflite", tflite_precision(graph), signature, ins, outs
    import onnx

    try:
        proto = onnx.load(str(path))
    except Exception as e:
        raise UsageError(f"artifact {path.name} is not a readable .onnx model: {' '.join(str(e).split())[:200]}") from None
    init = {i.name for i in proto.graph.initializer}
    ins = [_onnx_edge(i) for i in proto.graph.input if i.name not in init]
    outs = [_onnx_edge(o) for o in proto.graph.output]
    ops = {n.op_type for n in proto.graph.node}
    detected = ("int8" if ops & {"QLinearConv", "QLinearMatMul"} else
                "dynamic" if ops & {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DequantizeLinear"} else
                "fp16" if any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer) else "fp32")
    return "onnx", detected, None, ins, outs


def _tfl_edge(name: str, d: dict) -> Edge:
    dims = d.get("shape_signature")
    dims = d["shape"] if dims is None or len(dims) != len(d["shape"]) else dims
    return Edge(name, tuple(int(x) if x >= 0 else None for x in dims))


def _onnx_edge(v) -> Edge:
    tensor = v.type.tensor_type
    if not tensor.HasField("shape"):
        return Edge(v.name, None)
    return Edge(v.name, tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim))


def plan_outputs(path: Path, outputs: list[str], shapes: dict[str, tuple], edges: list[Edge],
                 output_map: dict[str, str]) -> OutputPlan:
    """Pairs model outputs with artifact outputs by `output_map`, name and unique shape; groups the rest.

    Raises:
        UsageError: output counts differ, `output_map` is wrong, or a model output has no artifact
            output of its shape.
    """
    name = path.name
    by_name = {e.name: e for e in edges}
    if len(outputs) != len(edges):
        raise UsageError(f"artifact {name} has {len(edges)} output(s) {_listing(edges)}; the model has "
                         f"{len(outputs)} {[f'{o} {_fmt(shapes[o])}' for o in outputs]}")
    plan = OutputPlan(path, outputs, {o: shapes[o] for o in outputs}, edges)
    for o, t in output_map.items():
        if o not in outputs:
            raise UsageError(f"--output-map names '{o}', which is not an output of the model (allowed: {', '.join(outputs)})")
        if t not in by_name:
            raise UsageError(f"--output-map maps '{o}' to '{t}', which is not an output of artifact {name} "
                             f"(allowed: {', '.join(by_name)})")
        if t in [p.tensor for p in plan.paired.values()]:
            raise UsageError(f"--output-map maps two outputs to '{t}' of artifact {name}")
        if not _compatible(shapes[o], by_name[t].tail):
            raise UsageError(f"--output-map pairs model output '{o}' {_fmt(shapes[o])} with '{t}' "
                             f"{_fmt(by_name[t].tail)} of artifact {name}: the shapes differ")
        plan.paired[o] = Pairing(o, t, "output-map")
    left = [o for o in outputs if o not in plan.paired]
    free = [e for e in edges if e.name not in {p.tensor for p in plan.paired.values()}]
    fits = lambda o, e: _compatible(shapes[o], e.tail)  # noqa: E731
    for o, t in _by_name(left, free, fits):
        plan.paired[o] = Pairing(o, t, "name")
    left = [o for o in outputs if o not in plan.paired]
    free = [e for e in edges if e.name not in {p.tensor for p in plan.paired.values()}]
    for o, t in _by_unique_shape(left, free, fits):
        plan.paired[o] = Pairing(o, t, "shape")
    left = [o for o in outputs if o not in plan.paired]
    free = [e for e in edges if e.name not in {p.tensor for p in plan.paired.values()}]
    for o in left:
        if not any(fits(o, e) for e in free):
            raise UsageError(f"artifact {name} has no output of the shape of model output '{o}' {_fmt(shapes[o])} "
                             f"(batch aside); its unpaired outputs: {_listing(free)}")
    # The rest: connected groups of outputs and tensors that fit each other, for the values to settle.
    todo = list(left)
    while todo:
        group, tensors, grew = {todo[0]}, set(), True
        while grew:
            more_t = {e.name for e in free if e.name not in tensors and any(fits(o, e) for o in group)}
            tensors |= more_t
            more_o = {o for o in todo if o not in group and any(fits(o, by_name[t]) for t in tensors)}
            group |= more_o
            grew = bool(more_t or more_o)
        todo = [o for o in todo if o not in group]
        outs_, tens_ = [o for o in outputs if o in group], [e for e in free if e.name in tensors]
        if len(tens_) < len(outs_):
            raise UsageError(f"artifact {name} has {len(tens_)} output(s) {_listing(tens_)} for the {len(outs_)} model "
                             f"outputs {[f'{o} {_fmt(shapes[o])}' for o in outs_]} of their shape; its unpaired "
                             f"outputs: {_listing(free)}")
        plan.groups.append((outs_, [e.name for e in tens_]))
    return plan


def _by_unique_shape(names: list[str], edges: list[Edge], fits) -> list[tuple[str, str]]:
    """(model tensor, artifact tensor) pairs where the artifact tensor is the only one of that shape left
    and fits no other model tensor left (repeated until nothing changes)."""
    found: list[tuple[str, str]] = []
    changed = True
    while changed:
        changed = False
        left = [n for n in names if n not in {f[0] for f in found}]
        free = [e for e in edges if e.name not in {f[1] for f in found}]
        for n in left:
            cands = [e for e in free if fits(n, e)]
            if len(cands) == 1 and [x for x in left if fits(x, cands[0])] == [n]:
                found.append((n, cands[0].name))
                changed = True
                break
    return found


def _by_name(outputs: list[str], edges: list[Edge], fits) -> list[tuple[str, str]]:
    """(model tensor, artifact tensor) pairs whose names match unambiguously and whose shapes fit."""
    found: list[tuple[str, str]] = []
    taken: set[str] = set()
    for key in (lambda n: n, normalized_name, None):
        for o in outputs:
            if o in {f[0] for f in found}:
                continue
            if key is None:  # the model name is a path component of exactly one tensor's name
                hits = [e for e in edges if e.name not in taken and o in _components(e.name)]
                if len(hits) == 1 and sum(x in _components(hits[0].name) for x in outputs) == 1 and fits(o, hits[0]):
                    found.append((o, hits[0].name))
                    taken.add(hits[0].name)
                continue
            k = key(o)
            hits = [e for e in edges if e.name not in taken and k and key(e.name) == k]
            if len(hits) == 1 and sum(key(x) == k for x in outputs) == 1 and fits(o, hits[0]):
                found.append((o, hits[0].name))
                taken.add(hits[0].name)
    return found


_CALL = re.compile(r"(Stateful)?PartitionedCall(_\d+)?")


def normalized_name(name: str) -> str:
    """A tensor name without `:N`, `serving_default_` and `StatefulPartitionedCall` parts ('' when nothing is left)."""
    n = re.sub(r":\d+$", "", name).removeprefix("serving_default_")
    return "/".join(p for p in n.split("/") if not _CALL.fullmatch(p))


def _components(name: str) -> set[str]:
    return {p for part in normalized_name(name).split(";") for p in part.split("/")}


def _pair_inputs(inputs: list[tuple[str, tuple]], edges: list[Edge], path: Path) -> dict[str, str]:
    """Model input name -> artifact input name: by name, else by a unique shape."""
    names = [n for n, _ in inputs]
    shapes = dict(inputs)
    if len(inputs) != len(edges):
        raise UsageError(f"artifact {path.name} has {len(edges)} input(s) {_listing(edges)}; "
                         f"the model has {len(inputs)} {[f'{n} {_fmt(s)}' for n, s in inputs]}")
    fits = lambda n, e: _compatible(shapes[n], e.tail)  # noqa: E731
    pairs = dict(_by_name(names, edges, fits))
    pairs.update(_by_unique_shape([n for n in names if n not in pairs],
                                  [e for e in edges if e.name not in pairs.values()], fits))
    left = [n for n in names if n not in pairs]
    free = [e for e in edges if e.name not in pairs.values()]
    for n in left:
        if not any(fits(n, e) for e in free):
            raise UsageError(f"artifact {path.name} has no input of the shape of model input '{n}' {_fmt(shapes[n])} "
                             f"(batch aside); its unpaired inputs: {_listing(free)}")
    if left:
        raise UsageError(f"cannot match artifact {path.name} inputs {_listing(free)} to model inputs "
                         f"{[f'{n} {_fmt(shapes[n])}' for n in left]}: neither names nor shapes tell them apart")
    return {n: pairs[n] for n in names}


def _compatible(model_shape: tuple, artifact_shape: tuple | None) -> bool:
    """Non-batch shapes that are the same tensor: equal where both are known, or equal once 1-dims are dropped."""
    if artifact_shape is None:  # the artifact does not say
        return True
    if len(model_shape) == len(artifact_shape):
        return all(a is None or b is None or a == b for a, b in zip(model_shape, artifact_shape))
    known = all(d is not None for d in (*model_shape, *artifact_shape))
    return known and [d for d in model_shape if d != 1] == [d for d in artifact_shape if d != 1]


def relative_error(ref: np.ndarray, got: np.ndarray) -> float:
    """||got - ref|| / ||ref|| over the samples and elements where both are finite; inf when shapes differ."""
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    if got.shape != ref.shape:
        if got.size != ref.size or len(got) != len(ref):
            return float("inf")
        got = got.reshape(ref.shape)
    ok = np.isfinite(ref) & np.isfinite(got)
    if not ok.any():
        return float("inf")
    return float(np.linalg.norm(got[ok] - ref[ok]) / max(np.linalg.norm(ref[ok]), _TINY))


def parse_output_map(text: str | None) -> dict[str, str]:
    """`NAME=TENSOR,NAME=TENSOR` -> {NAME: TENSOR}.

    Raises:
        UsageError: an entry without `=`, or a name given twice.
    """
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, tensor = item.partition("=")
        if not sep or not name.strip() or not tensor.strip():
            raise UsageError(f"--output-map entry {item.strip()!r} is not NAME=ARTIFACT_TENSOR "
                             "(e.g. --output-map onset=StatefulPartitionedCall:1,frames=StatefulPartitionedCall:2)")
        if name.strip() in out:
            raise UsageError(f"--output-map names '{name.strip()}' twice")
        out[name.strip()] = tensor.strip()
    return out


def _permutations(n: int, k: int) -> int:
    count = 1
    for i in range(k):
        count *= n - i
    return count


def _fmt(shape: tuple | None) -> str:
    if shape is None:
        return "(shape unknown)"
    return "(batch, " + ", ".join("?" if d is None else str(d) for d in shape) + ")" if shape else "(batch,)"


def _listing(edges: list[Edge]) -> str:
    return "[" + ", ".join(f"{e.name} {_fmt(e.tail)}" for e in edges) + "]"


def _pairs(outs: list[str], assignment: tuple, idx: list[int]) -> str:
    return "{" + ", ".join(f"{outs[i]}={assignment[i]}" for i in idx) + "}"


def _map_hint(outs: list[str], tensors: list[str]) -> str:
    """The flag that settles a pairing, with the names to choose from (never a guess)."""
    return (f"--output-map {','.join(f'{o}=ARTIFACT_TENSOR' for o in outs)} "
            f"(ARTIFACT_TENSOR one of {', '.join(tensors)})")
