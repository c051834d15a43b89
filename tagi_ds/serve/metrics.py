"""The server's counters and histograms, rendered as Prometheus text (``GET /metrics``).

Thread-safe: the HTTP event loop counts requests, the engine thread counts tokens, cache events, adapter
generations and batch sizes. No client library: the exposition format is a few lines of text.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict

# name -> help; every name below is what /metrics shows (with the tagi_ prefix)
COUNTERS = {
    "requests_total": "HTTP requests answered, by endpoint and status code",
    "prompt_tokens_total": "prompt tokens the backbone read (the input; the instruction too in mode concat)",
    "completion_tokens_total": "tokens generated (eos included when it came)",
    "adapter_cache_hits_total": "requests whose instruction's adapter was cached (or being generated already)",
    "adapter_cache_misses_total": "requests that had the hypernetwork generate their instruction's adapter",
    "adapter_cache_evictions_total": "adapters dropped from the cache to keep it under --adapter_cache_mb",
    "adapter_generations_total": "instructions the hypernetwork read (one per new adapter)",
    "requests_cancelled_total": "requests whose client went away before the answer ended (their row left the batch, "
    "or never got one)",
}
GAUGES = {
    "adapter_cache_bytes": "bytes held by cached adapters",
    "adapter_cache_entries": "adapters cached",
    "queue_depth": "requests waiting for a batch",
}
HISTOGRAMS = {  # name -> (help, bucket upper bounds)
    "adapter_generation_seconds": (
        "wall time of one hypernetwork forward (all new instructions of a batch)",
        (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    ),
    "batch_size": ("requests decoded together in one batch", (1, 2, 4, 8, 16, 32, 64, 128)),
    "batch_instructions": ("distinct instructions (adapters) in one batch", (1, 2, 4, 8, 16, 32, 64, 128)),
    "request_seconds": (
        "time from a request's arrival to its last token",
        (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    ),
}


def number(value: float) -> str:
    """A sample value in full: integers as integers (``:g`` wrote 1234567 as 1.23457e+06), others by ``repr``
    (the shortest text that reads back as the same float), infinities as Prometheus spells them."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:  # exact as an int
        return str(int(value))
    return repr(value)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, str], float] = defaultdict(float)
        self._gauges: dict[str, float] = {name: 0.0 for name in GAUGES}
        self._hist = {name: ([0] * (len(bounds) + 1), [0.0]) for name, (_, bounds) in HISTOGRAMS.items()}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        if name not in COUNTERS:
            raise KeyError(f"unknown counter {name!r}")
        with self._lock:
            self._counters[(name, _labels(labels))] += value

    def set(self, name: str, value: float) -> None:
        if name not in GAUGES:
            raise KeyError(f"unknown gauge {name!r}")
        with self._lock:
            self._gauges[name] = float(value)

    def observe(self, name: str, value: float) -> None:
        _, bounds = HISTOGRAMS[name]
        counts, total = self._hist[name]
        with self._lock:
            counts[next((i for i, b in enumerate(bounds) if value <= b), len(bounds))] += 1
            total[0] += value

    def value(self, name: str, **labels: str) -> float:
        """A counter's current value (the sum over its label sets when ``labels`` is empty)."""
        with self._lock:
            if labels:
                return self._counters.get((name, _labels(labels)), 0.0)
            return sum(v for (n, _), v in self._counters.items() if n == name)

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        out = []
        with self._lock:
            for name, text in COUNTERS.items():
                out += [f"# HELP tagi_{name} {text}", f"# TYPE tagi_{name} counter"]
                series = [(lab, v) for (n, lab), v in sorted(self._counters.items()) if n == name]
                out += [f"tagi_{name}{lab} {number(v)}" for lab, v in series] or [f"tagi_{name} 0"]
            for name, text in GAUGES.items():
                out += [
                    f"# HELP tagi_{name} {text}",
                    f"# TYPE tagi_{name} gauge",
                    f"tagi_{name} {number(self._gauges[name])}",
                ]
            for name, (text, bounds) in HISTOGRAMS.items():
                counts, total = self._hist[name]
                out += [f"# HELP tagi_{name} {text}", f"# TYPE tagi_{name} histogram"]
                running = 0
                for bound, count in zip((*bounds, "+Inf"), counts):
                    running += count
                    out.append(f'tagi_{name}_bucket{{le="{bound}"}} {running}')
                out += [f"tagi_{name}_sum {number(total[0])}", f"tagi_{name}_count {running}"]
        return "\n".join(out) + "\n"
