"""Adapters per ratio on a frozen base (ratio_adapters.py, `optim.lora.per_ratio`).

One module-scoped run trains adapters at ratios 2 and 4/3 on a tiny Llama base read from a
Hugging Face folder (with the distillation loss against the base at full depth), 2 steps, through
train.py's path. Full depth stays the base bit for bit; ratio r is the base plus r's adapters
merged into r's kept layers; a step moves only the adapters; infer.py on the workdir decodes the
base at ratio 1 and the merged sub-model at ratio 2; speculation drafted by base + adapter gives
the base's greedy output; the merged and pruned export is a plain Llama that transformers loads.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from flax import nnx
from flax.nnx import traversals

from configs import tiny as tiny_config
from tests import tolerance
from ulskip_jax import testing as tiny
from ulskip_jax import checkpoint as ckpt_lib
from ulskip_jax import config_check, decode, hf, lora, ratio_adapters, train_lib
from ulskip_jax.model import Decoder

pytestmark = pytest.mark.usefixtures("fast_engine_compile", "one_torch_thread")

RATIOS = (1.0, 2.0, 4 / 3)  # ratio 1 gets no adapters
PROMPTS = [[5, 9, 14, 3, 22], [40, 41, 7], [60, 12, 19, 33, 2 + 1, 8]]


def _config(**overrides):
  c = tiny_config.get_config()
  c.num_steps, c.batch_size, c.data.max_examples, c.data.seq_len = 2, 4, 32, 48
  c.checkpoint.every, c.optim.lr, c.optim.warmup_steps = 2, 2e-2, 1
  c.skip.ratios, c.skip.prompt_capacity = RATIOS, 1.0
  c.optim.lora.rank, c.optim.lora.alpha, c.optim.lora.per_ratio = 4, 8.0, True
  c.update_from_flattened_dict(overrides)
  return c


def _params(model) -> dict:
  return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _flat(tree) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_equal(got, want):
  got, want = _flat(got), _flat(want)
  assert got.keys() == want.keys()
  wrong = [p for p in want if not np.array_equal(got[p], want[p])]
  assert not wrong, f"{len(wrong)} arrays differ, e.g. {wrong[:3]}"


def _copy(tree):
  return jax.tree.map(np.array, jax.device_get(tree))  # copies: the step donates its state


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The base folder, the trained workdir, its parameters before and after, its restored model."""
  base_dir = tmp_path_factory.mktemp("base")
  tiny.save_hf_model("llama", base_dir, seed=3)
  tok = tiny.save_tiny_tokenizer(base_dir)
  # BOS first, as the workdir's tokenizer encodes a prompt: the two then decode the same ids.
  tok.backend_tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
      single="<bos> $A", special_tokens=[("<bos>", 1)])
  tok.save_pretrained(base_dir)
  workdir = tmp_path_factory.mktemp("adapters")
  # Skipping everywhere: a smaller step to compile than paper mode's (whose forward the tests
  # below check on the restored model).
  config = _config(**{"model.init_from": str(base_dir), "distill.teacher": "init",
                      "skip.mode": "everywhere"})
  trainer = train_lib.Trainer(config, str(workdir))
  try:
    state = trainer.restore_or_init()
    initial, batch = _copy(state["params"]), next(trainer.batcher)
    for step in range(config.num_steps):
      state, _ = trainer.step(state, batch, step)
    trainer.save(state, config.num_steps, force=True)
  finally:
    trainer.close()
  model, tok = ckpt_lib.load_for_inference(str(workdir))
  return dict(base_dir=base_dir, workdir=workdir, config=config, model=model, tok=tok,
              base=hf.from_pretrained(base_dir)[0], trainer=trainer, initial=initial,
              final=_copy(state), batch=batch)


def _tokens(seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(3, tiny.VOCAB, (2, 12)))


def test_full_depth_is_the_base_bit_for_bit_after_training(run):
  model, base = run["model"], run["base"]
  assert isinstance(model, ratio_adapters.RatioAdaptedDecoder)
  assert model.ratios == (2.0, 4 / 3)
  _assert_equal(_params(model.base), _params(base))
  tokens = _tokens()
  np.testing.assert_array_equal(model(tokens), base(tokens))
  for skip in ((), None):
    np.testing.assert_array_equal(model.hidden(tokens, skip=skip)[0], base.hidden(tokens)[0])
  trained_b = [x for p, x in _flat(_params(model.adapters)).items() if p.endswith("['b']")]
  assert trained_b and all(np.abs(b).max() > 0 for b in trained_b), "vacuous: adapters unmoved"


def _merged_by_hand(model, j) -> Decoder:
  """The base with adapters[j] folded into plan j's kept layers: W + a . b * alpha / rank."""
  plan, cfg = model.plans[j], model.lora_cfg
  params = traversals.flatten_mapping(_params(model.base))
  adapters = traversals.flatten_mapping(_params(model.adapters[j]))
  for (block, target, ab), a_stack in adapters.items():  # [kept, in..., r]
    if ab != "a":
      continue
    for k, layer in enumerate(plan.kept):
      w = ("layers", layer, block, target[:-len(lora.SUFFIX)])
      b = adapters[(block, target, "b")][k]
      params[w] = params[w] + np.tensordot(a_stack[k], b, 1) * (cfg.lora_alpha / cfg.lora_rank)
  out = nnx.eval_shape(lambda: Decoder(model.cfg, rngs=nnx.Rngs(0)))
  nnx.replace_by_pure_dict(state := nnx.state(out, nnx.Param),
                           traversals.unflatten_mapping(params))
  nnx.update(out, state)
  return out


def test_each_ratio_is_the_base_plus_its_own_adapters_on_its_kept_layers(run):
  model, tokens = run["model"], _tokens(1)
  outs = {}
  for j, plan in enumerate(model.plans):
    for paper in (None, True):
      got = model(tokens, skip=plan, full_depth_BT=paper)
      want = _merged_by_hand(model, j)(tokens, skip=plan, full_depth_BT=paper)
      np.testing.assert_allclose(got, want, atol=tolerance.bound(2e-5), rtol=0)
      plain = run["base"](tokens, skip=plan, full_depth_BT=paper)
      assert float(jnp.abs(got - plain).max()) > 1e-3, "vacuous: the adapters change nothing"
    outs[j] = got
    np.testing.assert_allclose(ratio_adapters.merged(model, plan)(tokens, skip=plan),
                               model(tokens, skip=plan), atol=tolerance.bound(2e-5), rtol=0)
    assert model.plan_at(model.ratios[j]) == plan


def test_a_step_moves_only_the_adapters_and_sums_each_ratios_loss(run):
  """The run's steps: the base bit for bit as read, every ratio's adapters moved, the optimizer
  state for the adapters alone, one executable for every step; the step's loss is the sum of
  each ratio's own (here the KL to the base at full depth, "init" taken in place)."""
  trainer, config, before, after = run["trainer"], run["config"], run["initial"], run["final"]
  assert set(before) == {"base", "adapters"} and trainer.teacher_params is None
  _assert_equal(after["params"]["base"], before["base"])
  _assert_equal(after["params"]["base"], dict(_params(run["base"])))
  for j, ratio in enumerate(trainer.abstract_model.ratios):
    was = _flat(before["adapters"][j])
    assert any(not np.array_equal(x, was[p]) for p, x in _flat(after["params"]["adapters"][j]).items()), ratio
  assert jax.tree.structure(after["opt_state"]) == jax.tree.structure(
      trainer.optimizer.init(lora.split(before, enabled=True)[0]))
  assert trainer.num_compiles == 1
  skips = train_lib.skip_for_step(config, 4, 0)
  assert skips == tuple(p.skipped for p in trainer.abstract_model.plans)
  loss = lambda skip, per_ratio: train_lib.loss_sums(
      before, trainer.graphdef, trainer.global_batch(run["batch"]), skip, False,
      distill=trainer.distill, per_ratio=per_ratio)
  (total, count), parts = jax.jit(lambda: (loss(skips, True), [loss(s, False) for s in skips]))()
  np.testing.assert_allclose(total, sum(p[0] for p in parts), rtol=1e-6)
  assert count == parts[0][1] and float(total) > 0


def _strong(model, scale=30.0):
  """The model with its adapters' b scaled up: sub-models far from the base, for decoding."""
  model = nnx.clone(model)
  for adapters in model.adapters:
    state = nnx.state(adapters, nnx.Param)
    nnx.update(adapters, jax.tree_util.tree_map_with_path(
        lambda p, x: x * scale if jax.tree_util.keystr(p).endswith("'b']") else x, state))
  return model


def test_adapter_draft_speculation_equals_full_depth_greedy(run):
  model = _strong(run["model"])
  kw = dict(max_new_tokens=10, eos_id=None, pad_id=0)
  want, _ = decode.generate(model.base, PROMPTS, **kw)
  plan = model.plan_at(2.0)
  got, stats = decode.generate(model, PROMPTS, speculative=dict(draft_skip=plan,
                                                                num_draft_tokens=3), **kw)
  assert got == want
  assert stats.draft_plan == plan and 0 < stats.accepted_tokens < stats.drafted_tokens


def _infer(tmp_path, checkpoint, ratio, name, *extra):
  import infer
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("w5 w9 w14\nw40 w41\nw60 w12 w19 w33\n")
  out = tmp_path / f"{name}.txt"
  assert infer.main(["--checkpoint", str(checkpoint), "--input", str(prompts), "--output",
                     str(out), "--ratio", ratio, "--template", "{source}", "--max-new-tokens",
                     "8", "--no-progress", "--no-chat", "--mode", "everywhere", *extra]) == 0
  return out


def test_infer_ratio_1_is_the_base_and_ratio_2_its_merged_export(run, tmp_path):
  """infer.py --ratio 1,2 on the workdir: r1 byte-identical to decoding the base folder; r2 to
  decoding the exported 2x folder (merged and pruned), a plain model of 2 layers (skipping
  everywhere: paper mode would run the prompt through layers the folder no longer has)."""
  _infer(tmp_path, run["workdir"], "1,2", "ours")
  _infer(tmp_path, run["base_dir"], "1", "base")
  ratio_adapters.save_pretrained(run["model"], tmp_path / "r2", ratio=2.0, tokenizer=run["tok"].hf)
  _infer(tmp_path, tmp_path / "r2", "1", "exported")
  assert (tmp_path / "ours.r1.txt").read_bytes() == (tmp_path / "base.txt").read_bytes()
  assert (tmp_path / "ours.r2.txt").read_bytes() == (tmp_path / "exported.txt").read_bytes()
  # --attention-impl reaches the merged sub-model a ratio decodes (it once failed internally).
  _infer(tmp_path, run["workdir"], "2", "xla", "--attention-impl", "xla")
  assert (tmp_path / "xla.txt").read_bytes() == (tmp_path / "exported.txt").read_bytes()


def test_serve_plans_each_ratio_with_its_own_sub_model(run):
  """serve.py's plans on the workdir: ratio 1 the base, ratio 2 the merged sub-model on its
  adapters' plan (the same weights infer.py decodes), and no lossless plan (one line)."""
  import infer
  import serve
  model, _, _, unit = infer.load_model(str(run["workdir"]))
  plans, _ = serve.plans_of(str(run["workdir"]), model, [1.0, 2.0], unit or "layer", None)
  (full, full_plan), (sub, sub_plan) = plans[1.0], plans[2.0]
  assert full_plan.skipped == () and sub_plan == model.plan_at(2.0)
  _assert_equal(_params(full), _params(run["base"]))
  _assert_equal(_params(sub), _params(ratio_adapters.merged(model, sub_plan)))
  with pytest.raises(infer.UsageError, match="^--speculative on an adapters-per-ratio workdir"):
    serve.plans_of(str(run["workdir"]), model, [1.0], "layer", "draft_ratio=2,k=4")


def test_exported_ratio_loads_in_transformers_and_equals_our_sub_model(run, tmp_path):
  import transformers
  model = _strong(run["model"], 5.0)
  plan = model.plan_at(2.0)
  ratio_adapters.save_pretrained(model, tmp_path / "r2", ratio=2.0)
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "r2").eval()
  assert torch_model.config.num_hidden_layers == len(plan.kept)
  tokens = np.asarray(_tokens(2))
  ours = model(jnp.asarray(tokens), skip=plan)
  err = float(np.abs(tiny.torch_logits(torch_model, tokens) - np.asarray(ours)).max())
  assert err < tolerance.bound(1e-4), err
  ratio_adapters.save_pretrained(model, tmp_path / "all")  # the base plus every ratio's adapters
  back, _ = ratio_adapters.from_pretrained(tmp_path / "all")
  _assert_equal(_params(back), _params(model))
  assert back.plans == model.plans and back.ratios == model.ratios


def test_adapters_per_ratio_are_under_5_percent_of_smollm2():
  """configs/smollm2_2x_adapters.py on SmolLM2's shapes (no weights read)."""
  from configs import smollm2_2x_adapters
  config = smollm2_2x_adapters.get_config()
  cfg = config_schema_model(config)
  plans = ratio_adapters.run_plans(config, cfg.num_layers, cfg.attention_windows)
  abstract = nnx.eval_shape(lambda: ratio_adapters.RatioAdaptedDecoder(
      cfg, *zip(*plans), rngs=nnx.Rngs(0)))
  base = ratio_adapters.base_count(abstract)
  counts = ratio_adapters.adapter_counts(abstract)
  assert set(counts) == set(config.skip.ratios) - {1.0} and base > 100e6
  for ratio, n in counts.items():
    assert 0 < n <= 0.05 * base, (ratio, n, base)
  line = ratio_adapters.params_line(abstract)
  assert f"r2 {counts[2.0] / 1e6:.2f}M" in line and f"{base / 1e6:.2f}M" in line, line


def config_schema_model(config):
  from ulskip_jax import config_schema
  return config_schema.model_config(config, base=hf.config_from_hf(
      hf.read_config(config.model.init_from)[0]))


@pytest.mark.parametrize("overrides,named", [
    ({"skip.ratios": ()}, "optim.lora.per_ratio=True needs skip.ratios with a ratio above 1"),
    ({"skip.ratios": (1.0,)}, "not skip.ratios=(1.0,)"),
    ({"optim.lora.rank": 0}, "optim.lora.per_ratio=True needs optim.lora.rank > 0"),
    ({"optim.lora.train_norms": True}, "optim.lora.train_norms=True trains the base"),
    ({"distill.teacher": "self", "distill.sandwich": True}, "distill.sandwich=True trains the base"),
])
def test_bad_adapters_per_ratio_settings_are_one_line_before_any_work(tmp_path, overrides, named):
  with pytest.raises(config_check.ConfigError) as e:
    train_lib.train_and_evaluate(_config(**overrides), str(tmp_path / "run"))
  assert named in str(e.value) and "\n" not in str(e.value), str(e.value)
  assert not (tmp_path / "run").exists()
