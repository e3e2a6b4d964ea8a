"""What every decoding strategy shares: buckets and left padding, one executable cache with one
set of compiler options, trimming after EOS, and the stats.

A strategy is a pure function `fn(graphdef, state, *arrays, opts)` (its loop state and step live
with it: `decode.py` greedy, sampling, beams and continuous batching; `speculative.py`;
`baselines.py` early exit and SkipDecode); `executable` builds it once per (strategy, model
structure, static options, argument shapes, compiler options) and `trim` turns its token rows into
outputs and counts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ulskip_jax.kv_cache import init_cache

MIN_BUCKET = 16

# Compiled executables: module level, so that every call with the same model structure and bucket
# reuses one. Keys start with the strategy's "module.name".
EXECUTABLES: dict[tuple, Any] = {}

# XLA options for every executable built here. Tests of tiny models set fast-compile options
# (xla_backend_optimization_level=0 builds about 3x faster on CPU; the run time is negligible).
COMPILER_OPTIONS: dict[str, Any] = {}


@dataclasses.dataclass
class DecodeStats:
  """Counts and timings of one or more `generate` calls (add them with `+`).

  generated_tokens counts the tokens the model produced, each row's EOS included, dummy rows and
  the pads after EOS excluded. wall_s is the execution time (host to device, run, back to lists)
  without compile_s, the time spent building executables. cache_bytes is the largest KV cache
  allocated (kept layers only: n / L of full depth; beams multiply the rows).
  """
  prompt_tokens: int = 0
  generated_tokens: int = 0
  wall_s: float = 0.0
  compile_s: float = 0.0
  cache_bytes: int = 0
  executables_built: int = 0
  calls: int = 0

  def __add__(self, other: DecodeStats) -> DecodeStats:
    return DecodeStats(self.prompt_tokens + other.prompt_tokens,
                       self.generated_tokens + other.generated_tokens,
                       self.wall_s + other.wall_s, self.compile_s + other.compile_s,
                       max(self.cache_bytes, other.cache_bytes),
                       self.executables_built + other.executables_built, self.calls + other.calls)

  @property
  def generated_tokens_per_s(self) -> float:
    return self.generated_tokens / self.wall_s if self.wall_s else 0.0

  @property
  def total_tokens_per_s(self) -> float:
    """(prompt + generated) tokens per second, the throughput the ULS paper reports."""
    return (self.prompt_tokens + self.generated_tokens) / self.wall_s if self.wall_s else 0.0

  def as_dict(self) -> dict[str, Any]:
    return dict(dataclasses.asdict(self), generated_tokens_per_s=self.generated_tokens_per_s,
                total_tokens_per_s=self.total_tokens_per_s)


def num_compiles(*modules: str) -> int:
  """Executables built so far by the strategies of these modules (e.g. "ulskip_jax.decode"), or
  by all."""
  return sum(1 for key in EXECUTABLES if not modules or key[0].rsplit(".", 1)[0] in modules)


def bucket(n: int, minimum: int = 1) -> int:
  """The next power of two >= max(n, minimum)."""
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def left_pad(prompts: Sequence[np.ndarray], rows: int, slots: int, pad_id: int):
  """(prompt_BP [rows, slots] int32, pad_B [rows]): each prompt ends at the last slot, so every
  row's next token is read from the last column; rows past the prompts (bucket filler) hold a
  one-token prompt of pad_id."""
  prompt_BP = np.full((rows, slots), pad_id, np.int32)
  pad_B = np.full((rows,), slots - 1, np.int32)
  for i, p in enumerate(prompts):
    prompt_BP[i, slots - len(p):] = p
    pad_B[i] = slots - len(p)
  return prompt_BP, pad_B


def prefill(model, prompt_BP, pad_B, num_slots: int, *, skip: tuple[int, ...], paper_mode: bool):
  """Run left-padded prompts, filling a fresh cache of `num_slots` slots for the kept layers:
  (last-position logits [B, V], cache). paper_mode: the prompt runs every layer (only the kept
  ones keep K/V); otherwise it skips the same layers as the generated tokens."""
  B, P = prompt_BP.shape
  positions = jnp.arange(P, dtype=jnp.int32)[None] - pad_B[:, None]
  cache = init_cache(model.cfg, B, num_slots, skip)
  x, cache = model.hidden(prompt_BP, skip=skip, positions_BT=positions,
                          segment_ids_BT=(positions >= 0).astype(jnp.int32),
                          full_depth_BT=True if paper_mode else None, cache=cache, cache_index=0)
  return model.unembed(x[:, -1:])[:, 0], cache


def executable(fn, graphdef, state, args, opts):
  """The compiled `fn` for these shapes and static options, built once (returns it and the
  seconds spent compiling, 0 when it was cached)."""
  leaves, treedef = jax.tree.flatten(state)
  key = (f"{fn.__module__}.{fn.__name__}", graphdef, treedef,
         tuple((x.shape, x.dtype) for x in leaves), opts, tuple((a.shape, a.dtype) for a in args),
         tuple(sorted(COMPILER_OPTIONS.items())))
  if key in EXECUTABLES:
    return EXECUTABLES[key], 0.0
  start = time.perf_counter()
  jitted = jax.jit(fn, static_argnames=("graphdef", "opts"))
  compiled = jitted.lower(graphdef, state, *args, opts=opts).compile(dict(COMPILER_OPTIONS))
  EXECUTABLES[key] = compiled
  return compiled, time.perf_counter() - start


def trim(rows_BN, count: int, max_new_tokens: int, eos_id: int | None):
  """(the first `count` rows' tokens, each cut before its EOS and at max_new_tokens; generated
  tokens: each row's EOS counted, the pads after it not)."""
  outputs, generated = [], 0
  for row in np.asarray(rows_BN)[:count, :max_new_tokens].tolist():
    n = row.index(eos_id) if eos_id in row else len(row)
    outputs.append(row[:n])
    generated += min(n + 1, len(row))
  return outputs, generated


def run(fn, model, args, opts, *, count: int, max_new_tokens: int, eos_id: int | None):
  """Run strategy `fn` (built once), whose first result is its token rows: (outputs of the first
  `count` rows as `trim` cuts them, generated tokens, fn's other results on the host, compile
  seconds, wall seconds)."""
  graphdef, state = nnx.split(model)
  compiled, compile_s = executable(fn, graphdef, state, args, opts)
  start = time.perf_counter()
  results = jax.device_get(compiled(state, *args))
  rows, *rest = results if isinstance(results, tuple) else (results,)
  outputs, generated = trim(rows, count, max_new_tokens, eos_id)
  return outputs, generated, rest, compile_s, time.perf_counter() - start
