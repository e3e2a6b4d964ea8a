"""Token selection shared by every decoding strategy: argmax, and the filtered distribution that
sampling draws from (temperature, then top-k, then top-p: Hugging Face's order), over any leading
dims, so the speculative draft [B, V] and its verify chunk [B, k + 1, V] use the same code."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def argmax(x: Array) -> Array:
  """jnp.argmax(x, -1) (the first maximal index, int32) as two plain reductions. XLA's CPU argmax,
  one variadic (value, index) reduce, is several times slower: a third of a decode round's
  overhead at batch 8."""
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.min(jnp.where(x == jnp.max(x, -1, keepdims=True), iota, x.shape[-1]), -1)


def filtered_logits(logits: Array, temperature: Array, top_k: int | None = None,
                    top_p: Array | None = None) -> Array:
  """Logits [..., V] after temperature, top-k (static) then top-p (None = off); the removed
  tokens are -inf."""
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    sorted_desc = -jnp.sort(-logits, -1)
    probs = jax.nn.softmax(sorted_desc, -1)
    before = jnp.cumsum(probs, -1) - probs  # mass of the strictly more likely tokens
    keep = (before < top_p).at[..., 0].set(True)
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), -1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits
