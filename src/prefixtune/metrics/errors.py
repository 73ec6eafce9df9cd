"""The one error type of the metrics package."""
from __future__ import annotations


class MetricsError(Exception):
    """Bad scoring input or a missing tool (Java, a data file): one clear message, no traceback needed."""


def attempt(scores: dict, names: str, compute, skipped: list[str] | None):
    """Add `compute()`'s scores; with a `skipped` list, a metric that cannot score the data is left out with a
    line there naming it (None: its MetricsError is raised)."""
    try:
        scores.update(compute())
    except MetricsError as e:
        if skipped is None:
            raise
        skipped.append(f"{names} skipped: {e}")
