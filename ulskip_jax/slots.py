"""Decoding rows that requests enter and leave while the others decode: serving's engine.

A `SlotPool` holds one plan's persistent decode state (`SlotState`: B rows of a ring KV cache of
S slots, each row's next token, position, budget and sampling settings) and drives two jitted
pure functions over it, the shape of MaxText's prefill / insert / generate (JetStream):
- `start_row`: prefill one prompt (left padded to a bucket of P slots: one executable per
  bucket) into a free row and choose its first token;
- `decode_steps`: up to `steps` decode steps of every row in one `lax.while_loop` (one
  executable), returning the tokens each live row emitted.
Which request holds which row is the host's business (`server.py`'s scheduler): it starts rows,
reads back tokens and finished rows after each call, and stops rows (a cancelled request, a stop
string) through the `stop_B` argument of the next call. The state is donated, so XLA updates
the cache in place.

Ring: decode step g writes every row's token at slot g % S (one shared write, as
`decode.Sample`); a prompt started at step g sits at slots [g - P, g) % S. A row lives
prompt_len + max_new - 1 slots, so `check_request` (<= S) keeps it from wrapping onto itself;
attention masks by the positions the cache keeps per slot, so slot order does not matter.

A plan runs the prompt at full depth (paper mode) and the generated tokens through its kept
layers, as `decode.generate(..., ratio=r)` does, so a greedy request gets the tokens `generate`
gives its prompt alone. `SpeculativePool` is the lossless plan: `speculative.Speculative`'s
rounds (draft k with the sub-model, verify at full depth, commit per row) over the same kind of
host-started rows, giving the full model's greedy tokens.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ulskip_jax import engine, sampling
from ulskip_jax.decode import one_token
from ulskip_jax.kv_cache import KVCache, init_cache
from ulskip_jax.skipping import SkipPlan, as_plan
from ulskip_jax.speculative import Speculative, SpeculativeState

Array = jax.Array

# Executables built here, one per (function, plan, shapes, compiler options); see num_compiles.
EXECUTABLES: dict[tuple, Any] = {}


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static part of a pool: the layers its generated tokens run, and its special ids."""
  skip: SkipPlan
  paper_mode: bool   # the prompt runs every layer (only the kept ones keep K/V)
  eos_id: int        # -1: none
  pad_id: int


@flax.struct.dataclass
class SlotState:
  """B rows decoding independently in one ring cache of S slots."""
  cache: KVCache        # [B] rows of S ring slots, kept layers only
  step: Array           # [] the next decode step writes slot step % S
  tok: Array            # [B] int32 the row's next input (its last token)
  pos: Array            # [B] int32 that token's position
  count: Array          # [B] int32 tokens the row has generated
  max_new: Array        # [B] int32 its budget
  done: Array           # [B] bool: nothing to generate (finished, stopped or free)
  temperature: Array    # [B] float32, 0 = greedy
  top_p: Array          # [B] float32, 1 = off
  seed: Array           # [B] uint32: token c of a row is drawn with fold_in(key(seed), c)


def init_state(cfg, rows: int, num_slots: int, skip: SkipPlan, pad_id: int) -> SlotState:
  """Every row free."""
  zeros = lambda: jnp.zeros((rows,), jnp.int32)  # distinct buffers: the state is donated
  return SlotState(cache=init_cache(cfg, rows, num_slots, skip), step=jnp.int32(0),
                   tok=zeros() + pad_id, pos=zeros(), count=zeros(), max_new=zeros(),
                   done=jnp.ones((rows,), bool), temperature=jnp.zeros((rows,), jnp.float32),
                   top_p=jnp.ones((rows,), jnp.float32), seed=jnp.zeros((rows,), jnp.uint32))


def choose(logits_BV: Array, temperature_B: Array, top_p_B: Array, seed_B: Array,
           count_B: Array) -> Array:
  """Each row's next token: argmax where temperature is 0, else drawn with the row's own key
  (so a seeded request samples the same tokens in any row, next to any other requests). The
  sort that top-p needs runs only when some row asks for it."""
  greedy = sampling.argmax(logits_BV)

  def draw(_):
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seed_B, count_B)
    temperature = jnp.maximum(temperature_B, 1e-6)[:, None]
    logits = jax.lax.cond(jnp.any(top_p_B < 1),
                          lambda: sampling.filtered_logits(logits_BV, temperature,
                                                           top_p=top_p_B[:, None]),
                          lambda: logits_BV / temperature)
    sampled = jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
    return jnp.where(temperature_B > 0, sampled, greedy)

  return jax.lax.cond(jnp.any(temperature_B > 0), draw, lambda _: greedy, None)


def start_row(graphdef, params, state: SlotState, prompt_1P: Array, prompt_len: Array,
              row: Array, max_new: Array, temperature: Array, top_p: Array, seed: Array, *,
              plan: Plan) -> tuple[SlotState, Array]:
  """state with the prompt (its prompt_len tokens left padded to P) prefilled into `row`, and
  its first token []."""
  model = nnx.merge(graphdef, params)
  P, S = prompt_1P.shape[1], state.cache.pos.shape[1]
  logits, prompt_cache = engine.prefill(model, prompt_1P, P - prompt_len[None], P,
                                        skip=plan.skip, paper_mode=plan.paper_mode)
  tok = choose(logits, temperature[None], top_p[None], seed[None], jnp.zeros((1,), jnp.int32))[0]
  put = lambda a, v: a.at[row].set(v)
  return state.replace(
      cache=state.cache.insert(row, prompt_cache, (state.step - P) % S),
      tok=put(state.tok, tok), pos=put(state.pos, prompt_len), count=put(state.count, 1),
      max_new=put(state.max_new, max_new),
      done=put(state.done, (tok == plan.eos_id) | (max_new <= 1)),
      temperature=put(state.temperature, temperature), top_p=put(state.top_p, top_p),
      seed=put(state.seed, seed)), tok


def decode_steps(graphdef, params, state: SlotState, stop_B: Array, *, plan: Plan,
                 steps: int) -> tuple[SlotState, Array, Array]:
  """Rows in stop_B marked done, then up to `steps` decode steps of every row (fewer once all
  are done): (state, tokens [B, steps], emitted [B, steps] bool: the live rows' new tokens)."""
  model = nnx.merge(graphdef, params)
  B, S = state.tok.shape[0], state.cache.pos.shape[1]

  def step(carry):
    i, s, tokens, emitted = carry
    logits, cache = one_token(model, plan.skip, s.tok, s.pos, s.cache, s.step % S)
    tok = choose(logits, s.temperature, s.top_p, s.seed, s.count)
    live = ~s.done
    count = s.count + live
    s = s.replace(cache=cache, step=s.step + 1, tok=jnp.where(live, tok, s.tok),
                  pos=s.pos + live, count=count,
                  done=s.done | (tok == plan.eos_id) | (count >= s.max_new))
    return (i + 1, s, tokens.at[:, i].set(jnp.where(live, tok, plan.pad_id)),
            emitted.at[:, i].set(live))

  start = (jnp.int32(0), state.replace(done=state.done | stop_B),
           jnp.full((B, steps), plan.pad_id, jnp.int32), jnp.zeros((B, steps), bool))
  _, state, tokens, emitted = jax.lax.while_loop(
      lambda c: (c[0] < steps) & jnp.any(~c[1].done), step, start)
  return state, tokens, emitted


def num_compiles() -> int:
  """Executables built so far by every pool (a server must build none after its warm-up)."""
  return len(EXECUTABLES)


def _compiled(fn, static: dict, *args):
  """fn's executable for these arguments' shapes (the state donated), built once."""
  graphdef, *arrays = args
  key = (fn.__name__, tuple(sorted(static.items())), graphdef, jax.tree.structure(arrays),
         tuple((a.shape, a.dtype) for a in jax.tree.leaves(arrays)),
         tuple(sorted(engine.COMPILER_OPTIONS.items())))
  if key not in EXECUTABLES:
    EXECUTABLES[key] = jax.jit(fn, static_argnames=("graphdef", *static),
                               donate_argnames="state").lower(*args, **static).compile(
                                   dict(engine.COMPILER_OPTIONS))
  return EXECUTABLES[key]


class SlotPool:
  """One plan's rows and state. Not thread safe: one host thread drives it.

  rows: B; num_slots: S, the longest prompt + max_new - 1 a row can hold; steps: decode steps
  per `step` call (more: fewer host round trips; fewer: finer-grained admission and stops).
  """

  def __init__(self, model, *, skip: SkipPlan | tuple[int, ...], paper_mode: bool = True,
               rows: int, num_slots: int, eos_id: int | None, pad_id: int = 0, steps: int = 4):
    self.cfg = model.cfg
    self.graphdef, self.params = nnx.split(model)
    skip = as_plan(self.cfg.num_layers, skip)
    self.plan = Plan(skip=skip, paper_mode=paper_mode and not skip.is_full,
                     eos_id=-1 if eos_id is None else int(eos_id), pad_id=int(pad_id))
    self.rows, self.num_slots, self.steps = rows, num_slots, steps
    if num_slots > self.cfg.max_position:
      raise ValueError(f"num_slots={num_slots} is more than the model's {self.cfg.max_position} "
                       "positions")
    self.state = init_state(self.cfg, rows, num_slots, self.plan.skip, self.plan.pad_id)
    # Prompt buckets: powers of two from MIN_BUCKET, the last one S: half as many shapes to warm
    # up at startup as `generate`'s half steps (`engine.prompt_bucket`), for more padding.
    self.buckets = sorted({min(2 ** i, num_slots) for i in range(
        engine.MIN_BUCKET.bit_length() - 1, num_slots.bit_length() + 1)})
    self._stop = np.zeros((rows,), bool)

  def check_request(self, prompt_len: int, max_new: int) -> None:
    """One-line ValueError when a row cannot hold this prompt and budget."""
    if prompt_len < 1:
      raise ValueError("the prompt is empty: give at least one token")
    if prompt_len + max_new - 1 > self.num_slots:
      raise ValueError(f"the prompt has {prompt_len} tokens; with max_tokens={max_new} it needs "
                       f"{prompt_len + max_new - 1} positions but this server allows "
                       f"{self.num_slots}: shorten it or lower max_tokens")

  def _start_args(self, P: int):
    s = lambda dtype: np.zeros((), dtype)
    return (self.graphdef, self.params, self.state, np.zeros((1, P), np.int32), s(np.int32),
            s(np.int32), s(np.int32), s(np.float32), s(np.float32), s(np.uint32))

  def warm_up(self) -> float:
    """Builds every executable the pool can need (each prompt bucket's start_row and
    decode_steps): the seconds it took."""
    start = time.perf_counter()
    for P in self.buckets:
      _compiled(start_row, dict(plan=self.plan), *self._start_args(P))
    _compiled(decode_steps, dict(plan=self.plan, steps=self.steps), self.graphdef, self.params,
              self.state, self._stop)
    return time.perf_counter() - start

  def start(self, row: int, prompt: list[int], *, max_new: int, temperature: float = 0.0,
            top_p: float = 1.0, seed: int = 0) -> int:
    """Prefills `prompt` into free row `row`: its first token (the row is done after it when
    that is EOS or max_new is 1)."""
    self.check_request(len(prompt), max_new)
    P = next(b for b in self.buckets if b >= len(prompt))
    prompt_1P = np.full((1, P), self.plan.pad_id, np.int32)
    prompt_1P[0, P - len(prompt):] = prompt
    args = list(self._start_args(P))
    args[3:] = (prompt_1P, np.int32(len(prompt)), np.int32(row), np.int32(max_new),
                np.float32(temperature), np.float32(top_p), np.uint32(seed % 2**32))
    self.state, tok = _compiled(start_row, dict(plan=self.plan), *args)(*args[1:])
    self._stop[row] = False
    return int(tok)

  def stop(self, row: int) -> None:
    """The row generates nothing more from the next `step` on (its slot is free then)."""
    self._stop[row] = True

  def step(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Up to `steps` decode steps of every row: (tokens [B, steps], emitted [B, steps], done [B])
    on the host."""
    # A fresh array for the next step's stops: on the CPU the executable may read the one passed
    # here in place, after this call has returned (clearing it in place raced with that read).
    stop, self._stop = self._stop, np.zeros_like(self._stop)
    args = (self.graphdef, self.params, self.state, stop)
    static = dict(plan=self.plan, steps=self.steps)
    self.state, tokens, emitted = _compiled(decode_steps, static, *args)(*args[1:])
    tokens, emitted, done = jax.device_get((tokens, emitted, self.state.done))
    return tokens, emitted, done


# ----------------------------------------------------------------------------------------------
# Lossless: self-speculative decoding (`speculative.Speculative`) over the same kind of rows.

@flax.struct.dataclass
class SpeculativeSlots:
  """The rows of a lossless pool: `speculative.Speculative`'s loop state, one request a row
  (row b writes its tokens to out[b]), and each row's budget."""
  spec: SpeculativeState
  max_new: Array  # [B] int32


def _queue_inputs(prompts, pad, max_new, plan: Plan) -> engine.Inputs:
  """The `engine.Inputs` a `Speculative` step reads for one row per request: greedy, so the
  key and the sampling fields are unused."""
  return engine.Inputs(prompts=prompts, pad=pad, rows=jnp.ones(prompts.shape[:1], bool),
                       num_prompts=jnp.int32(prompts.shape[0]), max_new=max_new,
                       eos_id=jnp.int32(plan.eos_id), pad_id=jnp.int32(plan.pad_id),
                       rng=jax.random.key_data(jax.random.key(0)),
                       temperature=jnp.float32(1), top_p=jnp.float32(1),
                       length_penalty=jnp.float32(1), threshold=jnp.float32(0))


def init_speculative(cfg, strategy: Speculative, rows: int, num_slots: int,
                     pad_id: int) -> SpeculativeSlots:
  """Every row free. Row layout (`speculative.py`): the prompt at [0, P), generated tokens from
  num_slots on, then k committed spares and k + 1 scratch slots."""
  k = strategy.num_draft_tokens
  zeros = lambda: jnp.zeros((rows,), jnp.int32)
  # count 1 in a free row, as `engine.Queued.start_queue` has it: with 0 a round would commit
  # its (empty) tokens at slot num_slots - 1, where a prompt started later may end.
  spec = SpeculativeState(
      out=jnp.full((rows, strategy.max_new_slots + k + 1), pad_id, jnp.int32),
      owner=jnp.arange(rows, dtype=jnp.int32), next_prompt=jnp.int32(0), prompt_len=zeros(),
      count=zeros() + 1, tok=zeros() + pad_id, done=jnp.ones((rows,), bool), rnd=jnp.int32(1),
      cache=init_cache(cfg, rows, 2 * num_slots + 2 * k + 1), draft_cache=None,
      carry_tok=zeros(), carry_valid=jnp.zeros((rows,), bool), accepted=jnp.int32(0),
      drafted=jnp.int32(0), last_commit=(zeros(), zeros() + num_slots, zeros()))
  return SpeculativeSlots(spec=spec, max_new=zeros())


def start_speculative_row(graphdef, params, state: SpeculativeSlots, prompt_1P: Array,
                          prompt_len: Array, row: Array, max_new: Array, *, plan: Plan,
                          strategy: Speculative) -> tuple[SpeculativeSlots, Array]:
  """`start_row` for a lossless pool (greedy): `Speculative.refill` into `row`. The row's
  pending commit (its last request's) is dropped first: it would move that request's scratch
  K/V into the new one's slots."""
  model = nnx.merge(graphdef, params)
  P = prompt_1P.shape[1]
  pad_1 = P - prompt_len[None]
  count, dest, first = state.spec.last_commit
  spec = state.spec.replace(last_commit=(count.at[row].set(0), dest, first))
  spec = strategy.refill(model, _queue_inputs(prompt_1P, pad_1, max_new, plan), spec, row, row,
                         prompt_1P, pad_1)
  return SpeculativeSlots(spec=spec, max_new=state.max_new.at[row].set(max_new)), spec.tok[row]


def speculative_steps(graphdef, params, state: SpeculativeSlots, stop_B: Array, *, plan: Plan,
                      strategy: Speculative, steps: int) -> SpeculativeSlots:
  """Rows in stop_B marked done, then up to `steps` rounds (draft k, verify) of every row."""
  model = nnx.merge(graphdef, params)
  B, S = state.max_new.shape[0], strategy.max_new_slots
  x = _queue_inputs(jnp.zeros((B, S), jnp.int32), jnp.zeros((B,), jnp.int32), state.max_new,
                    plan)
  start = (jnp.int32(0), state.spec.replace(done=state.spec.done | stop_B))
  _, spec = jax.lax.while_loop(lambda c: (c[0] < steps) & jnp.any(~c[1].done),
                               lambda c: (c[0] + 1, strategy.step(model, x, c[1])), start)
  return state.replace(spec=spec)


class SpeculativePool(SlotPool):
  """A lossless pool: the full model's greedy tokens, drafted by the ULS sub-model of
  `draft_skip` and verified k at a time (`speculative.Speculative`, shared cache). Greedy only:
  its rows share one verify pass, whose sampling settings are the executable's."""

  def __init__(self, model, *, draft_skip: SkipPlan | tuple[int, ...], num_draft_tokens: int = 4,
               rows: int, num_slots: int, eos_id: int | None, pad_id: int = 0, steps: int = 4):
    super().__init__(model, skip=(), rows=rows, num_slots=num_slots, eos_id=eos_id,
                     pad_id=pad_id, steps=steps)
    self.strategy = Speculative(draft=as_plan(self.cfg.num_layers, draft_skip),
                                num_draft_tokens=num_draft_tokens,
                                shared_cache=True, paper_mode=True, max_new_slots=num_slots)
    self.state = init_speculative(self.cfg, self.strategy, rows, num_slots, self.plan.pad_id)
    self._read = np.zeros((rows,), np.int64)  # tokens of each row's out already handed out

  def _static(self, **kw):
    return dict(plan=self.plan, strategy=self.strategy, **kw)

  def _start_args(self, P: int):
    s = np.zeros((), np.int32)
    return (self.graphdef, self.params, self.state, np.zeros((1, P), np.int32), s, s, s)

  def warm_up(self) -> float:
    start = time.perf_counter()
    for P in self.buckets:
      _compiled(start_speculative_row, self._static(), *self._start_args(P))
    _compiled(speculative_steps, self._static(steps=self.steps), self.graphdef, self.params,
              self.state, self._stop)
    return time.perf_counter() - start

  def start(self, row: int, prompt: list[int], *, max_new: int, temperature: float = 0.0,
            top_p: float = 1.0, seed: int = 0) -> int:
    if temperature > 0:
      raise ValueError(f"temperature={temperature:g}: the lossless plan decodes greedily (the "
                       "full model's argmax); give temperature 0")
    self.check_request(len(prompt), max_new)
    P = next(b for b in self.buckets if b >= len(prompt))
    prompt_1P = np.full((1, P), self.plan.pad_id, np.int32)
    prompt_1P[0, P - len(prompt):] = prompt
    args = (self.graphdef, self.params, self.state, prompt_1P, np.int32(len(prompt)),
            np.int32(row), np.int32(max_new))
    self.state, tok = _compiled(start_speculative_row, self._static(), *args)(*args[1:])
    self._stop[row], self._read[row] = False, 1
    return int(tok)

  def step(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    stop, self._stop = self._stop, np.zeros_like(self._stop)  # as in SlotPool.step
    args = (self.graphdef, self.params, self.state, stop)
    self.state = _compiled(speculative_steps, self._static(steps=self.steps), *args)(*args[1:])
    out, count, done = jax.device_get((self.state.spec.out, self.state.spec.count,
                                       self.state.spec.done))
    new = np.maximum(count - self._read, 0)
    width = max(1, int(new.max()))
    j = np.arange(width)
    emitted = j[None] < new[:, None]
    index = np.minimum(self._read[:, None] + j[None], out.shape[1] - 1)
    tokens = np.where(emitted, np.take_along_axis(out, index, 1), self.plan.pad_id)
    self._read = np.maximum(self._read, count)
    return tokens, emitted, done
