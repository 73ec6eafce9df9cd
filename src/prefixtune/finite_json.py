"""JSON as the standard has it: Python's `json.dumps` writes a NaN or infinite float as `NaN` / `Infinity`,
which no other JSON reader takes (JavaScript, jq, serde, ...). A training job's losses can be non-finite (a
user whose loss diverged): its files hold null there, and a CSV an empty cell."""
from __future__ import annotations

import json
import math


def finite(value):
    """`value` with every non-finite float, in dicts, lists and tuples at any depth, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value, **kwargs) -> str:
    """`json.dumps` of `finite(value)`; anything non-finite left (from `default`, say) is an error, not `NaN`."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)
