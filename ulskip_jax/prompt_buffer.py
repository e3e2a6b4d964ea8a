"""The compact buffer of full-depth (prompt) tokens that paper mode runs its skipped layers on.

In paper mode a skipped layer changes only the full-depth positions of a row, so computing it on
the whole row wastes the response tokens' share of its work. Instead the full-depth tokens of each
row are gathered, in row order, into a buffer of C slots (a static shape, so one executable per
skip tuple), the layer runs on the buffer and its outputs are scattered back.

This equals the masked whole-row computation when, in every row, each full-depth token's keys at
the skipped layer are all in the buffer: the token is in a segment (id > 0) and no token of its
segment before it is a response token. Packed data has that shape (each segment's prompt comes
first, `data.pack_row`). Buffer order is row order and the buffer keeps positions and segment ids,
so causal, per-segment attention over the buffer reads exactly the keys the masked row would.
`plan` also says whether a batch has that shape and fits; the model falls back to the masked
computation when it does not, so the result never depends on the capacity.

`select` (each row's marked tokens in C slots) is the generic part; the loss's buffer of
response tokens uses it too (`loss.py`).

Shapes: B batch, T row length, C buffer capacity (slots), D model width.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array
BUCKET = 8  # capacities are rounded up to a multiple of this


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
