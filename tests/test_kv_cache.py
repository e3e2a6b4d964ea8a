"""The cache API: a deferred layer cache attends like the written one, reorder, views, insert."""

import jax
import jax.numpy as jnp
import numpy as np

from tests import tolerance
from ulskip_jax import testing as tiny
from ulskip_jax.kv_cache import KVCache, cache_bytes, init_cache


def _filled(cfg, B=2, S=8, skip=()):
  cache = init_cache(cfg, B, S, skip)
  key = jax.random.key(0)
  rand = lambda i, a: jax.random.normal(jax.random.fold_in(key, i), a.shape)
  pos = jnp.where(jnp.arange(S)[None] < 5, jnp.arange(S)[None], -1) * jnp.ones((B, 1), jnp.int32)
  return KVCache(tuple(rand(i, a) for i, a in enumerate(cache.k)),
                 tuple(rand(100 + i, a) for i, a in enumerate(cache.v)), pos)


def test_deferred_layer_cache_attends_like_the_written_one():
  model = tiny.tiny_model()
  cfg = model.cfg
  cache = _filled(cfg)
  positions = jnp.full((2, 1), 5, jnp.int32)
  ones = jnp.ones((2, 1), jnp.int32)
  x = jax.random.normal(jax.random.key(1), (2, 1, cfg.d_model))
  cache = cache.write_positions(positions, ones, 5)
  y, written = model.layers[0](x, positions, ones, cache.layer(0, 5))
  y_deferred, (k, v) = model.layers[0](x, positions, ones, cache.layer(0, 5, deferred=True))
  np.testing.assert_allclose(y_deferred, y, **tolerance.close(1e-5))
  np.testing.assert_array_equal(cache.write(0, k, v, 5).k[0], written.k)


def test_reorder_views_and_ring_insert():
  cfg = tiny.tiny_config()
  cache = _filled(cfg)
  swapped = cache.reorder(jnp.array([1, 0]))
  np.testing.assert_array_equal(swapped.k[2][0], cache.k[2][1])
  view = cache.kept_view((1, 3))
  assert len(view.k) == len(view.v) == 2
  merged = init_cache(cfg, 2, 8).merge_view(view, (1, 3))
  np.testing.assert_array_equal(merged.v[3], cache.v[3])
  assert not np.any(merged.k[0])
  prompt = _filled(cfg, B=1, S=3).replace(pos=jnp.array([[0, 1, 2]], jnp.int32))
  ring = cache.insert(1, prompt, 6)  # slots 6, 7, 0
  np.testing.assert_array_equal(ring.pos[1], [2, -1, -1, -1, -1, -1, 0, 1])
  np.testing.assert_array_equal(ring.k[0][1][:, 6], prompt.k[0][0][:, 0])
  np.testing.assert_array_equal(ring.pos[0], cache.pos[0])


def test_cache_bytes_is_what_init_cache_allocates():
  cfg = tiny.tiny_config()
  for skip, dtype in [((), None), ([1, 2], None), ((1,), jnp.bfloat16)]:
    arrays = jax.tree.leaves(init_cache(cfg, 3, 20, tuple(skip), dtype))
    assert cache_bytes(cfg, 3, 20, skip, dtype) == sum(a.nbytes for a in arrays)
