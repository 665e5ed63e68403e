"""fp32 LiteRT / ONNX Runtime drift against Keras on deep keras.applications nets, and a real defect for contrast.

The figures behind the fp32 tolerance of profiles/*.toml (kdeploy/acceptance.py). Nets are built with
weights=None; BatchNorm gamma/beta are randomised and its moving statistics set from a batch of inputs
(momentum 0, one training-mode call), so activations stay in a trained network's range. Prints JSON:
fp32 .tflite on LiteRT, the tf2onnx conversion of it on ONNX Runtime, and Keras with one conv layer's
kernel perturbed by 3% (middle and last conv); with --int8 also a full-int8 .tflite (random calibration).

    .venv/bin/python bench/fp32_drift.py mobilenetv2 96 --int8 > /tmp/mnv2.json
    .venv/bin/python bench/fp32_drift.py resnet50 128 > /tmp/resnet50.json
    .venv/bin/python bench/fp32_drift.py efficientnetb0 128 > /tmp/effb0.json

scaled_err is max abs error / max |ref|, norm_err the same over the range; kdeploy's peak_err uses the
larger of the two denominators (the smaller of these two figures). Files go to /tmp/fp32_drift/; the
JSON is the last block of stdout (the TF converter prints above it).
"""
import os, sys, time, json
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import keras, tensorflow as tf

def trainedish(m, x, rng):
    for layer in m.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            g, b, mm, mv = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, g.shape).astype("float32"), rng.normal(0, 0.2, b.shape).astype("float32"), mm, mv])
            layer.momentum = 0.0
    m(x, training=True)  # momentum 0: moving stats = this batch's statistics, layer by layer
    for layer in m.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.99

def figs(ref, got):
    ref = ref.astype(np.float64); got = got.astype(np.float64)
    d = np.abs(got - ref)
    a, b = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return dict(max_abs=float(d.max()), peak=float(np.abs(ref).max()), scaled_err=float(d.max() / np.abs(ref).max()),
                norm_err=float(d.max() / (ref.max() - ref.min())), rel_rmse=float(np.linalg.norm(d) / np.linalg.norm(ref)),
                cosine_min=float(cos.min()), cosine_mean=float(cos.mean()),
                top1=float(np.mean(a.argmax(1) == b.argmax(1))), top_p_mean=float(a.max(1).mean()))

def run_tflite(path, x):
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=path); it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    outs = []
    for k in range(len(x)):
        xi = x[k:k+1]
        if i["dtype"] == np.int8:
            s, z = i["quantization"]; xi = np.clip(np.round(xi / s + z), -128, 127).astype(np.int8)
        it.set_tensor(i["index"], xi); it.invoke(); y = it.get_tensor(o["index"])
        if o["dtype"] == np.int8:
            s, z = o["quantization"]; y = (y.astype(np.float32) - z) * s
        outs.append(y)
    return np.concatenate(outs)

def run_ort(path, x):
    import onnxruntime as ort
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    n = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {n: x[k:k+1]})[0] for k in range(len(x))])

def main(name, size, n=32):
    os.makedirs("/tmp/fp32_drift", exist_ok=True)
    rng = np.random.default_rng(0)
    ctor = {"mobilenetv2": lambda: keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=0.35, weights=None),
            "resnet50": lambda: keras.applications.ResNet50(input_shape=(size, size, 3), weights=None),
            "efficientnetb0": lambda: keras.applications.EfficientNetB0(input_shape=(size, size, 3), weights=None)}[name]
    keras.utils.set_random_seed(0)
    m = ctor()
    x = rng.uniform(-1, 1, (n, size, size, 3)).astype("float32")
    cal = rng.uniform(-1, 1, (64, size, size, 3)).astype("float32")
    trainedish(m, cal, rng)
    ref = m.predict(x, verbose=0)
    out = {"model": name, "size": size, "samples": n}
    t = time.time()
    conv = tf.lite.TFLiteConverter.from_keras_model(m)
    fp32 = f"/tmp/fp32_drift/{name}-fp32.tflite"; open(fp32, "wb").write(conv.convert())
    out["litert_fp32"] = figs(ref, run_tflite(fp32, x))
    os.system(f"{sys.executable} -m tf2onnx.convert --tflite {fp32} --output /tmp/fp32_drift/{name}-fp32.onnx > /dev/null 2>&1")
    if os.path.exists(f"/tmp/fp32_drift/{name}-fp32.onnx"):
        out["ort_fp32_from_tflite"] = figs(ref, run_ort(f"/tmp/fp32_drift/{name}-fp32.onnx", x))
    # a defect: one conv layer's kernel perturbed by 3% (multiplicative), Keras vs Keras
    convs = [l for l in m.layers if isinstance(l, keras.layers.Conv2D)]
    for pick, lbl in ((convs[len(convs) // 2], "mid"), (convs[-1], "last")):
        w = pick.get_weights(); orig = [a.copy() for a in w]
        w[0] = w[0] * (1 + rng.normal(0, 0.03, w[0].shape)).astype("float32")
        pick.set_weights(w)
        out[f"defect_3pct_{lbl}_{pick.name}"] = figs(ref, m.predict(x, verbose=0))
        pick.set_weights(orig)
    if "--int8" in sys.argv:
        conv = tf.lite.TFLiteConverter.from_keras_model(m)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([cal[k:k+1]] for k in range(len(cal)))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8; conv.inference_output_type = tf.int8
        p = f"/tmp/fp32_drift/{name}-int8.tflite"; open(p, "wb").write(conv.convert())
        out["litert_int8"] = figs(ref, run_tflite(p, x))
        r = ref.astype(np.float64); out["litert_int8"]["mean_norm_err"] = float(np.abs(run_tflite(p, x) - r).mean() / (r.max() - r.min()))
    out["seconds"] = round(time.time() - t, 1)
    sys.stdout.flush()
    os.write(1, (json.dumps(out, indent=1) + "\n").encode())

main(sys.argv[1], int(sys.argv[2]))
