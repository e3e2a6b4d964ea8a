"""`ulskip_jax.testing`'s HLO check itself: the loop check tells in-place cache writes from per-step copies."""

import jax
import jax.numpy as jnp

from ulskip_jax.testing import loop_layer_ops

SHAPE = (2, 2, 8, 4)  # a cache layer [B, K, S, Hd]


def _loop_hlo(body) -> str:
  run = lambda x, n: jax.lax.fori_loop(0, n, body, x)  # a traced trip count: a real while loop
  return jax.jit(run).lower(jnp.zeros(SHAPE), 3).compile().as_text()


def test_in_place_write_and_transposed_copy():
  write = lambda i, x: jax.lax.dynamic_update_slice_in_dim(x, jnp.ones((2, 2, 1, 4)), i, 2)
  in_place, others = loop_layer_ops(_loop_hlo(write), SHAPE)
  assert in_place and not others, others
  # A permuted copy of the layer every iteration ([2, 8, 2, 4]: the same dims in another order).
  shuffle = lambda i, x: jnp.swapaxes(x, 1, 2).reshape(SHAPE) + 1.0
  in_place, others = loop_layer_ops(_loop_hlo(shuffle), SHAPE)
  assert others and not in_place
