"""Calibrated skip plans: score every layer on calibration text, then skip the lowest-scored.

Two methods (`METHODS`), both run as jitted forwards over the same calibration rows:

  kl_greedy        SLEB's greedy removal (Song et al., 2024), judged by the KL divergence to the
                   full-depth model's next-token distribution: remove the layer whose removal
                   raises the KL least, re-score every remaining candidate, repeat. A layer's
                   score is the step at which it went, so the scores nest: the plan at 3x skips
                   the 2x plan's layers and more.
  block_influence  ShortGPT's one-shot score (Men et al., 2024): 1 - cos(layer input, layer
                   output), averaged over the scored tokens of one full-depth forward.

Scoring many candidate plans with static skip tuples would compile one executable per candidate
(hundreds on a 30-layer model). Calibration instead runs the layers under a traced bool per layer
(`run_L`), each layer a `lax.cond`, so a skipped layer costs nothing and one executable scores every
candidate. A candidate differs from the current plan only from its layer on, so its forward starts
there, from the current plan's input to that layer (one forward per greedy step records them all),
which halves the work. The plan that comes out is a static tuple again (`skipping.LayerScores`):
training and decoding never see the gates.

The KL and the perplexity are measured on the scored tokens only (a row's response tokens, the
ones training's loss counts), unembedding just those. In paper mode (`paper=True`) a skipped layer
still runs on the prompt (full-depth) tokens, as training and decoding do; otherwise it is skipped
everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import time
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from ulskip_jax.model import Decoder
from ulskip_jax.skipping import CALIBRATION_METHODS, PLAN_FILE, LayerScores, read_plan, write_plan

METHODS = CALIBRATION_METHODS
_ROW_FIELDS = ("tokens", "targets", "positions", "segment_ids", "full_depth")


@dataclasses.dataclass(frozen=True)
class CalibrationText:
  """Rows of text in chunks of equal shape (one executable), with the tokens they score.

  Each chunk holds the batch fields (`batching.py`) of its rows plus `scored` [N], the flat indices
  (into rows x seq_len) of its scored tokens, and `weight` [N], 1 on a scored token, 0 on padding.
  """
  chunks: tuple[dict, ...]
  num_tokens: int  # scored tokens over all chunks
  sha256: str      # of every chunk's arrays: the same hash is the same calibration text


def calibration_text(batches: Iterable[dict], num_tokens: int) -> CalibrationText:
  """The first `num_tokens` response tokens (`loss_mask`) of `batches` (batching.Batcher's),
  scored; the rows that hold them are the context."""
  if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens <= 0:
    raise ValueError(f"calibration tokens={num_tokens!r} is invalid: it must be an int >= 1")
  rows, total = [], 0
  for batch in batches:
    mask = np.asarray(batch["loss_mask"]) > 0
    flat = np.flatnonzero(mask.reshape(-1))[:num_tokens - total]
    total += len(flat)
    rows.append((batch, flat))
    if total >= num_tokens:
      break
  if total == 0:
    raise ValueError("the calibration text has no response tokens: give training data")
  capacity = -(-max(len(flat) for _, flat in rows) // 128) * 128  # one shape for every chunk
  chunks, digest = [], hashlib.sha256()
  for batch, flat in rows:
    chunk = {k: np.asarray(batch[k]) for k in _ROW_FIELDS}
    chunk["scored"] = np.zeros(capacity, np.int32)
    chunk["scored"][:len(flat)] = flat
    chunk["weight"] = np.zeros(capacity, np.float32)
    chunk["weight"][:len(flat)] = 1.0
    for k in sorted(chunk):
      digest.update(k.encode() + np.ascontiguousarray(chunk[k]).tobytes())
    chunks.append(chunk)
  return CalibrationText(tuple(chunks), total, digest.hexdigest())


# ----------------------------------------------------------------------------------------------
# Jitted forwards under a traced per-layer gate.

def _run_layers(model: Decoder, x_BTD, chunk, run_L, start, paper: bool):
  """x after layers start, start+1, ... (layer i where run_L[i]; in paper mode a gated-off layer
  still runs on full-depth tokens), and each layer's input [L, B, T, D]."""
  positions, segment_ids = chunk["positions"], chunk["segment_ids"]
  full_depth = chunk["full_depth"][..., None]
  inputs = []
  for i, layer in enumerate(model.layers):
    inputs.append(x_BTD)

    def block(x, layer=layer):
      return layer(x, positions, segment_ids)[0]

    if paper:
      def gated(x, i=i, block=block):
        return jnp.where(run_L[i] | full_depth, block(x), x)
      x_BTD = jax.lax.cond(i >= start, gated, lambda x: x, x_BTD)
    else:
      x_BTD = jax.lax.cond((i >= start) & run_L[i], block, lambda x: x, x_BTD)
  return x_BTD, jnp.stack(inputs)


def _scored_log_probs(model: Decoder, x_BTD, scored_N):
  x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])[scored_N]
  return jax.nn.log_softmax(model.unembed(x_ND[None])[0], axis=-1)  # [N, V]


@functools.partial(jax.jit, static_argnames=("graphdef", "paper"))
def _reference(graphdef, state, chunk, *, paper: bool):
  """Full depth: log-probs [N, V] at the scored tokens, and per layer the summed cosine [L]
  between its input and its output there."""
  model = nnx.merge(graphdef, state)
  L = len(model.layers)
  x = model.embed_tokens(chunk["tokens"], chunk["positions"])
  x, inputs_LBTD = _run_layers(model, x, chunk, jnp.ones(L, bool), 0, paper)
  outputs_LBTD = jnp.concatenate([inputs_LBTD[1:], x[None]])
  flat = lambda a: a.reshape(L, -1, a.shape[-1])[:, chunk["scored"]]  # [L, N, D]
  a, b = flat(inputs_LBTD), flat(outputs_LBTD)
  cos_LN = jnp.sum(a * b, -1) / jnp.maximum(
      jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-30)
  return _scored_log_probs(model, x, chunk["scored"]), jnp.sum(cos_LN * chunk["weight"], -1)


@functools.partial(jax.jit, static_argnames=("graphdef", "paper"))
def _layer_inputs(graphdef, state, chunk, run_L, *, paper: bool):
  """Each layer's input [L, B, T, D] under the plan run_L."""
  model = nnx.merge(graphdef, state)
  x = model.embed_tokens(chunk["tokens"], chunk["positions"])
  return _run_layers(model, x, chunk, run_L, 0, paper)[1]


@functools.partial(jax.jit, static_argnames=("graphdef", "paper"))
def _divergence(graphdef, state, chunk, inputs_LBTD, start, run_L, reference_NV, *, paper: bool):
  """(summed KL(full depth || plan run_L), summed next-token NLL of the plan) over the scored
  tokens, running the layers from `start` on its recorded input."""
  model = nnx.merge(graphdef, state)
  x, _ = _run_layers(model, inputs_LBTD[start], chunk, run_L, start, paper)
  log_probs = _scored_log_probs(model, x, chunk["scored"])
  w = chunk["weight"]
  kl = jnp.sum(jnp.exp(reference_NV) * (reference_NV - log_probs), -1)
  targets = chunk["targets"].reshape(-1)[chunk["scored"]]
  nll = -jnp.take_along_axis(log_probs, targets[:, None], -1)[:, 0]
  return jnp.sum(kl * w), jnp.sum(nll * w)


class _Scorer:
  """The model split once, the calibration chunks on device and their full-depth references."""

  def __init__(self, model: Decoder, text: CalibrationText, paper: bool):
    self.graphdef, self.state = nnx.split(model)
    self.num_layers, self.paper = model.cfg.num_layers, paper
    self.text = text
    self.chunks = [{k: jnp.asarray(v) for k, v in c.items()} for c in text.chunks]
    refs = [_reference(self.graphdef, self.state, c, paper=paper) for c in self.chunks]
    self.references = [r for r, _ in refs]
    self.block_influence = 1.0 - np.sum([np.asarray(cos) for _, cos in refs], 0) / text.num_tokens

  def inputs(self, run_L) -> list:
    return [_layer_inputs(self.graphdef, self.state, c, jnp.asarray(run_L), paper=self.paper)
            for c in self.chunks]

  def divergence(self, inputs, start: int, run_L) -> tuple[float, float]:
    """Mean (KL to full depth, NLL) per scored token of plan run_L, from layer `start` on."""
    sums = [_divergence(self.graphdef, self.state, c, x, jnp.int32(start), jnp.asarray(run_L),
                        r, paper=self.paper)
            for c, x, r in zip(self.chunks, inputs, self.references)]
    kl, nll = np.sum([[float(a), float(b)] for a, b in sums], 0) / self.text.num_tokens
    return float(kl), float(nll)


def evaluate_plan(model: Decoder, text: CalibrationText, skips: Sequence[tuple[int, ...]],
                  paper: bool = True) -> list[dict]:
  """Per skip tuple: the mean KL to full depth and next-token NLL over `text`'s scored tokens."""
  scorer = _Scorer(model, text, paper)
  full = scorer.inputs(np.ones(scorer.num_layers, bool))
  out = []
  for skip in skips:
    run_L = np.ones(scorer.num_layers, bool)
    run_L[list(skip)] = False
    kl, nll = scorer.divergence(full, 0, run_L)
    out.append(dict(kl=kl, nll=nll))
  return out


# ----------------------------------------------------------------------------------------------
# Calibration.

def calibrate(model: Decoder, text: CalibrationText, method: str = "kl_greedy", *,
              paper: bool = True, keep: Sequence[int] = (), keep_ends: bool = True,
              max_ratio: float | None = None) -> LayerScores:
  """Per-layer scores of `model` on `text` (lower = skipped first); never-skipped layers (`keep`,
  and the first and last with `keep_ends`) score None. kl_greedy removes layers until the plan at
  `max_ratio` is known (None: every removable layer), the rest score None."""
  if method not in METHODS:
    raise ValueError(f"calibration method={method!r} is unknown: allowed are "
                     + ", ".join(repr(m) for m in METHODS))
  L = model.cfg.num_layers
  fixed = set(int(i) for i in keep) | ({0, L - 1} if keep_ends else set())
  removable = [i for i in range(L) if i not in fixed]
  start = time.perf_counter(), time.process_time()
  scorer = _Scorer(model, text, paper)
  scores: list[float | None] = [None] * L
  details = {}
  if method == "block_influence":
    for i in removable:
      scores[i] = round(float(scorer.block_influence[i]), 6)
  else:
    steps = len(removable) if max_ratio is None else min(len(removable), L - int(L / max_ratio))
    run_L = np.ones(L, bool)
    kls, forwards = [], 0
    for step in range(steps):
      inputs = scorer.inputs(run_L)
      best = None
      for j in (i for i in removable if run_L[i]):
        trial = run_L.copy()
        trial[j] = False
        kl, _ = scorer.divergence(inputs, j, trial)
        forwards += 1
        if best is None or kl < best[0]:  # the lower index on ties: deterministic
          best = (kl, j)
      run_L[best[1]] = False
      scores[best[1]] = step
      kls.append(round(best[0], 6))
      logging.info("calibration step %d: layer %d removed, KL %.4g", step, best[1], best[0])
    details = dict(removal_order=[scores.index(k) for k in range(steps)], kl_after_removal=kls,
                   candidate_forwards=forwards)
  wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
  calibration = dict(tokens=text.num_tokens, rows=sum(len(c["tokens"]) for c in text.chunks),
                     sha256=text.sha256, mode="paper" if paper else "everywhere", **details,
                     wall_s=round(wall, 1), cpu_s=round(cpu, 1))
  return LayerScores(L, method, tuple(scores), tuple(sorted(int(i) for i in keep)), calibration)


def run_ratios(config) -> tuple[float, ...]:
  """Every ratio a run trains or evaluates."""
  s = config.skip
  return tuple(float(r) for r in (tuple(s.ratios) or (s.ratio,)) + tuple(config.eval_ratios))


def resolve_plan(config, workdir: str, model_cfg, base_params, tok, train_pairs):
  """`config` with skip.plan_file naming the workdir's plan.json for a calibrated run (any other
  strategy: `config` itself). On a run's first start the file is skip.plan_file's plan, or
  calibrated on the training data (the base model, `base_params`); a resumed run reuses it."""
  s = config.skip
  if s.strategy != "calibrated":
    return config
  path = os.path.join(workdir, PLAN_FILE)
  if not os.path.isfile(path):
    if s.plan_file:
      layer_scores = read_plan(s.plan_file, model_cfg.num_layers)
    else:
      from ulskip_jax import batching
      cfg = dataclasses.replace(model_cfg, lora_rank=0, lora_targets=())
      model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
      state = nnx.state(model, nnx.Param)
      nnx.replace_by_pure_dict(state, base_params)
      nnx.update(model, state)
      batches = batching.Batcher.from_pairs(tok, config.data.template, train_pairs, 8,
                                            config.data.seq_len, pack=config.data.pack,
                                            seed=config.seed, repeat=False)
      text = calibration_text(batches, s.calibration_tokens)
      layer_scores = calibrate(model, text, s.calibration_method, paper=s.mode == "paper",
                               keep=tuple(s.keep), keep_ends=s.calibration_keep_ends,
                               # A sublayer unit's byte ratio can skip more blocks than the
                               # layer plan of that ratio skips layers: score every layer.
                               max_ratio=max(run_ratios(config)) if s.unit == "layer" else None)
    if jax.process_index() == 0:
      write_plan(path, layer_scores, sorted(set(run_ratios(config))))
  resolved = config.copy_and_resolve_references()
  resolved.skip.plan_file = os.path.abspath(path)
  return resolved
