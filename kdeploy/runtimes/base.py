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
        # The artifact's fixed batch size (its inputs' first dimension), set by `activate_impl`;
        # None when the batch dimension is dynamic. `infer` feeds a fixed-batch artifact in chunks of it.
        self.static_batch: int | None = None

    def __enter__(self) -> "Runner":
        self.activate_impl()
        self.is_active = True
        return self

    def __exit__(self, *exc) -> None:
        self.is_active = False
        self.deactivate_impl()

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Runs one batch. `feeds` maps model input names to arrays; returns outputs in model order.

        A fixed-batch artifact (e.g. batch 1, as many `.tflite` files from elsewhere are) gets the
        samples in chunks of its batch size, the last one padded with copies of its last sample
        (their outputs dropped).
        """
        if not self.is_active:
            raise RuntimeError(f"{self.name} runner used outside its `with` block")
        b = self.static_batch
        n = len(next(iter(feeds.values())))
        if not b or n == b:
            return self.infer_impl(feeds)
        parts = []
        for s in range(0, n, b):
            chunk = {k: v[s : s + b] for k, v in feeds.items()}
            m = min(b, n - s)
            if m < b:
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], b - m, axis=0)]) for k, v in chunk.items()}
            parts.append([o[:m] for o in self.infer_impl(chunk)])
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]

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
