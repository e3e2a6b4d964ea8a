"""Baselines: which layers ran for which token, checked against a masked-depth forward.

The reference for every dynamic decode is `baseline_losses.masked_hidden` over prompt + generated
tokens, where each generated token runs exactly the layers the decode says it ran and keeps its
hidden state through the others (so those layers' K/V come from it, as CALM propagates). Cached
decoding equals it only if the right layers ran and the skipped layers' cache was filled right.
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests import tolerance
from ulskip_jax.testing import loop_layer_ops
from ulskip_jax import testing as tiny
from ulskip_jax import (baseline_decode, baseline_losses, baseline_schedules, decode, engine,
                        early_exit_tuning)
from ulskip_jax.batching import pack_row
from ulskip_jax.kv_cache import init_cache

PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10, 11, 12]]  # equal lengths: no padding in the reference
MAX_NEW = 12
pytestmark = pytest.mark.usefixtures("fast_engine_compile")


@pytest.fixture(scope="module")
def model():
  # Larger logits than the default init, so that confidences spread over (0, 1).
  m = tiny.tiny_model(seed=3)
  m.embed[...] = m.embed[...] * 60.0
  return m


def _reference(model, prompts, generated, depth_of_step):
  """Greedy tokens and logits of the masked forward: generated token t (t >= 1) comes from the
  step that fed token t - 1 through the layers in `depth_of_step(t)` (a set of layer ids)."""
  P, L = len(prompts[0]), model.cfg.num_layers
  seq = np.array([p + g for p, g in zip(prompts, generated)], np.int32)
  B, T = seq.shape
  runs = np.ones((L, B, T), bool)
  for t in range(1, len(generated[0])):
    runs[:, :, P + t - 1] = np.array([l in depth_of_step(t) for l in range(L)])[:, None]
  graphdef, state = nnx.split(model)

  @jax.jit
  def fwd(state, tokens, runs):
    m = nnx.merge(graphdef, state)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    x = baseline_losses.masked_hidden(m, tokens, pos, jnp.ones((B, T), jnp.int32),
                                      lambda l, x: runs[l])
    return m.unembed(x)
  logits = np.asarray(fwd(state, seq, runs))
  return logits[:, P - 1:-1].argmax(-1), logits


def _generated(ids):
  assert all(len(row) == MAX_NEW for row in ids), "the test needs rows without EOS"
  return ids


def test_early_exit_threshold_above_one_is_the_full_model(model):
  ids, stats = baseline_decode.early_exit_generate(model, PROMPTS, threshold=2.0, exit_every=1,
                                                   max_new_tokens=MAX_NEW, eos_id=None)
  want, _ = decode.generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_id=None)
  assert ids == want
  assert stats.ratio(4) == 1.0 and stats.loop_steps == MAX_NEW - 1


@pytest.mark.parametrize("exit_every", [1, 2])
def test_early_exit_threshold_zero_runs_only_the_first_exit_point(model, exit_every):
  ids, stats = baseline_decode.early_exit_generate(model, PROMPTS, threshold=0.0,
                                                   exit_every=exit_every, max_new_tokens=MAX_NEW,
                                                   eos_id=None)
  first = set(range(exit_every))
  got, _ = _reference(model, PROMPTS, _generated(ids), lambda t: first)
  np.testing.assert_array_equal(got, np.array(ids))
  assert stats.ratio(4) == 4 / exit_every


def test_early_exit_truncated_logits_equal_a_truncated_model(model):
  """A generated token that exits at the first point gets the truncated model's logits: the
  prompt's cache at layer 0 is the same either way, so a one-step check is exact."""
  graphdef, state = nnx.split(model)
  step = baseline_decode.EarlyExit(16, exit_every=1)
  prompt = jnp.array(PROMPTS, jnp.int32)
  B, P = prompt.shape

  @jax.jit
  def one_step(state, threshold):
    m = nnx.merge(graphdef, state)
    cache = init_cache(m.cfg, B, P + 1)
    _, cache = m.hidden(prompt, cache=cache)
    positions, ones = jnp.full((B, 1), P), jnp.ones((B, 1), jnp.int32)
    h = m.embed_tokens(jnp.array([[3], [4]], jnp.int32), positions)
    logits, _, run = step.layers(m, SimpleNamespace(threshold=threshold),
                                 SimpleNamespace(done=jnp.zeros((B,), bool)), h, positions, ones,
                                 cache.write_positions(positions, ones, P), P)
    return logits, run
  logits, run = one_step(state, 0.0)
  # Reference: a model of layer 0 alone, prompt included, via the plain decoder with skip.
  want = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, skip=(1, 2, 3)))(
      state, jnp.concatenate([prompt, jnp.array([[3], [4]])], 1))[:, -1]
  assert int(run) == 1
  np.testing.assert_allclose(logits, want, **tolerance.close(2e-5))


def test_early_exit_propagates_kv_into_skipped_layers(model):
  """With a threshold that exits on some steps and not others, later full-depth tokens attend to
  the exited tokens' propagated K/V; cached decode then equals the masked forward."""
  L = model.cfg.num_layers
  threshold, ratio = early_exit_tuning.tune_threshold(model, PROMPTS, 1.6, batch_size=2,
                                                      exit_every=1, iterations=6,
                                                      max_new_tokens=MAX_NEW, eos_id=None)
  method = baseline_decode.EarlyExit(16, exit_every=1)
  ids, stats, step_layers = baseline_decode._generate(model, PROMPTS, method,
                                                      max_new_tokens=MAX_NEW, eos_id=None,
                                                      pad_id=0, threshold=threshold)
  depths = step_layers[1:MAX_NEW]
  assert len(set(depths.tolist())) > 1 and depths.max() == L, depths  # a mixture, full included
  # Some step after an exit runs deeper than that exit: it reads propagated K/V.
  assert any(depths[j] < depths[k] for j in range(len(depths)) for k in range(j + 1, len(depths)))
  got, _ = _reference(model, PROMPTS, _generated(ids), lambda t: set(range(step_layers[t])))
  np.testing.assert_array_equal(got, np.array(ids))
  assert stats.ratio(L) == pytest.approx(L / depths.mean()) and ratio == stats.ratio(L)


@pytest.mark.parametrize("L,ratio,horizon", [(4, 2, 12), (12, 2, 40), (12, 3, 40), (12, 5, 40),
                                             (24, 2, 64), (24, 5, 64)])
def test_skipdecode_schedule_is_monotone_and_hits_the_ratio(L, ratio, horizon):
  sched = baseline_schedules.skipdecode_schedule(L, ratio, horizon)
  depths = [int(sched.depth(s)) for s in range(horizon + 5)]
  assert all(a >= b for a, b in zip(depths, depths[1:])) and 1 <= min(depths) <= max(depths) <= L
  assert sched.mean_depth(horizon) == pytest.approx(L / ratio, abs=0.5)
  assert sched.skip(0) == tuple(range(L - sched.depths[0]))


def test_skipdecode_outputs_equal_a_model_running_each_tokens_layers(model):
  L = model.cfg.num_layers
  sched = baseline_schedules.SkipDecodeSchedule(L, starts=(0, 3, 7), depths=(4, 3, 1))
  ids, stats = baseline_decode.skipdecode_generate(model, PROMPTS, schedule=sched,
                                                   max_new_tokens=MAX_NEW, eos_id=None)
  top = lambda t: set(range(L - int(sched.depth(t - 1)), L))
  got, _ = _reference(model, PROMPTS, _generated(ids), top)
  np.testing.assert_array_equal(got, np.array(ids))
  assert stats.ratio(L) == pytest.approx(L / sched.mean_depth(MAX_NEW - 1))
  assert stats.cache_bytes == decode.cache_bytes(model.cfg, 2, 32, ())  # depth 4 = every layer


def test_skipdecode_training_loss_uses_the_decode_schedule(model):
  """The training loss's per-token depth is the decode step's: response token j runs depth(j)."""
  examples = [([1, 5, 6], [7, 8, 9, 10, 2]), ([1, 3], [4, 5, 2])]
  batch = {k: jnp.asarray(v)[None] for k, v in pack_row(examples, 16).items()}
  np.testing.assert_array_equal(
      baseline_losses.response_index(batch)[0],
      [-1, -1, -1, 0, 1, 2, 3, 4, -1, -1, 0, 1, 2, -1, -1, -1])
  L = model.cfg.num_layers
  sched = baseline_schedules.SkipDecodeSchedule(L, starts=(0, 2), depths=(3, 1))
  graphdef, _ = nnx.split(model)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  loss, count = jax.jit(
      lambda p: baseline_losses.skipdecode_loss_sums(p, graphdef, batch, sched))(params)
  assert count == 8 and np.isfinite(loss)
  # Full schedule (depth L everywhere) is the plain model's response loss.
  full = baseline_schedules.SkipDecodeSchedule(L, starts=(0,), depths=(L,))
  loss_full, _ = baseline_losses.skipdecode_loss_sums(params, graphdef, batch, full)
  logits = model(batch["tokens"], positions_BT=batch["positions"],
                 segment_ids_BT=batch["segment_ids"])
  want = (optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
          * batch["loss_mask"]).sum()
  np.testing.assert_allclose(loss_full, want, **tolerance.close(rtol=1e-5))


def test_early_exit_training_loss_weights_exit_points(model):
  graphdef, _ = nnx.split(model)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  batch = {k: jnp.asarray(v)[None] for k, v in pack_row([([1, 5, 6], [7, 8, 2])], 8).items()}
  loss, count = baseline_losses.early_exit_loss_sums(params, graphdef, batch, exit_every=2)
  # Exit points: after layer 1 (weight 2) and the last layer 3 (weight 4).
  def xent(skip):
    logits = model(batch["tokens"], skip=skip, positions_BT=batch["positions"],
                   segment_ids_BT=batch["segment_ids"])
    return (optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
            * batch["loss_mask"]).sum()
  np.testing.assert_allclose(loss, (2 * xent((2, 3)) + 4 * xent(())) / 6,
                             **tolerance.close(rtol=1e-5))
  assert count == 3


@pytest.mark.parametrize("kind", ["early_exit", "skipdecode"])
def test_dynamic_decode_loops_do_not_copy_the_cache(model, kind):
  """The cond / per-layer branches only read the cache and the new slot is written outside them,
  so XLA updates it in place: no cache-layer-sized copy anywhere in the executable (a branch that
  wrote the cache made XLA copy those layers on every step)."""
  if kind == "early_exit":
    baseline_decode.early_exit_generate(model, PROMPTS, threshold=0.5, exit_every=2,
                                        max_new_tokens=MAX_NEW, eos_id=None)
  else:
    sched = baseline_schedules.SkipDecodeSchedule(4, starts=(0, 3, 7), depths=(4, 3, 1))
    baseline_decode.skipdecode_generate(model, PROMPTS, schedule=sched, max_new_tokens=MAX_NEW,
                                        eos_id=None)
  cfg = model.cfg
  layer_shape = f"f32[2,{cfg.num_kv_heads},32,{cfg.head_dim}]"  # [B, K, S, Hd], S = 16 + 16
  # Every executable of this kind with this call's cache shape (other tests build more): none
  # may copy or transpose a cache layer.
  texts = [t for k, v in engine.EXECUTABLES.items()
           if k[0] == "ulskip_jax.baseline_decode."
           + {"early_exit": "EarlyExit", "skipdecode": "SkipDecode"}[kind]
           and k[1] == nnx.graphdef(model)
           for t in [v.as_text()] if layer_shape in t]
  assert texts
  for text in texts:
    in_place, others = loop_layer_ops(text, (2, cfg.num_kv_heads, 32, cfg.head_dim))
    assert in_place and not others, others[:2]


def test_threshold_search_resolves_low_confidences():
  """A weak model's top-1 probabilities sit near 1/V: the search must resolve thresholds there
  (a linear bisection on [0, 1] jumped from 1.8x to 5.2x and never reached 3x)."""
  V, L = 4096, 12

  def ratio(t):  # exits deepen as the threshold rises through log-uniform confidences [1/V, .05]
    frac = min(np.log(max(t * V, 1.0)) / np.log(0.05 * V), 1.0)
    return L / (2 + 10 * frac)

  for target in (2.0, 3.0, 5.0):
    t, r = early_exit_tuning._log_bisect(ratio, target, 1 / V, 1.0, 6, (0.0, ratio(0.0)))
    assert r == ratio(t) and abs(np.log(r / target)) < 0.05, (target, t, r)
