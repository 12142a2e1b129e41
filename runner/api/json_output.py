"""Every JSON response is JSON: a float that is not finite is written as null.

Python's json module writes NaN and Infinity as the bare words `NaN` and `Infinity`, which no
JSON parser (a browser's JSON.parse, jq) reads. They reach responses in what the API passes
through: a task's result, a stored value. null is what JavaScript's own JSON.stringify writes
for them.
"""

from __future__ import annotations

import math
from typing import Any

from flask.json.provider import DefaultJSONProvider


def finite(value: Any) -> Any:
    """`value` with every float that is not finite replaced by None (containers copied)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


class FiniteJSONProvider(DefaultJSONProvider):
    def dumps(self, obj: Any, **kwargs: Any) -> str:
        try:
            return super().dumps(obj, allow_nan=False, **kwargs)
        except ValueError:  # "Out of range float values are not JSON compliant": the rare case, walked
            return super().dumps(finite(obj), allow_nan=False, **kwargs)
