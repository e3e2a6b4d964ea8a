"""Adapters per ratio on a frozen base: one set of LoRA adapters (lora.py) per speedup ratio.

`RatioAdaptedDecoder` holds a base `Decoder` and, for each sub-model plan of a run (one per ratio
of `skip.ratios` above 1, resolved once by `skipping.plan_for`), LoRA adapters on that plan's
kept layers only. Its forward at a plan is the base plus that plan's adapters over the kept
layers; at full depth, or at a plan without adapters, it is the base itself, bit for bit. One
model object therefore serves every ratio, and self-speculative decoding with it drafts with
base + adapter and verifies with the base alone: lossless by construction.

Training (`optim.lora.per_ratio`, train_lib.py): only the adapters are trainable (`lora.split`:
their paths hold `<target>_lora`), so the base never changes, and each step trains every ratio's
adapters on that ratio's own loss. Decoding at one plan runs `merged(model, plan)`: a plain
`Decoder` with the plan's adapters folded into its kept layers, at the base model's cost.

Parameters: {"base": the Decoder's, "adapters": [per plan: {"attn": {"q_lora": {"a", "b"}, ...},
"mlp": {...}}]}, each adapter stacked over the plan's kept layers (a: [kept, in..., rank], b:
[kept, rank, out...]); the checkpoint meta records the plans (`meta`, `new_model`). docs/adapters.md has the layout of the exported folders.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import traversals

from ulskip_jax import lora
from ulskip_jax.model import MLP, Attention, Decoder, ModelConfig
from ulskip_jax.skipping import SkipPlan, as_plan, plan_for

META_KEY = "ratio_adapters"  # the checkpoint meta entry holding the plans


def run_plans(config, num_layers: int, windows=None) -> tuple[tuple[float, SkipPlan], ...]:
  """(ratio, plan) per ratio of `skip.ratios` that skips a layer, in the config's order, one per
  distinct plan: the sub-models that get adapters."""
  out, seen = [], set()
  for ratio in config.skip.ratios:
    plan = plan_for(config, num_layers, ratio, windows)
    if plan.skipped and plan not in seen:
      seen.add(plan)
      out.append((float(ratio), plan))
  return tuple(out)


class _Stacked(nnx.Module):
  """One projection's adapters on every kept layer of a plan: a [n, in..., r], b [n, r, out...],
  drawn as `lora.Adapter` draws one layer's (a random with std 1/sqrt(fan_in), b zero)."""

  def __init__(self, n: int, a_shape, a_axes, b_shape, b_axes, dtype, rngs: nnx.Rngs):
    fan_in = math.prod(a_shape[:-1])
    self.a = nnx.Param(jax.random.normal(rngs.params(), (n, *a_shape), dtype) / math.sqrt(fan_in),
                       axes=(None, *a_axes))
    self.b = nnx.Param(jnp.zeros((n, *b_shape), dtype), axes=(None, *b_axes))


class _Block(nnx.Module):
  """The stacked adapters of one block kind (attn or mlp), named as the block's own."""

  def __init__(self, stacked: dict):
    for name, adapters in stacked.items():
      setattr(self, name, adapters)


class _PlanAdapters(nnx.Module):
  def __init__(self, cfg: ModelConfig, n: int, rngs: nnx.Rngs):
    for kind, block in zip(("attn", "mlp"), _adapter_blocks(cfg)):
      setattr(self, kind, _Block({
          name: _Stacked(n, a.shape, a.get_metadata()["axes"], b.shape, b.get_metadata()["axes"],
                         a.dtype, rngs)
          for name in (t + lora.SUFFIX for t in lora.TARGETS) if hasattr(block, name)
          for a, b in [(getattr(block, name).a, getattr(block, name).b)]}))


@functools.lru_cache(maxsize=None)
def _adapter_blocks(cfg: ModelConfig):
  """Abstract attention and MLP blocks of a LoRA `cfg` model, with their adapters: the shapes
  and axes of one layer's (the same in every layer). Two blocks, not a whole model: building
  a model's parameters inside a trace costs time in their number."""
  def blocks():
    rngs = nnx.Rngs(0)
    attn, mlp = Attention(cfg, rngs, 0), MLP(cfg, rngs)
    attn.add_adapters(rngs)
    mlp.add_adapters(rngs)
    return attn, mlp
  return nnx.eval_shape(blocks)


@functools.lru_cache(maxsize=None)
def _adapted_graphdef(cfg: ModelConfig, skipped: tuple[int, ...]):
  """The graph of a LoRA `cfg` Decoder whose adapters sit on the layers not in `skipped` only."""
  model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  for i in skipped:
    for block in (model.layers[i].attn, model.layers[i].mlp):
      for target in lora.TARGETS:
        if hasattr(block, target + lora.SUFFIX):
          delattr(block, target + lora.SUFFIX)
  return nnx.graphdef(model)


class RatioAdaptedDecoder(nnx.Module):
  """A frozen base Decoder plus LoRA adapters per plan (module docstring); used as a Decoder.

  cfg: the base's config (no adapters), what decoding and the losses read; lora_cfg: the same
  with the adapters' lora_ fields. ratios[j] names plans[j], whose adapters are adapters[j].
  """

  def __init__(self, cfg: ModelConfig, ratios, plans, *, rngs: nnx.Rngs):
    if not cfg.lora_rank:
      raise ValueError("adapters per ratio need lora_rank > 0")
    self.lora_cfg, self.cfg = cfg, lora.base_config(cfg)
    self.ratios = tuple(float(r) for r in ratios)
    self.plans = tuple(as_plan(cfg.num_layers, p) for p in plans)
    # The base first, so that a seed draws the same base as Decoder(self.cfg) does.
    self.base = Decoder(self.cfg, rngs=rngs)
    self.adapters = nnx.List([_PlanAdapters(cfg, len(p.kept), rngs) for p in self.plans])

  # The base's parts, read by the losses (loss.py) and the decoders.
  @property
  def embed(self):
    return self.base.embed

  @property
  def lm_head(self):
    return self.base.lm_head

  @property
  def final_norm(self):
    return self.base.final_norm

  @property
  def layers(self):
    return self.base.layers

  def embed_tokens(self, tokens_BT, positions_BT):
    return self.base.embed_tokens(tokens_BT, positions_BT)

  def unembed(self, x_BTD):
    return self.base.unembed(x_BTD)

  def plan_at(self, ratio: float) -> SkipPlan | None:
    """The plan trained at `ratio`, or None when no adapters were trained at it."""
    return dict(zip(self.ratios, self.plans)).get(float(ratio))

  def decoder_for(self, skip) -> Decoder:
    """The Decoder this model is at plan `skip`: the base with the plan's adapters on its kept
    layers, or the base itself (full depth, or a plan without adapters)."""
    plan = as_plan(self.cfg.num_layers, skip)
    if plan not in self.plans:
      return self.base
    j = self.plans.index(plan)
    params = traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(self.base, nnx.Param)))
    for path, x in traversals.flatten_mapping(
        nnx.to_pure_dict(nnx.state(self.adapters[j], nnx.Param))).items():
      for k, layer in enumerate(plan.kept):  # path: ("attn", "q_lora", "a"), x: [kept, ...]
        params[("layers", layer, *path)] = x[k]
    return nnx.merge(_adapted_graphdef(self.lora_cfg, plan.skipped),
                     traversals.unflatten_mapping(params))

  def hidden(self, tokens_BT, *, skip=(), **kw):
    """`Decoder.hidden` of `decoder_for(skip)`."""
    return self.decoder_for(skip).hidden(tokens_BT, skip=skip, **kw)

  def __call__(self, tokens_BT, *, skip=(), **kw):
    """`Decoder.__call__` of `decoder_for(skip)`."""
    return self.decoder_for(skip)(tokens_BT, skip=skip, **kw)


def merged(model, skip) -> Decoder:
  """A plain Decoder computing `model` at plan `skip` (its adapters folded into the kept layers'
  weights): at the base model's cost. Any other model comes back as it is."""
  if not isinstance(model, RatioAdaptedDecoder):
    return model
  return lora.merge(model.decoder_for(skip))


def adapter_counts(model: RatioAdaptedDecoder) -> dict[float, int]:
  """Adapter parameters per ratio (the model may be abstract, from `nnx.eval_shape`)."""
  return {ratio: sum(x.size for x in jax.tree.leaves(nnx.state(adapters, nnx.Param)))
          for ratio, adapters in zip(model.ratios, model.adapters)}


def base_count(model: RatioAdaptedDecoder) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model.base, nnx.Param)))


def params_line(model: RatioAdaptedDecoder) -> str:
  """e.g. 'adapters per ratio: r1.5 3.26M (2.4% of the base's 134.52M), r2 2.44M (1.8%)'."""
  base = base_count(model)
  parts = [f"r{r:g} {n / 1e6:.2f}M ({100 * n / base:.1f}%"
           + (f" of the base's {base / 1e6:.2f}M)" if i == 0 else ")")
           for i, (r, n) in enumerate(adapter_counts(model).items())]
  return "adapters per ratio (frozen base): " + ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# Checkpoints, inference and export.

def meta(model: RatioAdaptedDecoder) -> dict:
  """What a checkpoint's meta records to rebuild the model (JSON)."""
  return dict(ratios=list(model.ratios), skipped=[list(p.skipped) for p in model.plans],
              strategies=[p.strategy for p in model.plans])


def new_model(cfg: ModelConfig, meta_: dict | None, *, rngs: nnx.Rngs):
  """The model a checkpoint's meta describes: a RatioAdaptedDecoder when it records adapters per
  ratio (`META_KEY`), else a Decoder."""
  record = (meta_ or {}).get(META_KEY)
  if not record:
    return Decoder(cfg, rngs=rngs)
  plans = [dataclasses.replace(as_plan(cfg.num_layers, tuple(s)), strategy=name)
           for s, name in zip(record["skipped"], record["strategies"])]
  return RatioAdaptedDecoder(cfg, record["ratios"], plans, rngs=rngs)


def for_run(model, kw: dict) -> tuple:
  """(model, generate keyword arguments) to decode one run of `kw` (ratio= / skip= /
  speculative=) with: on a RatioAdaptedDecoder, a ratio becomes the plan its adapters were
  trained on, and a plain run decodes the merged Decoder of its plan; a speculative run keeps
  the model (its draft needs the adapters, its verifier the base). Others are left as they are."""
  if not isinstance(model, RatioAdaptedDecoder):
    return model, kw
  kw = dict(kw)
  if "speculative" in kw:
    options = dict(kw["speculative"])
    plan = options.get("draft_ratio") is not None and model.plan_at(options["draft_ratio"])
    if plan and options.get("draft_skip") is None:
      options.pop("draft_ratio")
      options["draft_skip"] = plan
    kw["speculative"] = options
    return model, kw
  if kw.get("ratio") is not None and model.plan_at(kw["ratio"]) is not None:
    kw["skip"] = model.plan_at(kw.pop("ratio"))
  if kw.get("skip") is None:
    return model.base, kw  # full depth: the base itself
  return merged(model, kw["skip"]), kw


def save_pretrained(model: RatioAdaptedDecoder, path, *, ratio: float | None = None,
                    tokenizer=None) -> None:
  """Export to a Hugging Face folder. `ratio`: that sub-model, adapters merged and its skipped
  layers removed (a plain model of the family, e.g. LlamaForCausalLM). None: the base as a
  plain folder, plus `ratio_adapters.json` (per ratio: rank, alpha, targets, kept layers, file)
  and one `adapters_r<ratio>.safetensors` per ratio, tensors named
  `layers.<layer>.<attn|mlp>.<target>.lora_a|lora_b` in our own layout ([in..., r] and
  [r, out...]; docs/adapters.md)."""
  from safetensors.numpy import save_file
  from ulskip_jax import hf
  if ratio is not None:
    plan = model.plan_at(ratio)
    if plan is None:
      raise ValueError(f"ratio={ratio!r} has no adapters: this model has them at ratios "
                       + ", ".join(f"{r:g}" for r in model.ratios))
    hf.save_pretrained(merged(model, plan), path, skip=plan, tokenizer=tokenizer)
    return
  hf.save_pretrained(model.base, path, tokenizer=tokenizer)
  cfg, index = model.lora_cfg, []
  for r, plan, adapters in zip(model.ratios, model.plans, model.adapters):
    tensors = {}
    for p, x in traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(adapters, nnx.Param))).items():
      block, target, ab = p
      for k, layer in enumerate(plan.kept):
        name = f"layers.{layer}.{block}.{target[:-len(lora.SUFFIX)]}.lora_{ab}"
        tensors[name] = np.ascontiguousarray(np.asarray(x[k]))
    file = f"adapters_r{r:g}.safetensors"
    save_file(tensors, os.path.join(path, file))
    index.append(dict(ratio=r, kept_layers=list(plan.kept), skipped_layers=list(plan.skipped),
                      strategy=plan.strategy, file=file))
  record = dict(rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=list(cfg.lora_targets),
                scale=cfg.lora_alpha / cfg.lora_rank, ratios=index)
  with open(os.path.join(path, "ratio_adapters.json"), "w") as f:
    f.write(json.dumps(record, indent=2) + "\n")


def from_pretrained(path, *, dtype: str = "float32"):
  """(RatioAdaptedDecoder, tokenizer) from a folder `save_pretrained(model, path)` wrote (the
  base plus every ratio's adapters)."""
  from safetensors.numpy import load_file
  from ulskip_jax import hf
  base, tokenizer = hf.from_pretrained(path, dtype=dtype)
  with open(os.path.join(path, "ratio_adapters.json")) as f:
    record = json.load(f)
  cfg = dataclasses.replace(base.cfg, lora_rank=record["rank"], lora_alpha=record["alpha"],
                            lora_targets=tuple(record["targets"]))
  plans = [dataclasses.replace(as_plan(cfg.num_layers, tuple(r["skipped_layers"])),
                               strategy=r["strategy"]) for r in record["ratios"]]
  model = nnx.eval_shape(lambda: RatioAdaptedDecoder(
      cfg, [r["ratio"] for r in record["ratios"]], plans, rngs=nnx.Rngs(0)))
  params = {("base", *p): x for p, x in traversals.flatten_mapping(
      nnx.to_pure_dict(nnx.state(base, nnx.Param))).items()}
  for j, (r, plan) in enumerate(zip(record["ratios"], plans)):
    tensors = load_file(os.path.join(path, r["file"]))
    for name in {n.split(".", 2)[2] for n in tensors}:  # "attn.q.lora_a"
      block, target, ab = name.split(".")
      params[("adapters", j, block, target + lora.SUFFIX, ab[len("lora_"):])] = np.stack(
          [tensors[f"layers.{layer}.{name}"] for layer in plan.kept])
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, traversals.unflatten_mapping(params))
  nnx.update(model, state)
  return model, tokenizer
