"""Equivalences that pin down the decoder: skipping, caching, packing and paper mode."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ulskip_jax import Decoder, init_cache, plan_layers
from ulskip_jax.kv_cache import cache_bytes

from ulskip_jax.testing import jit_call, tiny_config, tiny_model
import tolerance

TOL = 2e-5


def _tokens(B=2, T=10, seed=1):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, 97)


def _cached_logits(fwd, tokens, skip, prompt_len, cache, full_depth=None):
  """Logits of a prefill of the first prompt_len tokens, then one cached step per token."""
  first, cache = fwd(tokens[:, :prompt_len], skip=skip, full_depth_BT=full_depth, cache=cache,
                     cache_index=0)
  steps = [first]
  for t in range(prompt_len, tokens.shape[1]):
    logits, cache = fwd(tokens[:, t:t + 1], skip=skip,
                        positions_BT=jnp.full((tokens.shape[0], 1), t), cache=cache,
                        cache_index=t)
    steps.append(logits)
  return jnp.concatenate(steps, 1)


def _delete_layers(model: Decoder, skip) -> Decoder:
  """A model with the skipped layers removed from its layer list."""
  kept = [i for i in range(model.cfg.num_layers) if i not in skip]
  cfg = dataclasses.replace(model.cfg, num_layers=len(kept))
  small = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(model)
  state["layers"] = nnx.State({j: state["layers"][i] for j, i in enumerate(kept)})
  nnx.update(small, state)
  return small


@pytest.mark.parametrize("overrides", [{}, dict(pos="alibi", norm="layer", mlp="plain",
                                                 act="gelu_tanh", qkv_bias=True, out_bias=True,
                                                 mlp_bias=True, embed_norm=True,
                                                 tie_embeddings=True),
                                       dict(pos="learned", norm="layer", num_kv_heads=1)])
def test_skipping_a_layer_equals_deleting_it(overrides):
  model = tiny_model(**overrides)
  fwd, tokens = jit_call(model), _tokens()
  for skip in [(1,), (1, 2), (0, 3)]:
    want = jit_call(_delete_layers(model, skip))(tokens)
    np.testing.assert_allclose(fwd(tokens, skip=skip), want, **tolerance.close(TOL))
  np.testing.assert_allclose(fwd(tokens, skip=()), fwd(tokens), atol=0)


@pytest.mark.parametrize("pos", ["rope", "alibi", "learned"])
@pytest.mark.parametrize("skip", [(), (1, 2)])
def test_cached_decode_equals_full_forward(pos, skip):
  model = tiny_model(pos=pos)
  fwd = jit_call(model)
  tokens = _tokens(T=12)
  want = fwd(tokens, skip=skip)
  got = _cached_logits(fwd, tokens, skip, 5, init_cache(model.cfg, 2, 16, skip))
  np.testing.assert_allclose(got, want, **tolerance.close(TOL))
  # An empty cache equals no cache.
  np.testing.assert_allclose(fwd(tokens, skip=skip, cache=init_cache(model.cfg, 2, 12, skip))[0],
                             want, **tolerance.close(TOL))


def test_paper_mode_prompt_at_full_depth_response_skips():
  model = tiny_model()
  fwd = jit_call(model)
  tokens, P, skip = _tokens(T=12), 7, (1, 2)
  full_depth = jnp.broadcast_to(jnp.arange(12) < P, (2, 12))
  got = fwd(tokens, skip=skip, full_depth_BT=full_depth)
  # The prompt sees exactly the full model; the response differs from both full and skipped.
  np.testing.assert_allclose(got[:, :P], fwd(tokens)[:, :P], **tolerance.close(TOL))
  assert not np.allclose(got[:, P:], fwd(tokens)[:, P:], **tolerance.close(1e-3))
  assert not np.allclose(got[:, P:], fwd(tokens, skip=skip)[:, P:], **tolerance.close(1e-3))
  # Cached: prefill at full depth writes KV for kept layers only, then decode skips.
  cached = _cached_logits(fwd, tokens, skip, P, init_cache(model.cfg, 2, 12, skip), True)
  np.testing.assert_allclose(cached, got, **tolerance.close(TOL))


def test_packed_segments_equal_separate_sequences():
  model = tiny_model()
  fwd = jit_call(model)
  a, b = _tokens(1, 6, seed=2), _tokens(1, 5, seed=3)
  packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], 1)
  seg = jnp.asarray([[1] * 6 + [2] * 5 + [0] * 3])
  pos = jnp.asarray([list(range(6)) + list(range(5)) + [0] * 3])
  got = fwd(packed, positions_BT=pos, segment_ids_BT=seg, skip=(2,))
  np.testing.assert_allclose(got[:, :6], fwd(a, skip=(2,)), **tolerance.close(TOL))
  np.testing.assert_allclose(got[:, 6:11], fwd(b, skip=(2,)), **tolerance.close(TOL))


# Gemma 3's switches, with a window (3) shorter than the sequences and the packed segments.
LOCAL_GLOBAL = dict(attention_windows=(3, None, 3, None), local_rope_theta=100.0,
                    norm="rms_plus_one", post_norms=True, embed_scale=True,
                    query_pre_attn_scalar=4, attn_softcap=5.0, final_softcap=3.0, qk_norm=True,
                    act="gelu_tanh", tie_embeddings=True)


def test_local_global_layers_cached_packed_and_paper_mode():
  model = tiny_model(**LOCAL_GLOBAL)
  fwd, tokens, skip, P = jit_call(model), _tokens(T=12), (1,), 5
  # Windows change the result (so the checks below see them), then cached == full forward.
  no_window = jit_call(tiny_model(**{**LOCAL_GLOBAL, "attention_windows": None}))
  assert not np.allclose(fwd(tokens), no_window(tokens), **tolerance.close(1e-3))
  for full_depth in (None, True):
    want = fwd(tokens, skip=skip, full_depth_BT=None if full_depth is None else
               jnp.broadcast_to(jnp.arange(12) < P, (2, 12)))
    got = _cached_logits(fwd, tokens, skip, P, init_cache(model.cfg, 2, 16, skip), full_depth)
    np.testing.assert_allclose(got, want, **tolerance.close(TOL))
  # The window counts positions, which restart in each packed segment.
  a, b = _tokens(1, 6, seed=2), _tokens(1, 5, seed=3)
  packed = jnp.concatenate([a, b], 1)
  pos = jnp.asarray([list(range(6)) + list(range(5))])
  seg = jnp.asarray([[1] * 6 + [2] * 5])
  got = fwd(packed, positions_BT=pos, segment_ids_BT=seg, skip=skip)
  np.testing.assert_allclose(got[:, :6], fwd(a, skip=skip), **tolerance.close(TOL))
  np.testing.assert_allclose(got[:, 6:], fwd(b, skip=skip), **tolerance.close(TOL))


def test_one_compile_per_skip_tuple():
  model = tiny_model()
  graphdef, state = nnx.split(model)

  fwd = jax.jit(lambda state, tokens, skip: nnx.merge(graphdef, state)(tokens, skip=skip),
                static_argnums=2)
  tokens = _tokens()
  for skip in [(), plan_layers(4, 2).skipped, (), plan_layers(4, 2).skipped, (1,)]:
    fwd(state, tokens, skip)
  assert fwd._cache_size() == 3


def test_skipped_layer_weights_are_never_read():
  model = tiny_model()
  graphdef, state = nnx.split(model)
  tokens = _tokens()
  grads = jax.jit(jax.grad(lambda s: nnx.merge(graphdef, s)(tokens, skip=(1, 2)).sum()))(state)
  layer_norms = [sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(grads["layers"][i]))
                 for i in range(4)]
  assert layer_norms[1] == layer_norms[2] == 0.0 and layer_norms[0] > 0 and layer_norms[3] > 0


def test_cache_shrinks_with_ratio():
  cfg = tiny_config(num_layers=12)
  full = cache_bytes(cfg, 8, 64)
  half = cache_bytes(cfg, 8, 64, plan_layers(12, 2).skipped)
  kv_only = lambda b: b - 8 * 64 * 4  # minus the per-slot position array
  assert kv_only(half) * 2 == kv_only(full)


def test_remat_and_bf16():
  model, remat = tiny_model(), tiny_model(remat=True)
  tokens = _tokens()
  def grads(m):
    graphdef, state = nnx.split(m)
    return jax.jit(jax.grad(lambda s: nnx.merge(graphdef, s)(tokens, skip=(1,)).sum()))(state)
  g1, g2 = grads(model), grads(remat)
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(x, y, **tolerance.close(1e-4, 1e-4))
  bf16 = tiny_model(dtype="bfloat16")
  np.testing.assert_allclose(jit_call(bf16)(tokens), jit_call(model)(tokens), atol=0.15)


def test_bad_skip_index():
  with pytest.raises(ValueError, match="skip index 4 is out of range"):
    tiny_model()(_tokens(), skip=(4,))
