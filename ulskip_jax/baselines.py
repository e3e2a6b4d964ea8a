"""Dynamic-depth baselines for the ULS comparison: CALM-style early exit and SkipDecode.

Both decode greedily in the same shape of executable as `decode.generate`: left-padded prompts in
power-of-two buckets, one jitted prefill + `lax.while_loop`, a per-layer KV cache ([B, K, S, Hd]
per cached layer), the same EOS handling and `DecodeStats`. So tokens/s compare like for like
with ULS and the static plans, which run through `decode.generate` itself.

Early exit (Schuster et al. 2022, CALM). Exit points sit after every `exit_every`-th layer. At
each one the hidden state goes through final_norm + unembedding, and the step stops when the
top-1 softmax probability reaches `threshold`. The decision is BATCH-WIDE (as T5X CALM decodes):
the step exits when every live row (not finished, not a dummy) is confident. Per-row exit with
masking would change which tokens a row emits but save nothing: the remaining layers still run
on the whole [B, 1, D] tensor as long as one row needs them, so at batch > 1 it costs the full
depth every step. Batch-wide exit keeps the saving real, and its cost (a batch exits only when
its least confident row does) is exactly what the speed table at batch 1 / 8 / 32 shows. Layers
after the exit are not run, but their K/V for this token are computed from the exit hidden state
(CALM's state propagation: norm, K/V projection, RoPE; no attention, no MLP), so later tokens
find a full cache.

SkipDecode (Del Corro et al. 2023). One depth schedule for the whole batch: decode step s runs
the TOP `depth(s)` layers, and depth never grows with s. A token skips only lower layers, and
every later token skips at least the same ones, so each layer a token attends in is one that all
earlier tokens ran: the cache never has a hole. The schedule has a few levels (static skip
tuples), and one executable serves every step (`SkipDecode`: each layer under a `lax.cond`).

Training (equal budget to ULS fine-tuning, see benchmarks/reproduce.py):
  * early exit: cross-entropy at every exit point, weighted by depth (CALM's weights), shared head;
  * SkipDecode: the forward masks layer updates per token by the schedule (`masked_hidden`), which
    equals decoding exactly because of the monotone schedule.

Shapes: B batch rows, P prompt slots, N new-token slots, S = P + N cache slots, T sequence, D width,
V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ulskip_jax import engine, sampling
from ulskip_jax import loss as loss_lib
from ulskip_jax.kv_cache import KVCache, cache_bytes
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


def exit_layers(num_layers: int, exit_every: int) -> tuple[int, ...]:
  """Layer indices after which a token may exit (the last layer is not an exit point: a token
  that reaches it is done anyway)."""
  if not 1 <= exit_every < num_layers:
    raise ValueError(f"exit_every={exit_every} is out of range: allowed is 1 <= exit_every < "
                     f"num_layers={num_layers}")
  return tuple(range(exit_every - 1, num_layers - 1, exit_every))


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


# ----------------------------------------------------------------------------------------------
# SkipDecode's schedule.

@dataclasses.dataclass(frozen=True)
class SkipDecodeSchedule:
  """Decode step s runs the top depths[b] layers, b the last level with starts[b] <= s.

  depths strictly decrease and starts strictly increase from 0, so the skipped set only grows.
  Hashable: it is a static argument of the executable and of the training step.
  """
  num_layers: int
  starts: tuple[int, ...]
  depths: tuple[int, ...]

  def __post_init__(self):
    if not self.starts or self.starts[0] != 0 or len(self.starts) != len(self.depths):
      raise ValueError(f"starts={self.starts} must begin at 0 and match depths={self.depths}")
    if any(b <= a for a, b in zip(self.starts, self.starts[1:])):
      raise ValueError(f"starts={self.starts} must strictly increase")
    if any(b >= a for a, b in zip(self.depths, self.depths[1:])):
      raise ValueError(f"depths={self.depths} must strictly decrease (monotone schedule)")
    if not 1 <= self.depths[-1] <= self.depths[0] <= self.num_layers:
      raise ValueError(f"depths={self.depths} must lie in [1, num_layers={self.num_layers}]")

  def level(self, step):
    """Level index of decode step(s) `step` (int or array; negative = the prompt, level 0)."""
    return jnp.maximum(jnp.searchsorted(jnp.asarray(self.starts), step, side="right") - 1, 0)

  def depth(self, step):
    return jnp.asarray(self.depths)[self.level(step)]

  def skip(self, level: int) -> tuple[int, ...]:
    """The static skip tuple of a level: the lowest L - depth layers."""
    return tuple(range(self.num_layers - self.depths[level]))

  def mean_depth(self, num_steps: int) -> float:
    return float(np.mean([self.depths[int(self.level(s))] for s in range(num_steps)]))


def skipdecode_schedule(num_layers: int, ratio: float, horizon: int,
                        num_levels: int = 4) -> SkipDecodeSchedule:
  """A linear-decay schedule whose mean depth over the first `horizon` steps is L / ratio.

  Depths are `num_levels` values spread evenly from 1.5 m down to 0.5 m (m = L / ratio, clipped
  to [1, L], rounded, deduplicated), the shape of SkipDecode's linear decay quantised to a few
  static branches. Levels start with equal lengths; the first and last then trade steps until the
  mean over `horizon` steps is m (to a step). Past the horizon the last level continues, so a
  longer generation reaches a higher average ratio and a shorter one a lower: report the ratio
  measured on the data, not this nominal one.
  """
  L, m = num_layers, num_layers / ratio
  if not 1 <= m <= L:
    raise ValueError(f"ratio={ratio} is out of range: allowed is 1 <= ratio <= {L}")
  if horizon < num_levels:
    raise ValueError(f"horizon={horizon} is shorter than num_levels={num_levels}")
  hi, lo = min(L, round(1.5 * m)), max(1, round(0.5 * m))
  depths = sorted({round(hi - (hi - lo) * i / max(num_levels - 1, 1)) for i in range(num_levels)},
                  reverse=True)
  if len(depths) == 1:
    return SkipDecodeSchedule(L, (0,), tuple(depths))
  frac = np.full(len(depths), 1.0 / len(depths))
  shift = (np.dot(frac, depths) - m) / (depths[0] - depths[-1])
  frac[0] -= shift
  frac[-1] += shift
  frac = np.clip(frac, 1.0 / horizon, None)
  lengths = np.maximum(1, np.round(frac / frac.sum() * horizon)).astype(int)
  starts = tuple(int(s) for s in np.concatenate([[0], np.cumsum(lengths)[:-1]]))
  return SkipDecodeSchedule(L, starts, tuple(depths))


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


# ----------------------------------------------------------------------------------------------
# Decoding.

@dataclasses.dataclass
class DynamicStats(engine.DecodeStats):
  """DecodeStats plus the depth run: layers summed over the loop's steps (batch-wide: one count a
  step), and the steps; the first token comes from the full-depth prompt pass, not a step."""
  layer_steps: int = 0
  loop_steps: int = 0

  def ratio(self, num_layers: int) -> float:
    """L / mean layers run per decode step (1.0 when no step ran)."""
    return num_layers * self.loop_steps / self.layer_steps if self.layer_steps else 1.0


@flax.struct.dataclass
class DynamicState(engine.QueueState):
  """The loop state of early exit and SkipDecode (N new-token slots)."""
  t: Array            # [] loop steps so far, + 1
  cache: KVCache
  step_layers: Array  # [N] layers run by the step that produced token t


@dataclasses.dataclass(frozen=True)
class _Dynamic(engine.Queued):
  """Greedy decoding of static batches whose depth a step picks (`layers`: logits, cache, layers
  run) after a full-depth prompt that caches the `cached` top layers. The result is (tokens
  [B, N], layers run by the step that produced token t [N] (0 at t = 0: the prompt), steps)."""
  max_new_slots: int
  continuous = False
  plan = None  # the depth varies per step: no one plan (`DynamicStats.ratio` reports it)

  def start(self, model, x):
    P, N, L = x.prompts.shape[1], self.max_new_slots, model.cfg.num_layers
    cached_skip = tuple(range(L - self.cached(L)))
    logits, cache = engine.prefill(model, x.prompts, x.pad, P + N, skip=cached_skip,
                                   paper_mode=bool(cached_skip))
    return DynamicState(**self.start_queue(x, sampling.argmax(logits), N), t=jnp.int32(1),
                        cache=cache, step_layers=jnp.zeros((N,), jnp.int32))

  def step(self, model, x, s: DynamicState) -> DynamicState:
    slot = x.prompts.shape[1] + s.t - 1
    positions = (s.prompt_len + s.count - 1)[:, None]
    ones = jnp.ones(positions.shape, jnp.int32)
    h = model.embed_tokens(s.tok[:, None], positions)
    cache = s.cache.write_positions(positions, ones, slot)
    logits, cache, run = self.layers(model, x, s, h, positions, ones, cache, slot)
    s, _ = self.emit(x, s, sampling.argmax(logits)[:, None], ones[:, 0])
    return s.replace(t=s.t + 1, cache=cache, step_layers=s.step_layers.at[s.t].set(run))

  def result(self, x, s: DynamicState):
    return s.out, s.step_layers, s.t - 1

  def stats(self, cfg, x, stats, rest) -> DynamicStats:
    step_layers, loop_steps = rest
    L = cfg.num_layers
    cache = cache_bytes(cfg, x.prompts.shape[0], x.prompts.shape[1] + self.max_new_slots,
                        tuple(range(L - self.cached(L))))
    return DynamicStats(**dict(dataclasses.asdict(stats), cache_bytes=cache),
                        layer_steps=int(np.sum(step_layers)), loop_steps=int(loop_steps))


@dataclasses.dataclass(frozen=True)
class EarlyExit(_Dynamic):
  """Layers in segments of exit_every; after each exit point, the step stops once every live
  row's confidence reaches the threshold. Layers after the exit get K/V from the exit state
  (CALM's propagation). Segments run in `lax.cond`s that only read the cache (deferred layer
  caches); the writes follow outside, so XLA keeps them in place."""
  exit_every: int = 2

  def cached(self, L):
    return L

  def layers(self, model, x, s, h, positions, ones, cache: KVCache, slot):
    L, k = model.cfg.num_layers, self.exit_every
    points = exit_layers(L, k)
    exited, layers_run = jnp.array(False), jnp.int32(0)
    logits = jnp.zeros((h.shape[0], model.cfg.vocab_size), jnp.float32)
    for seg in [tuple(range(a, min(a + k, L))) for a in range(0, L, k)]:
      def run(h, view, seg=seg):
        new = []
        for j, l in enumerate(seg):
          h, kv = model.layers[l](h, positions, ones, view.layer(j, slot, deferred=True))
          new.append(kv)
        return h, tuple(new)

      def fill(h, view, seg=seg):  # norm, K/V projection, RoPE; [B, T, K, Hd] -> [B, K, T, Hd]
        kvs = [model.layers[l].attn.project_qkv(model.layers[l].attn_norm(h), positions)[1:]
               for l in seg]
        return h, tuple((kn.transpose(0, 2, 1, 3), vn.transpose(0, 2, 1, 3)) for kn, vn in kvs)

      if seg[0] == 0:  # no exit point before: the plain cached Block, as in decode.generate
        for l in seg:
          h, w = model.layers[l](h, positions, ones, cache.layer(l, slot))
          cache = cache.merge_view(KVCache((w.k,), (w.v,), w.pos), (l,))
      else:
        h, new = jax.lax.cond(exited, fill, run, h, cache.kept_view(seg))
        for l, (kn, vn) in zip(seg, new):
          cache = cache.write(l, kn, vn, slot)
      layers_run = layers_run + jnp.where(exited, 0, len(seg))
      if seg[-1] in points:
        def confidence(h, logits):
          exit_logits = model.unembed(h)[:, 0]
          conf = jnp.max(jax.nn.softmax(exit_logits, -1), -1)
          return jnp.all((conf >= x.threshold) | s.done), exit_logits

        exited, logits = jax.lax.cond(exited, lambda h, lg: (jnp.array(True), lg), confidence,
                                      h, logits)
    logits = jax.lax.cond(exited, lambda h, lg: lg, lambda h, lg: model.unembed(h)[:, 0], h,
                          logits)
    return logits, cache, layers_run


@dataclasses.dataclass(frozen=True)
class SkipDecode(_Dynamic):
  """The step's top layers; the cache holds the top depths[0] layers (all any level runs).

  Each cached layer sits in its own `lax.cond` (run it or skip it; deferred: the write follows).
  A `lax.switch` over the levels' skip tuples takes the same paths, but its branches share the
  cache operands, and XLA copied the layers some branches leave unread on every step. A skipped
  layer writes zeros into this token's slot: no later token runs that layer (monotone schedule).
  """
  schedule: SkipDecodeSchedule | None = None

  def cached(self, L):
    return self.schedule.depths[0]

  def layers(self, model, x, s, h, positions, ones, cache: KVCache, slot):
    sched, L = self.schedule, model.cfg.num_layers
    first_cached = L - sched.depths[0]
    depth = sched.depth(s.t - 1)
    kv_shape = (h.shape[0], model.cfg.num_kv_heads, 1, model.cfg.head_dim)
    for j in range(len(cache.k)):
      def run(h, view, layer=model.layers[first_cached + j]):
        return layer(h, positions, ones, view.layer(0, slot, deferred=True))

      def skip(h, view):
        return h, (jnp.zeros(kv_shape, h.dtype), jnp.zeros(kv_shape, h.dtype))

      h, (kn, vn) = jax.lax.cond(first_cached + j >= L - depth, run, skip, h,
                                 cache.kept_view((j,)))
      cache = cache.write(j, kn, vn, slot)
    return model.unembed(h)[:, 0], cache, depth


def _generate(model: Decoder, prompts, method: _Dynamic, **kw):
  """(ids per prompt, stats, layers run per loop step [N]) for a dynamic method."""
  outputs, (step_layers, _), stats = engine.run(
      method, model, engine.checked_inputs(model.cfg, prompts, **kw)[1])
  return outputs, stats, np.asarray(step_layers)


def early_exit_generate(model: Decoder, prompts: Sequence[Sequence[int]], *, threshold: float,
                        exit_every: int = 2, max_new_tokens: int, eos_id: int | None,
                        pad_id: int = 0) -> tuple[list[list[int]], DynamicStats]:
  """Greedy CALM-style early exit (see the module docstring); threshold is traced (0 = exit at
  the first exit point, > 1 = never exit). Returns (ids per prompt, EOS excluded; stats)."""
  exit_layers(model.cfg.num_layers, exit_every)
  method = EarlyExit(engine.bucket(max_new_tokens, engine.MIN_BUCKET), exit_every)
  return _generate(model, prompts, method, max_new_tokens=max_new_tokens, eos_id=eos_id,
                   pad_id=pad_id, threshold=threshold)[:2]


def skipdecode_generate(model: Decoder, prompts: Sequence[Sequence[int]], *,
                        schedule: SkipDecodeSchedule, max_new_tokens: int, eos_id: int | None,
                        pad_id: int = 0) -> tuple[list[list[int]], DynamicStats]:
  """Greedy SkipDecode with `schedule` (one batch-wide depth per decode step)."""
  if schedule.num_layers != model.cfg.num_layers:
    raise ValueError(f"schedule is for {schedule.num_layers} layers, the model has "
                     f"{model.cfg.num_layers}")
  method = SkipDecode(engine.bucket(max_new_tokens, engine.MIN_BUCKET), schedule=schedule)
  return _generate(model, prompts, method, max_new_tokens=max_new_tokens, eos_id=eos_id,
                   pad_id=pad_id)[:2]


def tune_threshold(model: Decoder, prompts, target_ratio: float, *, batch_size: int,
                   exit_every: int = 2, iterations: int = 8, **kw) -> tuple[float, float]:
  """Search the confidence threshold until early exit's measured ratio on `prompts` (at this
  batch size: the batch-wide decision depends on it) is closest to `target_ratio`.

  Returns (threshold, ratio reached). The ratio falls as the threshold rises; if even threshold
  0 (always the first exit point) stays below the target, that is what is returned.
  """
  L = model.cfg.num_layers

  def ratio(threshold):
    run = lambda chunk: early_exit_generate(model, chunk, threshold=threshold,
                                            exit_every=exit_every, **kw)
    return engine.in_chunks(run, prompts, batch_size, by_length=True)[1].ratio(L)

  best = (0.0, ratio(0.0))
  if best[1] <= target_ratio:
    return best
  # A top-1 probability lies in [1/V, 1]; a weak model's sit near 1/V, where a bisection on a
  # linear scale has no resolution (6 steps on [0, 1] jumped from 1.8x to 5.2x on a 12-layer model).
  return _log_bisect(ratio, target_ratio, 1.0 / model.cfg.vocab_size, 1.0, iterations, best)


def _log_bisect(ratio, target, lo, hi, iterations, best):
  """Geometric bisection of a decreasing ratio(threshold) on [lo, hi]; the closest (in log
  ratio) of `best` and every point tried."""
  for _ in range(iterations):
    mid = math.sqrt(lo * hi)
    r = ratio(mid)
    if abs(math.log(r / target)) < abs(math.log(best[1] / target)):
      best = (mid, r)
    lo, hi = (mid, hi) if r >= target else (lo, mid)
  return best
