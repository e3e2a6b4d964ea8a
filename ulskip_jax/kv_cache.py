"""The KV cache: one writer for its arrays, so attention and the decoders never index them.

`KVCache` holds K and V per kept layer, [B, K, S, Hd] (B rows, K heads, S slots, Hd head width:
the layout both attention matmuls read; with the slot axis outside the head axis XLA on CPU
transposed whole layers every step), and each slot's token position, [B, S] (-1 = empty).
Positions are per row and mask attention: a query at position p sees the slots with
0 <= pos <= p, in any order. So rows hold prompts of different lengths, accept different numbers
of speculative tokens or start at different steps (`insert`), while a call still writes one slot
range shared by all rows: a dynamic_update_slice that XLA does in place in a while loop.

Attention gets a `LayerCache` per kept layer (`KVCache.layer`). A deferred one only reads, and
hands the call's K/V back for the caller to `write` after a `lax.cond` (a branch that wrote the
cache made XLA copy every cache layer it touches on every step).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from ulskip_jax.skipping import SkipPlan, as_plan

Array = jax.Array


@flax.struct.dataclass
class LayerCache:
  """One kept layer's cache for one call that writes T tokens at slots [index, index + T)."""
  k: Array    # [B, K, S, Hd]
  v: Array    # [B, K, S, Hd]
  pos: Array  # [B, S] slot positions, this call's tokens already written
  index: Any  # int32 scalar: the call's first slot
  deferred: bool = flax.struct.field(pytree_node=False, default=False)

  def attend_inputs(self, k_BKTD: Array, v_BKTD: Array, positions_BT: Array):
    """(keys, values [B, K, S', Hd], key positions [B, S'], mask [B, T, S'], written) for T
    queries whose own K/V are k, v. written: the layer with them written (deferred: (k, v))."""
    visible = lambda pos: (pos[:, None, :] >= 0) & (pos[:, None, :] <= positions_BT[:, :, None])
    if not self.deferred:
      k = jax.lax.dynamic_update_slice_in_dim(self.k, k_BKTD.astype(self.k.dtype), self.index, 2)
      v = jax.lax.dynamic_update_slice_in_dim(self.v, v_BKTD.astype(self.v.dtype), self.index, 2)
      return k, v, self.pos, visible(self.pos), self.replace(k=k, v=v)
    S, T = self.pos.shape[1], positions_BT.shape[1]
    slot = jnp.arange(S)
    unwritten = (slot >= self.index) & (slot < self.index + T)  # this call's slots: stale K/V
    mask = jnp.concatenate([visible(self.pos) & ~unwritten[None, None], visible(positions_BT)], -1)
    return (jnp.concatenate([self.k.astype(k_BKTD.dtype), k_BKTD], 2),
            jnp.concatenate([self.v.astype(v_BKTD.dtype), v_BKTD], 2),
            jnp.concatenate([self.pos, positions_BT], 1), mask, (k_BKTD, v_BKTD))


@flax.struct.dataclass
class KVCache:
  """k[j], v[j]: [B, K, S, Hd] for the j-th kept layer; pos: [B, S] int32, -1 = empty slot."""
  k: tuple[Array, ...]
  v: tuple[Array, ...]
  pos: Array

  def write_positions(self, positions_BT: Array, segment_ids_BT: Array, index) -> KVCache:
    """Positions of the T tokens a call writes at slots [index, index + T); pads (segment 0)
    stay empty. Written once per call, before the layers, which all read them."""
    new = jnp.where(segment_ids_BT > 0, positions_BT, -1).astype(jnp.int32)
    return self.replace(pos=jax.lax.dynamic_update_slice_in_dim(self.pos, new, index, 1))

  def layer(self, j: int, index, deferred: bool = False) -> LayerCache:
    return LayerCache(self.k[j], self.v[j], self.pos, index, deferred)

  def with_layers(self, layers) -> KVCache:
    """The cache holding these written `LayerCache`s, one per kept layer."""
    return self.replace(k=tuple(x.k for x in layers), v=tuple(x.v for x in layers))

  def write(self, j: int, k_BKTD: Array, v_BKTD: Array, index) -> KVCache:
    """Layer j's K/V of T tokens at slots [index, index + T) (a deferred layer's write)."""
    put = lambda a, x: jax.lax.dynamic_update_slice_in_dim(a, x.astype(a.dtype), index, 2)
    k, v = list(self.k), list(self.v)
    k[j], v[j] = put(k[j], k_BKTD), put(v[j], v_BKTD)
    return self.replace(k=tuple(k), v=tuple(v))

  def reorder(self, rows_R: Array) -> KVCache:
    """Row r of the result is row rows_R[r] (beam search: each beam takes its parent's K/V)."""
    return jax.tree.map(lambda a: a[rows_R], self)

  def kept_view(self, kept: tuple[int, ...]) -> KVCache:
    """The cache of the layers at indices `kept` (a draft sub-model's layers in a full cache)."""
    return KVCache(tuple(self.k[i] for i in kept), tuple(self.v[i] for i in kept), self.pos)

  def merge_view(self, view: KVCache, kept: tuple[int, ...]) -> KVCache:
    """This cache with the layers at `kept` (and the positions) taken from `view`."""
    k, v = list(self.k), list(self.v)
    for j, i in enumerate(kept):
      k[i], v[i] = view.k[j], view.v[j]
    return KVCache(tuple(k), tuple(v), view.pos)

  def commit(self, scratch: int, width: int, shift_B: Array, count_B: Array, dest_B: Array,
             first_pos_B: Array) -> KVCache:
    """Per row, move scratch entries [shift_b, shift_b + count_b) to slots dest_b ... and empty
    the scratch slots [scratch, S). Slots dest_b + count_b ... dest_b + width - 1 get pos -1
    (garbage, overwritten by the row's next commit)."""
    j = jnp.arange(width)
    src = jnp.minimum(j[None] + shift_B[:, None], width - 1)  # [B, width]

    def move(x_BKSD):
      block = jnp.take_along_axis(x_BKSD[:, :, scratch:scratch + width], src[:, None, :, None], 2)
      return _write_rows(x_BKSD, block, dest_B, 2)

    pos_block = jnp.where(j[None] < count_B[:, None], first_pos_B[:, None] + j[None], -1)
    pos = _write_rows(self.pos, pos_block, dest_B, 1).at[:, scratch:].set(-1)
    return KVCache(tuple(map(move, self.k)), tuple(map(move, self.v)), pos)

  def insert(self, row, prompt: KVCache, first_slot) -> KVCache:
    """Row `row` replaced by the one-row cache `prompt` (P slots) placed at the ring slots
    [first_slot, first_slot + P) % S; the row's other slots become empty."""
    S, P = self.pos.shape[1], prompt.pos.shape[1]
    slots = (first_slot + jnp.arange(P)) % S
    # [K, P, Hd] -> [P, K, Hd]: a scalar and an array index around a slice put the array's first.
    put = lambda big, small: big.at[row, :, slots].set(small[0].swapaxes(0, 1).astype(big.dtype))
    return KVCache(tuple(map(put, self.k, prompt.k)), tuple(map(put, self.v, prompt.v)),
                   self.pos.at[row].set(jnp.full((S,), -1, jnp.int32).at[slots].set(prompt.pos[0])))


def _write_rows(buf: Array, block: Array, offset_B: Array, axis: int) -> Array:
  """buf[b, ..., offset_B[b] : offset_B[b] + len, ...] = block[b] along `axis` (in place)."""
  return jax.vmap(lambda x, u, o: jax.lax.dynamic_update_slice_in_dim(x, u, o, axis - 1))(
      buf, block.astype(buf.dtype), offset_B)


def init_cache(cfg, batch: int, max_len: int, skip: SkipPlan | tuple[int, ...] = (),
               dtype: Any = None) -> KVCache:
  """An empty cache with slots for the layers of `skip` (a plan or skipped indices) whose attention
  runs only (`SkipPlan.attention_layers`): its size at ratio r is n / L of full, and whole for a
  plan skipping MLP blocks. cfg: a `model.ModelConfig`."""
  n = len(as_plan(cfg.num_layers, skip).attention_layers)
  shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
  dtype = dtype or cfg.dtype
  return KVCache(k=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
                 v=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
                 pos=jnp.full((batch, max_len), -1, jnp.int32))


def cache_bytes(cfg, batch: int, max_len: int, skip: SkipPlan | tuple[int, ...] = (),
                dtype: Any = None) -> int:
  """Bytes `init_cache` would allocate: K and V of the layers whose attention runs, and the int32
  positions."""
  n = len(as_plan(cfg.num_layers, skip).attention_layers)
  itemsize = jnp.dtype(dtype or cfg.dtype).itemsize
  return batch * max_len * (2 * n * cfg.num_kv_heads * cfg.head_dim * itemsize + 4)
