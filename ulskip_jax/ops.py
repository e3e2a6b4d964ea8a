"""Array operations the model, its LoRA adapters and the loss share."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def dense(x: Array, w: Array, n_in: int = 1) -> Array:
  """x [..., *in] @ w [*in, *out] -> [..., *out] (n_in = len(in)) as ONE 2-D matmul in x's dtype.
  XLA:CPU runs a dot over [B, T, D] operands (and its backward, contracting B and T at once)
  much slower than the same dot over [B * T, D]; a reshape of a row-major array is free."""
  ins, outs = w.shape[:n_in], w.shape[n_in:]
  y = x.reshape(-1, math.prod(ins)) @ w.reshape(math.prod(ins), -1).astype(x.dtype)
  return y.reshape(*x.shape[:x.ndim - n_in], *outs)


def softcap(x: Array, cap: float | None) -> Array:
  """cap * tanh(x / cap) (Gemma 2's logit soft cap); x itself when cap is None."""
  return x if cap is None else cap * jnp.tanh(x / cap)
