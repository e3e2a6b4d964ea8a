"""Softmax attention of projected queries over keys and values, by one of several implementations.

`ModelConfig.attention_impl` chooses it:
  * "einsum": two grouped-query einsums with the softmax in f32; every feature of the model
    (soft-capped logits, ALiBi). The default.
  * "xla": `jax.nn.dot_product_attention(implementation="xla")`, JAX's own attention in plain XLA.
    It computes what "einsum" does on any backend, so the tests check the arguments the fused
    kernel gets (mask, GQA, scale, bias) on a CPU.
  * "cudnn": cuDNN's fused flash attention, the kernel behind the same call with
    implementation="cudnn", given K and V in the cache's layout (NVIDIA GPUs; bfloat16 or
    float16; head width a multiple of 8, at most 128, or 256 on Hopper and later).
  * "auto": "cudnn" where the model runs on an NVIDIA GPU and fits it, else "einsum" (the reason
    is logged once).
An explicit "xla" or "cudnn" the model cannot use is an error (`unfit_reason`), not a silent
fallback. `with_impl` switches a loaded model (infer.py's --attention-impl).

The mask always carries the whole visibility rule (causal, packed segments, sliding windows by
position, cache slots), so every implementation attends to the same keys. Self-attention over a
chunk also tells the call it is causal, which lets cuDNN skip the tiles above the diagonal; a
window is not passed as `local_window_size`, which counts slots, not positions (packed segments
restart at 0, cache slots are a ring), so cuDNN computes the tiles outside a window and masks them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from absl import logging

from ulskip_jax.ops import softcap

try:  # JAX's cuDNN call, whose layout argument its public one lacks (`_cudnn_attention`)
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fmha
except ImportError:  # moved in a later JAX: the public call, which transposes K and V
  cudnn_fmha = None

Array = jax.Array
AttentionImpl = Literal["einsum", "xla", "cudnn", "auto"]
NEG_INF = -1e30  # finite, so fully masked rows (padding queries) give no NaN
_CUDNN_DTYPES = ("bfloat16", "float16")


def unfit_reason(cfg, impl: str) -> str | None:
  """Why `jax.nn.dot_product_attention(implementation=impl)` cannot compute the attention of
  `cfg` (a `model.ModelConfig`), or None if it can (backend aside)."""
  if impl == "einsum":
    return None
  if cfg.attn_softcap is not None:
    return (f"attn_softcap={cfg.attn_softcap} (soft-capped logits, Gemma 2) is not an option of "
            "jax.nn.dot_product_attention")
  if impl != "cudnn":
    return None
  if cfg.dtype not in _CUDNN_DTYPES:
    return f"cuDNN's fused attention takes {' or '.join(_CUDNN_DTYPES)} inputs, not {cfg.dtype}"
  if cfg.head_dim % 8 or cfg.head_dim > 256:
    return f"cuDNN's fused attention needs a head width that is a multiple of 8 up to 256, not " \
           f"{cfg.head_dim}"
  if cfg.pos == "alibi":
    return (f"cuDNN adds the bias in the inputs' dtype ({cfg.dtype}): ALiBi's slope x distance "
            "would lose the differences softmax depends on")
  return None


def resolve(cfg, backend: str | None = None) -> tuple[str, str | None]:
  """(the implementation `cfg.attention_impl` runs: "einsum", "xla" or "cudnn", why "auto" did
  not pick cuDNN or None). backend: JAX's platform name, default `jax.default_backend()`.
  Raises ValueError for an explicit "xla" or "cudnn" that cannot compute this model."""
  impl = cfg.attention_impl
  if impl != "auto":
    reason = unfit_reason(cfg, impl)
    if reason:
      raise ValueError(f"attention_impl={impl!r} cannot compute this model's attention: {reason}; "
                       "use 'einsum' or 'auto'")
    return impl, None
  backend = backend or jax.default_backend()
  if backend != "gpu" or "cuda" not in jax.devices(backend)[0].client.platform_version:
    return "einsum", f"cuDNN's fused attention needs an NVIDIA GPU (the backend is {backend})"
  reason = unfit_reason(cfg, "cudnn")
  major = int(str(getattr(jax.devices(backend)[0], "compute_capability", "0")).split(".")[0])
  if reason is None and cfg.head_dim > 128 and major < 9:
    reason = f"cuDNN before Hopper takes heads of at most 128, not {cfg.head_dim}"
  return ("einsum", reason) if reason else ("cudnn", None)


def with_impl(model, impl: str):
  """`model` (a `model.Decoder`) on the same weights, computing attention by `impl`. ValueError,
  one line, where `impl` cannot compute this model's attention here (cuDNN off an NVIDIA GPU)."""
  from flax import nnx
  cfg = dataclasses.replace(model.cfg, attention_impl=impl)
  reason = unfit_reason(cfg, impl)
  if reason is None and impl == "cudnn" and jax.default_backend() != "gpu":
    reason = f"cuDNN's fused attention needs an NVIDIA GPU (the backend is {jax.default_backend()})"
  if reason:
    raise ValueError(f"attention_impl={impl!r} cannot compute this model's attention: {reason}; "
                     "use 'einsum' or 'auto'")
  rebuilt = nnx.eval_shape(lambda: type(model)(cfg, rngs=nnx.Rngs(0)))
  nnx.update(rebuilt, nnx.state(model))
  return rebuilt


def attend(cfg, q_BTHD: Array, k_BKSD: Array, v_BKSD: Array, mask_BTS: Array,
           bias_BHTS: Array | None = None, causal: bool = False) -> Array:
  """Grouped-query attention (query head h reads KV head h // G) of `cfg`'s implementation.

  Logits are scaled by query_pre_attn_scalar ** -0.5 (None: Hd ** -0.5), soft-capped at
  attn_softcap, biased (ALiBi, f32), then masked. causal: the mask is causal over a chunk's own
  keys (no cache), which a fused kernel can exploit; the mask must say so too."""
  impl, reason = resolve(cfg)
  if reason:
    logging.log_first_n(logging.INFO, "attention_impl='auto' runs einsum attention: %s", 1, reason)
  scale_dim = cfg.query_pre_attn_scalar or q_BTHD.shape[-1]
  if impl == "einsum":
    return _einsum_attention(q_BTHD, k_BKSD, v_BKSD, mask_BTS, bias_BHTS, scale_dim,
                             cfg.attn_softcap)
  if impl == "cudnn" and cudnn_fmha is not None:
    return _cudnn_attention(q_BTHD, k_BKSD, v_BKSD, mask_BTS, scale_dim, causal)
  # The call's layout is [B, S, K, Hd]; the cache keeps [B, K, S, Hd] (`kv_cache.py`).
  k_BSKD, v_BSKD = k_BKSD.transpose(0, 2, 1, 3), v_BKSD.transpose(0, 2, 1, 3)
  return jax.nn.dot_product_attention(
      q_BTHD, k_BSKD, v_BSKD, bias=bias_BHTS, mask=mask_BTS[:, None],
      scale=1.0 / math.sqrt(scale_dim), is_causal=causal, implementation=impl)


def _cudnn_attention(q_BTHD, k_BKSD, v_BKSD, mask_BTS, scale_dim, causal):
  """cuDNN's fused attention reading K and V in the cache's own layout, [B, K, S, Hd] (cuDNN's
  BNSH). Given [B, S, K, Hd], as `jax.nn.dot_product_attention` takes them, XLA:GPU transposed
  every cache layer on every step of continuous batching's and speculative decoding's loops
  (benchmarks/gpu_hlo.py); only the small query is transposed here."""
  out_BHTD = cudnn_fmha.dot_product_attention(
      q_BTHD.transpose(0, 2, 1, 3), k_BKSD, v_BKSD, mask=mask_BTS[:, None],
      scale=1.0 / math.sqrt(scale_dim), qkv_layout="BNTH",
      mask_type=cudnn_fmha.MaskType.CAUSAL if causal else cudnn_fmha.MaskType.NO_MASK)
  return out_BHTD.transpose(0, 2, 1, 3)


def _einsum_attention(q_BTHD, k_BKSD, v_BKSD, mask_BTS, bias_BHTS, scale_dim, cap):
  B, T, H, Hd = q_BTHD.shape
  K = k_BKSD.shape[1]
  q = q_BTHD.reshape(B, T, K, H // K, Hd)
  logits = jnp.einsum("btkgd,bksd->bkgts", q, k_BKSD).astype(jnp.float32)
  logits = softcap(logits / math.sqrt(scale_dim), cap)
  if bias_BHTS is not None:  # [B, H, T, S] -> [B, K, G, T, S]
    logits = logits + bias_BHTS.reshape(B, K, H // K, T, -1)
  logits = jnp.where(mask_BTS[:, None, None], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BKSD.dtype)
  return jnp.einsum("bkgts,bksd->btkgd", probs, v_BKSD).reshape(B, T, H, Hd)
