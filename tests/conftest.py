"""Shared test helpers: fixture paths and a quick-timing copy of a built-in profile."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import tomllib
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Module- and session-scoped fixtures run before the per-test cache folder below is set: they get
# an empty cache of this test session's own, never the user's (~/.cache/kdeploy) entries.
os.environ["KDEPLOY_CACHE_DIR"] = tempfile.mkdtemp(prefix="kdeploy-test-cache-")
atexit.register(shutil.rmtree, os.environ["KDEPLOY_CACHE_DIR"], ignore_errors=True)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
PROFILES = ROOT / "profiles"
# Latency is measured, not asserted, in tests: a few iterations keep the suite fast.
QUICK_TIMING = {"warmup": 1, "min_iters": 5, "min_seconds": 0.0, "max_iters": 20, "timeout_s": 300}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def dump_toml(data: dict) -> str:
    """Minimal TOML writer for profile dicts (scalars, lists, one level of nested tables)."""
    lines, tables = [], []
    for k, v in data.items():
        (tables if isinstance(v, dict) else lines).append((k, v))
    out = [f"{k} = {_toml_value(v)}" for k, v in lines]

    def table(prefix, d):
        flat = [(k, v) for k, v in d.items() if not isinstance(v, dict)]
        nested = [(k, v) for k, v in d.items() if isinstance(v, dict)]
        if flat or not nested:
            out.append(f"\n[{prefix}]")
            out.extend(f"{k} = {_toml_value(v)}" for k, v in flat)
        for k, v in nested:
            table(f"{prefix}.{k}", v)

    for k, v in tables:
        table(k, v)
    return "\n".join(out) + "\n"


def make_profile(tmp_path: Path, base: str = "cpu-edge", **overrides) -> Path:
    """Writes a copy of built-in profile `base` with quick timing and `overrides` (top-level keys)."""
    data = tomllib.loads((PROFILES / f"{base}.toml").read_text())
    data["timing"] = dict(QUICK_TIMING)
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    path = tmp_path / f"{data['name']}-test.toml"
    path.write_text(dump_toml(data))
    return path


@pytest.fixture
def quick_profile(tmp_path):
    """Factory: quick_profile(base="cpu-edge", **overrides) -> path of a profile file."""
    return lambda base="cpu-edge", **kw: make_profile(tmp_path, base, **kw)


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path_factory, monkeypatch):
    """Every test gets an empty result cache of its own: never the user's, never another test's entries.

    (A shared one would let a fault-injection test be answered by an earlier test's cached success.)
    """
    monkeypatch.setenv("KDEPLOY_CACHE_DIR", str(tmp_path_factory.mktemp("kdeploy-cache")))
