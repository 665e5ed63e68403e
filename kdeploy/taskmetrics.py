"""Task metrics with labels: accuracy for classifiers, MAE/RMSE for regression, for Keras and each artifact.

Pure functions over arrays and report rows (no run context). Labels come from `--data` as `y`
(one-output models) or `y_<output>`. Budgets of the profile (`max_relative_accuracy_drop`, default 1% of Keras' accuracy
as in MLPerf Inference; `max_accuracy_drop`; `max_mae_increase`) become checks, judged by
`acceptance.task_verdict`; with labels, a fidelity check that failed on top-1 agreement alone
passes when the task accuracy of that output stays within its budget, and says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdeploy.acceptance import accuracy_allowance, task_verdict
from kdeploy.compare import output_kind
from kdeploy.report.model import Check


def labels_for(labels: dict[str, np.ndarray] | None, names: list[str]) -> list[np.ndarray | None]:
    """Per output, its labels: `y_<output>`, or `y` for a one-output model; None where there are none."""
    labels = labels or {}
    return [labels.get(f"y_{n}", labels.get("y") if len(names) == 1 else None) for n in names]


def metric_values(kind: str, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Task metrics of `pred` against labels `y` for an output of `kind`.

    Binary: accuracy at 0.5; multiclass: accuracy of the top class (labels as class ids or one-hot;
    a tie at the top is no prediction, hence wrong: argmax's first index would be luck, as in
    `acceptance.decisions`);
    regression: MAE and RMSE. Other kinds (multilabel): no metric. A map (rank > 2) is scored cell
    by cell, as `acceptance.decisions` judges it: the argmax along the last axis against a label
    map of class ids (N, ...) or one-hot (N, ..., C), or every element at 0.5; the fraction of
    cells right (its `samples` stay the samples: the bound counts net samples lost).
    """
    pred = np.asarray(pred, dtype=np.float64)
    y = np.asarray(y)
    if pred.ndim > 2 and kind in ("binary", "multiclass"):
        if kind == "binary" and y.size == pred.size:
            return {"accuracy": float(np.mean((pred > 0.5) == (y.reshape(pred.shape) > 0.5)))}
        if kind == "multiclass" and y.shape == pred.shape:
            return {"accuracy": float(np.mean(_top(pred) == y.argmax(-1)))}
        if kind == "multiclass" and y.size * pred.shape[-1] == pred.size:
            return {"accuracy": float(np.mean(_top(pred) == y.reshape(pred.shape[:-1]).astype(int)))}
        return {}  # labels that are not a map of this output's cells: no metric
    if kind == "binary":
        return {"accuracy": float(np.mean((pred.reshape(len(pred), -1)[:, 0] > 0.5) == (y.reshape(len(y), -1)[:, 0] > 0.5)))}
    if kind == "multiclass":
        ids = y.reshape(len(y), -1).argmax(1) if y.ndim > 1 and y.shape[-1] > 1 else y.reshape(-1).astype(int)
        return {"accuracy": float(np.mean(_top(pred.reshape(len(pred), -1)) == ids))}
    if kind == "regression":
        d = pred.reshape(len(pred), -1) - y.reshape(len(y), -1).astype(np.float64)
        return {"mae": float(np.mean(np.abs(d))), "rmse": float(np.sqrt(np.mean(d ** 2)))}
    return {}


def _top(pred: np.ndarray) -> np.ndarray:
    """The top class along the last axis, -1 where two or more classes tie at the top."""
    best = pred.argmax(-1)
    ties = (pred >= pred.max(-1, keepdims=True)).sum(-1) > 1
    return np.where(ties, -1, best)


def task_rows(names: list[str], kinds: list[str], labels: list[np.ndarray | None], keras: list[np.ndarray],
              got: list[np.ndarray]) -> list[dict[str, Any]]:
    """`candidates[].task_metrics`: `{name, output, keras, value, drop, samples}` per output with labels.

    `drop` is how much worse the artifact is than Keras: accuracy lost, or MAE/RMSE gained.
    """
    rows = []
    for name, kind, y, ref, out in zip(names, kinds, labels, keras, got):
        if y is None:
            continue
        kind = output_kind(kind, ref)
        k, v = metric_values(kind, y, ref), metric_values(kind, y, np.asarray(out).reshape(ref.shape))
        for metric in k:
            drop = k[metric] - v[metric] if metric == "accuracy" else v[metric] - k[metric]
            rows.append({"name": metric, "output": name, "keras": round(k[metric], 6), "value": round(v[metric], 6),
                         "drop": round(drop, 6), "samples": int(len(ref))})
    return rows


def budget_checks(rows: list[dict[str, Any]], max_accuracy_drop: float | None,
                  max_mae_increase: float | None, max_relative_accuracy_drop: float | None = None) -> list[Check]:
    """The profile's task budgets over task metric rows, one check per (output, metric) budgeted.

    Accuracy: the allowance is the tighter of `max_accuracy_drop` and `max_relative_accuracy_drop`
    of Keras' accuracy, and a larger drop still passes when the samples lost are consistent with it
    for the sample count (`acceptance.task_verdict`). MAE: the increase against its limit.
    """
    checks = []
    for r in rows:
        if r["name"] == "accuracy":
            limit = accuracy_allowance(r["keras"], max_accuracy_drop, max_relative_accuracy_drop)
        else:
            limit = {"mae": max_mae_increase}.get(r["name"])
        if limit is None:
            continue
        limit = round(limit, 6)
        what = "drop" if r["name"] == "accuracy" else "increase"
        passed, note = (task_verdict(r["drop"], r.get("samples"), limit) if r["name"] == "accuracy"
                        else (r["drop"] <= limit + 1e-12, ""))  # 1e-12: rounding of the rows only
        summary = "" if passed else (
            f"accuracy {r['value']:.1%} vs Keras {r['keras']:.1%} [{r['output']}]: {r['drop'] * 100:.3g} points lost, "
            f"budget {limit * 100:.3g}" if r["name"] == "accuracy" else
            f"MAE {r['value']:.4g} vs Keras {r['keras']:.4g} [{r['output']}]: +{r['drop']:.4g}, budget {limit:.4g}")
        checks.append(Check(name=f"task {r['name']} {what} [{r['output']}]", value=r["drop"], limit=limit,
                            passed=passed, summary=summary,
                            detail=f"{r['name']} {r['value']:.4f} vs Keras {r['keras']:.4f} on the labelled "
                                   f"validation samples{note}"))
    return checks


def accept_on_task(fidelity_check: Check, top1_only: bool, task: list[Check]) -> bool:
    """Passes a fidelity check that failed on top-1 agreement alone when the output's task accuracy is in budget.

    Args:
        fidelity_check: a failed `fidelity ... [output]` check (changed in place when accepted).
        top1_only: the comparison passes every other criterion of the tolerance.
        task: the candidate's task budget checks.

    Returns:
        True when accepted.
    """
    output = fidelity_check.name.rsplit("[", 1)[-1].rstrip("]")
    acc = next((k for k in task if k.name == f"task accuracy drop [{output}]"), None)
    if fidelity_check.passed or not top1_only or acc is None or not acc.passed:
        return False
    fidelity_check.passed = True
    fidelity_check.summary = ""
    fidelity_check.detail += (f"; top-1 agreement below min_top1, accepted on the task metric: accuracy drop "
                              f"{acc.value:.4f} <= max_accuracy_drop {acc.limit:g} (labels)")
    return True
