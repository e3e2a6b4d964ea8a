"""Calibrated plans: the gated calibration forward equals the model with those layers deleted,
greedy removal picks what is known to matter least and re-scores after each removal, plans are
deterministic, nested and saved as a plan.json that a training run and infer.py reuse."""

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infer
from configs import tiny as tiny_config
from ulskip_jax import batching, calibrate, config_check, skipping, train_lib
from ulskip_jax import testing as tiny
from ulskip_jax.model import layer_bytes
from ulskip_jax.skipping import (PLAN_FILE, LayerScores, SkipPlan, read_plan, workdir_plan,
                                 write_plan)

L = 5
IDENTITY = 2  # the layer whose attention and MLP outputs are zeroed: removing it changes nothing
RUN_LAYERS = 6  # the training run's model: at 2x its plan can differ


def _batches(seed=0, count=4, rows=2, seq_len=32):
  """Packed rows of random prompt / response pairs, as batching.Batcher makes them."""
  rng = np.random.default_rng(seed)
  for _ in range(count):
    packed = []
    for _ in range(rows):
      examples, used = [], 0
      while used < seq_len - 12:
        prompt = rng.integers(3, tiny.VOCAB, rng.integers(3, 8)).tolist()
        target = rng.integers(3, tiny.VOCAB, rng.integers(2, 5)).tolist()
        examples.append((prompt, target))
        used += len(prompt) + len(target)
      packed.append(batching.pack_row(examples, seq_len))
    yield {k: np.stack([r[k] for r in packed]) for k in packed[0]}


@pytest.fixture(scope="module")
def model():
  model = tiny.tiny_model(num_layers=L)
  block = model.layers[IDENTITY]
  block.attn.o[...] = jnp.zeros_like(block.attn.o[...])
  block.mlp.down[...] = jnp.zeros_like(block.mlp.down[...])
  return model


@pytest.fixture(scope="module")
def call(model):
  return tiny.jit_call(model)


@pytest.fixture(scope="module")
def text():
  return calibrate.calibration_text(_batches(), 40)


def _reference_divergence(call, text, skip, paper):
  """KL to full depth and NLL from the model's own static-skip forward (the plain path)."""
  kl = nll = 0.0
  for c in text.chunks:
    kw = dict(positions_BT=jnp.asarray(c["positions"]),
              segment_ids_BT=jnp.asarray(c["segment_ids"]))
    full = jax.nn.log_softmax(call(jnp.asarray(c["tokens"]), **kw), -1)
    plan = jax.nn.log_softmax(call(jnp.asarray(c["tokens"]), skip=skip, **kw,
                                   full_depth_BT=jnp.asarray(c["full_depth"]) if paper else None),
                              -1)
    V = full.shape[-1]
    full, plan = full.reshape(-1, V)[c["scored"]], plan.reshape(-1, V)[c["scored"]]
    targets = c["targets"].reshape(-1)[c["scored"]]
    kl += float(jnp.sum(c["weight"] * jnp.sum(jnp.exp(full) * (full - plan), -1)))
    nll += float(jnp.sum(c["weight"] * -plan[jnp.arange(len(targets)), targets]))
  return kl / text.num_tokens, nll / text.num_tokens


def test_calibration_text_counts_exactly_the_asked_response_tokens(text):
  assert text.num_tokens == 40 == sum(float(c["weight"].sum()) for c in text.chunks)
  for c in text.chunks:  # every scored index is a response token of its rows
    assert (c["targets"].reshape(-1)[c["scored"][c["weight"] > 0]] > 0).all()
  assert calibrate.calibration_text(_batches(), 40).sha256 == text.sha256
  assert calibrate.calibration_text(_batches(seed=1), 40).sha256 != text.sha256


@pytest.mark.parametrize("paper", [True, False], ids=["paper", "everywhere"])
def test_gated_forward_equals_the_model_with_those_layers_skipped(model, call, text, paper):
  skips = [(), (1,), (2, 3)] if paper else [(), (1, 3)]
  got = calibrate.evaluate_plan(model, text, skips, paper=paper)
  for skip, row in zip(skips, got):
    kl, nll = _reference_divergence(call, text, skip, paper)
    np.testing.assert_allclose([row["kl"], row["nll"]], [kl, nll], rtol=1e-4, atol=1e-6)
  assert got[0]["kl"] == 0.0 and got[1]["kl"] > 0


def test_greedy_removes_the_identity_layer_first_then_rescores(model, text):
  scores = calibrate.calibrate(model, text, "kl_greedy", paper=True)
  order = scores.calibration["removal_order"]
  assert order[0] == IDENTITY and scores.calibration["kl_after_removal"][0] == 0.0
  assert scores.scores[0] is None and scores.scores[-1] is None  # the ends are never removed
  assert sorted(order) == [1, 2, 3]
  # Each step's choice is the best removal given the ones before it, judged on the plain model.
  removed = []
  for chosen, kl in zip(order, scores.calibration["kl_after_removal"]):
    candidates = [j for j in range(1, L - 1) if j not in removed]
    kls = [row["kl"] for row in calibrate.evaluate_plan(
        model, text, [tuple(sorted(removed + [j])) for j in candidates], paper=True)]
    assert chosen == candidates[int(np.argmin(kls))], (removed, dict(zip(candidates, kls)))
    assert kl == pytest.approx(min(kls), abs=1e-5)  # judged with the earlier removals made
    removed.append(chosen)
  # Deterministic, and nested: a larger ratio skips the smaller one's layers and more.
  again = calibrate.calibrate(model, text, "kl_greedy", paper=True)
  assert again.scores == scores.scores
  plans = [set(scores.plan(r).skipped) for r in (1.25, 1.6, 2.5)]
  assert plans[0] < plans[1] < plans[2]
  assert scores.plan(1.25).skipped == (IDENTITY,)


def test_block_influence_and_the_greedy_depth_limit(model, text):
  influence = calibrate.calibrate(model, text, "block_influence", paper=False, keep_ends=False)
  assert min(range(L), key=lambda i: influence.scores[i]) == IDENTITY
  assert influence.scores[IDENTITY] == pytest.approx(0.0, abs=1e-6)
  assert all(v > 0.01 for i, v in enumerate(influence.scores) if i != IDENTITY)
  short = calibrate.calibrate(model, text, "kl_greedy", keep=(1,), max_ratio=1.25)
  assert short.scores[1] is None and short.keep == (1,) and short.plan(1.25).skipped == (IDENTITY,)
  with pytest.raises(ValueError, match=r"allowed is ratio <= 1.25$"):
    short.plan(1.5)


def test_plan_json_round_trip(tmp_path):
  scores = LayerScores(6, "kl_greedy", (None, 2, 0, 1, 3.5, None), (4,),
                       dict(tokens=40, sha256="ab12"))
  path = str(tmp_path / PLAN_FILE)
  write_plan(path, scores, (1.5, 2))
  assert read_plan(path, 6) == scores
  record = json.loads(open(path).read())
  assert record["plans"] == {"1.5": dict(kept=[0, 1, 4, 5], skipped=[2, 3]),
                             "2": dict(kept=[0, 4, 5], skipped=[1, 2, 3])}  # layer 4 is kept
  assert workdir_plan(str(tmp_path), 6) == scores
  (tmp_path / "checkpoints" / "8").mkdir(parents=True)
  assert workdir_plan(str(tmp_path / "checkpoints" / "8"), 6) == scores  # a step folder
  assert workdir_plan(str(tmp_path / "checkpoints"), 6) is None
  with pytest.raises(ValueError, match=r"is for 6 layers but the model has 4: calibrate this"):
    read_plan(path, 4)
  record["plans"]["1.5"]["skipped"] = [1, 2]  # a hand-edited plan its scores do not give
  (tmp_path / "edited.json").write_text(json.dumps(record))
  with pytest.raises(ValueError, match=r"plans\['1.5'\] does not follow from the scores"):
    read_plan(str(tmp_path / "edited.json"))


def _run_config(folder, **overrides):
  c = tiny_config.get_config()
  c.model.init_from = str(folder)
  c.num_steps, c.batch_size, c.data.max_examples, c.data.seq_len = 2, 4, 32, 48
  c.checkpoint.every = 2
  c.skip.strategy, c.skip.ratio, c.skip.calibration_tokens = "calibrated", 2.0, 32
  c.update_from_flattened_dict(overrides)
  return c


def test_training_and_infer_take_a_calibrated_run_plan_from_its_workdir(tmp_path):
  folder, workdir = tmp_path / "base", tmp_path / "run"
  tiny.save_hf_model("llama", folder, num_layers=RUN_LAYERS, seed=3)
  tiny.save_tiny_tokenizer(folder)
  config = _run_config(folder)
  config_check.validate_run(config, str(workdir))
  path = workdir / PLAN_FILE
  trainer = train_lib.Trainer(config, str(workdir))  # the first start calibrates
  try:
    plan = read_plan(str(path), RUN_LAYERS)
    assert trainer.config.skip.plan_file == str(path)
    assert train_lib.skip_for_step(trainer.config, RUN_LAYERS, 0) == plan.plan(2).skipped
  finally:
    trainer.close()
  written = path.stat().st_mtime_ns
  # A resumed run reads the file: given nothing to calibrate on, it still resolves.
  resumed = calibrate.resolve_plan(config, str(workdir), trainer.model_cfg, None, None, None)
  assert resumed.skip.plan_file == str(path) and path.stat().st_mtime_ns == written
  assert plan.method == "kl_greedy" and plan.calibration["tokens"] == 32
  config_check.validate_run(config, str(workdir))  # now checks the workdir's plan
  # Every plan comes from the file, never from the ratio: edit the scores, and training and
  # infer.py follow them.
  edited = dataclasses.replace(plan, scores=(None, 0, 1, 2, 3, None))
  write_plan(str(path), edited, (2,))
  assert train_lib.skip_for_step(trainer.config, RUN_LAYERS, 1) == (1, 2, 3)
  args = argparse.Namespace(skip=None, ratio="1,2", speculative=None, checkpoint=str(workdir))
  runs = infer.parse_runs(args, RUN_LAYERS)
  assert [(label, run["skip"].skipped, run["skip"].strategy) for label, run in runs] == [
      ("r1", (), "calibrated"), ("r2", (1, 2, 3), "calibrated")]
  args.ratio, args.speculative = None, "draft_ratio=2,k=2"  # the calibrated sub-model drafts
  assert infer.parse_runs(args, RUN_LAYERS)[0][1]["speculative"]["draft_skip"].skipped == (1, 2, 3)
  # The plan file can seed another run; a plan for another depth is refused before any work.
  other = _run_config(folder, **{"skip.plan_file": str(path)})
  config_check.validate_run(other, str(tmp_path / "run2"))
  with pytest.raises(config_check.ConfigError, match=r"skip.plan_file .* is for 6 layers but "
                     r"the model has 4"):
    config_check.validate_run(_run_config("", **{"skip.plan_file": str(path)}),
                              str(tmp_path / "run3"))


# ----------------------------------------------------------------------------------------------
# Per-block calibration (skip.unit "mlp", "attention", "sublayer").

MLP_IDENTITY, ATTENTION_IDENTITY = 1, 3  # zeroed blocks of `blocks_model`: removing them is free


@pytest.fixture(scope="module")
def blocks_model():
  model = tiny.tiny_model(num_layers=L, seed=1)
  model.layers[MLP_IDENTITY].mlp.down[...] = jnp.zeros_like(model.layers[MLP_IDENTITY].mlp.down[...])
  model.layers[ATTENTION_IDENTITY].attn.o[...] = jnp.zeros_like(
      model.layers[ATTENTION_IDENTITY].attn.o[...])
  return model


@pytest.mark.parametrize("paper", [True, False], ids=["paper", "everywhere"])
def test_gated_blocks_equal_the_model_with_those_blocks_skipped(blocks_model, text, paper):
  call = tiny.jit_call(blocks_model)
  plans = [SkipPlan.sublayers(L, attention=(2,), mlp=(1, 3)),
           skipping.plan_layers(L, strategy=(2, 3), unit="mlp"),
           skipping.plan_layers(L, strategy=(1,), unit="attention")]
  got = calibrate.evaluate_plan(blocks_model, text, plans, paper=paper)
  for plan, row in zip(plans, got):
    kl, nll = _reference_divergence(call, text, plan, paper)
    np.testing.assert_allclose([row["kl"], row["nll"]], [kl, nll], rtol=1e-4, atol=1e-6)
    assert row["kl"] > 1e-3


@pytest.mark.parametrize("unit,first", [("mlp", MLP_IDENTITY), ("attention", ATTENTION_IDENTITY)])
def test_greedy_per_unit_removes_that_units_identity_block_first(blocks_model, text, unit, first):
  costs = layer_bytes(blocks_model.cfg)
  scores = calibrate.calibrate(blocks_model, text, "kl_greedy", unit=unit, costs=costs)
  assert scores.unit == unit and scores.calibration["removal_order"][0] == first
  assert scores.calibration["kl_after_removal"][0] == pytest.approx(0.0, abs=1e-6)
  assert scores.scores[0] is None and scores.scores[-1] is None
  assert sorted(scores.calibration["removal_order"]) == [1, 2, 3]
  # Its smallest plan skips that block; layer-unit plans cannot be made from block scores.
  assert scores.plan(1.01, unit, costs).skipped == (first,)
  with pytest.raises(ValueError, match=rf"scores rank unit={unit!r} blocks, not what "
                     r"unit='layer' skips: calibrate with skip.unit='layer'"):
    scores.plan(1.25)


def test_sublayer_greedy_takes_the_cheapest_kl_per_byte_and_plans_by_bytes(blocks_model, text,
                                                                           tmp_path):
  costs = layer_bytes(blocks_model.cfg)
  scores = calibrate.calibrate(blocks_model, text, "kl_greedy", unit="sublayer", costs=costs,
                               max_ratio=1.6)
  order = scores.calibration["removal_order"]
  # Both free blocks first (the attention block on the tie), as scores over 2L blocks.
  assert order[:2] == [ATTENTION_IDENTITY, L + MLP_IDENTITY] and len(scores.scores) == 2 * L
  assert scores.calibration["kl_after_removal"][1] == pytest.approx(0.0, abs=1e-6)
  # Each later step is the block with the least KL added per byte saved, judged on the plain
  # model with the earlier removals made.
  removed, kl_now = [], 0.0
  for chosen, kl in zip(order, scores.calibration["kl_after_removal"]):
    candidates = [j for j in range(2 * L) if j % L not in (0, L - 1) and j not in removed]
    plans = [SkipPlan.sublayers(L, [b for b in removed + [j] if b < L],
                                [b - L for b in removed + [j] if b >= L]) for j in candidates]
    kls = [row["kl"] for row in calibrate.evaluate_plan(blocks_model, text, plans)]
    per_byte = [(k - kl_now) / (costs.attention if j < L else costs.mlp)
                for j, k in zip(candidates, kls)]
    assert chosen == candidates[int(np.argmin(per_byte))], (removed, order)
    assert kl == pytest.approx(kls[candidates.index(chosen)], abs=1e-5)
    removed.append(chosen)
    kl_now = kl
  # The bytes decide between kinds: blocks saving 10**6 times the other kind's bytes go first.
  for attention, mlp, kind in ((1, 10**6, "mlp"), (10**6, 1, "attention")):
    order = calibrate.calibrate(blocks_model, text, "kl_greedy", unit="sublayer",
                                costs=skipping.LayerBytes(attention, mlp, 100)
                                ).calibration["removal_order"]
    assert [("attention" if j < L else "mlp") for j in order[2:4]] == [kind, kind], order
  order = scores.calibration["removal_order"]
  # Greedy stopped at the first plan reading 1.6x fewer bytes; each plan is the shortest prefix
  # of the order that reaches its ratio, and the plans nest.
  assert costs.ratio(scores.plan(1.6, "sublayer", costs)) >= 1.6
  plans = [scores.plan(r, "sublayer", costs) for r in (1.05, 1.3, 1.6)]
  assert plans[0] == SkipPlan.sublayers(L, attention=(ATTENTION_IDENTITY,))
  blocks = [set(p.skipped) | {L + i for i in p.mlp_skipped} for p in plans]
  assert blocks[0] < blocks[1] < blocks[2] and blocks[2] == set(order)
  with pytest.raises(ValueError, match=r"rank layers, not what unit='sublayer' skips"):
    LayerScores(L, "kl_greedy", (None, 0, 1, 2, None)).plan(1.2, "sublayer", costs)
  # plan.json keeps the unit, the 2L scores and the bytes its listed plans were made by.
  path = str(tmp_path / PLAN_FILE)
  write_plan(path, scores, (1.3, 1.6), costs)
  assert read_plan(path, L) == scores
  record = json.loads(open(path).read())
  assert record["unit"] == "sublayer" and record["plans"]["1.3"] == dict(
      attention_skipped=list(plans[1].skipped), mlp_skipped=list(plans[1].mlp_skipped))
  with pytest.raises(ValueError, match=r"give one number \(or None = never skipped\) per "
                     r"attention block, then per MLP block, 10 in all"):
    skipping.plan_layers(L, 1.2, "calibrated", scores=scores.scores[:L], unit="sublayer",
                         costs=costs)


def test_block_influence_scores_blocks(blocks_model, text):
  costs = layer_bytes(blocks_model.cfg)
  both = calibrate.calibrate(blocks_model, text, "block_influence", unit="sublayer", costs=costs)
  values = {j: v for j, v in enumerate(both.scores) if v is not None}
  assert values[ATTENTION_IDENTITY] == pytest.approx(0.0, abs=1e-6)
  assert values[L + MLP_IDENTITY] == pytest.approx(0.0, abs=1e-6)
  assert all(v > 1e-4 for j, v in values.items() if j not in (ATTENTION_IDENTITY,
                                                              L + MLP_IDENTITY))
  mlp = calibrate.calibrate(blocks_model, text, "block_influence", unit="mlp", costs=costs)
  assert mlp.scores == tuple(both.scores[L:])
