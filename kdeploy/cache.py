"""The result cache: a finished run's artifacts and report, content-addressed and verified before use.

An entry is keyed by everything a run's result depends on (`run_key`): the model's and the
data's bytes, the resolved profile, the recipes it yields, the options that change the result
(seed, custom code, input shapes), kdeploy's version and source, the library versions and the
host. An entry is a folder `<root>/v1/<key[:2]>/<key>/` holding `manifest.json` (the sha256 of
every file), `report.json` and `staging/` (the run's output folder without the report files);
it is written beside its final place and renamed into it, so it appears complete or not at all.
`lookup` re-hashes every file before the entry is used: a missing or altered file makes the
entry corrupt, and a corrupt entry is deleted and rebuilt, never trusted.

Location: `$KDEPLOY_CACHE_DIR`, else the platform's user cache folder (`~/.cache/kdeploy` on
Linux). No ML framework is imported here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from kdeploy import __version__
from kdeploy.util import file_sha256

LAYOUT = "v1"
ENV_VAR = "KDEPLOY_CACHE_DIR"
# Libraries whose version changes a result, besides the host's list (`run.host.LIBRARIES`).
EXTRA_LIBRARIES = ("tflite-micro", "keras-hub", "tensorflow-text")


def cache_root() -> Path:
    """`$KDEPLOY_CACHE_DIR`, else the platform's user cache folder for kdeploy."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("kdeploy", appauthor=False))


def source_digest() -> str:
    """sha256 of kdeploy's own source files: a changed kdeploy never reuses an older one's results."""
    h = hashlib.sha256(__version__.encode())
    pkg = Path(__file__).resolve().parent
    for p in sorted(pkg.rglob("*.py")):
        h.update(str(p.relative_to(pkg)).encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for lib in EXTRA_LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    return versions


def run_key(parts: dict[str, Any]) -> str:
    """sha256 of `parts` (JSON-serializable) in canonical form, with kdeploy's source and library versions."""
    body = {**parts, "kdeploy": __version__, "kdeploy_source": source_digest(), "libraries": library_versions(),
            "layout": LAYOUT}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Entry:
    """A verified cache entry."""

    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def report_json(self) -> str:
        return (self.path / "report.json").read_text()

    @property
    def extra(self) -> dict[str, Any]:
        """What the run stored beside the report (e.g. artifact io maps)."""
        return self.manifest.get("extra", {})

    def restore(self, staging: Path) -> None:
        """Copies the entry's output folder into `staging` (which exists, empty or not)."""
        shutil.copytree(self.path / "staging", staging, dirs_exist_ok=True)


class Cache:
    """The cache under `root`. Reads verify, writes are atomic; nothing here raises on a bad entry."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_root()

    def entry_dir(self, key: str) -> Path:
        return self.root / LAYOUT / key[:2] / key

    def lookup(self, key: str) -> tuple[Entry | None, str]:
        """The verified entry for `key`, or None and why not ("no entry", or what was corrupt: then it is deleted)."""
        path = self.entry_dir(key)
        if not path.is_dir():
            return None, "no entry"
        problem = _verify(path, key)
        if problem is None:
            return Entry(key, path, json.loads((path / "manifest.json").read_text())), "verified"
        shutil.rmtree(path, ignore_errors=True)
        return None, f"entry corrupt ({problem}); deleted and rebuilt"

    def store(self, key: str, staging: Path, report_json: str, extra: dict[str, Any] | None = None,
              skip: tuple[str, ...] = ()) -> Path | None:
        """Writes an entry from a run's output folder (files named in `skip` left out); None when it could not.

        A failure to write (disk full, read-only folder) costs the cache, never the run.
        """
        final = self.entry_dir(key)
        tmp = None
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.partial-", dir=final.parent))
            shutil.copytree(staging, tmp / "staging", ignore=lambda d, names: [n for n in names if
                                                                           Path(d) == staging and n in skip])
            (tmp / "report.json").write_text(report_json)
            files = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = {"key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "kdeploy": __version__, "files": files, "extra": extra or {}}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
            if final.exists():
                shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
        except OSError:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            return None
        return final


def _verify(path: Path, key: str) -> str | None:
    """None when every file of the manifest is there with its sha256 and nothing else is; else the first problem."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        files: dict[str, str] = manifest["files"]
        if manifest.get("key") != key:
            return "manifest is for another key"
    except (OSError, ValueError, KeyError, TypeError):
        return "manifest.json missing or unreadable"
    present = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {"manifest.json"}
    if present - set(files):
        return f"unexpected file {sorted(present - set(files))[0]}"
    for rel, digest in files.items():
        p = path / rel
        if not p.is_file():
            return f"{rel} missing"
        if file_sha256(p) != digest:
            return f"{rel} sha256 mismatch"
    return None
