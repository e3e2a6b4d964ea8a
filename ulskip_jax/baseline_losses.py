"""The dynamic-depth baselines' training losses, with the fine-tuning step that takes any of them
(equal budget to ULS fine-tuning, see benchmarks/reproduce.py):
  * early exit (CALM): cross-entropy at every exit point, weighted by depth (CALM's weights),
    shared head; and its validation loss under teacher forcing, each token exiting at its own
    first confident exit point;
  * SkipDecode: the forward masks layer updates per token by the schedule (`masked_hidden`), which
    equals decoding (`baseline_decode.py`) exactly because of the monotone schedule.

Shapes: B batch rows, T sequence, D width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ulskip_jax import loss as loss_lib
from ulskip_jax.baseline_schedules import SkipDecodeSchedule, exit_layers
from ulskip_jax.model import Decoder

Array = jax.Array


# ----------------------------------------------------------------------------------------------
# Masked-depth forward (training and teacher-forced evaluation).

def masked_hidden(model: Decoder, tokens_BT, positions_BT, segment_ids_BT, runs_fn,
                  exit_fn=None):
  """Hidden states [B, T, D] where layer l updates token (b, t) only if `runs_fn(l, x)[b, t]`.

  A token that does not run layer l keeps its hidden state, and the layer's K/V for it are still
  computed from that state: exactly CALM's propagation of an exit state, and exactly what a
  token skipping lower layers in SkipDecode never exposes (no later token reads them).
  exit_fn(l, x), if given, is called after each layer with the updated hidden states (for
  exit-point losses and confidences).
  """
  x = model.embed_tokens(tokens_BT, positions_BT)
  for l, layer in enumerate(model.layers):
    runs = runs_fn(l, x)
    y, _ = layer(x, positions_BT, segment_ids_BT)
    x = jnp.where(runs[..., None], y, x)
    if exit_fn is not None:
      exit_fn(l, x)
  return x


def response_index(batch: dict) -> Array:
  """[B, T] index of each token within its segment's response (0 = the first target token fed
  back, i.e. decode step 0); -1 on prompt tokens and padding."""
  seg, prompt = batch["segment_ids"], batch["full_depth"]
  same = seg[:, :, None] == seg[:, None, :]
  prompt_len = jnp.sum(same & prompt[:, None, :], -1)  # prompt tokens in the token's segment
  return jnp.where(prompt | (seg == 0), -1, batch["positions"] - prompt_len)


def early_exit_loss_sums(params, graphdef, batch, exit_every: int):
  """CALM's training loss: sum over exit points j (and the last layer) of w_j * CE_j / sum w,
  w_j = number of layers before the exit; summed over response tokens, with their count."""
  model = nnx.merge(graphdef, params)
  L = model.cfg.num_layers
  points = exit_layers(L, exit_every) + (L - 1,)
  mask = batch["loss_mask"].astype(jnp.float32)
  total = []

  def at_exit(l, x):
    if l in points:
      total.append((l + 1) * loss_lib.model_xent_sums(model, x, batch["targets"], mask)[0])

  # Every token runs every layer (the prompt is full depth anyway).
  masked_hidden(model, batch["tokens"], batch["positions"], batch["segment_ids"],
                lambda l, x: jnp.ones(x.shape[:2], bool), at_exit)
  return sum(total) / sum(l + 1 for l in points), mask.sum()


def early_exit_teacher_forced_loss_sums(params, graphdef, batch, exit_every: int, threshold):
  """Validation loss of early exit under teacher forcing: each response token exits at its own
  first confident exit point (per token here: there is no batch of decode steps to agree on),
  later layers propagate its exit state (their K/V computed from it). Returns (loss sum, token
  count, layer sum over response tokens)."""
  model = nnx.merge(graphdef, params)
  L = model.cfg.num_layers
  points = set(exit_layers(L, exit_every))
  resp = batch["loss_mask"] > 0
  B, T = batch["tokens"].shape
  state = dict(exited=jnp.zeros((B, T), bool), layers=jnp.zeros((B, T), jnp.float32))

  def runs(l, x):
    r = ~state["exited"] | ~resp  # the prompt always runs every layer
    state["layers"] = state["layers"] + r
    return r

  def at_exit(l, x):
    if l in points:
      conf = jnp.max(jax.nn.softmax(model.unembed(x), -1), -1)
      state["exited"] = state["exited"] | (conf >= threshold)

  x = masked_hidden(model, batch["tokens"], batch["positions"], batch["segment_ids"], runs,
                    at_exit)
  xent = optax.softmax_cross_entropy_with_integer_labels(model.unembed(x), batch["targets"])
  mask = resp.astype(jnp.float32)
  return (xent * mask).sum(), mask.sum(), (state["layers"] * mask).sum()


def skipdecode_loss_sums(params, graphdef, batch, schedule: SkipDecodeSchedule):
  """Response cross-entropy with each response token running only its step's top layers."""
  model = nnx.merge(graphdef, params)
  L = model.cfg.num_layers
  depth_BT = jnp.where(response_index(batch) >= 0, schedule.depth(response_index(batch)), L)
  x = masked_hidden(model, batch["tokens"], batch["positions"], batch["segment_ids"],
                    lambda l, x: l >= L - depth_BT)
  return loss_lib.model_xent_sums(model, x, batch["targets"], batch["loss_mask"])


# ----------------------------------------------------------------------------------------------
# A generic fine-tuning step over any of the losses above (same optimizer and data as ULS).

def train_step(state: dict, batch: dict, *, graphdef, optimizer, loss_fn):
  """One AdamW update of `loss_fn(params, graphdef, batch) -> (loss sum, count)` per token."""
  def mean_loss(params):
    loss, count = loss_fn(params, graphdef, batch)
    return loss / jnp.maximum(count, 1.0)

  loss, grads = jax.value_and_grad(mean_loss)(state["params"])
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  return dict(params=params, opt_state=opt_state), dict(loss=loss)
