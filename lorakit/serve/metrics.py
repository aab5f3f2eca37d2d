"""Serving counters in the Prometheus text exposition format (no client library needed for a handful of series)."""
from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Counters, gauges and histograms, each series identified by ``(name, label value)``; thread-safe."""

    def __init__(self, prefix: str = "lorakit") -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, str], float] = defaultdict(float)
        self._gauges: dict[str, float] = {}
        self._hist: dict[str, list[float]] = {}
        self._help: dict[str, tuple[str, str]] = {}

    def inc(self, name: str, amount: float = 1.0, label: str = "", help: str = "") -> None:
        with self._lock:
            self._counters[(name, label)] += amount
            self._help.setdefault(name, ("counter", help))

    def set(self, name: str, value: float, help: str = "") -> None:
        with self._lock:
            self._gauges[name] = value
            self._help.setdefault(name, ("gauge", help))

    def observe(self, name: str, value: float, help: str = "") -> None:
        with self._lock:
            counts = self._hist.setdefault(name, [0.0] * (len(LATENCY_BUCKETS) + 2))  # buckets, +Inf, sum
            for i, bound in enumerate(LATENCY_BUCKETS):
                counts[i] += value <= bound
            counts[-2] += 1
            counts[-1] += value
            self._help.setdefault(name, ("histogram", help))

    def counter(self, name: str, label: str = "") -> float:
        with self._lock:
            return self._counters[(name, label)]

    def render(self) -> str:
        """The exposition text (``# HELP`` / ``# TYPE`` lines, then the samples)."""
        lines: list[str] = []
        with self._lock:
            for name, (kind, help) in sorted(self._help.items()):
                full = f"{self.prefix}_{name}"
                lines += [f"# HELP {full} {help or name}", f"# TYPE {full} {kind}"]
                if kind == "counter":
                    for (n, label), value in sorted(self._counters.items()):
                        if n == name:
                            tag = f'{{reason="{label}"}}' if label else ""
                            lines.append(f"{full}{tag} {value:g}")
                elif kind == "gauge":
                    lines.append(f"{full} {self._gauges[name]:g}")
                else:
                    counts = self._hist[name]
                    for bound, count in zip(LATENCY_BUCKETS, counts):
                        lines.append(f'{full}_bucket{{le="{bound:g}"}} {count:g}')
                    lines += [f'{full}_bucket{{le="+Inf"}} {counts[-2]:g}', f"{full}_count {counts[-2]:g}",
                              f"{full}_sum {counts[-1]:g}"]
        return "\n".join(lines) + "\n"
