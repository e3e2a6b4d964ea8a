"""Sublayer plans (skip.unit "mlp" / "attention" / "sublayer"): transformers parity with those blocks removed,
cached decoding against a full recompute, no skipped block's weights in the executables, the byte
ratio against a hand count, training, and bad input in one line."""

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import infer
import tolerance
from configs import tiny as tiny_run
from ulskip_jax import config_check, decode, engine, hf, skipping, train_lib
from ulskip_jax import testing as tiny
from ulskip_jax.kv_cache import cache_bytes, init_cache
from ulskip_jax.model import ModelConfig, layer_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fast_engine_compile")

UNITS = ("mlp", "attention")
SKIPPED = (1, 2)  # of the tiny models' 4 layers
# Unit "sublayer": attention and MLP blocks chosen apart (layer 2 loses both, i.e. the layer).
SUBLAYER = dict(attention=(1, 2), mlp=(2,))
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
NEW = 4


def _plan(unit):
  if unit == "sublayer":
    return skipping.SkipPlan.sublayers(4, **SUBLAYER)
  return skipping.plan_layers(4, strategy=SKIPPED, unit=unit)


@functools.cache
def _jit_forward(graphdef):
  @functools.partial(jax.jit, static_argnames=("skip",))
  def forward(state, tokens, skip, **kw):
    return nnx.merge(graphdef, state)(tokens, skip=skip, **kw)
  return forward


def _forward(model, tokens, plan, **kw):
  graphdef, state = nnx.split(model)
  return np.asarray(_jit_forward(graphdef)(state, jnp.asarray(tokens), plan, **kw))


def _without_blocks(torch_model, plan):
  """The torch model with the MLP and attention blocks `plan` skips answering zeros."""
  for i, layer in enumerate(torch_model.model.layers):
    if i not in plan.mlp_layers:
      layer.mlp.forward = lambda x: torch.zeros_like(x)
    if i not in plan.attention_layers:
      layer.self_attn.forward = lambda hidden_states, *a, **k: (torch.zeros_like(hidden_states),
                                                                None)
  return torch_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """Our model of a random tiny transformers Llama (`tiny.hf_model("llama")`, seeded)."""
  path = tmp_path_factory.mktemp("llama")
  tiny.save_hf_model("llama", path)
  return hf.from_pretrained(path)[0]


@pytest.mark.parametrize("unit", UNITS + ("sublayer",))
def test_sublayer_plan_matches_transformers_without_those_blocks(llama, unit):
  model, torch_model = llama, tiny.hf_model("llama")  # the saved one: same seed
  tokens = np.random.default_rng(0).integers(3, tiny.VOCAB, (2, 12))
  mask = np.ones_like(tokens)
  mask[0, :3] = 0  # left padding: positions and segments as the decoders give them
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  ours = _forward(model, tokens, _plan(unit), positions_BT=jnp.asarray(positions),
                  segment_ids_BT=jnp.asarray(mask))
  ref = tiny.torch_logits(_without_blocks(torch_model, _plan(unit)), tokens, mask, positions)
  assert np.abs(ours - ref)[mask > 0].max() < tolerance.bound(1e-4)
  full = tiny.torch_logits(tiny.hf_model("llama"), tokens, mask, positions)
  assert np.abs(full - ref)[mask > 0].max() > 1e-2  # the removed blocks mattered


@pytest.mark.parametrize("unit,mode", [("mlp", "paper"), ("mlp", "everywhere"),
                                       ("attention", "paper"), ("attention", "everywhere"),
                                       ("sublayer", "paper"), ("sublayer", "everywhere")])
def test_cached_decoding_equals_full_recompute(unit, mode):
  """Greedy tokens from the cache are the argmax of one uncached forward over prompt + output
  (paper mode: the prompt at full depth); the cache holds the layers whose attention runs."""
  model, plan = tiny.tiny_model(), _plan(unit)
  out, stats = decode.generate(model, PROMPTS, max_new_tokens=NEW, eos_id=None, skip=plan,
                               mode=mode)
  assert stats.plan == plan and stats.plan.unit == unit
  assert len(init_cache(model.cfg, 2, 16, plan).k) == (4 if unit == "mlp" else 2)
  assert plan.attention_layers == ((0, 1, 2, 3) if unit == "mlp" else (0, 3))
  slots = engine.bucket(len(PROMPTS[0]), engine.MIN_BUCKET) + engine.bucket(NEW, engine.MIN_BUCKET)
  assert stats.cache_bytes == cache_bytes(model.cfg, 2, slots, plan)
  P = len(PROMPTS[0])
  tokens = np.array([p + o for p, o in zip(PROMPTS, out)])
  full_depth = {} if mode == "everywhere" else dict(
      full_depth_BT=jnp.asarray(np.arange(tokens.shape[1]) < P)[None].repeat(2, 0))
  logits = _forward(model, tokens, plan, **full_depth)
  np.testing.assert_array_equal(logits[:, P - 1:-1].argmax(-1), np.array(out))


def test_continuous_batching_and_speculative_drafts_take_sublayer_plans():
  """Continuous batching gives the static batch's tokens; an MLP-skipping draft drafts through
  a view of every layer of the full model's cache, and greedy speculative decoding keeps the
  full model's tokens."""
  model = tiny.tiny_model()
  kw = dict(max_new_tokens=NEW, eos_id=None)
  for plan in (_plan("attention"), _plan("sublayer")):
    out, _ = decode.generate(model, PROMPTS, skip=plan, mode="everywhere", **kw)
    rows, _ = decode.generate(model, PROMPTS, skip=plan, mode="everywhere", batch_size=1, **kw)
    assert rows == out
  full, _ = decode.generate(model, PROMPTS, **kw)
  for draft in (_plan("mlp"), _plan("sublayer")):
    spec, stats = decode.generate(model, PROMPTS, mode="paper", **kw,
                                  speculative=dict(draft_skip=draft, draft_cache="shared"))
    assert spec == full and stats.draft_plan == draft


def test_beam_search_with_a_sublayer_plan_equals_transformers_without_those_blocks(llama):
  """Beams through the blocks a unit "sublayer" plan keeps (mode "everywhere") are transformers'
  beams on the model whose skipped blocks answer zeros."""
  plan, eos = _plan("sublayer"), 2
  kw = dict(num_beams=3, early_stopping=True, length_penalty=0.8)
  prompts = [[1, 5, 6, 7, 5, 6], [1, 9, 8, 7, 6, 5]]
  got, _ = decode.generate(llama, prompts, skip=plan, mode="everywhere", max_new_tokens=8,
                           eos_id=eos, **kw)
  torch_model = _without_blocks(tiny.hf_model("llama"), plan)
  with torch.no_grad():
    out = torch_model.generate(input_ids=torch.tensor(prompts), max_new_tokens=8, do_sample=False,
                               eos_token_id=eos, pad_token_id=0, **kw)
  want = [row[:row.index(eos)] if eos in row else row for row in out[:, len(prompts[0]):].tolist()]
  assert got == want
  plain, _ = decode.generate(llama, prompts, max_new_tokens=8, eos_id=eos, **kw)
  assert plain != got  # the skipped blocks change the beams


def _entry_parameters(text: str) -> collections.Counter:
  """Shapes of the executable's parameters: jit drops the arguments it never reads."""
  entry = re.search(r"^ENTRY (%[\w.\-]+)", text, re.M).group(1)
  return collections.Counter(re.match(r"\s*%\S+ = (\w+\[[\d,]*\])", line).group(1)
                             for line in tiny.computations(text)[entry] if " parameter(" in line)


@pytest.mark.parametrize("unit", UNITS + ("sublayer",))
def test_skipped_blocks_weights_are_not_read(unit):
  """In the decode executable: gate and up are [D, F], down [F, D], q [D, H, Hd], k and v
  [D, K, Hd] (tiny shapes that nothing else has); each runs once per layer that reads it."""
  model = tiny.tiny_model()
  plan = _plan(unit)
  compiled = tiny.compile_generate(model, 2, 5, skip=plan, mode="everywhere",
                                   max_new_tokens=NEW, eos_id=None)
  shapes = _entry_parameters(compiled.as_text())
  mlps, attentions = len(plan.mlp_layers), len(plan.attention_layers)
  assert (mlps, attentions) == {"mlp": (2, 4), "attention": (4, 2), "sublayer": (3, 2)}[unit]
  assert shapes["f32[64,32]"] == mlps and shapes["f32[32,64]"] == 2 * mlps
  assert shapes["f32[32,4,8]"] == attentions and shapes["f32[32,2,8]"] == 2 * attentions


def test_byte_ratio_against_a_hand_count():
  cfg = tiny.tiny_config()  # D 32, H 4, K 2, Hd 8, F 64, V 97, untied, f32
  attention = 4 * (32 + 32 * 4 * 8 + 2 * 32 * 2 * 8 + 4 * 8 * 32)  # norm, q, k, v, o
  mlp = 4 * (32 + 3 * 32 * 64)                                     # norm, gate, up, down
  fixed = 4 * (32 * 97 + 32)                                       # unembedding, final norm
  costs = layer_bytes(cfg)
  assert costs == skipping.LayerBytes(attention, mlp, fixed)
  full = fixed + 4 * (attention + mlp)
  plan = skipping.plan_layers(4, 1.2, unit="mlp", costs=costs)
  # One MLP (1.18x) falls short of 1.2x: ULS skips two, the middle ones.
  assert full / (full - mlp) < 1.2 and plan.skipped == (1, 2)
  assert costs.ratio(plan) == pytest.approx(full / (full - 2 * mlp))
  layer_plan = skipping.plan_layers(4, 2)
  assert costs.ratio(layer_plan) == pytest.approx(full / (fixed + 2 * (attention + mlp)))
  # A sublayer plan's "2x" is bytes, not a block count: the same ratio skips more attention
  # blocks than MLP blocks, and every plan reaches at least its ratio.
  smollm2 = layer_bytes(ModelConfig(vocab_size=49152, num_layers=30, d_model=576, num_heads=9,
                                    num_kv_heads=3, head_dim=64, d_ff=1536, tie_embeddings=True))
  for ratio in (1.1, 1.2):
    by_unit = {u: skipping.plan_layers(30, ratio, unit=u, costs=smollm2) for u in UNITS}
    assert len(by_unit["attention"].skipped) > len(by_unit["mlp"].skipped)
    for p in by_unit.values():
      assert smollm2.ratio(p) >= ratio
      fewer = skipping.plan_layers(30, strategy=p.skipped[1:], unit=p.unit)
      assert smollm2.ratio(fewer) < ratio  # the fewest blocks that reach it


def test_calibrated_scores_order_the_skipped_blocks():
  scores = skipping.LayerScores(4, "kl_greedy", (None, 0.5, 0.1, None))
  costs = layer_bytes(tiny.tiny_config())
  assert scores.plan(1.2, "mlp", costs).skipped == (1, 2)
  assert scores.plan(1.1, "mlp", costs).skipped == (2,)
  assert scores.plan(1.1, "attention", costs).unit == "attention"


@pytest.mark.parametrize("unit,paper", [("mlp", False), ("attention", True),
                                        ("sublayer", False)])
def test_training_skips_the_blocks_everywhere_and_trains_them_on_the_prompt_in_paper_mode(
    unit, paper):
  """The gradient of a skipped block's weights: zero when skipped everywhere, nonzero in paper
  mode (prompt positions run it, and the response's loss reads them through attention); paper
  mode with remat, whose rematerialised blocks get the skipped block's mask."""
  graphdef, params = nnx.split(tiny.tiny_model(remat=paper), nnx.Param)
  T = 10
  tokens = jnp.asarray(np.random.default_rng(1).integers(3, tiny.VOCAB, (2, T)))
  batch = dict(tokens=tokens, targets=jnp.roll(tokens, -1, 1),
               positions=jnp.broadcast_to(jnp.arange(T), (2, T)),
               segment_ids=jnp.ones((2, T), jnp.int32), full_depth=jnp.arange(T)[None] < 4,
               loss_mask=jnp.broadcast_to(jnp.arange(T) >= 4, (2, T)).astype(jnp.float32))
  loss = lambda p: train_lib.loss_sums(p, graphdef, batch, _plan(unit), paper)[0]
  grads = jax.jit(jax.grad(loss))(nnx.to_pure_dict(params))
  plan = _plan(unit)
  for i in range(4):
    for block, runs in (("mlp", plan.mlp_layers), ("attn", plan.attention_layers)):
      norm = _square_sum(grads["layers"][i][block])
      assert (norm == 0) == (i not in runs and not paper), (i, block, norm)


def _square_sum(tree) -> float:
  return float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_run_config_plans_by_unit(tmp_path):
  config = tiny_run.get_config()
  config.skip.unit, config.skip.ratio = "mlp", 1.2
  costs = layer_bytes(tiny.tiny_config())
  skip = train_lib.skip_for_step(config, 4, 0, costs=costs)
  assert skip == skipping.plan_layers(4, 1.2, unit="mlp", costs=costs) and skip.unit == "mlp"
  config.skip.ratio = 1.0
  assert train_lib.skip_for_step(config, 4, 0, costs=costs) == ()
  # Unit "sublayer" from a calibrated plan file: MLP blocks alone are still a skipping plan.
  scores = skipping.LayerScores(4, "kl_greedy", (None, 3, 2, None, None, 0, 1, None),
                                unit="sublayer")
  skipping.write_plan(str(tmp_path / "plan.json"), scores, (1.2,), costs)
  config.skip.unit, config.skip.ratio = "sublayer", 1.2
  config.skip.strategy, config.skip.plan_file = "calibrated", str(tmp_path / "plan.json")
  skip = train_lib.skip_for_step(config, 4, 0, costs=costs)
  assert skip == skipping.SkipPlan.sublayers(4, mlp=(1, 2)) and skip.is_full is False


@pytest.mark.parametrize("case,message", [
    ("unknown_unit", "unit='block' is unknown: allowed are layer, mlp, attention"),
    ("unreachable", "ratio=2 is unreachable with unit='attention'"),
    ("export", "transformers loads no layer without its attention or MLP"),
    ("export_sublayer", "(attention skipped in (1, 2), MLP in (2,)): transformers loads no"),
    ("sublayer_uls", "unit='sublayer' with strategy='uls': attention and MLP blocks are chosen "
                     "separately by calibration only"),
    ("sublayer_explicit", "an explicit skip list with unit='sublayer' names no block kind"),
    ("config_sublayer", "skip.ratio=2.0 cannot be planned on the model's 4 layers "
                        "(skip.strategy='uls', skip.unit='sublayer')"),
    ("config_unit", "skip.unit='mlps' is unknown: allowed are 'layer', 'mlp', 'attention'"),
    ("config_ratio", "skip.ratio=3.0 cannot be planned"),
])
def test_bad_input_is_one_line(tmp_path, case, message):
  smollm2 = layer_bytes(ModelConfig(vocab_size=49152, num_layers=30, d_model=576, num_heads=9,
                                    num_kv_heads=3, head_dim=64, d_ff=1536, tie_embeddings=True))
  config = tiny_run.get_config()
  with pytest.raises(ValueError) as e:
    if case == "unknown_unit":
      skipping.plan_layers(4, 2, unit="block")
    elif case == "unreachable":
      skipping.plan_layers(30, 2, unit="attention", costs=smollm2)
    elif case == "export":
      hf.save_pretrained(tiny.tiny_model(), tmp_path / "out", skip=_plan("mlp"))
    elif case == "export_sublayer":
      hf.save_pretrained(tiny.tiny_model(), tmp_path / "out", skip=_plan("sublayer"))
    elif case == "sublayer_uls":
      skipping.plan_layers(30, 2, unit="sublayer", costs=smollm2)
    elif case == "sublayer_explicit":
      skipping.plan_layers(4, strategy=(1,), unit="sublayer")
    elif case == "config_sublayer":
      config.skip.unit = "sublayer"
      config_check.validate_run(config, str(tmp_path / "run"))
    elif case == "config_unit":
      config.skip.unit = "mlps"
      config_check.validate_run(config, str(tmp_path / "run"))
    else:
      config.skip.unit, config.skip.ratio = "attention", 3.0
      config_check.validate_run(config, str(tmp_path / "run"))
  text = str(e.value)
  assert message in text and "\n" not in text, text
  if case == "unreachable":
    assert "allowed is ratio <= 1.2" in text  # the largest ratio attention blocks reach
  assert not (tmp_path / "out").exists()


def test_infer_plans_by_skip_unit(tmp_path):
  args = infer.parse_args(["--checkpoint", str(tmp_path), "--input", "in.txt", "--output", "o.txt",
                           "--ratio", "1,1.2", "--skip-unit", "mlp"])
  costs = layer_bytes(tiny.tiny_config())
  runs = infer.parse_runs(args, 4, args.skip_unit, costs)
  assert [run["skip"] for _, run in runs] == [
      skipping.SkipPlan.full(4), skipping.plan_layers(4, 1.2, unit="mlp", costs=costs)]
  assert runs[1][1]["skip"].unit == "mlp"
  args.ratio, args.skip = None, "1,2"
  assert infer.parse_runs(args, 4, "attention", costs)[0][1]["skip"] == _plan("attention")
  args.ratio, args.skip = "2", None
  with pytest.raises(infer.UsageError, match="ratio=2.0 is unreachable with unit='attention'"):
    infer.parse_runs(args, 4, "attention", costs)
