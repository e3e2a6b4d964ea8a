"""A training workdir read back at realistic depth: load_for_inference, infer.py, save_pretrained.

Orbax's metadata keeps no key types, so a layer list restored without the model's own structure
comes back keyed '0', '1', '10', '2', ...: string order and numeric order agree below 11 layers,
which is why these tests use 11 (and one model of 101 layers).
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

import infer
from ulskip_jax import testing as tiny
from ulskip_jax import checkpoint as ckpt_lib
from ulskip_jax import decode, hf, train_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
from configs import tiny as tiny_config  # noqa: E402

LAYERS = 11


def _params(model) -> dict:
  return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _assert_same_params(got: dict, want: dict):
  flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  assert flat_got.keys() == flat_want.keys()
  wrong = [jax.tree_util.keystr(k) for k in flat_want
           if not np.array_equal(np.asarray(flat_got[k]), np.asarray(flat_want[k]))]
  assert not wrong, f"{len(wrong)} tensors differ, e.g. {wrong[:3]}"


def _run_config(**overrides):
  c = tiny_config.get_config()
  c.num_steps, c.model.num_layers, c.data.max_examples, c.data.seq_len = 3, LAYERS, 64, 48
  c.checkpoint.every, c.optim.lr = 100, 1e-2
  c.update_from_flattened_dict(overrides)
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """An 11-layer run from scratch, its final state kept in memory and saved to the workdir."""
  workdir = tmp_path_factory.mktemp("scratch")
  config = _run_config()
  trainer = train_lib.Trainer(config, str(workdir))
  state = trainer.restore_or_init()
  for step in range(config.num_steps):
    state, _ = trainer.step(state, next(trainer.batcher), step)
  trainer.save(state, config.num_steps, force=True)
  trainer.ckpt.wait()
  trainer.ckpt.close()
  model = nnx.merge(trainer.graphdef, jax.device_get(state["params"]))
  return workdir, model, trainer.tok, config


def test_workdir_restores_the_trained_params_exactly(trained):
  workdir, model, _, _ = trained
  restored, _ = ckpt_lib.load_for_inference(str(workdir))
  assert restored.cfg == model.cfg and restored.cfg.num_layers == LAYERS
  _assert_same_params(_params(restored), _params(model))


def test_a_step_folder_and_an_explicit_step_restore_the_same(trained):
  workdir, model, _, _ = trained
  step_folder = workdir / "checkpoints" / "3"
  for path, step in ((step_folder, None), (workdir, 3), (workdir / "checkpoints", 3)):
    restored, _ = ckpt_lib.load_for_inference(str(path), step)
    _assert_same_params(_params(restored), _params(model))
  with pytest.raises(ckpt_lib.CheckpointError, match="step 7 not in"):
    ckpt_lib.load_for_inference(str(workdir), 7)


def test_save_pretrained_of_a_workdir_equals_the_trained_model(trained, tmp_path):
  workdir, model, _, _ = trained
  restored, _ = ckpt_lib.load_for_inference(str(workdir))
  hf.save_pretrained(restored, tmp_path / "hf")
  reloaded, _ = hf.from_pretrained(tmp_path / "hf")
  _assert_same_params(_params(reloaded), _params(model))


def test_infer_on_a_workdir_equals_generate_on_the_trained_model(trained, tmp_path):
  workdir, model, tok, config = trained
  sources = ["In the beginning God created the heaven and the earth.", "Jesus wept.",
             "And the evening and the morning were the first day."]
  (tmp_path / "in.txt").write_text("".join(s + "\n" for s in sources))
  out = tmp_path / "out.txt"
  code = infer.main(["--checkpoint", str(workdir), "--input", str(tmp_path / "in.txt"),
                     "--output", str(out), "--ratio", "1,2", "--max-new-tokens", "8",
                     "--no-progress"])
  assert code == 0
  texts = [config.data.template.format(source=s) for s in sources]
  for ratio in (1, 2):
    want, _ = decode.generate_text(model, tok, texts, ratio=ratio, max_new_tokens=8)
    want = [" ".join(w.splitlines()).strip() for w in want]
    assert (tmp_path / f"out.r{ratio}.txt").read_text().splitlines() == want


def test_a_workdir_started_from_an_hf_folder_keeps_its_layers(tmp_path):
  """The issue's own case: init_from an 11-layer HF model, lr 0: the workdir equals the folder."""
  folder = tmp_path / "base"
  tiny.save_hf_model("llama", folder, num_layers=LAYERS, seed=3)
  tiny.save_tiny_tokenizer(folder)
  config = _run_config(**{"model.init_from": str(folder), "optim.lr": 0.0, "num_steps": 2,
                          "skip.full_depth_steps": 2})
  train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  restored, _ = ckpt_lib.load_for_inference(str(tmp_path / "run"))
  base, _ = hf.from_pretrained(folder)
  _assert_same_params(_params(restored), _params(base))


def test_a_hundred_and_one_layers_come_back_in_order(tmp_path):
  """restore_params against a target built from the meta, as load_for_inference does."""
  layers = {i: {"w": np.full((2,), float(i), np.float32)} for i in range(101)}
  with ckpt_lib.Checkpointer(tmp_path, async_=False) as ckpt:
    ckpt.save(1, {"layers": layers}, meta=dict(num_layers=101))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def target(meta):
    return {"layers": {i: {"w": jax.ShapeDtypeStruct((2,), np.float32, sharding=device)}
                       for i in range(meta["num_layers"])}}

  restored = ckpt_lib.restore_params(tmp_path, params_target=target)
  _assert_same_params(restored.params, {"layers": layers})
