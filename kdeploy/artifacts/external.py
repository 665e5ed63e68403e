"""Artifacts built elsewhere (`kdeploy check`): how to feed a `.tflite` / `.onnx` and what precision it is."""

from __future__ import annotations

from pathlib import Path

from kdeploy.artifacts import Artifact
from kdeploy.artifacts.flatbuffer import read_tflite_file, tflite_precision
from kdeploy.errors import UsageError
from kdeploy.loading import LoadedModel
from kdeploy.util import natural_key


def external_artifact(path: Path, model: LoadedModel, precision: str | None) -> Artifact:
    """Describes a `.tflite` / `.onnx` built elsewhere: how to feed it and what precision it is."""
    names = [t.name for t in model.inputs]
    out_names = [t.name for t in model.outputs]
    if path.suffix.lower() == ".tflite":
        from ai_edge_litert.interpreter import Interpreter

        try:
            it = Interpreter(model_path=str(path))
            sigs = it.get_signature_list()
            graph = read_tflite_file(path)
        except Exception as e:
            raise UsageError(f"artifact {path.name} is not a readable .tflite model: {' '.join(str(e).split())[:200]}") from None
        if "serving_default" not in sigs:
            raise UsageError(f"artifact {path.name} has no 'serving_default' signature (has: {list(sigs)}); "
                             "convert it from a SavedModel or Keras model so it carries one")
        ins, outs = sigs["serving_default"]["inputs"], sigs["serving_default"]["outputs"]
        io = {"inputs": _map_names(names, ins, path), "outputs": _map_outputs(out_names, outs, path)}
        fmt, detected = "tflite", tflite_precision(graph)
    else:
        import onnx

        try:
            proto = onnx.load(str(path))
        except Exception as e:
            raise UsageError(f"artifact {path.name} is not a readable .onnx model: {' '.join(str(e).split())[:200]}") from None
        init = {i.name for i in proto.graph.initializer}
        ins = [i.name for i in proto.graph.input if i.name not in init]
        outs = [o.name for o in proto.graph.output]
        io = {"inputs": _map_names(names, ins, path), "outputs": _map_outputs(out_names, outs, path)}
        ops = {n.op_type for n in proto.graph.node}
        fmt = "onnx"
        detected = ("int8" if ops & {"QLinearConv", "QLinearMatMul"} else
                    "dynamic" if ops & {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DequantizeLinear"} else
                    "fp16" if any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer) else "fp32")
    return Artifact(format=fmt, path=path, precision=precision or detected, source="external", io=io).measure()


def _map_names(model_names: list[str], artifact_names: list[str], path: Path) -> dict[str, str]:
    if len(model_names) != len(artifact_names):
        raise UsageError(f"artifact {path.name} has {len(artifact_names)} input(s) {artifact_names}; "
                         f"the model has {len(model_names)} {model_names}")
    by_base = {a.split(":")[0]: a for a in artifact_names}
    if set(model_names) <= set(by_base):
        return {n: by_base[n] for n in model_names}
    if len(model_names) == 1:
        return {model_names[0]: artifact_names[0]}
    raise UsageError(f"cannot match artifact {path.name} inputs {artifact_names} to model inputs {model_names}")


def _map_outputs(model_names: list[str], artifact_names: list[str], path: Path) -> list[str]:
    if len(model_names) != len(artifact_names):
        raise UsageError(f"artifact {path.name} has {len(artifact_names)} output(s) {artifact_names}; "
                         f"the model has {len(model_names)} {model_names}")
    if set(model_names) <= set(artifact_names):
        return list(model_names)
    return sorted(artifact_names, key=natural_key) if all(a.startswith("output_") for a in artifact_names) else artifact_names
