"""kdeploy: is this Keras model ready to deploy on that hardware, and what is the best artifact?

Importing this package imports no ML framework; TensorFlow, LiteRT and ONNX Runtime are
imported lazily by the modules that need them.

Python API:

```python
import kdeploy

report = kdeploy.optimize("model.keras", target="cpu-edge", data="data.npz")  # or a keras.Model
print(report.ready, report.selected)
report.save("out", formats=("json", "md", "html"))
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # for type checkers only: no import cost at run time
    from kdeploy.api import check, inspect, load_report, optimize  # noqa: F401
    from kdeploy.diff import DiffResult, Thresholds, diff_reports  # noqa: F401
    from kdeploy.report.model import Inspection, Report

__all__ = ["__version__", "optimize", "check", "inspect", "load_report", "diff_reports", "Report", "Inspection",
           "DiffResult", "Thresholds"]
_LAZY = {
    "optimize": ("kdeploy.api", "optimize"),
    "check": ("kdeploy.api", "check"),
    "load_report": ("kdeploy.api", "load_report"),
    "inspect": ("kdeploy.api", "inspect"),
    "Report": ("kdeploy.report.model", "Report"),
    "Inspection": ("kdeploy.report.model", "Inspection"),
    "diff_reports": ("kdeploy.diff", "diff_reports"),
    "DiffResult": ("kdeploy.diff", "DiffResult"),
    "Thresholds": ("kdeploy.diff", "Thresholds"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'kdeploy' has no attribute {name!r}")
