"""The fused-attention switch (`attention.py`): jax.nn.dot_product_attention, run by XLA
(attention_impl="xla", the call cuDNN gets, on any backend), equals the einsum attention in every
case the model has, through the whole model and through cached decoding; "auto" is the einsum
path where there is no cuDNN; a model the fused call cannot compute is refused with the reason."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tolerance
from configs import tiny as tiny_run_config
from ulskip_jax import attention, config_check, decode, init_cache
from ulskip_jax.testing import compile_generate, jit_call, loop_layer_ops, tiny_config, tiny_model

TOL = 2e-5
P = 5  # prompt length of the cached checks
CASES = {  # each runs causal rows, packed segments, paper mode (prompt buffer) and a cache
    "GQA, sliding windows, scaled logits": dict(attention_windows=(3, None, 3, None),
                                                query_pre_attn_scalar=4, qk_norm=True),
    "multi-query, ALiBi": dict(num_kv_heads=1, pos="alibi", norm="layer", mlp="plain",
                               act="gelu_tanh"),
}


def _tokens(B=2, T=12, seed=1):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, 97)


def _models(**overrides):
  """The same weights with einsum and with XLA's dot_product_attention."""
  return tiny_model(**overrides), tiny_model(**overrides, attention_impl="xla")


def _paper_logits(model, tokens, full_depth):
  """Paper mode: prompts at full depth through skipped layers 1 and 2, on a buffer of 6 prompt
  tokens per row."""
  graphdef, state = nnx.split(model)
  forward = lambda s, t, f: nnx.merge(graphdef, s)(t, skip=(1, 2), full_depth_BT=f,
                                                   full_depth_capacity=6)
  return jax.jit(forward)(state, tokens, full_depth)


def _cached_logits(fwd, cfg, tokens, skip=(), full_depth=None):
  """A prefill of P tokens, then one cached step per token."""
  cache = init_cache(cfg, tokens.shape[0], 16, skip)
  first, cache = fwd(tokens[:, :P], skip=skip, full_depth_BT=full_depth, cache=cache,
                     cache_index=0)
  steps = [first]
  for t in range(P, tokens.shape[1]):
    logits, cache = fwd(tokens[:, t:t + 1], skip=skip,
                        positions_BT=jnp.full((tokens.shape[0], 1), t), cache=cache,
                        cache_index=t)
    steps.append(logits)
  return jnp.concatenate(steps, 1)


@pytest.mark.parametrize("case", CASES)
def test_xla_attention_equals_einsum_through_the_model(case):
  einsum_model, xla_model = _models(**CASES[case])
  einsum, xla = jit_call(einsum_model), jit_call(xla_model)
  tokens, close = _tokens(), tolerance.close(TOL)
  # Row 0 one causal sequence; row 1 packed: two sequences and three pads.
  seg = jnp.asarray([[1] * 12, [1] * 6 + [2] * 3 + [0] * 3])
  pos = jnp.asarray([list(range(12)), list(range(6)) + list(range(3)) + [0] * 3])
  rows = dict(positions_BT=pos, segment_ids_BT=seg, skip=(1,))
  np.testing.assert_allclose(xla(tokens, **rows), einsum(tokens, **rows), **close)
  full_depth = jnp.asarray([[True] * 5 + [False] * 7, [True] * 3 + [False] * 9])
  np.testing.assert_allclose(_paper_logits(xla_model, tokens, full_depth),
                             _paper_logits(einsum_model, tokens, full_depth), **close)


@pytest.mark.parametrize("case", CASES)
def test_xla_attention_cached_decode_equals_einsum_full_forward(case):
  einsum, xla = map(jit_call, _models(**CASES[case]))
  cfg, tokens, skip = tiny_config(**CASES[case]), _tokens(), (1,)
  np.testing.assert_allclose(_cached_logits(xla, cfg, tokens, skip), einsum(tokens, skip=skip),
                             **tolerance.close(TOL))
  # The paper-mode prefill: the prompt through every layer, then cached steps skip.
  want = einsum(tokens, skip=skip, full_depth_BT=jnp.broadcast_to(jnp.arange(12) < P, (2, 12)))
  np.testing.assert_allclose(_cached_logits(xla, cfg, tokens, skip, True), want,
                             **tolerance.close(TOL))


PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11, 12], [1, 8, 9], [1, 3, 4, 5, 6]]


def test_xla_attention_generates_the_einsum_tokens():
  """Speculative greedy decoding (left-padded prompts in a ring cache; a draft that skips layers;
  verification: several queries per step over a deferred cache) gives the same tokens with
  either attention."""
  kw = dict(max_new_tokens=8, eos_id=None,
            speculative=dict(draft_ratio=2, num_draft_tokens=3))
  want, _ = decode.generate(tiny_model(), PROMPTS, **kw)
  got, _ = decode.generate(tiny_model(attention_impl="xla"), PROMPTS, **kw)
  assert got == want


def test_xla_attention_decode_loop_updates_the_cache_in_place():
  """dot_product_attention reads keys as [B, S, K, Hd] and the cache keeps [B, K, S, Hd]: XLA
  must fold the transpose into the matmuls, not copy a cache layer every step."""
  model = tiny_model(attention_impl="xla")
  compiled = compile_generate(model, 3, 9, ratio=2, max_new_tokens=10, eos_id=None)
  in_place, others = loop_layer_ops(compiled.as_text(), (4, 2, 32, 8))
  assert not others, others[:2]
  assert in_place >= 2 * 2  # K and V of both kept layers


def test_bfloat16_xla_attention_within_bfloat16_rounding_of_einsum():
  """The einsum path rounds logits to bfloat16 before its f32 softmax, the XLA call keeps them in
  f32: they differ by bfloat16 rounding only."""
  einsum, xla = map(jit_call, _models(dtype="bfloat16", attention_windows=(3, None, 3, None)))
  tokens = _tokens()
  got, want = xla(tokens), einsum(tokens)
  np.testing.assert_allclose(got, want, **tolerance.close(0.15, dtype="bfloat16"))
  assert (np.asarray(got).argmax(-1) == np.asarray(want).argmax(-1)).mean() > 0.9


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's kernel needs an NVIDIA GPU")
def test_cudnn_attention_within_bfloat16_rounding_of_einsum():
  """cuDNN's kernel (reading the cache's layout) through the model and through cached decoding,
  in bfloat16 (the dtypes it takes); the CPU cannot run it (`benchmarks/gpu_checks.sh`)."""
  overrides = dict(dtype="bfloat16", attention_windows=(3, None, 3, None))
  einsum_model = tiny_model(**overrides)
  cudnn_model = tiny_model(**overrides, attention_impl="cudnn")
  einsum, cudnn = jit_call(einsum_model), jit_call(cudnn_model)
  tokens, close = _tokens(), tolerance.close(0.15, dtype="bfloat16")
  np.testing.assert_allclose(cudnn(tokens), einsum(tokens), **close)
  cached = _cached_logits(cudnn, cudnn_model.cfg, tokens, (1,))
  np.testing.assert_allclose(cached, einsum(tokens, skip=(1,)), **close)


def test_auto_is_the_einsum_path_without_cudnn():
  if jax.default_backend() == "gpu":
    pytest.skip("auto picks cuDNN on an NVIDIA GPU")
  impl, reason = attention.resolve(tiny_config(attention_impl="auto"))
  assert impl == "einsum" and "NVIDIA GPU" in reason
  forward = lambda model: str(jax.make_jaxpr(lambda t: model(t, skip=(1,)))(_tokens()))
  assert forward(tiny_model(attention_impl="auto")) == forward(tiny_model())
  assert forward(tiny_model(attention_impl="xla")) != forward(tiny_model())  # the check can fail


@pytest.mark.parametrize("overrides, impl, message", [
    (dict(attn_softcap=5.0), "xla", "attn_softcap=5.0"),
    (dict(attn_softcap=5.0), "cudnn", "attn_softcap=5.0"),
    (dict(dtype="float32"), "cudnn", "not float32"),
    (dict(dtype="bfloat16", head_dim=12, d_model=48), "cudnn", "not 12"),
    (dict(dtype="bfloat16", pos="alibi"), "cudnn", "ALiBi"),
])
def test_a_model_the_fused_call_cannot_compute_is_refused(overrides, impl, message):
  cfg = tiny_config(**overrides, attention_impl=impl)
  assert message in attention.unfit_reason(cfg, impl)
  with pytest.raises(ValueError, match=f"attention_impl='{impl}' cannot compute"):
    attention.resolve(cfg)
  if impl == "cudnn":  # "auto" falls back instead, with the same reason
    impl_auto, reason = attention.resolve(tiny_config(**overrides, attention_impl="auto"),
                                          backend="cpu")
    assert impl_auto == "einsum" and reason


def test_bad_attention_impl_is_caught_before_the_run(tmp_path):
  with pytest.raises(ValueError, match=r"attention_impl='flash' is unknown: allowed are"):
    tiny_config(attention_impl="flash")
  config = tiny_run_config.get_config()
  config.model.attention_impl = "flash"
  with pytest.raises(config_check.ConfigError, match=r"model.attention_impl='flash'"):
    config_check.validate_run(config, str(tmp_path))
  config.model.attention_impl = "cudnn"  # the tiny config computes in float32
  with pytest.raises(config_check.ConfigError,
                     match=r"model.attention_impl='cudnn' cannot compute .* not float32"):
    config_check.validate_run(config, str(tmp_path))
