"""LoRA (lora.py) and the memory report, on the tiny model.

One module-scoped run trains adapters (every target, dropout on) on a base model's folder
(`model.init_from`) in paper mode at ratio 2 for 3 steps, saving at steps 2 and 3; most tests read
it (adapters on a model from scratch: test_lora_reference.py). A fresh adapter changes nothing,
training moves only the adapters, the base weights stay the folder's, the optimizer state holds
moments for the adapters alone, a resume from step 2 repeats step 3 exactly, and whatever leaves
the run for inference (load_for_inference, save_pretrained, pruned or not) is the merged model.
"""

from __future__ import annotations

import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import traversals

from tests import tolerance
from ulskip_jax import testing as tiny
from ulskip_jax import checkpoint as ckpt_lib
from ulskip_jax import config_check, hf, lora, train_lib
from ulskip_jax import memory as memory_lib
from ulskip_jax.model import Decoder
from ulskip_jax.skipping import kept_layers

REPO = pathlib.Path(__file__).resolve().parents[1]
from configs import tiny as tiny_config  # noqa: E402

STEPS = 3


def _config(**overrides):
  c = tiny_config.get_config()
  c.num_steps, c.batch_size, c.data.max_examples, c.data.seq_len = STEPS, 4, 32, 48
  c.checkpoint.every, c.optim.lr, c.optim.warmup_steps = 2, 1e-2, 1
  c.optim.lora.rank, c.optim.lora.alpha, c.optim.lora.dropout = 4, 8.0, 0.1
  c.update_from_flattened_dict(overrides)
  return c


def _flat(tree) -> dict:
  """{key path: array} of any tree (the optimizer state is tuples, not dicts)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def _assert_equal(got, want):
  got, want = _flat(got), _flat(want)
  assert got.keys() == want.keys()
  wrong = [p for p in want if not np.array_equal(got[p], want[p])]
  assert not wrong, f"{len(wrong)} arrays differ, e.g. {wrong[:3]}"


def _params(model) -> dict:
  return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _copy(tree):
  return jax.tree.map(np.array, jax.device_get(tree))  # copies: the step donates its state


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The LoRA run on a base folder: initial and final params, the batches and skip tuples, the
  final state."""
  base = tmp_path_factory.mktemp("base")
  tiny.save_hf_model("llama", base, seed=3)
  tiny.save_tiny_tokenizer(base)
  workdir = tmp_path_factory.mktemp("lora")
  config = _config(**{"model.init_from": str(base)})
  trainer = train_lib.Trainer(config, str(workdir))
  state = trainer.restore_or_init()
  initial = _copy(state["params"])
  batches, skips = [], []
  for step in range(STEPS):
    batches.append(next(trainer.batcher))
    skips.append(train_lib.skip_for_step(config, trainer.model_cfg.num_layers, step))
    state, _ = trainer.step(state, batches[-1], step)
    trainer.save(state, step + 1, force=step + 1 == STEPS)
  trainer.close()
  return dict(base=base, workdir=workdir, config=config, trainer=trainer, initial=initial,
              final=_copy(state), batches=batches, skips=skips)


def _loss(trainer, params, batch, skip) -> float:
  loss, count = jax.jit(train_lib.loss_sums, static_argnums=(1, 3, 4))(
      params, trainer.graphdef, trainer.global_batch(batch), skip, True)
  return float(loss / count)


def test_fresh_adapters_give_the_base_model_exactly():
  base = tiny.tiny_model(seed=0)
  adapted = tiny.tiny_model(seed=0, lora_rank=4, lora_targets=lora.TARGETS)
  trainable, frozen = lora.split(_params(adapted), enabled=True)
  _assert_equal(frozen, _params(base))  # the same seed draws the same base weights
  assert {p[-1] for p in traversals.flatten_mapping(trainable)} == {"a", "b"}
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, tiny.VOCAB, (2, 12)))
  full_depth = jnp.arange(12)[None].repeat(2, 0) < 5
  for kw in (dict(), dict(skip=(1, 2), full_depth_BT=full_depth)):
    np.testing.assert_array_equal(np.asarray(tiny.jit_call(adapted)(tokens, **kw)),
                                  np.asarray(tiny.jit_call(base)(tokens, **kw)))


def test_lora_in_paper_mode_trains_only_the_adapters(run):
  trainer, initial, final = run["trainer"], run["initial"], run["final"]["params"]
  assert all(run["skips"]) and run["config"].skip.mode == "paper"
  _, frozen_before = lora.split(initial, enabled=True)
  adapters_after, frozen_after = lora.split(final, enabled=True)
  _assert_equal(frozen_after, frozen_before)  # bit for bit
  moved = {p: x for p, x in _flat(adapters_after).items() if p.endswith("['b']")}
  assert moved and all(np.abs(x).max() > 0 for x in moved.values())  # every B left zero
  before = _loss(trainer, initial, run["batches"][0], run["skips"][0])
  after = _loss(trainer, final, run["batches"][0], run["skips"][0])
  assert after < before - 0.01, (before, after)


def test_optimizer_state_holds_only_the_adapters(run):
  trainer, state = run["trainer"], run["final"]
  adapters, _ = lora.split(state["params"], enabled=True)
  shapes = {x.shape for x in jax.tree.leaves(adapters)}
  arrays = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim]
  assert arrays and all(x.shape in shapes for x in arrays)
  opt_bytes = memory_lib.tree_bytes(state["opt_state"])
  assert 2 * memory_lib.tree_bytes(adapters) <= opt_bytes <= 2 * memory_lib.tree_bytes(adapters) + 64
  assert trainer.memory()["opt_state"] == opt_bytes  # the shapes' count is the real one


def test_merged_equals_unmerged(run):
  trainer, batch, skip = run["trainer"], run["batches"][-1], run["skips"][-1]
  model = nnx.merge(trainer.graphdef, run["final"]["params"])
  merged = lora.merge(model)
  assert merged.cfg.lora_rank == 0 and not any(
      lora.is_adapter(p) for p in traversals.flatten_mapping(_params(merged)))
  kw = dict(skip=skip, positions_BT=jnp.asarray(batch["positions"]),
            segment_ids_BT=jnp.asarray(batch["segment_ids"]),
            full_depth_BT=jnp.asarray(batch["full_depth"]))
  tokens = jnp.asarray(batch["tokens"])
  np.testing.assert_allclose(np.asarray(tiny.jit_call(merged)(tokens, **kw)),
                             np.asarray(tiny.jit_call(model)(tokens, **kw)), **tolerance.close(1e-5))


def test_resume_equals_uninterrupted(run, tmp_path, capsys):
  """train.py's path (train_and_evaluate) from a copy of the run's step 2; logs the memory line."""
  workdir = tmp_path / "resumed"
  for item in ("tokenizer", "checkpoints/2"):
    shutil.copytree(run["workdir"] / item, workdir / item)
  train_lib.train_and_evaluate(run["config"], str(workdir))
  assert "memory (from shapes): params" in capsys.readouterr().out
  trainer = train_lib.Trainer(run["config"], str(workdir))
  try:
    state = trainer.restore_or_init()
  finally:
    trainer.close()
  assert int(state["step"]) == STEPS
  _assert_equal(_copy(state["params"]), run["final"]["params"])
  _assert_equal(_copy(state["opt_state"]), run["final"]["opt_state"])


def test_inference_and_export_get_the_merged_model(run, tmp_path):
  model = nnx.merge(run["trainer"].graphdef, run["final"]["params"])
  merged = _params(lora.merge(model))
  restored, _ = ckpt_lib.load_for_inference(str(run["workdir"]))
  assert restored.cfg.lora_rank == 0
  _assert_equal(_params(restored), merged)
  hf.save_pretrained(model, tmp_path / "full")
  _assert_equal(_params(hf.from_pretrained(tmp_path / "full")[0]), merged)
  skip = run["skips"][-1]
  hf.save_pretrained(model, tmp_path / "pruned", skip=skip)
  pruned = _params(hf.from_pretrained(tmp_path / "pruned")[0])
  kept = kept_layers(model.cfg.num_layers, skip)
  want = dict(merged, layers={j: merged["layers"][i] for j, i in enumerate(kept)})
  _assert_equal(pruned, want)


def test_lora_on_a_base_model_trains_adapters_beside_its_weights(run):
  """model.init_from: the base weights are the folder's, bit for bit; the adapters are fresh."""
  trainer = train_lib.Trainer(run["config"], str(run["workdir"]))
  try:
    state = trainer.restore_or_init()
  finally:
    trainer.close()
  adapters, frozen = lora.split(_copy(state["params"]), enabled=True)
  _assert_equal(frozen, _params(hf.from_pretrained(run["base"])[0]))
  assert all(np.abs(x).max() > 0 for p, x in _flat(adapters).items() if p.endswith("['b']"))


def test_train_norms_and_full_fine_tuning_splits():
  params = _params(tiny.tiny_model(lora_rank=2, lora_targets=("q", "v")))
  trainable, _ = lora.split(params, enabled=True, train_norms=True)
  names = {p[-2] for p in traversals.flatten_mapping(trainable)}
  assert names == {"q_lora", "v_lora", "attn_norm", "mlp_norm", "final_norm"}
  whole, frozen = lora.split(params, enabled=False)
  assert whole is params and frozen == {}


def _memory(model_cfg, optim) -> dict:
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda: Decoder(model_cfg, rngs=nnx.Rngs(0))), nnx.Param))
  return memory_lib.memory_bytes(abstract, train_lib.make_optimizer(optim, 10),
                                train_lib.param_split(optim))


def test_memory_report_lora_optimizer_state_is_far_below_full():
  """From shapes only: the tiny model (the tiny config's optimizer), and SmolLM2-135M's shapes
  with configs/smollm2_2x.py's optimizer (frozen embeddings), the issue's rank-16 case."""
  from configs import smollm2_2x
  smollm2 = dict(vocab_size=49152, num_layers=30, d_model=576, num_heads=9, num_kv_heads=3,
                 head_dim=64, d_ff=1536, tie_embeddings=True)
  cases = dict(tiny=(dict(), _config().optim, 2, 0.1),
               smollm2_shapes=(smollm2, smollm2_2x.get_config().optim, 16, 0.05))
  for name, (shape, optim, rank, bound) in cases.items():
    full_optim, lora_optim = optim.copy_and_resolve_references(), optim.copy_and_resolve_references()
    full_optim.lora.rank, lora_optim.lora.rank = 0, rank
    full = _memory(tiny.tiny_config(**shape), full_optim)
    adapted = _memory(tiny.tiny_config(**shape, **lora.model_fields(lora_optim.lora)), lora_optim)
    ratio = adapted["opt_state"] / full["opt_state"]
    print(f"{name}: LoRA rank {rank} optimizer state / full fine-tuning's = {ratio:.4f}; LoRA "
          + memory_lib.memory_line(adapted, None))
    assert adapted["params"] > full["params"] and adapted["grads"] < full["grads"]
    assert ratio < bound, ratio
    if name == "tiny":
      assert 2 * full["params"] <= full["opt_state"] <= 2 * full["params"] + 64  # mu, nu, counts
  assert "peak in use n/a" in memory_lib.memory_line(adapted, None)


@pytest.mark.parametrize("overrides,named", [
    ({"optim.lora.rank": -1}, "optim.lora.rank=-1"),
    ({"optim.lora.targets": ("q", "qkv")}, "'qkv', which is unknown: allowed are 'q', 'k'"),
    ({"optim.lora.targets": ()}, "optim.lora.targets=() is empty"),
    ({"optim.lora.dropout": 1.0}, "optim.lora.dropout=1.0"),
    ({"model.mlp": "plain", "optim.lora.targets": ("gate",)}, "its MLP is plain (no gate)"),
])
def test_bad_lora_settings_are_one_line_before_any_work(tmp_path, overrides, named):
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate_run(_config(**overrides), str(tmp_path / "run"))
  assert named in str(e.value) and "\n" not in str(e.value), str(e.value)
  assert not (tmp_path / "run").exists()
  with pytest.raises(ValueError, match="lora_rank=-1"):
    tiny.tiny_config(lora_rank=-1, lora_targets=("q",))


def test_resuming_with_other_adapters_is_one_line(run):
  base = {"model.init_from": str(run["base"])}
  for overrides, named in (({"optim.lora.rank": 8}, "optim.lora.rank=8 (saved: 4)"),
                           ({"optim.lora.rank": 0}, "optim.lora.rank=0 (saved: 4)"),
                           ({"optim.lora.targets": ("q",)}, "optim.lora.targets=['q']")):
    with pytest.raises(config_check.ConfigError) as e:
      config_check.validate_run(_config(**base, **overrides), str(run["workdir"]))
    assert named in str(e.value) and "\n" not in str(e.value), str(e.value)
  config_check.validate_run(_config(**base, **{"optim.lora.dropout": 0.0}), str(run["workdir"]))
