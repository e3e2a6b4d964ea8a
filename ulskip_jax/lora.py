"""LoRA: low-rank adapters on the model's projections, which parameters train, and merging.

An adapter on a projection W ([in..., out...], e.g. q: [D, H, Hd], o: [H, Hd, D]) adds
  y += dropout(x) . A . B * alpha / rank,   A: [in..., r], B: [r, out...]
with A random (std 1/sqrt(fan_in), as a projection of the same input is initialised) and B zero,
so a fresh adapter changes nothing (Hu et al. 2021). The model creates adapters only when
`ModelConfig.lora_rank > 0` (model.py); at rank 0 no adapter parameter exists and the projections
run as before.

Training with adapters differentiates and optimises only `split(params, ...)[0]`: the adapters
and, with `train_norms`, the norm scales and biases. The rest of the model stays bit-for-bit as
loaded, and the optimizer state holds moments for the trainable subset only.

`merge_params` folds each adapter into its base weight (W + A . B * scale) and drops it;
`merge(model)` gives the plain model (lora_rank 0) that inference and the Hugging Face export use.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import traversals

from ulskip_jax.checks import as_float, as_int
from ulskip_jax.ops import dense

Array = jax.Array
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the projections an adapter can sit on
SUFFIX = "_lora"  # an adapter of projection `q` is the module attribute `q_lora`


def check_targets(name: str, targets) -> None:
  """One-line ValueError unless `targets` is a tuple of distinct names among TARGETS."""
  if isinstance(targets, (str, bytes)) or not hasattr(targets, "__iter__"):
    raise ValueError(f"{name}={targets!r} is invalid: give a tuple of projection names among "
                     + ", ".join(map(repr, TARGETS)))
  for t in targets:
    if t not in TARGETS:
      raise ValueError(f"{name}={tuple(targets)!r} has {t!r}, which is unknown: allowed are "
                       + ", ".join(map(repr, TARGETS)))
  if len(set(targets)) != len(tuple(targets)):
    raise ValueError(f"{name}={tuple(targets)!r} names a projection twice")


def check(rank, targets, dropout=0.0, alpha=1.0, *, prefix: str = "lora_") -> None:
  """One-line ValueError for a bad LoRA setting; `prefix` names the keys (lora_ or optim.lora.)."""
  as_int(f"{prefix}rank", rank, min=0)
  as_float(f"{prefix}alpha", alpha, min=0, min_open=True)
  as_float(f"{prefix}dropout", dropout, min=0, max=1, max_open=True)
  check_targets(f"{prefix}targets", targets)
  if rank and not tuple(targets):
    raise ValueError(f"{prefix}targets=() is empty with {prefix}rank={rank}: name at least one "
                     "of " + ", ".join(map(repr, TARGETS)))


def model_fields(lora_config) -> dict:
  """The ModelConfig lora_ fields a run's `optim.lora` sets: none when rank is 0 (no adapters)."""
  if not lora_config.rank:
    return {}
  return dict(lora_rank=int(lora_config.rank), lora_alpha=float(lora_config.alpha),
              lora_dropout=float(lora_config.dropout), lora_targets=tuple(lora_config.targets))


class Adapter(nnx.Module):
  """The low-rank update of one projection with input dims `in_shape` and output `out_shape`."""

  def __init__(self, target: str, in_shape: tuple, out_shape: tuple, in_axes: tuple,
               out_axes: tuple, *, rank: int, alpha: float, dropout: float, dtype, rngs: nnx.Rngs):
    fan_in = math.prod(in_shape)
    self.index = TARGETS.index(target)  # folded into the dropout key: one mask per projection
    self.scale, self.dropout = alpha / rank, dropout
    self.a = nnx.Param(jax.random.normal(rngs.params(), (*in_shape, rank), dtype)
                       / math.sqrt(fan_in), axes=(*in_axes, None))
    self.b = nnx.Param(jnp.zeros((rank, *out_shape), dtype), axes=(None, *out_axes))

  def __call__(self, x: Array, dropout_key: Array | None = None) -> Array:
    """The update for input x [B, T, in...]: [B, T, out...]. Dropout only with a key."""
    if self.dropout and dropout_key is not None:
      key = jax.random.fold_in(dropout_key, self.index)
      keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
    a = self.a[...]
    return dense(dense(x, a, a.ndim - 1), self.b[...]) * jnp.asarray(self.scale, x.dtype)


# ----------------------------------------------------------------------------------------------
# Pure functions on parameter dicts (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`).

def is_adapter(path: tuple) -> bool:
  return any(isinstance(k, str) and k.endswith(SUFFIX) for k in path)


def is_norm(path: tuple) -> bool:
  return any(isinstance(k, str) and k.endswith("norm") for k in path[:-1])


def split(params: dict, *, enabled: bool, train_norms: bool = False) -> tuple[dict, dict]:
  """(trainable, frozen): the adapters (and norms with `train_norms`), and everything else.

  Disabled (full fine-tuning), it is (params, {}): the same tree, so the optimizer state of a run
  without LoRA keeps its structure.
  """
  if not enabled:
    return split_none(params)
  flat = traversals.flatten_mapping(params)
  train = {p: x for p, x in flat.items() if is_adapter(p) or (train_norms and is_norm(p))}
  frozen = {p: x for p, x in flat.items() if p not in train}
  return traversals.unflatten_mapping(train), traversals.unflatten_mapping(frozen)


def split_none(params: dict) -> tuple[dict, dict]:
  """`split` for full fine-tuning: (params, {})."""
  return params, {}


def combine(trainable: dict, frozen: dict) -> dict:
  """The inverse of `split`."""
  if not frozen:
    return trainable
  flat = {**traversals.flatten_mapping(frozen), **traversals.flatten_mapping(trainable)}
  return traversals.unflatten_mapping(flat)


def merge_params(params: dict, scale: float) -> dict:
  """Params with every adapter folded into its base weight (in f32, cast back) and removed."""
  flat = traversals.flatten_mapping(params)
  out = {p: x for p, x in flat.items() if not is_adapter(p)}
  for path, a in flat.items():
    if not (is_adapter(path) and path[-1] == "a"):
      continue
    b = flat[(*path[:-1], "b")]
    base = (*path[:-2], path[-2][:-len(SUFFIX)])
    w = out[base]
    delta = jnp.tensordot(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), axes=1)
    out[base] = (jnp.asarray(w, jnp.float32) + scale * delta).astype(w.dtype)
  return traversals.unflatten_mapping(out)


def base_config(cfg: Any) -> Any:
  """The model config without adapters (a ModelConfig with the lora_ fields at their defaults)."""
  defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.name.startswith("lora_")}
  return dataclasses.replace(cfg, **defaults)


def merge(model: nnx.Module) -> nnx.Module:
  """The same model class without adapters, computing what `model` does (adapters folded in).

  A model without adapters comes back as it is.
  """
  cfg = model.cfg
  if not cfg.lora_rank:
    return model
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  params = merge_params(params, cfg.lora_alpha / cfg.lora_rank)
  merged = nnx.eval_shape(lambda: type(model)(base_config(cfg), rngs=nnx.Rngs(0)))
  state = nnx.state(merged, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(merged, state)
  return merged
