"""Tolerances for comparing two computations of the same values, on any backend.

A test states the tolerance its comparison needs where matmuls are exact: on the CPU, whose dots
compute f32 operands in f32 whatever JAX's matmul precision says. Elsewhere JAX's default
precision rounds f32 operands before multiplying: to TF32 (10 mantissa bits) on NVIDIA GPUs, to
bfloat16 (one pass, 7 bits) on TPUs. Two computations that should agree then differ by rounding at
that precision, which no CPU-tuned constant covers, so there the tolerance is also at least
`REDUCED_ULPS` units of that rounding, relative and absolute. Operands of a 16-bit dtype round the
same on every backend: their tests keep their own constants.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Unit roundoff (half the gap above 1.0) of the types matmul operands are rounded to.
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "tensorfloat32": 2.0 ** -11, "bfloat16": 2.0 ** -8,
                 "float16": 2.0 ** -11}
# Rounding at reduced precision, carried through a few layers of a tiny model: 2e-2 at TF32.
REDUCED_ULPS = 40
_EXACT_PRECISIONS = ("highest", "float32", "F32_F32_F32")


def matmul_operand_type(dtype="float32") -> str:
  """The type matmul operands of `dtype` are rounded to here, at JAX's matmul precision."""
  name = jnp.dtype(dtype).name
  if name != "float32":
    return name
  precision = jax.config.jax_default_matmul_precision
  backend = jax.default_backend()
  if backend == "cpu" or str(precision) in _EXACT_PRECISIONS:
    return "float32"
  if backend == "tpu" and str(precision) not in ("high", "tensorfloat32"):
    return "bfloat16"
  return "tensorfloat32"  # NVIDIA's default, and TPU's 3-pass "high" (no coarser than TF32)


def bound(exact: float, dtype="float32") -> float:
  """A tolerance here, from `exact`: the comparison's tolerance where matmuls are exact."""
  operand = matmul_operand_type(dtype)
  if operand == jnp.dtype(dtype).name:
    return exact
  return max(exact, REDUCED_ULPS * UNIT_ROUNDOFF[operand])


def close(atol: float = 0.0, rtol: float = 0.0, dtype="float32") -> dict[str, float]:
  """`np.testing.assert_allclose` keywords: the given tolerances where matmuls are exact; where
  they round, each at least `REDUCED_ULPS` units of that rounding."""
  return dict(atol=bound(atol, dtype), rtol=bound(rtol, dtype))
