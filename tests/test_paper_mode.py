"""Paper mode on a buffer of prompt tokens equals paper mode on whole rows (`prompt_buffer.py`).

Every batch is packed rows of several segments. "fits" has every row's prompt tokens within the
buffer's 16 slots, "overflows" has one row of 22, so the two sides of the capacity edge take the
two branches of the model's lax.cond; both must give the whole-row losses and gradients. A run
takes the buffer or whole rows by `prompt_buffer.choose` (skip.prompt_buffer): whole rows where
the buffer costs more than it saves, with the same training either way.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ulskip_jax.testing import tiny_model
import tolerance
from ulskip_jax import batching
from ulskip_jax import config_check, prompt_buffer, train_lib
from ulskip_jax.model import ModelConfig

SKIP = (1, 2)
CAPACITY = 16
ROW = 32
# (prompt, response) lengths of each row's segments; the prompt totals are 15, 15, 3 and 15, 22, 3.
FITS = [[(5, 4), (6, 3), (4, 5)], [(8, 6), (7, 5)], [(3, 2)]]
OVERFLOWS = [[(5, 4), (6, 3), (4, 5)], [(12, 2), (10, 3)], [(3, 2)]]
TOL = 1e-5
SMOLLM2 = ModelConfig(vocab_size=49152, num_layers=30, d_model=576, num_heads=9, num_kv_heads=3,
                      head_dim=64, d_ff=1536, tie_embeddings=True)
WIDE = ModelConfig(vocab_size=32000, num_layers=4, d_model=2048, num_heads=16, num_kv_heads=8,
                   head_dim=128, d_ff=5632)  # benchmarks/train_speed.py --wide


def _batch(rows, seed=0):
  rng = np.random.default_rng(seed)
  packed = [batching.pack_row([(list(rng.integers(3, 97, p)), list(rng.integers(3, 97, r)))
                               for p, r in segments], ROW) for segments in rows]
  return {k: jnp.asarray(np.stack([row[k] for row in packed])) for k in packed[0]}


def _params_and_graphdef(**overrides):
  graphdef, params = nnx.split(tiny_model(**overrides), nnx.Param)
  return nnx.to_pure_dict(params), graphdef


def test_plan_places_prompt_tokens_in_row_order_and_says_when_it_is_exact():
  # Row 0: segment 1 = prompt 0-1, response 2; segment 2 = prompt 3-4, response 5; padding.
  full_depth = jnp.array([[1, 1, 0, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]], bool)
  segments = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
  buffer = prompt_buffer.plan(full_depth, segments, 4)
  np.testing.assert_array_equal(buffer.index_BC, [[0, 1, 3, 4], [0, 8, 8, 8]])
  assert bool(buffer.fits)
  x = jnp.arange(16.0).reshape(2, 8, 1)
  gathered = prompt_buffer.gather(x, buffer)
  np.testing.assert_array_equal(gathered[..., 0], [[0, 1, 3, 4], [8, 0, 0, 0]])
  back = prompt_buffer.scatter(x, -gathered, buffer)[..., 0]
  np.testing.assert_array_equal(back, [[0, -1, 2, -3, -4, 5, 6, 7],
                                       [-8, 9, 10, 11, 12, 13, 14, 15]])

  assert not bool(prompt_buffer.plan(full_depth, segments, 3).fits)  # row 0 has 4 prompt tokens
  assert int(prompt_buffer.overflow_rows(full_depth, 3)) == 1
  # A prompt token after a response token of its segment reads that token's key: not exact.
  after_response = full_depth.at[0, 1].set(False).at[0, 2].set(True)
  assert not bool(prompt_buffer.plan(after_response, segments, 8).fits)
  # ... but after a response token of another segment it is.
  short_second_prompt = full_depth.at[0, 4].set(False)
  assert bool(prompt_buffer.plan(short_second_prompt, segments, 8).fits)
  # A full-depth padding token attends to nothing in the masked row: not exact either.
  assert not bool(prompt_buffer.plan(full_depth.at[0, 7].set(True), segments, 8).fits)


def test_capacity_is_a_bucketed_fraction_of_the_row():
  assert prompt_buffer.capacity_for(0.75, 128) == 96
  assert prompt_buffer.capacity_for(0.6, 100) == 64
  assert prompt_buffer.capacity_for(1.0, 100) == 100


@pytest.mark.parametrize("overrides", [
    {},
    # Qwen3's QK-norm, SmolLM3's NoPE layers (one of them skipped), LoRA adapters, remat.
    dict(qk_norm=True, rope_layers=(True, False, True, False), lora_rank=2,
         lora_targets=("q", "v", "o", "down"), remat=True),
], ids=["plain", "qknorm_nope_lora_remat"])
def test_losses_and_gradients_equal_the_whole_row_computation(overrides):
  params, graphdef = _params_and_graphdef(**overrides)

  @functools.partial(jax.jit, static_argnums=2)
  def mean_loss_and_grads(params, batch, capacity):
    def mean_loss(p):
      total, count = train_lib.loss_sums(p, graphdef, batch, SKIP, True, prompt_capacity=capacity)
      return total / count
    return jax.value_and_grad(mean_loss)(params)

  for rows, fits in ((FITS, True), (OVERFLOWS, False)):
    batch = _batch(rows)
    buffer = prompt_buffer.plan(batch["full_depth"], batch["segment_ids"], CAPACITY)
    assert bool(buffer.fits) == fits
    want_loss, want_grads = mean_loss_and_grads(params, batch, None)
    loss, grads = mean_loss_and_grads(params, batch, CAPACITY)
    np.testing.assert_allclose(float(loss), float(want_loss), **tolerance.close(TOL))
    for path, want in jax.tree_util.tree_leaves_with_path(want_grads):
      got = functools.reduce(lambda t, k: t[k.key], path, grads)
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), **tolerance.close(TOL),
                                 err_msg=f"fits={fits} {jax.tree_util.keystr(path)}")


def test_alibi_and_a_prompt_after_a_response_give_the_whole_row_logits():
  """ALiBi reads positions in the buffer; a mask the buffer cannot serve takes the fallback."""
  params, graphdef = _params_and_graphdef(pos="alibi", norm="layer", mlp="plain", act="gelu")
  batch = _batch(FITS)
  late_prompt = batch["full_depth"].at[1, 23].set(True)  # segment 2, after its response began

  @functools.partial(jax.jit, static_argnums=2)
  def logits(params, full_depth, capacity):
    return nnx.merge(graphdef, params)(
        batch["tokens"], skip=SKIP, positions_BT=batch["positions"],
        segment_ids_BT=batch["segment_ids"], full_depth_BT=full_depth,
        full_depth_capacity=capacity)

  for full_depth in (batch["full_depth"], late_prompt):
    np.testing.assert_allclose(logits(params, full_depth, CAPACITY),
                               logits(params, full_depth, None), **tolerance.close(TOL))
  assert not bool(prompt_buffer.plan(late_prompt, batch["segment_ids"], CAPACITY).fits)


def test_accumulated_step_equals_the_whole_row_step_and_counts_overflowing_rows():
  """Two micro-batches, one fitting and one overflowing; one SGD step, whose update is the
  gradient itself (through Adam, rounding-level gradients would be amplified)."""
  params, graphdef = _params_and_graphdef()
  batch = _batch(FITS[:2] + OVERFLOWS[1:], seed=1)  # rows 0-1 fit, row 2 does not, row 3 does
  optimizer = optax.sgd(0.5)
  state = dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))
  step = jax.jit(functools.partial(train_lib.train_step, graphdef=graphdef, optimizer=optimizer,
                                   paper=True, accum_steps=2), static_argnums=2,
                 static_argnames="prompt_capacity")
  want, want_metrics = step(state, batch, SKIP, prompt_capacity=None)
  got, metrics = step(state, batch, SKIP, prompt_capacity=CAPACITY)
  assert int(metrics["prompt_overflow_rows"]) == 1 and "prompt_overflow_rows" not in want_metrics
  np.testing.assert_allclose(float(metrics["loss"]), float(want_metrics["loss"]), **tolerance.close(TOL))
  for path, a in jax.tree_util.tree_leaves_with_path(want["params"]):
    b = functools.reduce(lambda t, k: t[k.key], path, got["params"])
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), **tolerance.close(TOL),
                               err_msg=jax.tree_util.keystr(path))


def test_auto_takes_whole_rows_where_the_buffer_costs_more_than_it_saves():
  """The quick start's shape (SmolLM2, 8 x 128, 88 slots): the buffer made an H200's paper-mode
  step slower than full depth and the CPU's faster (benchmarks/results/gpu/h200.md,
  benchmarks/results/smollm2/train_speed.md); a wide model's matmuls pay for it on a GPU too."""
  slots = prompt_buffer.capacity_for(0.6875, 128)
  quick = dict(cfg=SMOLLM2, rows=8, seq_len=128)
  assert prompt_buffer.choose("auto", slots, platform="gpu", **quick).capacity is None
  assert prompt_buffer.choose("auto", slots, platform="tpu", **quick).capacity is None
  assert prompt_buffer.choose("auto", slots, platform="cpu", **quick).capacity == slots
  wide = prompt_buffer.choose("auto", prompt_buffer.capacity_for(0.6875, 512), WIDE, rows=32,
                              seq_len=512, platform="gpu")
  assert wide.capacity == 352 and wide.saved_s > 5 * wide.cost_s
  # More rows per device amortise the buffer's fixed cost: past some batch it pays on a GPU.
  pays = [prompt_buffer.choose("auto", slots, SMOLLM2, rows, 128, "gpu").capacity is not None
          for rows in (8, 16, 32, 64, 128)]
  assert pays == sorted(pays) and pays[-1], pays
  # "on" and "off" overrule the estimate; a buffer as long as the row is whole rows anyway.
  assert prompt_buffer.choose("on", slots, platform="gpu", **quick).capacity == slots
  assert prompt_buffer.choose("off", slots, platform="cpu", **quick).capacity is None
  assert prompt_buffer.choose("on", 128, platform="cpu", **quick).capacity is None
  assert "whole rows" in prompt_buffer.choose("auto", slots, platform="gpu", **quick).line()


def test_a_bad_prompt_buffer_is_one_line_before_any_work(tmp_path):
  from configs import tiny as tiny_run
  config = tiny_run.get_config()
  config.skip.prompt_buffer = "always"
  with pytest.raises(ValueError, match=r"^skip.prompt_buffer='always' is unknown: allowed are "
                                       r"'auto', 'on', 'off'$"):
    config_check.validate_run(config, str(tmp_path))


def test_the_auto_choice_trains_as_the_buffer_does_and_says_so(tmp_path, monkeypatch, capsys):
  """Two steps of the tiny run with the buffer forced on, and with "auto" weighed at a GPU's
  rates (whole rows): the startup line says which, the step ran it (only a buffer counts
  overflowing rows), and the second step's loss (after one update) is the same."""
  import json
  from configs import tiny as tiny_run
  results = {}
  for mode, rates in (("on", "cpu"), ("auto", "gpu")):
    monkeypatch.setitem(prompt_buffer.DEVICES, "cpu", prompt_buffer.DEVICES[rates])
    config = tiny_run.get_config()
    config.num_steps, config.skip.prompt_buffer = 2, mode
    loss = train_lib.train_and_evaluate(config, str(tmp_path / mode))["train_loss"]
    with open(tmp_path / mode / "log.jsonl") as f:
      logged = [json.loads(line) for line in f]
    line = [l for l in capsys.readouterr().out.splitlines()
            if l.startswith("paper mode: skipped layers on")]
    results[mode] = loss, line, all("prompt_overflow_rows" in m for m in logged)
  assert "a buffer of 48 slots/row" in results["on"][1][0] and results["on"][2], results["on"]
  assert "whole rows" in results["auto"][1][0] and not results["auto"][2], results["auto"]
  np.testing.assert_allclose(results["auto"][0], results["on"][0], **tolerance.close(TOL))
