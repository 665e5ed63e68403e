"""The runner interface: a context manager with `infer(feeds) -> outputs` (Polygraphy-style)."""

from __future__ import annotations

import abc

import numpy as np


class Runner(abc.ABC):
    """Runs one artifact. Use as a context manager; `infer` checks state and calls `infer_impl`."""

    name = "runner"
    framework: str | tuple[str, ...] = ()  # modules imported before a memory baseline is taken
    max_threads: int | None = None  # None: any thread count; 1 for single-threaded runtimes

    def __init__(self, artifact, threads: int = 1):
        self.artifact = artifact
        self.threads = threads
        self.is_active = False

    def __enter__(self) -> "Runner":
        self.activate_impl()
        self.is_active = True
        return self

    def __exit__(self, *exc) -> None:
        self.is_active = False
        self.deactivate_impl()

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Runs one batch. `feeds` maps model input names to arrays; returns outputs in model order."""
        if not self.is_active:
            raise RuntimeError(f"{self.name} runner used outside its `with` block")
        return self.infer_impl(feeds)

    def infer_batched(self, feeds: dict[str, np.ndarray], batch_size: int = 64) -> list[np.ndarray]:
        """Runs all samples in batches of `batch_size` and concatenates the outputs."""
        n = len(next(iter(feeds.values())))
        parts = [self.infer({k: v[s : s + batch_size] for k, v in feeds.items()}) for s in range(0, n, batch_size)]
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]

    @abc.abstractmethod
    def activate_impl(self) -> None: ...

    @abc.abstractmethod
    def infer_impl(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def arena_bytes(self) -> int | None:
        """Working memory the runtime reports for the loaded model (TFLite Micro's arena), else None."""
        return None

    def deactivate_impl(self) -> None:
        pass
