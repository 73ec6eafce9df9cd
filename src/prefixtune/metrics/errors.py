"""The one error type of the metrics package."""
from __future__ import annotations


class MetricsError(Exception):
    """Bad scoring input or a missing tool (Java, a data file): one clear message, no traceback needed."""
