"""One-line argument checks shared by the Python API, the run-config validation and infer.py.

Each check returns the value as a plain Python number, so numpy scalars (`np.int64(12)`,
`np.float32(2)`) are accepted wherever a Python number is, and raises a one-line ValueError that
names the argument, its value and what is allowed. Booleans are never numbers here (`True` as a
layer count is a mistake, not 1). Kept free of heavy imports: train.py validates a config with
these before it imports JAX's training stack.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any


def _is_bool(value: Any) -> bool:
  return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy's bool


def as_int(name: str, value: Any, min: int | None = None, max: int | None = None) -> int:
  """`value` as an int in [min, max] (either bound optional)."""
  allowed = _range_text("an int", min, max)
  if _is_bool(value) or isinstance(value, (str, bytes, float)):
    raise ValueError(f"{name}={value!r} is invalid: it must be {allowed}")
  try:
    result = operator.index(value)  # ints, numpy integers, 0-d integer arrays; not 1.5
  except TypeError:
    raise ValueError(f"{name}={value!r} is invalid: it must be {allowed}") from None
  if (min is not None and result < min) or (max is not None and result > max):
    raise ValueError(f"{name}={result!r} is out of range: it must be {allowed}")
  return result


def as_float(name: str, value: Any, min: float | None = None, max: float | None = None, *,
             min_open: bool = False, max_open: bool = False) -> float:
  """`value` as a finite float in [min, max] (`min_open` / `max_open` exclude the bound)."""
  lo = None if min is None else ("> " if min_open else ">= ") + f"{min:g}"
  hi = None if max is None else ("< " if max_open else "<= ") + f"{max:g}"
  allowed = " and ".join(["a finite number" + "".join(f" {b}" for b in (lo or hi,) if b)]
                         + ([hi] if lo and hi else []))
  if _is_bool(value) or isinstance(value, (str, bytes)):
    raise ValueError(f"{name}={value!r} is invalid: it must be {allowed}")
  if not isinstance(value, numbers.Real):
    if getattr(value, "shape", None) != () or getattr(value, "dtype", None) is None or (
        value.dtype.kind not in "iuf"):
      raise ValueError(f"{name}={value!r} is invalid: it must be {allowed}")
  result = float(value)
  if not math.isfinite(result):
    raise ValueError(f"{name}={result!r} is invalid: it must be {allowed}")
  if (min is not None and (result < min or (min_open and result == min))) or (
      max is not None and (result > max or (max_open and result == max))):
    raise ValueError(f"{name}={result!r} is out of range: it must be {allowed}")
  return result


def as_choice(name: str, value: Any, choices) -> Any:
  """`value` if it is one of `choices` (compared with ==, so 'paper' but not 1 for True)."""
  if not any(type(value) is type(c) and value == c for c in choices):
    raise ValueError(f"{name}={value!r} is unknown: allowed are "
                     + ", ".join(repr(c) for c in choices))
  return value


def _range_text(kind: str, min, max) -> str:
  if min is not None and max is not None:
    return f"{kind} in [{min}, {max}]"
  if min is not None:
    return f"{kind} >= {min}"
  if max is not None:
    return f"{kind} <= {max}"
  return kind
