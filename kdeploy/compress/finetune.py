"""Fine-tuning targets and losses for pruned/clustered tf_keras models (runs in the TFMOT child).

With labels in `--data` (`y`, or `y_<output>` per output) the model is trained on them; without,
it is distilled from the original model's outputs on the same inputs. The loss follows the
output kind unless the profile names one.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

# output kind -> loss when distilling from the original model's outputs (soft targets)
DISTILL_LOSS = {"multiclass": "categorical_crossentropy", "binary": "binary_crossentropy",
                "multilabel": "binary_crossentropy", "regression": "mse", "unknown": "mse"}


class TargetsError(ValueError):
    """finetune.targets = "labels" but the data has no usable labels (message says which output)."""


def label_for(labels: dict[str, np.ndarray] | None, name: str, n_outputs: int) -> np.ndarray | None:
    """The label array for one output: `y_<name>`, or `y` for a single-output model."""
    if not labels:
        return None
    if f"y_{name}" in labels:
        return labels[f"y_{name}"]
    return labels.get("y") if n_outputs == 1 else None


def _label_loss(kind: str, y: np.ndarray, width: int) -> tuple[str, np.ndarray] | str:
    """(loss, labels shaped for it), or a reason the labels do not fit this output."""
    integral = y.dtype.kind in "iub" or (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0))
    if kind == "multiclass":
        if y.ndim == 1 and integral and y.min() >= 0 and y.max() < width:
            return "sparse_categorical_crossentropy", y.astype(np.int64)
        if y.ndim == 2 and y.shape[1] == width:
            return "categorical_crossentropy", y.astype(np.float32)
        return f"labels of shape {y.shape} are neither class ids in [0, {width}) nor one-hot of width {width}"
    if kind in ("binary", "multilabel"):
        y2 = y.reshape(len(y), -1).astype(np.float32)
        if y2.shape[1] == width and np.all((y2 == 0) | (y2 == 1)):
            return "binary_crossentropy", y2
        return f"labels of shape {y.shape} are not 0/1 values of width {width}"
    y2 = y.reshape(len(y), -1).astype(np.float32)
    if y2.shape[1] == width:
        return "mse", y2
    if width > 1 and y.ndim == 1 and integral and y.min() >= 0 and y.max() < width:
        return "sparse_categorical_crossentropy_logits", y.astype(np.int64)  # a logits classifier
    return f"labels of shape {y.shape} do not fit an output of width {width}"


def choose_targets(
    kinds: list[str],
    names: list[str],
    teacher: list[np.ndarray],
    labels: dict[str, np.ndarray] | None,
    mode: str,
    loss_override: str,
) -> tuple[list[np.ndarray], list[str], dict[str, Any]]:
    """Training targets and one loss per output.

    Args:
        kinds: output kinds ("multiclass", "binary", "multilabel", "regression").
        names: output names (model order).
        teacher: the original model's outputs on the training inputs (model order).
        labels: label arrays from the data file, by key.
        mode: "auto", "labels" or "distill".
        loss_override: "auto" or a Keras loss name used for every output.

    Returns:
        (targets, loss names, description {targets, losses, note}).

    Raises:
        TargetsError: mode "labels" and some output has no usable labels.
    """
    fitted, why = [], []
    if mode != "distill":
        for kind, name, t in zip(kinds, names, teacher):
            y = label_for(labels, name, len(names))
            if y is None:
                why.append(f"no 'y_{name}'" + (" or 'y'" if len(names) == 1 else "") + " array in --data")
                continue
            r = _label_loss(kind, y, t.shape[-1] if t.ndim > 1 else 1)
            if isinstance(r, str):
                why.append(f"output {name}: {r}")
            else:
                fitted.append(r)
    if mode != "distill" and not why:
        losses, targets = [r[0] for r in fitted], [r[1] for r in fitted]
        source, note = "labels", "trained on the labels in --data"
    elif mode == "labels":
        raise TargetsError("finetune.targets is 'labels' but " + "; ".join(why))
    else:
        losses = [DISTILL_LOSS.get(k, "mse") for k in kinds]
        targets = [np.asarray(t, dtype=np.float32) for t in teacher]
        source = "distill"
        note = "distilled from the original model's outputs" + (f" ({'; '.join(why)})" if why else "")
    if loss_override != "auto":
        losses = [loss_override] * len(losses)
    return targets, losses, {"targets": source, "losses": losses, "note": note}


def make_loss(name: str) -> Any:
    import tf_keras

    if name == "sparse_categorical_crossentropy_logits":
        return tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return tf_keras.losses.get(name)


def fit(
    model: Any,
    inputs: list[np.ndarray],
    targets: list[np.ndarray],
    losses: list[str],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    callbacks: list,
    progress: Callable[[str], None],
    label: str,
) -> dict[str, Any]:
    """Compiles and trains a tf_keras model (seeded by the caller).

    Returns:
        {epochs, epochs_run (fewer when a callback stopped training), steps, batch_size, learning_rate, samples,
        loss_first, loss_last}.
    """
    import tf_keras

    n = len(inputs[0])
    batch = min(batch_size, n)
    model.compile(optimizer=tf_keras.optimizers.Adam(learning_rate), loss=[make_loss(l) for l in losses])
    history: list[float] = []

    class _Progress(tf_keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            loss = float((logs or {}).get("loss", float("nan")))
            history.append(loss)
            progress(f"{label}: epoch {epoch + 1}/{epochs} loss {loss:.4g}")

    if epochs > 0:
        model.fit(inputs if len(inputs) > 1 else inputs[0], targets if len(targets) > 1 else targets[0],
                  batch_size=batch, epochs=epochs, shuffle=True, verbose=0, callbacks=[*callbacks, _Progress()])
    return {"epochs": epochs, "epochs_run": len(history), "steps": epochs * math.ceil(n / batch), "batch_size": batch,
            "learning_rate": learning_rate, "samples": n,
            "loss_first": history[0] if history else None, "loss_last": history[-1] if history else None}


def steps_for(n: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps that `fit` will run."""
    return epochs * math.ceil(n / min(batch_size, n))
