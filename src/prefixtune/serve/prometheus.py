"""Prometheus text-format metrics, kept by hand (no client library): counters, gauges, histograms."""
from __future__ import annotations

import threading
from collections import defaultdict

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                    for k, v in labels)
    return "{" + body + "}"


class _Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float):
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1


class Metrics:
    HELP = {
        "prefixtune_requests_total": ("counter", "HTTP requests by route and status code"),
        "prefixtune_completions_total": ("counter", "completion rows finished, by outcome"),
        "prefixtune_rejected_total": ("counter", "completion requests refused before decoding, by reason"),
        "prefixtune_generated_tokens_total": ("counter", "tokens generated and returned"),
        "prefixtune_prompt_tokens_total": ("counter", "prompt tokens decoded"),
        "prefixtune_batches_total": ("counter", "decoding batches run"),
        "prefixtune_batch_size": ("histogram", "rows per decoding batch"),
        "prefixtune_batch_prefixes": ("histogram", "distinct prefixes per decoding batch"),
        "prefixtune_batch_seconds": ("histogram", "wall time of one decoding batch"),
        "prefixtune_batch_size_max": ("gauge", "the most rows one decoding batch (engine: one step) has held"),
        "prefixtune_batch_prefixes_max": ("gauge", "the most distinct prefixes one decoding batch (engine: one "
                                                   "step) has held"),
        "prefixtune_request_seconds": ("histogram", "completion latency (queue + decoding)"),
        "prefixtune_queue_depth": ("gauge", "rows waiting for the decoding worker"),
        "prefixtune_prefixes": ("gauge", "prefixes stored, all tenants (resident or not)"),
        "prefixtune_worker_alive": ("gauge", "1 while the decoding worker runs"),
        "prefixtune_worker_heartbeat_age_seconds": ("gauge", "time since the worker's last decoding step or idle wait"),
        "prefixtune_worker_stall_seconds": ("gauge", "how long the most starved row has waited for a token (its "
                                                     "first, or its next): the oldest unserved row's age"),
        "prefixtune_worker_longest_stall_seconds": ("gauge", "the longest such wait so far"),
        # the prefix cache (bank.py): counted there, read at render time through `gauges`
        "prefixtune_prefix_cache_hits_total": ("counter", "prefix lookups served by a resident prefix"),
        "prefixtune_prefix_cache_misses_total": ("counter", "prefix lookups that loaded the prefix from the store"),
        "prefixtune_prefix_cache_evictions_total": ("counter", "resident prefixes evicted to stay within the limit"),
        "prefixtune_prefixes_resident": ("gauge", "prefixes loaded on the model's device"),
        "prefixtune_prefixes_resident_bytes": ("gauge", "bytes of the resident prefixes' tensors"),
        "prefixtune_prefixes_stored": ("gauge", "prefixes in the store, all tenants"),
    }

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self._hist: dict[str, _Histogram] = {
            "prefixtune_batch_size": _Histogram(BATCH_BUCKETS),
            "prefixtune_batch_prefixes": _Histogram(BATCH_BUCKETS),
            "prefixtune_batch_seconds": _Histogram(SECONDS_BUCKETS),
            "prefixtune_request_seconds": _Histogram(SECONDS_BUCKETS),
        }
        self.gauges: dict[str, callable] = {}  # name -> value read at render time (a gauge, or a counter kept
        #                                        elsewhere: the prefix cache's)
        self._peaks: dict[str, float] = {}
        for name in ("prefixtune_batch_size_max", "prefixtune_batch_prefixes_max"):
            self.gauges[name] = lambda name=name: self._peaks.get(name, 0.0)  # read under render's lock

    def inc(self, name: str, value: float = 1.0, **labels):
        with self._lock:
            self._counters[name][tuple(sorted(labels.items()))] += value

    def observe(self, name: str, value: float):
        with self._lock:
            self._hist[name].observe(value)

    def batch(self, rows: int, prefixes: int, seconds: float):
        """One decoding step of the engine: its counters, histograms and peaks."""
        with self._lock:
            self._counters["prefixtune_batches_total"][()] += 1
            self._hist["prefixtune_batch_size"].observe(rows)
            self._hist["prefixtune_batch_prefixes"].observe(prefixes)
            self._hist["prefixtune_batch_seconds"].observe(seconds)
            for name, value in (("prefixtune_batch_size_max", rows), ("prefixtune_batch_prefixes_max", prefixes)):
                self._peaks[name] = max(self._peaks.get(name, 0.0), value)

    def value(self, name: str, **labels) -> float:
        with self._lock:
            return self._counters[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, help_) in self.HELP.items():
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
                if kind == "counter" and name not in self.gauges:
                    series = self._counters.get(name) or {(): 0.0}
                    lines += [f"{name}{_labels(k)} {v:g}" for k, v in sorted(series.items())]
                elif kind == "histogram":
                    h = self._hist[name]
                    lines += [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(h.buckets, h.counts)]
                    lines += [f'{name}_bucket{{le="+Inf"}} {h.count}', f"{name}_sum {h.sum:g}",
                              f"{name}_count {h.count}"]
                else:
                    fn = self.gauges.get(name)
                    try:
                        value = float(fn()) if fn else 0.0
                    except Exception:
                        value = float("nan")
                    lines.append(f"{name} {value:g}")
        return "\n".join(lines) + "\n"
