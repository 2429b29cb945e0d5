"""JSON without NaN or infinities, which JSON does not have.

Python's `json` reads `NaN`, `Infinity` and numbers too big for a float (`1e999`, read as
infinity) and writes them back as `NaN` / `Infinity`, which no JSON parser accepts. A
stored value like that would make every later answer that shows it fail, so what comes
in is refused (`loads_finite`) and what goes out is made valid (`finite_only`).
"""

from __future__ import annotations

import json
import math
from typing import Any


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def loads_finite(raw: bytes | str) -> Any:
    """`json.loads` that raises ValueError for NaN, Infinity and out-of-range numbers."""
    return json.loads(raw, parse_float=_finite, parse_constant=_no_constant)


def finite_only(data: Any) -> Any:
    """`data` with every NaN or infinite float replaced by None (lists and dicts copied)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_only(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [finite_only(v) for v in data]
    return data
