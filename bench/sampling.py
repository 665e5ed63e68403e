"""Peak memory of a running process tree, sampled on a thread (the benches' one sampler)."""

from __future__ import annotations

import threading

from kdeploy.memory import tree_memory_mb


class PeakMemory:
    """While the `with` block runs, samples `pid`'s process tree: `peak["rss"]` (RSS sum) every `interval`
    seconds and `peak["pss"]` every `pss_every`-th sample (reading PSS walks the page tables, ~0.1 s per GB)."""

    def __init__(self, pid: int, interval: float, pss_every: int):
        self.pid, self.interval, self.pss_every = pid, interval, pss_every
        self.peak = {"pss": 0.0, "rss": 0.0}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        n = 0
        while not self._done.is_set():
            self.peak["rss"] = max(self.peak["rss"], tree_memory_mb(self.pid, "rss"))
            if n % self.pss_every == 0:
                self.peak["pss"] = max(self.peak["pss"], tree_memory_mb(self.pid, "pss"))
            n += 1
            self._done.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
