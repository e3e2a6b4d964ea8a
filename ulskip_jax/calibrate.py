"""Calibrated skip plans: score every layer (or block) on calibration text, then skip the
lowest-scored.

Two methods (`METHODS`), both run as jitted forwards over the same calibration rows:

  kl_greedy        SLEB's greedy removal (Song et al., 2024), judged by the KL divergence to the
                   full-depth model's next-token distribution: remove the layer whose removal
                   raises the KL least, re-score every remaining candidate, repeat. A layer's
                   score is the step at which it went, so the scores nest: the plan at 3x skips
                   the 2x plan's layers and more.
  block_influence  ShortGPT's one-shot score (Men et al., 2024): 1 - cos(layer input, layer
                   output), averaged over the scored tokens of one full-depth forward.

A sublayer unit (`skipping.Unit`) scores blocks instead of layers: the MLP blocks ("mlp"), the
attention blocks ("attention"), or both kinds at once ("sublayer", AdaSkip's separate choice),
where greedy removal takes the block that raises the KL least per weight byte it saves, since an
MLP block of a GQA model costs several attention blocks.

Scoring many candidate plans with static skip tuples would compile one executable per candidate
(hundreds on a 30-layer model). Calibration instead runs the blocks under a traced bool each
(`gates_2L`), each layer a `lax.cond`, so a skipped layer costs nothing and one executable scores
every candidate. A candidate differs from the current plan only from its layer on, so its forward
starts there, from the current plan's input to that layer (one forward per greedy step records them
all), which halves the work. The plan that comes out is a static tuple again
(`skipping.LayerScores`): training and decoding never see the gates.

The KL and the perplexity are measured on the scored tokens only (a row's response tokens, the
ones training's loss counts), unembedding just those. In paper mode (`paper=True`) a skipped block
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

from ulskip_jax.model import Decoder, layer_bytes
from ulskip_jax.skipping import (CALIBRATION_METHODS, PLAN_FILE, UNITS, LayerBytes, LayerScores,
                                 SkipPlan, Unit, as_plan, read_plan, write_plan)

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
# Jitted forwards under a traced gate per block: gates_2L[0, i] runs layer i's attention,
# gates_2L[1, i] its MLP.

def _run_layers(model: Decoder, x_BTD, chunk, gates_2L, start, paper: bool):
  """x after layers start, start+1, ... (each block where its gate is on; in paper mode a
  gated-off block still runs on full-depth tokens), and each layer's input [L, B, T, D]."""
  positions, segment_ids = chunk["positions"], chunk["segment_ids"]
  on_BT = chunk["full_depth"] if paper else jnp.zeros(positions.shape, bool)
  inputs = []
  for i, layer in enumerate(model.layers):
    inputs.append(x_BTD)

    def block(x, layer=layer, i=i):
      return layer(x, positions, segment_ids, attention=gates_2L[0, i] | on_BT,
                   mlp=gates_2L[1, i] | on_BT)[0]

    # A layer with both blocks off costs nothing where nothing of it runs (everywhere mode).
    runs = (i >= start) & (paper | gates_2L[0, i] | gates_2L[1, i])
    x_BTD = jax.lax.cond(runs, block, lambda x: x, x_BTD)
  return x_BTD, jnp.stack(inputs)


def _scored_log_probs(model: Decoder, x_BTD, scored_N):
  x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])[scored_N]
  return jax.nn.log_softmax(model.unembed(x_ND[None])[0], axis=-1)  # [N, V]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _reference(graphdef, state, chunk):
  """Full depth: log-probs [N, V] at the scored tokens, and the summed cosine over them between
  the input and the output of each layer [L] and of each block [2, L] (attention, MLP)."""
  model = nnx.merge(graphdef, state)
  positions, segment_ids = chunk["positions"], chunk["segment_ids"]
  x = model.embed_tokens(chunk["tokens"], positions)
  stages = [x]  # the input of every block, then the last output: [2L + 1]
  for layer in model.layers:
    x = layer(x, positions, segment_ids, mlp=False)[0]
    stages.append(x)
    x = layer(x, positions, segment_ids, attention=False)[0]
    stages.append(x)
  flat = jnp.stack(stages).reshape(len(stages), -1, x.shape[-1])[:, chunk["scored"]]  # [S, N, D]

  def summed_cos(a, b):
    cos = jnp.sum(a * b, -1) / jnp.maximum(
        jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-30)
    return jnp.sum(cos * chunk["weight"], -1)

  L = len(model.layers)
  layers = summed_cos(flat[0:-1:2], flat[2::2])                       # [L]
  blocks = summed_cos(flat[:-1], flat[1:]).reshape(L, 2).T             # [2, L]
  return _scored_log_probs(model, x, chunk["scored"]), layers, blocks


@functools.partial(jax.jit, static_argnames=("graphdef", "paper"))
def _layer_inputs(graphdef, state, chunk, gates_2L, *, paper: bool):
  """Each layer's input [L, B, T, D] under the plan gates_2L."""
  model = nnx.merge(graphdef, state)
  x = model.embed_tokens(chunk["tokens"], chunk["positions"])
  return _run_layers(model, x, chunk, gates_2L, 0, paper)[1]


@functools.partial(jax.jit, static_argnames=("graphdef", "paper"))
def _divergence(graphdef, state, chunk, inputs_LBTD, start, gates_2L, reference_NV, *,
                paper: bool):
  """(summed KL(full depth || plan gates_2L), summed next-token NLL of the plan) over the scored
  tokens, running the layers from `start` on its recorded input."""
  model = nnx.merge(graphdef, state)
  x, _ = _run_layers(model, inputs_LBTD[start], chunk, gates_2L, start, paper)
  log_probs = _scored_log_probs(model, x, chunk["scored"])
  w = chunk["weight"]
  kl = jnp.sum(jnp.exp(reference_NV) * (reference_NV - log_probs), -1)
  targets = chunk["targets"].reshape(-1)[chunk["scored"]]
  nll = -jnp.take_along_axis(log_probs, targets[:, None], -1)[:, 0]
  return jnp.sum(kl * w), jnp.sum(nll * w)


def _gates(plan: SkipPlan) -> np.ndarray:
  """[2, L] bools: which attention and which MLP blocks `plan` runs."""
  gates = np.zeros((2, plan.num_layers), bool)
  gates[0, list(plan.attention_layers)] = True
  gates[1, list(plan.mlp_layers)] = True
  return gates


class _Scorer:
  """The model split once, the calibration chunks on device and their full-depth references."""

  def __init__(self, model: Decoder, text: CalibrationText, paper: bool):
    self.graphdef, self.state = nnx.split(model)
    self.num_layers, self.paper = model.cfg.num_layers, paper
    self.text = text
    self.chunks = [{k: jnp.asarray(v) for k, v in c.items()} for c in text.chunks]
    refs = [_reference(self.graphdef, self.state, c) for c in self.chunks]
    self.references = [r for r, _, _ in refs]
    n = text.num_tokens
    # 1 - mean cosine between input and output: per layer [L], per block [2, L].
    self.layer_influence = 1.0 - np.sum([np.asarray(c) for _, c, _ in refs], 0) / n
    self.block_influence = 1.0 - np.sum([np.asarray(c) for _, _, c in refs], 0) / n

  def inputs(self, gates_2L) -> list:
    return [_layer_inputs(self.graphdef, self.state, c, jnp.asarray(gates_2L), paper=self.paper)
            for c in self.chunks]

  def divergence(self, inputs, start: int, gates_2L) -> tuple[float, float]:
    """Mean (KL to full depth, NLL) per scored token of plan gates_2L, from layer `start` on."""
    sums = [_divergence(self.graphdef, self.state, c, x, jnp.int32(start), jnp.asarray(gates_2L),
                        r, paper=self.paper)
            for c, x, r in zip(self.chunks, inputs, self.references)]
    kl, nll = np.sum([[float(a), float(b)] for a, b in sums], 0) / self.text.num_tokens
    return float(kl), float(nll)


def evaluate_plan(model: Decoder, text: CalibrationText,
                  skips: Sequence[SkipPlan | tuple[int, ...]], paper: bool = True) -> list[dict]:
  """Per plan (or tuple of skipped layers): the mean KL to full depth and next-token NLL over
  `text`'s scored tokens."""
  scorer = _Scorer(model, text, paper)
  full = scorer.inputs(np.ones((2, scorer.num_layers), bool))
  out = []
  for skip in skips:
    kl, nll = scorer.divergence(full, 0, _gates(as_plan(scorer.num_layers, skip)))
    out.append(dict(kl=kl, nll=nll))
  return out


# ----------------------------------------------------------------------------------------------
# Calibration.

def calibrate(model: Decoder, text: CalibrationText, method: str = "kl_greedy", *,
              paper: bool = True, keep: Sequence[int] = (), keep_ends: bool = True,
              max_ratio: float | None = None, unit: Unit = "layer",
              costs: LayerBytes | None = None) -> LayerScores:
  """Scores of `model`'s layers, or of its blocks of `unit` (attention and MLP both for
  "sublayer"), on `text` (lower = skipped first); never-skipped layers (`keep`, and the first and
  last with `keep_ends`) score None. kl_greedy removes until the plan at `max_ratio` is known (None:
  everything removable), the rest score None; a sublayer unit counts the ratio in weight bytes
  (`costs`, `model.layer_bytes(cfg)`), and "sublayer" removes the block that raises the KL least
  per byte it saves."""
  if method not in METHODS:
    raise ValueError(f"calibration method={method!r} is unknown: allowed are "
                     + ", ".join(repr(m) for m in METHODS))
  if unit not in UNITS:
    raise ValueError(f"unit={unit!r} is unknown: allowed are {', '.join(UNITS)}")
  if unit != "layer" and not isinstance(costs, LayerBytes):
    raise ValueError(f"unit={unit!r} calibrates by weight bytes: give costs=model.layer_bytes(cfg)")
  L = model.cfg.num_layers
  fixed = set(int(i) for i in keep) | ({0, L - 1} if keep_ends else set())
  # A candidate removes `blocks` (0 the attention block, 1 the MLP) of layer i.
  kinds = {"layer": [(0, 1)], "attention": [(0,)], "mlp": [(1,)], "sublayer": [(0,), (1,)]}[unit]
  removable = [(blocks, i) for blocks in kinds for i in range(L) if i not in fixed]
  index = lambda blocks, i: i + L if unit == "sublayer" and blocks == (1,) else i  # noqa: E731
  start = time.perf_counter(), time.process_time()
  scorer = _Scorer(model, text, paper)
  scores: list[float | None] = [None] * (2 * L if unit == "sublayer" else L)
  details = {}
  if method == "block_influence":
    for blocks, i in removable:
      value = (scorer.layer_influence[i] if len(blocks) == 2
               else scorer.block_influence[blocks[0], i])
      scores[index(blocks, i)] = round(float(value), 6)
  else:
    gates = np.ones((2, L), bool)
    last_step = L - int(L / max_ratio) if max_ratio is not None and unit == "layer" else None
    kls, order, forwards, current = [], [], 0, 0.0
    while True:
      candidates = [(b, i) for b, i in removable if gates[list(b), i].all()]
      reached = (max_ratio is not None and unit != "layer"
                 and costs.read_blocks(L, L) / costs.read_blocks(*gates.sum(1))
                 >= max_ratio - 1e-9)
      if not candidates or len(order) == last_step or reached:
        break
      inputs = scorer.inputs(gates)
      best = None
      for blocks, i in candidates:
        trial = gates.copy()
        trial[list(blocks), i] = False
        kl, _ = scorer.divergence(inputs, i, trial)
        # "sublayer": the KL added per byte saved (an MLP block reads several attention blocks'
        # bytes); else the KL. The earlier candidate on ties: deterministic.
        cost = ((kl - current) / (costs.mlp if blocks == (1,) else costs.attention)
                if unit == "sublayer" else kl)
        if best is None or cost < best[0]:
          best = (cost, kl, blocks, i)
      forwards += len(candidates)
      _, current, blocks, i = best
      gates[list(blocks), i] = False
      scores[index(blocks, i)] = len(order)
      logging.info("calibration step %d: %s %d removed, KL %.4g", len(order),
                   {(0, 1): "layer", (0,): "attention", (1,): "MLP"}[blocks], i, current)
      order.append(index(blocks, i))
      kls.append(round(current, 6))
    details = dict(removal_order=order, kl_after_removal=kls, candidate_forwards=forwards)
  wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
  calibration = dict(tokens=text.num_tokens, rows=sum(len(c["tokens"]) for c in text.chunks),
                     sha256=text.sha256, mode="paper" if paper else "everywhere", **details,
                     wall_s=round(wall, 1), cpu_s=round(cpu, 1))
  return LayerScores(L, method, tuple(scores), tuple(sorted(int(i) for i in keep)), calibration,
                     unit)


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
                               max_ratio=max(run_ratios(config)), unit=s.unit,
                               costs=layer_bytes(model_cfg))
    if jax.process_index() == 0:
      write_plan(path, layer_scores, sorted(set(run_ratios(config))), layer_bytes(model_cfg))
  resolved = config.copy_and_resolve_references()
  resolved.skip.plan_file = os.path.abspath(path)
  return resolved
