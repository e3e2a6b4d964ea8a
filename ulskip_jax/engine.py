"""The decoding engine: what every strategy shares, and the one loop they all run.

A strategy (greedy, sampling and beams in `decode.py`; `speculative.py`; early exit and SkipDecode
in `baseline_decode.py`) is a frozen dataclass of its static options with `start` (its named loop
state after the prefill), `step`, `running` and `result`. `decode_loop` runs it as one
`lax.while_loop` in one executable per (strategy, model structure, shapes, compiler options),
built once. The engine holds the rest: checks, buckets, left padding, the prefill, the prompt
queue, trimming after EOS and the stats, so adding a strategy is one class in one file.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import operator
import time
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from ulskip_jax.checks import as_choice, as_float, as_int
from ulskip_jax.kv_cache import init_cache
from ulskip_jax.skipping import SkipPlan, resolve

Array = jax.Array
MIN_BUCKET = 16
QUEUE_ROUNDS = 32  # prompts per row in one continuous-batching call

# Every call with the same strategy, model structure and buckets reuses one executable.
EXECUTABLES: dict[tuple, Any] = {}

# XLA options for every executable built here. Tests of tiny models set fast-compile options
# (xla_backend_optimization_level=0 builds about 3x faster on CPU; the run time is negligible).
COMPILER_OPTIONS: dict[str, Any] = {}


@dataclasses.dataclass
class DecodeStats:
  """Counts and timings of one or more `generate` calls (add them with `+`). generated_tokens:
  the tokens the model produced, each prompt's EOS included. wall_s: the execution time (host to
  device and back), without compile_s. cache_bytes: the largest KV cache allocated. plan: the
  layers the generated tokens ran (the strategy's own, not re-derived; None for per-step depth,
  or for a sum over different plans)."""
  prompt_tokens: int = 0
  generated_tokens: int = 0
  wall_s: float = 0.0
  compile_s: float = 0.0
  cache_bytes: int = 0
  executables_built: int = 0
  calls: int = 0
  plan: SkipPlan | None = None

  def __add__(self, other: DecodeStats) -> DecodeStats:
    """Counts and times add up, cache sizes take the larger, a plan stays if both ran it (or one
    side is an empty sum: calls 0); a subclass's fields count 0 (plans None) here."""
    rich = self if isinstance(self, type(other)) else other

    def merge(name):
      if name.endswith("plan"):
        a, b = getattr(self, name, None), getattr(other, name, None)
        return b if not self.calls else a if not other.calls or a == b else None
      return (max if name.endswith("cache_bytes") else operator.add)(
          getattr(self, name, 0), getattr(other, name, 0))

    return type(rich)(**{f.name: merge(f.name) for f in dataclasses.fields(rich)})

  @property
  def generated_tokens_per_s(self) -> float:
    return self.generated_tokens / self.wall_s if self.wall_s else 0.0

  @property
  def total_tokens_per_s(self) -> float:
    """(prompt + generated) tokens per second, the throughput the ULS paper reports."""
    return (self.prompt_tokens + self.generated_tokens) / self.wall_s if self.wall_s else 0.0

  def as_dict(self) -> dict[str, Any]:
    """The fields and the properties (a subclass's too)."""
    names = [n for n in dir(type(self)) if isinstance(getattr(type(self), n), property)]
    return dict(dataclasses.asdict(self), **{n: getattr(self, n) for n in names})


def num_compiles(*modules: str) -> int:
  """Executables built so far by the strategies of these modules (e.g. "ulskip_jax.decode")."""
  return sum(1 for key in EXECUTABLES if not modules or key[0].rsplit(".", 1)[0] in modules)


def bucket(n: int, minimum: int = 1) -> int:
  """The next power of two >= max(n, minimum)."""
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def prompt_bucket(n: int) -> int:
  """The prompt slots for a longest prompt of n tokens: the next of MIN_BUCKET, then powers of two
  and 1.5x powers of two (16, 24, 32, 48, 64, 96, 128, ...) >= n. The prefill's work grows with
  the slots, padding included: a power-of-two bucket alone pads up to 2x (96 tokens to 128)."""
  p = bucket(n, MIN_BUCKET)
  return p * 3 // 4 if p > MIN_BUCKET and n <= p * 3 // 4 else p


def prefill(model, prompt_BP, pad_B, num_slots: int, *, skip: SkipPlan, paper_mode: bool):
  """Run left-padded prompts, filling a fresh cache of `num_slots` slots for the plan's kept
  layers: (last-position logits [B, V], cache). paper_mode: the prompt runs every layer (only the
  kept ones keep K/V); otherwise it skips the same layers as the generated tokens."""
  B, P = prompt_BP.shape
  positions = jnp.arange(P, dtype=jnp.int32)[None] - pad_B[:, None]
  cache = init_cache(model.cfg, B, num_slots, skip)
  x, cache = model.hidden(prompt_BP, skip=skip, positions_BT=positions,
                          segment_ids_BT=(positions >= 0).astype(jnp.int32),
                          full_depth_BT=True if paper_mode else None, cache=cache, cache_index=0)
  return model.unembed(x[:, -1:])[:, 0], cache


# ----------------------------------------------------------------------------------------------
# Checked prompts and options (every strategy's), before anything is built or run.

_TEXT_HINT = "give token ids (e.g. tokenizer.encode(text)), or call generate_text with strings"


def check_prompts(cfg, prompts, max_new_tokens: int) -> list[np.ndarray]:
  """The prompts as int32 arrays, each checked: token ids (not text), not empty, every id in
  [0, vocab_size) (a larger id reads past the embedding, a negative one wraps), and room for
  max_new_tokens (checked) after it. Lists, tuples and integer arrays (numpy or JAX) are
  accepted."""
  if isinstance(prompts, (str, bytes)):
    raise ValueError(f"prompts={prompts[:40]!r} is text: {_TEXT_HINT}")
  if getattr(prompts, "ndim", 2) != 2 or not hasattr(prompts, "__len__"):
    raise ValueError(f"prompts={prompts!r} is invalid: give a list of prompts, each a list of "
                     "token ids")
  if not len(prompts):
    raise ValueError("prompts is empty: give at least one prompt (a list of token ids)")
  V, checked = cfg.vocab_size, []
  for i, p in enumerate(prompts):
    if isinstance(p, (str, bytes)):
      raise ValueError(f"prompt {i} is text ({p[:40]!r}): {_TEXT_HINT}")
    try:
      ids = np.asarray(p)
    except ValueError:  # ragged nesting
      ids = np.asarray(p, dtype=object)
    if ids.ndim != 1:
      raise ValueError(f"prompt {i} is invalid: it must be a flat list of token ids (got shape "
                       f"{ids.shape})")
    if ids.size == 0:
      raise ValueError(f"prompt {i} is empty: every prompt needs at least one token (e.g. BOS)")
    if ids.dtype.kind not in "iu":
      bad = next(x for x in list(p) if isinstance(x, bool) or not isinstance(x, numbers.Integral))
      raise ValueError(f"prompt {i} holds {bad!r}, not a token id: ids are ints in [0, {V})")
    outside = np.flatnonzero((ids < 0) | (ids >= V))
    if outside.size:
      j = int(outside[0])
      raise ValueError(f"prompt {i} has token id {int(ids[j])} at position {j}: ids must be in "
                       f"[0, {V}) (the model's vocab_size)")
    checked.append(ids.astype(np.int32))
    if len(p) + max_new_tokens > cfg.max_position:
      raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it "
                       f"needs {len(p) + max_new_tokens} positions but the model allows "
                       f"{cfg.max_position}: shorten it or lower max_new_tokens")
  return checked


@dataclasses.dataclass(frozen=True)
class Options:
  """`generate`'s options but the prompts, checked once (`check_options`), as plain Python
  values: numpy scalars work and NaN never reaches a comparison that would silently be False."""
  plan: SkipPlan                 # the layers the generated tokens run (skip / ratio resolved)
  max_new_tokens: int
  eos_id: int | None             # None: rows never stop early
  pad_id: int
  mode: str                      # "paper": the prompt at full depth; "everywhere": it skips too
  temperature: float             # 0 = greedy
  top_k: int | None
  top_p: float | None
  num_beams: int
  no_repeat_ngram_size: int
  seed: int
  length_penalty: float
  early_stopping: bool | str     # True, False or "never" (beam search)

  @property
  def sample(self) -> bool:
    return self.temperature > 0

  @property
  def paper_mode(self) -> bool:
    """The prompt runs every layer; full depth has nothing to skip, so it is plain decoding."""
    return self.mode == "paper" and not self.plan.is_full

  @property
  def max_new_slots(self) -> int:
    """N, the bucketed token budget (a static shape)."""
    return bucket(self.max_new_tokens, MIN_BUCKET)


def check_options(cfg, *, skip=None, ratio=None, max_new_tokens, eos_id=None,
                  pad_id=0, mode="paper", temperature=0.0, top_k=None, top_p=None, num_beams=1,
                  no_repeat_ngram_size=0, seed=0, length_penalty=1.0,
                  early_stopping=True) -> Options:
  """Every option of `generate` but the prompts, checked (one-line ValueErrors naming the
  option, its value and what is allowed): the one place a call's plan is resolved."""
  V = cfg.vocab_size
  as_choice("mode", mode, ("paper", "everywhere"))
  plan = resolve(cfg.num_layers, skip=skip, ratio=ratio, windows=cfg.attention_windows)
  max_new_tokens = as_int("max_new_tokens", max_new_tokens, min=1)
  eos_id = None if eos_id is None else as_int("eos_id", eos_id, 0, V - 1)
  pad_id = as_int("pad_id", pad_id, 0, V - 1)
  temperature = as_float("temperature", temperature, min=0)  # 0 = greedy
  sample = temperature > 0
  top_k = None if top_k is None else as_int("top_k", top_k, 1, V)
  top_p = None if top_p is None else as_float("top_p", top_p, 0, 1, min_open=True)
  if not sample and (top_k is not None or top_p is not None):
    raise ValueError("top_k / top_p need sampling: set temperature > 0")
  num_beams = as_int("num_beams", num_beams, min=1)
  if num_beams > 1 and sample:
    raise ValueError(f"num_beams={num_beams} with temperature={temperature} is unsupported: beam "
                     "search is deterministic (temperature=0)")
  no_repeat_ngram_size = as_int("no_repeat_ngram_size", no_repeat_ngram_size, 0, MIN_BUCKET)
  seed = as_int("seed", seed, 0, 2**32 - 1)  # jax.random.key truncates larger seeds silently
  length_penalty = as_float("length_penalty", length_penalty)
  if not any(early_stopping is x for x in (True, False)) and early_stopping != "never":
    raise ValueError(f"early_stopping={early_stopping!r} is invalid: allowed are True, False, "
                     "'never'")
  return Options(plan=plan, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                 mode=mode, temperature=temperature, top_k=top_k, top_p=top_p,
                 num_beams=num_beams, no_repeat_ngram_size=no_repeat_ngram_size, seed=seed,
                 length_penalty=length_penalty, early_stopping=early_stopping)


# ----------------------------------------------------------------------------------------------
# The loop.

@flax.struct.dataclass
class Inputs:
  """The arrays every strategy's executable takes: all traced, so one executable serves any
  values. Static batches have Q = B (a prompt per row); continuous batching queues Q >= B."""
  prompts: Array         # [Q, P] int32 prompts, left padded: each ends at slot P - 1
  pad: Array             # [Q] int32 pads before each prompt
  rows: Array            # [B] bool: the rows in use (bucket filler rows are not)
  num_prompts: Array     # [] int32 prompts in the queue
  max_new: Array         # [] int32 token budget per prompt
  eos_id: Array          # [] int32, -1 = none
  pad_id: Array          # [] int32
  rng: Array             # key data
  temperature: Array     # [] float32 (sampling)
  top_p: Array           # [] float32 (sampling; 1 = off)
  length_penalty: Array  # [] float32 (beam search)
  threshold: Array       # [] float32 (early exit)


def inputs(o: Options, prompts: Sequence[np.ndarray], *, rows: int | None = None,
           threshold: float = 0.0) -> Inputs:
  """Prompts `check_prompts` has checked as `Inputs`: P = prompt_bucket(longest prompt); with
  `rows` (continuous batching) B = bucket(rows) rows decode a queue of
  max(B, bucket(len(prompts))) prompts, else each prompt has a row of B = bucket(len(prompts))."""
  B = bucket(rows or len(prompts))
  Q, P = max(B, bucket(len(prompts))), prompt_bucket(max(map(len, prompts)))
  prompts_QP = np.full((Q, P), o.pad_id, np.int32)
  pad_Q = np.full((Q,), P - 1, np.int32)  # filler rows: a one-token prompt of pad_id
  for i, p in enumerate(prompts):  # each prompt ends at the last slot
    prompts_QP[i, P - len(p):], pad_Q[i] = p, P - len(p)
  eos_id = -1 if o.eos_id is None else o.eos_id
  return Inputs(prompts=prompts_QP, pad=pad_Q, rows=np.arange(B) < (rows or len(prompts)),
                num_prompts=np.int32(len(prompts)), max_new=np.int32(o.max_new_tokens),
                eos_id=np.int32(eos_id), pad_id=np.int32(o.pad_id),
                rng=jax.random.key_data(jax.random.key(o.seed)),
                temperature=np.float32(max(o.temperature, 1e-6)),
                top_p=np.float32(o.top_p or 1.0), length_penalty=np.float32(o.length_penalty),
                threshold=np.float32(threshold))


def checked_inputs(cfg, prompts, *, rows: int | None = None, threshold: float = 0.0,
                   **options) -> tuple[Options, Inputs]:
  """`check_options(cfg, **options)` and the checked prompts as `inputs`."""
  o = check_options(cfg, **options)
  return o, inputs(o, check_prompts(cfg, prompts, o.max_new_tokens), rows=rows,
                   threshold=threshold)


class Strategy:
  """A decoding strategy: static options (max_new_slots: N, the bucketed token budget; plan: the
  `SkipPlan` its generated tokens run, which `run` reports in the stats, None where the depth
  varies per step) and the methods `decode_loop` calls. `result`: token rows [Q, >= N] (pad_id
  after EOS), or a tuple of them and other arrays, which `stats` gets on the host."""
  max_new_slots: int
  plan: SkipPlan | None

  def start(self, model, x: Inputs):
    raise NotImplementedError

  def step(self, model, x: Inputs, s):
    raise NotImplementedError

  def running(self, x: Inputs, s) -> Array:
    raise NotImplementedError

  def result(self, x: Inputs, s):
    raise NotImplementedError

  def stats(self, cfg, x: Inputs, stats: DecodeStats, rest: list) -> DecodeStats:
    return stats


@flax.struct.dataclass
class QueueState:
  """What the state of a strategy over a prompt queue holds (B rows, Q prompts, W output slots)."""
  out: Array          # [Q, W] each prompt's generated tokens, pad_id after EOS
  owner: Array        # [B] the prompt each row decodes (-1 = none)
  next_prompt: Array  # [] prompts [0, next_prompt) have been started
  prompt_len: Array   # [B] the row's prompt length
  count: Array        # [B] tokens the row's prompt has generated so far
  tok: Array          # [B] the last of them: the row's next input
  done: Array         # [B] bool: nothing to feed (finished, unused, or no prompt yet)


class Queued(Strategy):
  """A strategy over a prompt queue (x.prompts [Q, P], x.rows [B]) whose state extends
  `QueueState`. With the static field `continuous`, before each step `fill_rows` starts the next
  waiting prompt in the first free row (`refill`), while both exist; else every prompt has a row
  from the start, and no refill is compiled."""
  continuous: bool

  def refill(self, model, x: Inputs, s, b: Array, i: Array, prompt_1P: Array, pad_1: Array):
    """s with prompt i (tokens prompt_1P [1, P], pads pad_1 [1]) started in row b."""
    raise NotImplementedError

  def start_queue(self, x: Inputs, tok_B: Array, width: int) -> dict[str, Array]:
    """The `QueueState` fields after the prefill of the first B prompts (first tokens tok_B)."""
    (Q, P), B = x.prompts.shape, x.rows.shape[0]
    filled = x.rows & (jnp.arange(B) < x.num_prompts)
    owner = jnp.where(filled, jnp.arange(B, dtype=jnp.int32), -1)
    tok = jnp.where(filled, tok_B, x.pad_id)
    return dict(out=jnp.full((Q, width), x.pad_id, jnp.int32).at[jnp.where(filled, owner, Q), 0]
                .set(tok, mode="drop"), owner=owner, prompt_len=P - x.pad[:B],
                next_prompt=jnp.minimum(x.num_prompts, jnp.sum(x.rows, dtype=jnp.int32)),
                count=jnp.ones_like(owner), tok=tok,
                done=~filled | (tok == x.eos_id) | (x.max_new <= 1))

  def start_row(self, x: Inputs, s, b: Array, i: Array, tok: Array, pad: Array):
    """s with prompt i (pad pads) started in row b, its first token tok."""
    return s.replace(out=s.out.at[i, 0].set(tok), owner=s.owner.at[b].set(i), next_prompt=i + 1,
                     prompt_len=s.prompt_len.at[b].set(x.prompts.shape[1] - pad),
                     count=s.count.at[b].set(1), tok=s.tok.at[b].set(tok),
                     done=s.done.at[b].set((tok == x.eos_id) | (x.max_new <= 1)))

  def emit(self, x: Inputs, s, block_BW: Array, n_B: Array):
    """s after each live row emits the first n_B of block_BW, cut after an EOS and at the
    budget; and the number emitted [B]."""
    Q, j = x.prompts.shape[0], jnp.arange(block_BW.shape[1])
    is_eos = (block_BW == x.eos_id) & (j < n_B[:, None])
    hit_eos = jnp.any(is_eos, 1)
    n = jnp.where(hit_eos, leading_true(~is_eos) + 1, n_B)
    n = jnp.where(s.done, 0, jnp.minimum(n, x.max_new - s.count))
    block = jnp.where(j < n[:, None], block_BW, x.pad_id)
    count = s.count + n
    return s.replace(
        out=s.out.at[jnp.where(s.done, Q, s.owner)[:, None], s.count[:, None] + j].set(
            block, mode="drop"),
        count=count, done=s.done | hit_eos | (count >= x.max_new),
        tok=jnp.where(n > 0, block[jnp.arange(n.shape[0]), jnp.maximum(n - 1, 0)], s.tok)), n

  def _waiting(self, x: Inputs, s) -> Array:
    return (s.next_prompt < x.num_prompts) & jnp.any(s.done & x.rows)

  def fill_rows(self, model, x: Inputs, s):
    if not self.continuous:
      return s

    def refill(s):
      row = jnp.min(jnp.where(s.done & x.rows, jnp.arange(x.rows.shape[0]), x.rows.shape[0]))
      i = s.next_prompt
      return self.refill(model, x, s, row, i, jax.lax.dynamic_slice_in_dim(x.prompts, i, 1),
                         jax.lax.dynamic_slice_in_dim(x.pad, i, 1))

    return jax.lax.while_loop(functools.partial(self._waiting, x), refill, s)

  def running(self, x: Inputs, s) -> Array:
    return jnp.any(~s.done) | self._waiting(x, s)


def leading_true(x_BK: Array) -> Array:
  """The number of leading True per row (a min: XLA's CPU runs it faster than a cumprod)."""
  iota = jax.lax.broadcasted_iota(jnp.int32, x_BK.shape, 1)
  return jnp.min(jnp.where(x_BK, x_BK.shape[1], iota), 1)


def decode_loop(graphdef, params, x: Inputs, *, strategy: Strategy):
  """The one loop: `strategy.step` from `strategy.start` while `strategy.running`."""
  model = nnx.merge(graphdef, params)
  end = jax.lax.while_loop(functools.partial(strategy.running, x),
                           functools.partial(strategy.step, model, x), strategy.start(model, x))
  return strategy.result(x, end)


def executable(strategy: Strategy, graphdef, params, x: Inputs):
  """The compiled `decode_loop` of `strategy` for these shapes, built once (returns it and the
  seconds spent compiling, 0 when it was cached)."""
  leaves, treedef = jax.tree.flatten(params)
  key = (f"{type(strategy).__module__}.{type(strategy).__name__}", graphdef, treedef,
         tuple((a.shape, a.dtype) for a in leaves), strategy,
         tuple((a.shape, a.dtype) for a in jax.tree.leaves(x)),
         tuple(sorted(COMPILER_OPTIONS.items())))
  if key in EXECUTABLES:
    return EXECUTABLES[key], 0.0
  start = time.perf_counter()
  EXECUTABLES[key] = jax.jit(decode_loop, static_argnames=("graphdef", "strategy")).lower(
      graphdef, params, x, strategy=strategy).compile(dict(COMPILER_OPTIONS))
  return EXECUTABLES[key], time.perf_counter() - start


def run(strategy: Strategy, model, x: Inputs):
  """Run `strategy` (built once) on `x`: (the x.num_prompts prompts' tokens, each cut before its
  EOS, the strategy's other results on the host, its `stats`)."""
  graphdef, params = nnx.split(model)
  compiled, compile_s = executable(strategy, graphdef, params, x)
  start = time.perf_counter()
  results = jax.device_get(compiled(params, x))
  tokens, *rest = results if isinstance(results, tuple) else (results,)
  count, eos_id, outputs, generated = int(x.num_prompts), int(x.eos_id), [], 0
  for row in np.asarray(tokens)[:count, :int(x.max_new)].tolist():
    n = row.index(eos_id) if eos_id in row else len(row)
    outputs.append(row[:n])
    generated += min(n + 1, len(row))  # EOS counted, the pads after it not
  prompt_tokens = int(np.sum(x.prompts.shape[1] - np.asarray(x.pad)[:count]))
  stats = DecodeStats(prompt_tokens=prompt_tokens, generated_tokens=generated,
                      wall_s=time.perf_counter() - start, compile_s=compile_s,
                      executables_built=int(compile_s > 0), calls=1, plan=strategy.plan)
  return outputs, rest, strategy.stats(model.cfg, x, stats, rest)


def in_chunks(fn, prompts: Sequence, size: int, *, by_length: bool = False,
              progress: bool = False) -> tuple[list, DecodeStats]:
  """`fn(chunk) -> (outputs, stats)` over chunks of `size` prompts, sorted by length first when
  `by_length` (less padding, fewer prompt buckets): (outputs in input order, summed stats).
  progress: a tqdm bar over the chunks (on stderr)."""
  order = range(len(prompts))
  order = sorted(order, key=lambda i: len(prompts[i])) if by_length else order
  chunks = [order[i:i + size] for i in range(0, len(order), size)]
  chunks = tqdm.tqdm(chunks, desc="batches", unit="batch") if progress else chunks
  outputs, stats = [None] * len(prompts), DecodeStats()
  for chunk in chunks:
    ids, chunk_stats = fn([prompts[i] for i in chunk])
    stats = stats + chunk_stats
    for i, row in zip(chunk, ids):
      outputs[i] = row
  return outputs, stats
