"""benchmarks/train_speed.py's PyTorch peer is the same computation as our train step: on the
same weights and packed batch, the same loss before and after one clipped AdamW update."""

import importlib.util
import pathlib

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ulskip_jax import testing as tiny
import tolerance

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_speed", ROOT / "benchmarks" / "train_speed.py")
train_speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_speed)

# A learning rate large enough that one update moves the loss far beyond the tolerance, and a
# weight decay large enough that dropping it (or decaying the norms too) shows at step 2.
OPTIM = ml_collections.ConfigDict(dict(lr=1e-2, b1=0.9, b2=0.95, weight_decay=0.5,
                                       clip_norm=1.0))


def test_torch_loop_matches_our_step(tmp_path, one_torch_thread):
  model = tiny.tiny_model(seed=1)
  # Several examples per row and padding at the end of most rows: the block-diagonal mask and
  # per-segment positions are exercised.
  batch = train_speed.random_batch(4, 32, tiny.VOCAB, prompt_len=6, response_len=5)
  assert (batch["segment_ids"].max(1) > 1).all() and (batch["segment_ids"] == 0).any()

  graphdef, params = nnx.split(model, nnx.Param)
  tx = train_speed.optimizer(OPTIM)
  state = train_speed.jax_state(nnx.to_pure_dict(params), tx)
  step = train_speed.jax_step(graphdef, tx, paper=False)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  ours = []
  for _ in range(2):
    state, metrics = step(state, jbatch, ())
    ours.append(float(metrics["loss"]))

  torch_model = train_speed.torch_model(model, tmp_path / "hf")
  opt = train_speed.torch_optimizer(torch_model, OPTIM)
  inputs = train_speed.torch_inputs(batch)
  theirs = [train_speed.torch_step(torch_model, opt, inputs, OPTIM.clip_norm) for _ in range(2)]

  np.testing.assert_allclose(theirs[0], ours[0], **tolerance.close(1e-5))
  assert abs(ours[1] - ours[0]) > 0.05  # the update matters at this tolerance
  np.testing.assert_allclose(theirs[1], ours[1], **tolerance.close(1e-5))
