"""The compact buffer of full-depth (prompt) tokens that paper mode runs its skipped layers on.

In paper mode a skipped layer changes only the full-depth positions of a row, so computing it on
the whole row wastes the response tokens' share of its work. Instead the full-depth tokens of each
row are gathered, in row order, into a buffer of C slots (a static shape, so one executable per
skip tuple), the layer runs on the buffer and its outputs are scattered back.

This equals the masked whole-row computation when, in every row, each full-depth token's keys at
the skipped layer are all in the buffer: the token is in a segment (id > 0) and no token of its
segment before it is a response token. Packed data has that shape (each segment's prompt comes
first, `batching.pack_row`). Buffer order is row order and the buffer keeps positions and segment
ids, so causal, per-segment attention over the buffer reads exactly the keys the masked row would.
`plan` also says whether a batch has that shape and fits; the model falls back to the masked
computation when it does not, so the result never depends on the capacity.

`select` (each row's marked tokens in C slots) is the generic part; the loss's buffer of
response tokens uses it too (`loss.py`).

Whether a run uses the buffer at all is `choose`'s call, made once from static shapes: the buffer
saves each skipped layer's work on T - C slots of every row, and costs its gathers and scatters,
which move activations and add ops of their own. Where a step is bound by its ops' fixed cost
rather than by its matmuls (a small model on a GPU), the work saved is worth less than the ops
added, and whole rows are the faster way to the same result (docs/accelerators.md).

Shapes: B batch, T row length, C buffer capacity (slots), D model width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Literal, get_args

import flax.struct
import jax
import jax.numpy as jnp

from ulskip_jax.checks import as_choice

if TYPE_CHECKING:
  from ulskip_jax.model import ModelConfig

Array = jax.Array
BUCKET = 8  # capacities are rounded up to a multiple of this
Mode = Literal["auto", "on", "off"]  # skip.prompt_buffer: the cost rule decides | buffer | rows
MODES = get_args(Mode)


@flax.struct.dataclass
class Buffer:
  index_BC: Array  # int32: row position of each row's c-th full-depth token; T = empty slot
  fits: Array      # bool []: the buffer computation equals the masked one for the whole batch


def capacity_for(fraction: float, seq_len: int) -> int:
  """Slots per row for a capacity given as a fraction of the row length, bucketed."""
  return min(seq_len, BUCKET * math.ceil(fraction * seq_len / BUCKET))


def overflow_rows(full_depth_BT: Array, capacity: int) -> Array:
  """Rows [] int32 with more full-depth tokens than `capacity` slots."""
  return (jnp.asarray(full_depth_BT, bool).sum(-1) > capacity).sum().astype(jnp.int32)


def select(on_BT: Array, capacity: int) -> Buffer:
  """A buffer of each row's `on` tokens, in row order, in `capacity` slots; fits: every row's
  count is at most `capacity` (the rest are dropped)."""
  on_BT = jnp.asarray(on_BT, bool)
  T = on_BT.shape[1]
  slot_BT = jnp.where(on_BT, jnp.cumsum(on_BT, -1, dtype=jnp.int32) - 1, capacity)  # past the end
  index_BC = jax.vmap(lambda s: jnp.full((capacity,), T, jnp.int32).at[s].set(
      jnp.arange(T, dtype=jnp.int32), mode="drop"))(slot_BT)
  return Buffer(index_BC=index_BC, fits=jnp.all(on_BT.sum(-1) <= capacity))


def plan(full_depth_BT: Array, segment_ids_BT: Array, capacity: int) -> Buffer:
  """Where each row's full-depth tokens go in a buffer of `capacity` slots, and whether it fits."""
  full_depth_BT = jnp.asarray(full_depth_BT, bool)
  B, T = full_depth_BT.shape
  t_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  buffer = select(full_depth_BT, capacity)
  # Each segment's first response token: a full-depth token after it would read a key that the
  # buffer lacks. Segment ids outside [0, T] cannot index this table, so they take the fallback.
  in_range = (segment_ids_BT >= 0) & (segment_ids_BT <= T)
  seg_BT = jnp.clip(segment_ids_BT, 0, T)
  first_response = jax.vmap(lambda s, t: jnp.full((T + 1,), T, jnp.int32).at[s].min(t))(
      seg_BT, jnp.where(full_depth_BT, T, t_BT))
  opened = t_BT > jnp.take_along_axis(first_response, seg_BT, axis=-1)
  bad = full_depth_BT & ((segment_ids_BT <= 0) | opened)
  return buffer.replace(fits=buffer.fits & ~bad.any() & in_range.all())


def gather(a_BT: Array, buffer: Buffer) -> Array:
  """a's values at the buffer's tokens, [B, C, ...]; empty slots hold zeros."""
  index = buffer.index_BC.reshape(*buffer.index_BC.shape, *(1,) * (a_BT.ndim - 2))
  return jnp.take_along_axis(a_BT, index, axis=1, mode="fill", fill_value=0)


def scatter(x_BTD: Array, y_BCD: Array, buffer: Buffer) -> Array:
  """x with the buffer's tokens replaced by y; empty slots are dropped."""
  return jax.vmap(lambda x, i, y: x.at[i].set(y, mode="drop"))(x_BTD, buffer.index_BC, y_BCD)


# ----------------------------------------------------------------------------------------------
# Whether the buffer pays, per run.

@dataclasses.dataclass(frozen=True)
class Device:
  """The rates `choose` weighs the buffer's trade with on one platform (rough figures for the
  platform's common chips; docs/accelerators.md gives where each comes from)."""
  flops_per_s: float  # the rate a layer's matmuls run at when they are the bottleneck
  bytes_per_s: float  # the rate the gathers and scatters move activations at
  overhead_s: float   # the buffer's fixed cost per skipped layer and micro-batch: its ops


DEVICES = {
    "cpu": Device(flops_per_s=1e11, bytes_per_s=1e10, overhead_s=2e-5),
    "gpu": Device(flops_per_s=3e14, bytes_per_s=3e12, overhead_s=1.5e-4),
    "tpu": Device(flops_per_s=2e14, bytes_per_s=1e12, overhead_s=1.5e-4),
}


@dataclasses.dataclass(frozen=True)
class Choice:
  """How a run's skipped layers treat the prompt: a buffer of `capacity` slots, or whole rows."""
  capacity: int | None  # buffer slots per row; None = whole rows
  mode: str             # the skip.prompt_buffer it came from
  saved_s: float        # estimated time the buffer saves per skipped layer and micro-batch
  cost_s: float         # estimated time its gathers, scatters and ops cost there

  def line(self) -> str:
    """The startup line that says which and why."""
    what = f"a buffer of {self.capacity} slots/row" if self.capacity else "whole rows"
    return (f"paper mode: skipped layers on {what} (skip.prompt_buffer={self.mode!r}; per "
            f"skipped layer the buffer would save ~{self.saved_s * 1e3:.3g} ms, cost "
            f"~{self.cost_s * 1e3:.3g} ms)")


def layer_flops_per_token(cfg: ModelConfig, keys: int) -> float:
  """Forward FLOPs of one layer per token: its projections, and attention over `keys` keys (the
  einsum path scores every key of the row, masked or not)."""
  attn_proj = cfg.d_model * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
  mlp = (3 if cfg.mlp == "gated" else 2) * cfg.d_model * cfg.d_ff
  return 2 * (attn_proj + mlp) + 4 * cfg.num_heads * cfg.head_dim * keys


def choose(mode: str, capacity: int, cfg: ModelConfig, rows: int, seq_len: int,
           platform: str) -> Choice:
  """The buffer or whole rows for micro-batches of `rows` x `seq_len` (per device) on `platform`.

  "auto" takes the buffer when the work it saves per skipped layer, at the platform's matmul
  rate, outweighs its fixed cost plus the bytes its gathers and scatters move: forward and
  backward each read and write about a row's and a buffer's activations twice. "on" and "off"
  take the buffer or whole rows whatever the estimate; a buffer no smaller than the row saves
  nothing, so that is whole rows either way.
  """
  as_choice("skip.prompt_buffer", mode, MODES)
  device = DEVICES.get(platform, DEVICES["gpu"])  # other accelerator plugins: taken as GPU-like
  T, C = seq_len, min(capacity, seq_len)
  passes = 4 if cfg.remat else 3  # the forward, its two backward products, remat's recompute
  saved_flops = passes * rows * (T * layer_flops_per_token(cfg, T)
                                 - C * layer_flops_per_token(cfg, C))
  moved_bytes = 4 * rows * (T + C) * cfg.d_model * jnp.dtype(cfg.dtype).itemsize
  saved_s = saved_flops / device.flops_per_s
  cost_s = device.overhead_s + moved_bytes / device.bytes_per_s
  use = C < T and (mode == "on" or (mode == "auto" and saved_s > cost_s))
  return Choice(capacity=C if use else None, mode=mode, saved_s=saved_s, cost_s=cost_s)
