"""The one sampler: argmax and the filtered distribution, on any leading dims."""

import jax
import jax.numpy as jnp
import numpy as np

from ulskip_jax import sampling


def test_argmax_is_the_first_maximal_index():
  x = jnp.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
  np.testing.assert_array_equal(sampling.argmax(x), [1, 0])
  y = jax.random.normal(jax.random.key(0), (2, 3, 50))
  np.testing.assert_array_equal(sampling.argmax(y), jnp.argmax(y, -1))


def test_filtering_keeps_top_k_and_the_top_p_nucleus_on_any_leading_dims():
  logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
  batched = jnp.broadcast_to(logits, (2, 3, 4))
  kept = jnp.isfinite(sampling.filtered_logits(batched, 1.0, top_k=3, top_p=0.7))
  np.testing.assert_array_equal(kept, jnp.broadcast_to(jnp.array([True, True, False, False]),
                                                       (2, 3, 4)))
  assert bool(jnp.all(jnp.isfinite(sampling.filtered_logits(batched, 2.0))))
  top1 = sampling.filtered_logits(batched, 1.0, top_k=1)
  tok = jax.random.categorical(jax.random.key(1), top1, -1)
  np.testing.assert_array_equal(tok, jnp.zeros((2, 3), jnp.int32))
