"""LoRA against hand computations, not against itself: an adapted model equals the plain model whose
weights are W + A . B * alpha / rank (the adapters' formula from Hu et al., computed here in
numpy), and LoRA dropout zeroes a fraction p of each adapter's input, scales the rest by
1 / (1 - p), and is on in the Trainer's steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import traversals

from configs import tiny as tiny_config
from ulskip_jax import testing as tiny
from ulskip_jax import lora, train_lib

RANK, ALPHA = 4, 6.0


def _params(model) -> dict:
  return traversals.flatten_mapping(
      jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param))))


def _load(model, flat: dict) -> None:
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, traversals.unflatten_mapping(flat))
  nnx.update(model, state)


def test_adapters_equal_hand_merged_weights():
  targets = ("q", "v", "o", "up", "down")
  adapted = tiny.tiny_model(seed=0, lora_rank=RANK, lora_alpha=ALPHA, lora_targets=targets)
  base = tiny.tiny_model(seed=0)
  rng = np.random.default_rng(0)
  params = {p: (rng.standard_normal(np.shape(x)).astype(np.float32) * 0.3
                if lora.is_adapter(p) else np.asarray(x)) for p, x in _params(adapted).items()}
  _load(adapted, params)
  merged = dict(_params(base))
  adapters = [p for p in params if lora.is_adapter(p) and p[-1] == "a"]
  assert len(adapters) == len(targets) * 4
  for path in adapters:
    a, b = params[path], params[(*path[:-1], "b")]
    weight = (*path[:-2], path[-2][:-len(lora.SUFFIX)])
    np.testing.assert_array_equal(merged[weight], params[weight])  # the same base weights
    # W [in..., out...] + A [in..., r] . B [r, out...] * alpha / rank
    merged[weight] = params[weight] + np.tensordot(a, b, axes=1) * (ALPHA / RANK)
  _load(base, merged)
  tokens = jnp.asarray(rng.integers(3, tiny.VOCAB, (2, 12)))
  want = np.asarray(tiny.jit_call(base)(tokens))
  got = np.asarray(tiny.jit_call(adapted)(tokens))
  assert np.abs(want - np.asarray(tiny.jit_call(tiny.tiny_model(seed=0))(tokens))).max() > 0.1
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(tiny.jit_call(lora.merge(adapted))(tokens)), want,
                             atol=2e-5, rtol=0)


def test_dropout_zeroes_p_of_the_inputs_and_rescales_the_rest():
  """An adapter whose A and B are identities at scale 1 returns dropout(x) itself."""
  D, p = 64, 0.25
  adapters = {t: lora.Adapter(t, (D,), (D,), (None,), (None,), rank=D, alpha=float(D),
                              dropout=p, dtype=jnp.float32, rngs=nnx.Rngs(0)) for t in ("q", "v")}
  for adapter in adapters.values():
    adapter.a.set_value(jnp.eye(D))
    adapter.b.set_value(jnp.eye(D))
  x = 1.0 + np.random.default_rng(0).random((8, 128, D), np.float32)
  np.testing.assert_allclose(adapters["q"](jnp.asarray(x)), x, rtol=1e-6)  # no key: no dropout
  key = jax.random.key(0)
  y = np.asarray(adapters["q"](jnp.asarray(x), key))
  dropped = y == 0
  assert abs(dropped.mean() - p) < 5 * np.sqrt(p * (1 - p) / x.size), dropped.mean()
  np.testing.assert_allclose(y[~dropped], x[~dropped] / (1 - p), rtol=1e-6)
  other = np.asarray(adapters["v"](jnp.asarray(x), key)) == 0
  assert 0 < (other != dropped).mean() < 1  # a mask per projection


def test_trainer_steps_apply_dropout(tmp_path):
  """With adapters that change the output, a training step's loss (dropout on) differs from the
  same batch's loss without dropout, by more than float noise."""
  c = tiny_config.get_config()
  c.batch_size, c.data.max_examples, c.data.seq_len = 4, 32, 48
  c.optim.lora.rank, c.optim.lora.alpha, c.optim.lora.dropout = RANK, ALPHA, 0.5
  trainer = train_lib.Trainer(c, str(tmp_path))
  state = trainer.init_state()
  rng = np.random.default_rng(0)
  flat = traversals.flatten_mapping(state["params"])
  flat = {p: (jax.device_put(rng.standard_normal(x.shape).astype(x.dtype), x.sharding)
              if lora.is_adapter(p) and p[-1] == "b" else x) for p, x in flat.items()}
  state = dict(state, params=traversals.unflatten_mapping(flat))
  batch = next(trainer.batcher)
  skip = train_lib.skip_for_step(c, trainer.model_cfg.num_layers, 0)
  loss, count = jax.jit(train_lib.loss_sums, static_argnums=(1, 3, 4))(
      state["params"], trainer.graphdef, trainer.global_batch(batch), skip, trainer.paper)
  no_dropout = float(loss / count)
  _, metrics = trainer.step(state, batch, 0)
  trainer.ckpt.close()
  assert abs(float(metrics["loss"]) - no_dropout) > 1e-3, (float(metrics["loss"]), no_dropout)
