"""The result cache in a run: the key of a run's inputs, a hit turned back into a report, a finished run stored.

The storage rules (content addressing, verification, atomic writes) are `kdeploy.cache`'s; this
module says what a run's result depends on and what a reused report must say about itself.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Any

from kdeploy.cache import Entry, run_key
from kdeploy.profiles import TargetProfile
from kdeploy.recipes import ort_recipes, ptq_recipes
from kdeploy.report.model import CacheInfo, Report
from kdeploy.run.context import Build, RunOptions
from kdeploy.util import file_sha256

# What a hit takes from the entry, as the report's `cache.from_cache` names it.
REUSED = ["artifacts", "reference_artifacts", "fidelity", "robustness", "memory", "compute", "checks", "latency",
          "selection", "findings"]
RETIMED = [s for s in REUSED if s not in ("latency", "selection")]


def key_for(opts: RunOptions, prof: TargetProfile, host: dict[str, Any]) -> str | None:
    """The cache key of an `optimize` run: everything its result depends on (see `kdeploy.cache`).

    None when the model path does not exist (loading then says so, exit 2).
    """
    if not Path(opts.model).exists():
        return None
    return run_key({
        "command": "optimize",
        "model_sha256": file_sha256(Path(opts.model)),
        "data_sha256": file_sha256(Path(opts.data)) if opts.data is not None else None,
        "profile": prof.model_dump(mode="json"),
        # Selective and TFMOT recipes follow from the profile (in the key) and the search's results.
        "recipes": [repr(r) for r in [*ptq_recipes(prof), *ort_recipes(prof)]],
        "seed": opts.seed,
        "trust_custom_code": opts.trust_custom_code,
        "trusted_packages": sorted(opts.trusted_packages),
        # A missing file hashes as None: the run then stops where custom objects are loaded (exit 2).
        "custom_objects_sha256": file_sha256(Path(opts.custom_objects))
        if opts.custom_objects and Path(opts.custom_objects).is_file() else None,
        "input_shapes": sorted((k, list(v)) for k, v in (opts.input_shapes or {}).items()),
        "host": host,
    })


def restore_hit(entry: Entry, opts: RunOptions, staging: Path, started: float) -> Report:
    """The cached run's report over a copy of its artifacts in `staging`, stating where it came from."""
    entry.restore(staging)
    report = Report.model_validate_json(entry.report_json)
    _as_this_run(report, opts, started)
    report.cache = CacheInfo(status="hit", key=entry.key, from_cache=list(REUSED),
                             entry_created=entry.manifest.get("created"),
                             detail=f"every file verified by sha256 ({len(entry.manifest['files'])} files); "
                                    "nothing was converted, run or timed (--retime times again, --no-cache "
                                    "ignores the cache)")
    report._staging = staging
    return report


def cached_report(entry: Entry, staging: Path) -> Report:
    """The cached run's report, its artifacts copied into `staging` (for a --retime run)."""
    entry.restore(staging)
    return Report.model_validate_json(entry.report_json)


def _as_this_run(report: Report, opts: RunOptions, started: float) -> None:
    """What differs between the cached run and this one although the inputs' bytes are the same."""
    report.model.path = str(opts.model)
    if opts.data is not None:
        report.data["source"] = str(opts.data)
    report.command = list(opts.command or [])
    report.reproducibility["rerun"] = shlex.join(opts.command) if opts.command else None
    report.reproducibility["cwd"] = os.getcwd()
    report.duration_s = round(time.perf_counter() - started, 3)


def retimed_info(entry: Entry) -> CacheInfo:
    return CacheInfo(status="retimed", key=entry.key, from_cache=list(RETIMED), entry_created=entry.manifest.get("created"),
                     detail="artifacts, fidelity, robustness, memory and the other checks from the cache (verified by "
                            "sha256); latency measured again and the selection made again (--retime)")


def io_of(builds: list[Build], staging: Path) -> dict[str, dict]:
    """Artifact path (relative to the output folder) -> its io map: stored with an entry, for --retime."""
    return {str(a.path.relative_to(staging)): a.io for b in builds for a in b.artifacts}


def io_maps(entry: Entry) -> dict[str, dict]:
    """The io maps stored with the entry (see `io_of`)."""
    return dict(entry.extra.get("io", {}))
