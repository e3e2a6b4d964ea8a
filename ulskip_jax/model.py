"""A decoder-only transformer in Flax NNX whose graph is specialised by a static skip tuple.

Shapes: B batch, T query length, S key length (cache slots), D model width, H query heads,
K key/value heads, G = H // K heads per KV group, Hd head width, F MLP width, V vocabulary.

One config covers the Hugging Face families we import (see `families.py`): Llama 2/3 (llama3
rope scaling), Mistral and Qwen2 (sliding-window layers; Qwen2's qkv bias), Qwen3 (per-head q/k
RMSNorm), SmolLM3 (layers without RoPE), Phi-3, Gemma 2/3 (local/global layers, each with its RoPE
base, (1 + w) RMSNorm, norms after attention and MLP, scaled embeddings, logit soft-capping),
GPT-2 (learned positions, LayerNorm, GELU) and BLOOM (ALiBi, embedding LayerNorm).
With `lora_rank > 0` the projections also carry LoRA adapters (`lora.py`), created after every
base weight so that a seed draws the same base model with or without them.

Layer weights are one module per layer (`Decoder.layers[i]`), not one stacked array, because:
  * decoding indexes layers with Python ints from the static skip tuple, so each kept layer's
    weights are read in place and a skipped layer's weights are never read; a stacked [L, ...]
    array would need a gather (a copy of n layers' weights) for every non-contiguous ULS plan;
  * training unrolls the same Python loop over kept layers. Compile time grows linearly in L, which
    is what MaxText's `scan_layers=False` trades for the same reason; remat is per layer.

Skipping has two modes, chosen per call by `full_depth`:
  * skip everywhere (`full_depth=None`): skipped layers are not computed at all;
  * paper mode (`full_depth` a [B, T] bool mask, or `True` for all positions): positions marked
    full depth (the prompt) run every layer, the others (the response) only the kept layers. A
    skipped layer's output is kept only at full-depth positions. Attention is causal and the
    prompt precedes the response, so no prompt position ever sees a response position's
    skipped-layer output. With `full_depth_capacity` a skipped layer runs on a compact buffer of
    each row's full-depth tokens (`prompt_buffer.py`), so it costs prompt tokens, not the row;
    a batch that does not fit the buffer takes the whole-row computation, which gives the same
    result (a `lax.cond` per skipped layer, or none when the caller has checked the fit itself:
    `full_depth_fits`).
A sublayer plan (`SkipPlan.unit` "mlp", "attention" or "sublayer", which picks blocks of both
kinds) skips only those blocks: a skipped block is the identity and its weights are never read, or in paper mode it runs on
the whole row and keeps its output at the full-depth positions. The cache holds the layers whose
attention runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Literal, get_args

import jax
import jax.numpy as jnp
from flax import nnx

from ulskip_jax import attention, lora
from ulskip_jax import prompt_buffer
from ulskip_jax.kv_cache import KVCache, LayerCache
from ulskip_jax.ops import dense, softcap
from ulskip_jax.skipping import LayerBytes, as_plan

Array = jax.Array
DType = Literal["float32", "bfloat16", "float16"]  # compute and parameter dtypes
DTYPES = get_args(DType)
# RMSNorm (Llama) | RMSNorm scaled by (1 + w), w stored zero-centred (Gemma) | LayerNorm (GPT-2)
NormKind = Literal["rms", "rms_plus_one", "layer"]
MLPKind = Literal["gated", "plain"]         # gated: down(act(gate x) * up x)
Activation = Literal["silu", "gelu", "gelu_tanh"]  # gelu: erf
Positions = Literal["rope", "learned", "alibi"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture; frozen and hashable so it can sit in static jit arguments."""
  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_ff: int
  norm: NormKind = "rms"
  norm_eps: float = 1e-6
  mlp: MLPKind = "gated"
  act: Activation = "silu"
  pos: Positions = "rope"
  max_position: int = 2048       # learned position table size (GPT-2)
  rope_theta: float = 10000.0
  rope_scaling: tuple | None = None  # llama3: (("factor", 8.0), ("low_freq_factor", 1.0), ...)
  # Per layer, whether it applies RoPE (SmolLM3's no_rope_layers); None = every layer does.
  rope_layers: tuple[bool, ...] | None = None
  qk_norm: bool = False          # Qwen3: RMSNorm over head_dim on each q and k head, before RoPE
  # Per layer, its sliding window W (a query at position p sees keys at positions p-W < pos <= p,
  # as transformers masks) or None for global attention; None = every layer is global.
  attention_windows: tuple[int | None, ...] | None = None
  # Gemma 3: the RoPE base of the windowed layers, which take no rope_scaling (rope_theta and
  # rope_scaling are the global layers'); None = every layer uses rope_theta and rope_scaling.
  local_rope_theta: float | None = None
  post_norms: bool = False       # Gemma 2/3: norm the attention and MLP outputs before each add
  embed_scale: bool = False      # Gemma: embeddings times sqrt(d_model), in the compute dtype
  query_pre_attn_scalar: int | None = None  # Gemma: logits scaled by this ** -0.5; None = Hd
  attn_softcap: float | None = None   # Gemma 2: attention logits -> c * tanh(logits / c)
  final_softcap: float | None = None  # Gemma 2: output logits -> c * tanh(logits / c)
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  embed_norm: bool = False       # BLOOM's LayerNorm right after the embedding
  tie_embeddings: bool = False
  dtype: DType = "float32"       # compute dtype
  param_dtype: DType = "float32"
  remat: bool = False            # rematerialise each layer in the backward pass
  # einsum | xla | cudnn | auto: how attention is computed (`attention.py`); never the result
  attention_impl: attention.AttentionImpl = "einsum"
  lora_rank: int = 0             # LoRA adapters (lora.py) of this rank; 0 = none
  lora_alpha: float = 16.0       # adapter scale alpha / rank
  lora_dropout: float = 0.0      # on each adapter's input, when the call passes a dropout key
  lora_targets: tuple = ()       # projections with adapters, among lora.TARGETS

  @staticmethod
  @functools.cache
  def choices() -> dict[str, tuple]:
    """The allowed values of each Literal field: its annotation is their one list (config_schema
    builds its choices from the same Literal types)."""
    return {field: get_args(hint) for field, hint in typing.get_type_hints(ModelConfig).items()
            if typing.get_origin(hint) is Literal}

  def __post_init__(self):
    for field, values in ModelConfig.choices().items():
      if getattr(self, field) not in values:
        raise ValueError(f"{field}={getattr(self, field)!r} is unknown: allowed are {values}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads="
                       f"{self.num_kv_heads}")
    lora.check(self.lora_rank, self.lora_targets, self.lora_dropout, self.lora_alpha)
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # hashable, for jit
    if self.rope_layers is not None:
      if self.pos != "rope" or len(self.rope_layers) != self.num_layers:
        raise ValueError(f"rope_layers has {len(self.rope_layers)} entries with pos={self.pos!r}: "
                         f"it needs pos='rope' and one entry per layer ({self.num_layers})")
      # One spelling per computation, so configs compare equal whatever list or tuple made them.
      rope_layers = tuple(bool(x) for x in self.rope_layers)
      object.__setattr__(self, "rope_layers", None if all(rope_layers) else rope_layers)
    if self.attention_windows is not None:
      windows = tuple(None if w is None else int(w) for w in self.attention_windows)
      if len(windows) != self.num_layers or any(w is not None and w < 1 for w in windows):
        raise ValueError(f"attention_windows={self.attention_windows} is invalid: it needs one "
                         f"entry per layer ({self.num_layers}), each a window >= 1 or None")
      object.__setattr__(self, "attention_windows",
                         None if all(w is None for w in windows) else windows)
    if self.local_rope_theta is not None and (
        self.attention_windows is None or float(self.local_rope_theta) == self.rope_theta
        and self.rope_scaling is None):
      object.__setattr__(self, "local_rope_theta", None)  # the same RoPE on every layer
    if self.query_pre_attn_scalar is not None and self.query_pre_attn_scalar == self.head_dim:
      object.__setattr__(self, "query_pre_attn_scalar", None)

  def uses_rope(self, layer: int) -> bool:
    return self.pos == "rope" and (self.rope_layers is None or self.rope_layers[layer])

  def window(self, layer: int) -> int | None:
    """The layer's sliding window, None for global attention."""
    return None if self.attention_windows is None else self.attention_windows[layer]

  def rope(self, layer: int) -> tuple[float, tuple | None]:
    """(RoPE base, rope_scaling) of a layer: Gemma 3's local layers have their own base."""
    if self.local_rope_theta is not None and self.window(layer) is not None:
      return float(self.local_rope_theta), None
    return self.rope_theta, self.rope_scaling


# ----------------------------------------------------------------------------------------------
# Layers.

def _param(rngs: nnx.Rngs, shape, axes, dtype, scale=None) -> nnx.Param:
  """A parameter with its logical axis names (mapped to mesh axes by rules in `sharding.py`)."""
  fan_in = shape[0] if scale is None else None
  std = scale if scale is not None else 1.0 / math.sqrt(fan_in)
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), axes=axes)


def _zeros(shape, axes, dtype) -> nnx.Param:
  return nnx.Param(jnp.zeros(shape, dtype), axes=axes)


def _add_adapters(module: nnx.Module, cfg: ModelConfig, specs: dict, rngs: nnx.Rngs) -> None:
  """An adapter `<name>_lora` for each targeted projection of `module` (specs: name ->
  (in shape, in axes, out shape, out axes)), in lora.TARGETS order whatever the config's order."""
  for name in lora.TARGETS:
    if name in specs and name in cfg.lora_targets:
      in_shape, in_axes, out_shape, out_axes = specs[name]
      setattr(module, name + lora.SUFFIX, lora.Adapter(
          name, in_shape, out_shape, in_axes, out_axes, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
          dropout=cfg.lora_dropout, dtype=jnp.dtype(cfg.param_dtype), rngs=rngs))


def _plus_lora(module: nnx.Module, name: str, x: Array, y: Array, dropout_key) -> Array:
  """y, plus the adapter update of `module`'s projection `name` on input x if it has one."""
  adapter = getattr(module, name + lora.SUFFIX, None)
  return y if adapter is None else y + adapter(x, dropout_key)


class Norm(nnx.Module):
  """RMSNorm or LayerNorm over the last axis of `width` features (d_model; head_dim for QK-norm)."""

  def __init__(self, cfg: ModelConfig, width: int):
    pdt = jnp.dtype(cfg.param_dtype)
    self.kind, self.eps = cfg.norm, cfg.norm_eps
    init = jnp.zeros if cfg.norm == "rms_plus_one" else jnp.ones  # both start as the identity
    self.scale = nnx.Param(init((width,), pdt), axes=("norm",))
    if cfg.norm == "layer":
      self.bias = _zeros((width,), ("norm",), pdt)

  def __call__(self, x_BTD: Array) -> Array:
    x = x_BTD.astype(jnp.float32)  # statistics in f32 whatever the compute dtype
    if self.kind != "layer":
      y = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps)
      y = y * (self.scale[...].astype(jnp.float32) + (self.kind == "rms_plus_one"))
    else:
      mean = x.mean(-1, keepdims=True)
      var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
      y = (x - mean) * jax.lax.rsqrt(var + self.eps)
      y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x_BTD.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: tuple | None) -> Array:
  """Inverse frequencies [Hd/2], with linear (positions / factor) or Llama 3's
  frequency-dependent scaling when configured."""
  inv = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  if scaling is None:
    return inv
  s = dict(scaling)
  kind = s.get("rope_type", s.get("type"))
  if kind == "linear":
    return inv / s["factor"]
  if kind != "llama3":
    raise ValueError(f"rope_scaling type {kind!r} is unsupported: allowed are 'linear', "
                     "'llama3' or none")
  factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
  old_len = s["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv
  lo_wavelen, hi_wavelen = old_len / lo, old_len / hi
  smooth = (old_len / wavelen - lo) / (hi - lo)
  mid = (1 - smooth) * inv / factor + smooth * inv
  out = jnp.where(wavelen > lo_wavelen, inv / factor, inv)
  return jnp.where((wavelen <= lo_wavelen) & (wavelen >= hi_wavelen), mid, out)


def apply_rope(x_BTNH: Array, positions_BT: Array, inv_freq: Array) -> Array:
  """Rotate-half RoPE (the Hugging Face layout: first half / second half of each head)."""
  angles = positions_BT[..., None].astype(jnp.float32) * inv_freq  # [B, T, Hd/2]
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def alibi_slopes(num_heads: int) -> Array:
  """BLOOM's per-head ALiBi slopes (geometric; interleaved extras for non-powers of two)."""
  p2 = 2 ** math.floor(math.log2(num_heads))
  base = 2.0 ** (-(2.0 ** -(math.log2(p2) - 3)))
  slopes = [base ** i for i in range(1, p2 + 1)]
  if p2 != num_heads:
    extra = 2.0 ** (-(2.0 ** -(math.log2(2 * p2) - 3)))
    slopes += [extra ** i for i in range(1, 1 + 2 * min(p2, num_heads - p2), 2)]
  return jnp.asarray(slopes, jnp.float32)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, index: int):
    D, H, K, Hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pdt = jnp.dtype(cfg.param_dtype)
    self.cfg, self.use_rope, self.rope = cfg, cfg.uses_rope(index), cfg.rope(index)
    self.q = _param(rngs, (D, H, Hd), ("embed", "heads", "head_dim"), pdt)
    self.k = _param(rngs, (D, K, Hd), ("embed", "kv_heads", "head_dim"), pdt)
    self.v = _param(rngs, (D, K, Hd), ("embed", "kv_heads", "head_dim"), pdt)
    self.o = _param(rngs, (H, Hd, D), ("heads", "head_dim", "embed"), pdt,
                    scale=1.0 / math.sqrt(H * Hd))
    if cfg.qkv_bias:
      self.q_bias = _zeros((H, Hd), ("heads", "head_dim"), pdt)
      self.k_bias = _zeros((K, Hd), ("kv_heads", "head_dim"), pdt)
      self.v_bias = _zeros((K, Hd), ("kv_heads", "head_dim"), pdt)
    if cfg.out_bias:
      self.o_bias = _zeros((D,), ("embed",), pdt)
    if cfg.qk_norm:
      self.q_norm, self.k_norm = Norm(cfg, Hd), Norm(cfg, Hd)

  def add_adapters(self, rngs: nnx.Rngs) -> None:
    cfg = self.cfg
    D, H, K, Hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kv = ((D,), ("embed",), (K, Hd), ("kv_heads", "head_dim"))
    _add_adapters(self, cfg, dict(q=((D,), ("embed",), (H, Hd), ("heads", "head_dim")), k=kv, v=kv,
                                  o=((H, Hd), ("heads", "head_dim"), (D,), ("embed",))), rngs)

  def project_qkv(self, x_BTD: Array, positions_BT: Array, dropout_key=None):
    cfg, dt = self.cfg, x_BTD.dtype
    q, k, v = dense(x_BTD, self.q[...]), dense(x_BTD, self.k[...]), dense(x_BTD, self.v[...])
    q, k, v = (_plus_lora(self, name, x_BTD, y, dropout_key) for name, y in zip("qkv", (q, k, v)))
    if cfg.qkv_bias:
      q, k, v = (q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt),
                 v + self.v_bias[...].astype(dt))
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.use_rope:
      inv_freq = rope_inv_freq(cfg.head_dim, *self.rope)
      q, k = apply_rope(q, positions_BT, inv_freq), apply_rope(k, positions_BT, inv_freq)
    return q, k, v

  def project_out(self, out_BTHD: Array, dropout_key=None) -> Array:
    y = dense(out_BTHD, self.o[...], 2)
    y = _plus_lora(self, "o", out_BTHD, y, dropout_key)
    if self.cfg.out_bias:
      y = y + self.o_bias[...].astype(y.dtype)
    return y

  def __call__(self, q_BTHD, q_pos_BT, k_BKSD, v_BKSD, k_pos_BS, mask_BTS,
               dropout_key=None, causal: bool = False) -> Array:
    """Attention of projected queries over keys/values at positions k_pos, then out-projection.
    causal: the keys are the queries' own chunk and the mask is causal (`attention.attend`)."""
    bias = None
    if self.cfg.pos == "alibi":
      # BLOOM adds slope * key_position; slope * (key - query) differs by a per-query constant,
      # which softmax ignores, and stays small for long sequences.
      rel = (k_pos_BS[:, None, :] - q_pos_BT[:, :, None]).astype(jnp.float32)
      bias = alibi_slopes(self.cfg.num_heads)[None, :, None, None] * rel[:, None]
    out = attention.attend(self.cfg, q_BTHD, k_BKSD, v_BKSD, mask_BTS, bias, causal)
    return self.project_out(out, dropout_key)


def _act(name: str, x: Array) -> Array:
  if name == "silu":
    return jax.nn.silu(x)
  return jax.nn.gelu(x, approximate=(name == "gelu_tanh"))


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, F = cfg.d_model, cfg.d_ff
    pdt = jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    if cfg.mlp == "gated":
      self.gate = _param(rngs, (D, F), ("embed", "mlp"), pdt)
    self.up = _param(rngs, (D, F), ("embed", "mlp"), pdt)
    self.down = _param(rngs, (F, D), ("mlp", "embed"), pdt)
    if cfg.mlp_bias:
      if cfg.mlp == "gated":
        self.gate_bias = _zeros((F,), ("mlp",), pdt)
      self.up_bias = _zeros((F,), ("mlp",), pdt)
      self.down_bias = _zeros((D,), ("embed",), pdt)

  def add_adapters(self, rngs: nnx.Rngs) -> None:
    cfg = self.cfg
    D, F = cfg.d_model, cfg.d_ff
    up = ((D,), ("embed",), (F,), ("mlp",))
    specs = dict(up=up, down=((F,), ("mlp",), (D,), ("embed",)))
    if cfg.mlp == "gated":  # a plain MLP has no gate: a "gate" target does not apply to it
      specs["gate"] = up
    _add_adapters(self, cfg, specs, rngs)

  def __call__(self, x_BTD: Array, dropout_key=None) -> Array:
    cfg, dt = self.cfg, x_BTD.dtype
    h = _plus_lora(self, "up", x_BTD, dense(x_BTD, self.up[...]), dropout_key)
    if cfg.mlp_bias:
      h = h + self.up_bias[...].astype(dt)
    if cfg.mlp == "gated":
      g = _plus_lora(self, "gate", x_BTD, dense(x_BTD, self.gate[...]), dropout_key)
      if cfg.mlp_bias:
        g = g + self.gate_bias[...].astype(dt)
      h = _act(cfg.act, g) * h
    else:
      h = _act(cfg.act, h)
    y = _plus_lora(self, "down", h, dense(h, self.down[...]), dropout_key)
    if cfg.mlp_bias:
      y = y + self.down_bias[...].astype(dt)
    return y


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); with post_norms (Gemma)
  x + norm(attn(norm(x))), then x + norm(mlp(norm(x)))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, index: int):
    self.window = cfg.window(index)
    self.attn_norm = Norm(cfg, cfg.d_model)
    self.attn = Attention(cfg, rngs, index)
    self.mlp_norm = Norm(cfg, cfg.d_model)
    self.mlp = MLP(cfg, rngs)
    if cfg.post_norms:
      self.attn_post_norm = Norm(cfg, cfg.d_model)
      self.mlp_post_norm = Norm(cfg, cfg.d_model)

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, kv: LayerCache | None = None,
               dropout_key=None, attention=True, mlp=True):
    """Self-attention over the chunk (kv=None) or through the layer's cache (`kv_cache.py`).

    Returns the block output and, with a cache, the written `LayerCache` (for a deferred one, the
    chunk's (k, v)). dropout_key: the layer's LoRA dropout key (training), None = no dropout.
    attention, mlp: True = the sublayer runs; False = it is the identity and its weights are not
    read (a sublayer plan); a [B, T] bool mask = its output is kept at those positions only
    (paper mode).
    """
    x, new_kv = x_BTD, None
    if attention is not False:
      x, new_kv = self._attend(x_BTD, positions_BT, segment_ids_BT, kv, dropout_key, attention)
    if mlp is False:
      return x, new_kv
    mlp_out = self.mlp(self.mlp_norm(x), dropout_key)
    if hasattr(self, "mlp_post_norm"):
      mlp_out = self.mlp_post_norm(mlp_out)
    return _where(mlp, x + mlp_out, x), new_kv

  def _attend(self, x_BTD, positions_BT, segment_ids_BT, kv, dropout_key, keep):
    """(x plus the attention output where `keep` (True or a [B, T] mask), the written cache)."""
    h = self.attn_norm(x_BTD)
    q, k, v = self.attn.project_qkv(h, positions_BT, dropout_key)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, Hd], the cache layout
    if kv is None:
      T = x_BTD.shape[1]
      causal = jnp.tril(jnp.ones((T, T), bool))
      same = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
      mask = causal[None] & same & (segment_ids_BT[:, None, :] > 0)
      k_all, v_all, k_pos, new_kv = k, v, positions_BT, None
    else:
      k_all, v_all, k_pos, mask, new_kv = kv.attend_inputs(k, v, positions_BT)
      k_all, v_all = k_all.astype(q.dtype), v_all.astype(q.dtype)
    if self.window is not None:  # positions, not slots: packed segments restart at 0
      mask = mask & (k_pos[:, None, :] > positions_BT[:, :, None] - self.window)
    attn_out = self.attn(q, positions_BT, k_all, v_all, k_pos, mask, dropout_key, kv is None)
    if hasattr(self, "attn_post_norm"):
      attn_out = self.attn_post_norm(attn_out)
    return _where(keep, x_BTD + attn_out, x_BTD), new_kv


def _where(keep, y_BTD: Array, x_BTD: Array) -> Array:
  """y, or y at the positions of a [B, T] mask `keep` and x elsewhere."""
  return y_BTD if keep is True else jnp.where(keep[..., None], y_BTD, x_BTD)


def layer_bytes(cfg: ModelConfig) -> LayerBytes:
  """Weight bytes a generated token reads (`skipping.LayerBytes`), from the parameter shapes: one
  block's attention and MLP sides, each with its norms, and the unembedding with the final norm
  (the embedding is one row per token: not counted)."""
  size = lambda module: sum(x.size * x.dtype.itemsize
                            for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
  block = nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(0), 0))
  sides = {side: sum(size(getattr(block, name)) for name in names if hasattr(block, name))
           for side, names in (("attention", ("attn_norm", "attn", "attn_post_norm")),
                               ("mlp", ("mlp_norm", "mlp", "mlp_post_norm")))}
  final_norm = nnx.eval_shape(lambda: Norm(cfg, cfg.d_model))
  unembed = cfg.d_model * cfg.vocab_size * jnp.dtype(cfg.param_dtype).itemsize
  return LayerBytes(fixed=unembed + size(final_norm), **sides)


class Decoder(nnx.Module):
  """Embedding, L blocks, final norm, unembedding.

  `model(tokens, skip=..., ...)` returns logits [B, T, V], or (logits, cache) with a cache.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pdt = jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt, scale=0.02)
    if cfg.pos == "learned":
      self.pos_embed = _param(rngs, (cfg.max_position, cfg.d_model), ("position", "embed"), pdt,
                              scale=0.02)
    if cfg.embed_norm:
      self.embed_norm = Norm(cfg, cfg.d_model)
    self.layers = nnx.List([Block(cfg, rngs, i) for i in range(cfg.num_layers)])
    self.final_norm = Norm(cfg, cfg.d_model)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pdt)
    if cfg.lora_rank:  # last, so the base weights are the ones the same seed gives without LoRA
      for layer in self.layers:
        layer.attn.add_adapters(rngs)
        layer.mlp.add_adapters(rngs)

  def embed_tokens(self, tokens_BT: Array, positions_BT: Array) -> Array:
    cfg = self.cfg
    x = jnp.take(self.embed[...], tokens_BT, axis=0).astype(cfg.dtype)
    if cfg.pos == "learned":
      x = x + jnp.take(self.pos_embed[...], jnp.maximum(positions_BT, 0), axis=0).astype(cfg.dtype)
    if cfg.embed_scale:  # rounded to the compute dtype first, as transformers does
      x = x * jnp.asarray(math.sqrt(cfg.d_model), cfg.dtype)
    if cfg.embed_norm:
      x = self.embed_norm(x)
    return x

  def unembed(self, x_BTD: Array) -> Array:
    x = self.final_norm(x_BTD)
    w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    logits = dense(x, w).astype(jnp.float32)
    return softcap(logits, self.cfg.final_softcap)

  def hidden(self, tokens_BT, *, skip=(), positions_BT=None, segment_ids_BT=None,
             full_depth_BT=None, full_depth_capacity: int | None = None,
             full_depth_fits: bool = False, cache: KVCache | None = None, cache_index=0,
             dropout_key=None):
    """Final hidden states [B, T, D] (before the final norm) and the updated cache (or None).
    full_depth_fits: the caller has checked that the batch fits the buffer
    (`prompt_buffer.plan(...).fits`), so skipped layers run on it with no `lax.cond`; other
    arguments as `__call__`'s."""
    cfg = self.cfg
    plan = as_plan(cfg.num_layers, skip)
    kept, cached = plan.kept, plan.attention_layers
    B, T = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones((B, T), jnp.int32)
    if cache is not None:
      if len(cache.k) != len(cached):
        raise ValueError(f"cache has {len(cache.k)} layers but skip={plan.skipped} keeps "
                         f"{len(cached)}: build it with init_cache(cfg, ..., skip=skip)")
      cache = cache.write_positions(positions_BT, segment_ids_BT, cache_index)
    x = self.embed_tokens(tokens_BT, positions_BT)
    buffer = None  # a buffer no smaller than the row would save nothing
    masked_paper = full_depth_BT is not None and full_depth_BT is not True
    if masked_paper and full_depth_capacity is not None and full_depth_capacity < T:
      buffer = prompt_buffer.plan(full_depth_BT, segment_ids_BT, full_depth_capacity)
      if full_depth_fits:
        buffer = buffer.replace(fits=True)
    written = []
    whole = plan.unit == "layer"
    attention_on, mlp_on = set(plan.attention_layers), set(plan.mlp_layers)
    for i, layer in enumerate(self.layers):
      is_kept = i in kept
      if not is_kept and full_depth_BT is None and whole:
        continue  # skipped everywhere: this layer's weights are never read
      layer_key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
      if not is_kept and masked_paper and whole:
        x = _skipped_layer(layer, x, positions_BT, segment_ids_BT, full_depth_BT, buffer,
                           cfg.remat, layer_key)
        continue
      # A sublayer plan's skipped block: off everywhere, or on at paper mode's full-depth
      # positions (on whole rows: the prompt buffer is for whole layers).
      paper = full_depth_BT is True or (False if full_depth_BT is None else full_depth_BT)
      attention = True if i in attention_on else paper
      mlp = True if i in mlp_on else paper
      kv = cache.layer(len(written), cache_index) if cache is not None and i in cached else None
      x, layer_kv = _run_block(layer, x, positions_BT, segment_ids_BT, kv, cfg.remat, layer_key,
                               attention, mlp)
      if layer_kv is not None:
        written.append(layer_kv)
    return x, None if cache is None else cache.with_layers(written)

  def __call__(self, tokens_BT, *, skip=(), positions_BT=None, segment_ids_BT=None,
               full_depth_BT=None, full_depth_capacity: int | None = None,
               cache: KVCache | None = None, cache_index=0, dropout_key=None):
    """Logits [B, T, V] (f32); with `cache`, (logits, updated cache).

    skip: static: a `SkipPlan` or a tuple of skipped layer indices (one compiled graph per
      distinct set of kept layers).
    positions_BT: token positions (default 0..T-1); with a cache, per-row absolute positions.
    segment_ids_BT: packed-sequence ids, 0 = padding (default all 1).
    full_depth_BT: None = skip everywhere; True or a [B, T] bool mask = paper mode (see module
      docstring). With a cache, paper mode is for a prefill from an empty cache: skipped layers
      keep no KV, so they only see the current chunk.
    full_depth_capacity: static; in paper mode with a mask, skipped layers run on a buffer of this
      many full-depth tokens per row (`prompt_buffer.py`); None = on the whole row.
    cache, cache_index: write this chunk's K/V at slots [cache_index, cache_index + T).
    dropout_key: a PRNG key for LoRA dropout (training); None = no dropout.
    """
    x, new_cache = self.hidden(tokens_BT, skip=skip, positions_BT=positions_BT,
                               segment_ids_BT=segment_ids_BT, full_depth_BT=full_depth_BT,
                               full_depth_capacity=full_depth_capacity, cache=cache,
                               cache_index=cache_index, dropout_key=dropout_key)
    logits = self.unembed(x)
    return logits if cache is None else (logits, new_cache)


def _run_block(layer: Block, x, positions, segment_ids, kv, remat: bool, dropout_key=None,
               attention=True, mlp=True):
  if remat:  # attention and mlp closed over: a traced False would not switch a sublayer off
    def call(layer, x, positions, segment_ids, kv, dropout_key):
      return layer(x, positions, segment_ids, kv, dropout_key, attention, mlp)
    return nnx.remat(call)(layer, x, positions, segment_ids, kv, dropout_key)
  return layer(x, positions, segment_ids, kv, dropout_key, attention, mlp)


def _skipped_layer(layer: Block, x, positions, segment_ids, full_depth, buffer, remat: bool,
                   dropout_key):
  """Paper mode's skipped layer: x with its full-depth positions taken through `layer`."""
  graphdef, state = nnx.split(layer)  # pure state, so the layer can enter lax.cond

  def masked(state, x):
    y, _ = _run_block(nnx.merge(graphdef, state), x, positions, segment_ids, None, remat,
                      dropout_key)
    return jnp.where(full_depth[..., None], y, x)

  def compact(state, x):
    y, _ = _run_block(nnx.merge(graphdef, state), prompt_buffer.gather(x, buffer),
                      prompt_buffer.gather(positions, buffer),
                      prompt_buffer.gather(segment_ids, buffer), None, remat, dropout_key)
    return prompt_buffer.scatter(x, y, buffer)

  if buffer is None:
    return masked(state, x)
  if buffer.fits is True:  # checked by the caller
    return compact(state, x)
  # The fallback is rematerialised: jax's cond keeps the residuals of both branches for the
  # backward pass, and whole-row activations would cost the buffer's saving in memory.
  return jax.lax.cond(buffer.fits, compact, jax.checkpoint(masked), state, x)
