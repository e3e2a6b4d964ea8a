"""Decoding with the dynamic-depth baselines of the ULS comparison: CALM-style early exit and
SkipDecode.

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
earlier tokens ran: the cache never has a hole. The schedule (`baseline_schedules.py`) has a few
levels (static skip tuples), and one executable serves every step (`SkipDecode`: each layer under
a `lax.cond`).

Their training losses are in `baseline_losses.py`; early exit's threshold search for a target
ratio in `early_exit_tuning.py`.

Shapes: B batch rows, P prompt slots, N new-token slots, S = P + N cache slots, T sequence, D width,
V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ulskip_jax import engine, sampling
from ulskip_jax.baseline_schedules import SkipDecodeSchedule, exit_layers
from ulskip_jax.kv_cache import KVCache, cache_bytes
from ulskip_jax.model import Decoder

Array = jax.Array


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
