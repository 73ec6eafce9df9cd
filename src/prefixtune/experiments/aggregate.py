"""`Agg`: one group of cells' values of a metric (mean, std, standard error), with the cells it came from."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass
class Agg:
    values: list[float]
    ids: list[str]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else float("nan")

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def se(self) -> float | None:
        return self.std / math.sqrt(self.n) if self.n > 1 else None

    def fmt(self, digits: int = 1) -> str:
        if not self.values:
            return "–"
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"
