"""The Hugging Face model families we load and write: one `Family` entry each, in `FAMILIES`.

An entry holds everything that differs between families: the HF model_type and architecture, the
config.json <-> `ModelConfig` mapping both ways, the tensor names, and how fused tensors are laid
out. `hf.py` holds the machinery that reads and writes folders with them, so adding a dense
family is one entry here, the `ModelConfig` switches it needs (model.py), and its tests.

Tensor names map a HF name inside the CausalLM (after `base` and, per layer,
`{layer_list}.{i}.`) to our key, a dotted path inside a layer ("attn.q") or the model. A fused HF
tensor maps to a key of `FUSED`, which names its parts.

Several families compute the same thing for some configs (a Mistral without sliding window is a
Llama; a SmolLM3 whose layers all use RoPE is a Llama with optional biases). `infer` picks the
family for a `ModelConfig` with no model_type given: the one whose `default_for` claims it; the
predicates are exclusive, so the choice never depends on the order of the entries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from ulskip_jax.model import ModelConfig

_ACTIVATIONS = dict(silu="silu", swish="silu", gelu="gelu", gelu_new="gelu_tanh",
                    gelu_pytorch_tanh="gelu_tanh")
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings")
# Fused HF tensors: our key -> the keys of its parts, in the order they are concatenated.
FUSED = {"attn.qkv": ("attn.q", "attn.k", "attn.v"),
         "attn.qkv_bias": ("attn.q_bias", "attn.k_bias", "attn.v_bias"),
         "mlp.gate_up": ("mlp.gate", "mlp.up")}
# Lists in config.json with one entry per layer: a pruned export keeps the kept layers' entries.
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")
# Attention kinds whose layers are softmax attention over a KV cache (the blocks ULS skips).
_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class Family:
  model_type: str
  architecture: str
  config_from_hf: Callable[[dict], ModelConfig]
  # The family's own config.json fields for a ModelConfig (the common ones are added by hf.py).
  config_to_hf: Callable[[ModelConfig], dict]
  layer_names: Mapping[str, str]
  top_names: Mapping[str, str]
  default_for: Callable[[ModelConfig], bool] = lambda cfg: False
  base: str = "model."
  layer_list: str = "layers"
  num_layers_key: str = "num_hidden_layers"
  conv1d: bool = False           # GPT-2's Conv1D stores [in, out], not nn.Linear's [out, in]
  # Whether config.json's layer_types says which layers slide (a pruned export rewrites it from
  # the model, so that each kept layer keeps its kind whatever rule wrote the original).
  layer_types: bool = False
  interleaved_qkv: bool = False  # BLOOM's fused qkv is [H, 3, Hd]; otherwise q | k | v


# ----------------------------------------------------------------------------------------------
# config.json reading helpers.

def _get(hf: dict, *keys: str, default: Any = None, required: bool = False) -> Any:
  """The first of `keys` set (not null) in config.json; old and new HF names differ per family."""
  for key in keys:
    if hf.get(key) is not None:
      return hf[key]
  if required:
    raise ValueError(f"config.json has no {' / '.join(keys)}: it is required for model_type="
                     f"{hf.get('model_type')!r}")
  return default


def _activation(name: str) -> str:
  if name not in _ACTIVATIONS:
    raise ValueError(f"activation {name!r} is unsupported: allowed are "
                     f"{', '.join(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def _rope(hf: dict) -> tuple[float, tuple | None]:
  """(rope_theta, rope_scaling) from transformers 5's `rope_parameters` or the older keys."""
  params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
    raise ValueError("partial_rotary_factor != 1 is unsupported: RoPE rotates whole heads here")
  kind = params.get("rope_type", params.get("type", "default"))
  if kind == "default":
    return theta, None
  if kind == "linear":
    return theta, (("factor", float(params["factor"])), ("rope_type", "linear"))
  if kind != "llama3":
    raise ValueError(f"rope type {kind!r} is unsupported: allowed are 'default', 'linear' and "
                     "'llama3'")
  scaling = {k: float(params[k]) for k in _LLAMA3_ROPE_KEYS}
  scaling["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
  return theta, tuple(sorted({**scaling, "rope_type": "llama3"}.items()))


def _layer_windows(hf: dict, window: int | None, default_types: list[str]) -> tuple | None:
  """Per-layer windows: `window` on the layers config.json's layer_types (else `default_types`,
  transformers' rule when it is absent) marks sliding_attention, None (global) elsewhere."""
  types = hf.get("layer_types") or default_types
  num_layers = _get(hf, "num_hidden_layers", required=True)
  if len(types) != num_layers:
    raise ValueError(f"{hf['model_type']} layer_types has {len(types)} entries but "
                     f"num_hidden_layers={num_layers}: it needs one per layer")
  return tuple(window if kind == "sliding_attention" else None for kind in types)


def _every_layer_window(hf: dict) -> tuple | None:
  """Mistral and Phi-3 slide every layer by sliding_window (they ignore layer_types)."""
  return (hf.get("sliding_window"),) * _get(hf, "num_hidden_layers", required=True)


def _max_window_layers_windows(hf: dict) -> tuple | None:
  """Qwen2 / Qwen3: with use_sliding_window, layers from max_window_layers on slide, unless
  layer_types says otherwise (transformers nulls sliding_window without use_sliding_window)."""
  window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
  first = hf.get("max_window_layers", 28)
  return _layer_windows(hf, window, [
      "sliding_attention" if window is not None and i >= first else "full_attention"
      for i in range(_get(hf, "num_hidden_layers", required=True))])


def layer_types(cfg: ModelConfig) -> list[str]:
  """config.json's layer_types for a model: which layers slide."""
  return ["full_attention" if cfg.window(i) is None else "sliding_attention"
          for i in range(cfg.num_layers)]


def _one_window(cfg: ModelConfig) -> int | None:
  """The window the windowed layers share (a config.json holds one), None if none slides."""
  windows = sorted({w for w in cfg.attention_windows or () if w is not None})
  return windows[0] if windows else None


def _every_layer_window_to_hf(cfg: ModelConfig) -> dict:
  return dict(sliding_window=_one_window(cfg))


def _max_window_layers_to_hf(cfg: ModelConfig) -> dict:
  if cfg.attention_windows is None:
    return dict(use_sliding_window=False)
  types = layer_types(cfg)
  return dict(use_sliding_window=True, sliding_window=_one_window(cfg), layer_types=types,
              max_window_layers=types.index("sliding_attention"))


def _rope_config(hf: dict, **switches) -> ModelConfig:
  """The fields every RoPE family (Llama's layout) reads the same way, plus its switches."""
  d_model = _get(hf, "hidden_size", required=True)
  num_heads = _get(hf, "num_attention_heads", required=True)
  theta, scaling = _rope(hf)
  fields = dict(
      vocab_size=_get(hf, "vocab_size", required=True),
      num_layers=_get(hf, "num_hidden_layers", required=True),
      d_model=d_model, num_heads=num_heads,
      num_kv_heads=_get(hf, "num_key_value_heads", default=num_heads),
      head_dim=_get(hf, "head_dim", default=d_model // num_heads),
      d_ff=_get(hf, "intermediate_size", required=True),
      norm="rms", norm_eps=float(_get(hf, "rms_norm_eps", default=1e-6)),
      mlp="gated", act=_activation(_get(hf, "hidden_act", default="silu")),
      pos="rope", max_position=_get(hf, "max_position_embeddings", default=2048),
      rope_theta=theta, rope_scaling=scaling,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
  return ModelConfig(**{**fields, **switches})


def _rope_to_hf(cfg: ModelConfig) -> dict:
  """Rope settings use the `rope_theta` / `rope_scaling` keys, which transformers 4 and 5 and the
  serving engines all read."""
  return dict(hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
              hidden_act=dict(gelu_tanh="gelu_pytorch_tanh").get(cfg.act, cfg.act),
              max_position_embeddings=cfg.max_position, rms_norm_eps=cfg.norm_eps,
              rope_theta=cfg.rope_theta,
              rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None)


def _gemma(hf: dict, qk_norm: bool, pattern: int) -> ModelConfig:
  """Gemma 2 (`qk_norm` False) and Gemma 3 text: every `pattern`-th layer global, the others
  sliding, unless layer_types says otherwise."""
  if hf.get("use_bidirectional_attention"):
    raise ValueError(f"{hf['model_type']} use_bidirectional_attention=true is unsupported: "
                     "layer skipping here decodes causally")
  num_layers = _get(hf, "num_hidden_layers", required=True)
  pattern = hf.get("sliding_window_pattern", pattern)
  windows = _layer_windows(hf, hf.get("sliding_window"), [
      "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)])
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
  plain = {**hf, "hidden_act": act, "tie_word_embeddings": hf.get("tie_word_embeddings", True)}
  local_theta = None
  if qk_norm:  # Gemma 3: the global layers' RoPE (maybe scaled) and the local layers' base
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params:  # transformers 5: RoPE settings per layer type
      global_rope, local_rope = params["full_attention"], params.get("sliding_attention") or {}
    else:  # the older keys, with transformers' defaults
      global_rope = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 1e6)}
      local_rope = {"rope_theta": hf.get("rope_local_base_freq", 1e4)}
    local_theta, local_scaling = _rope({"rope_parameters": local_rope})
    if local_scaling is not None:
      raise ValueError(f"{hf['model_type']} rope scaling on sliding_attention layers is "
                       "unsupported: only the global layers' RoPE can be scaled")
    plain.update(rope_parameters=global_rope, rope_scaling=None)
  return _rope_config(plain, **_attention_bias(hf), qk_norm=qk_norm, attention_windows=windows,
                      local_rope_theta=local_theta, norm="rms_plus_one", post_norms=True,
                      embed_scale=True,
                      query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
                      attn_softcap=hf.get("attn_logit_softcapping"),
                      final_softcap=hf.get("final_logit_softcapping"))


def _gemma_to_hf(cfg: ModelConfig) -> dict:
  """Gemma's config.json fields; RoPE in the keys transformers 4 and 5 both read."""
  out = _rope_to_hf(cfg)
  out.update(hidden_activation=out.pop("hidden_act"), attention_bias=cfg.qkv_bias,
             query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
             sliding_window=_one_window(cfg), layer_types=layer_types(cfg),
             attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap)
  if cfg.qk_norm:
    out["rope_local_base_freq"] = cfg.local_rope_theta or cfg.rope_theta
  return out


def _attention_bias(hf: dict) -> dict:
  """Llama-style `attention_bias`: biases on q, k, v and o together."""
  bias = bool(hf.get("attention_bias", False))
  return dict(qkv_bias=bias, out_bias=bias)


def _is_rope(cfg: ModelConfig) -> bool:
  return cfg.pos == "rope" and cfg.norm == "rms" and cfg.mlp == "gated" and not cfg.embed_norm


# ----------------------------------------------------------------------------------------------
# Per-family config mappings.

def _llama(hf: dict) -> ModelConfig:
  return _rope_config(hf, **_attention_bias(hf), mlp_bias=bool(hf.get("mlp_bias", False)))


def _mistral(hf: dict) -> ModelConfig:
  return _rope_config(hf, attention_windows=_every_layer_window(hf))


def _qwen2(hf: dict) -> ModelConfig:
  return _rope_config(hf, qkv_bias=True, attention_windows=_max_window_layers_windows(hf))


def _qwen3(hf: dict) -> ModelConfig:
  return _rope_config(hf, **_attention_bias(hf), qk_norm=True,
                      attention_windows=_max_window_layers_windows(hf))


def _smollm3(hf: dict) -> ModelConfig:
  num_layers = _get(hf, "num_hidden_layers", required=True)
  # transformers' default when the list is absent: every no_rope_layer_interval-th layer is NoPE.
  interval = hf.get("no_rope_layer_interval", 4)
  flags = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(num_layers)]
  if len(flags) != num_layers:
    raise ValueError(f"smollm3 no_rope_layers has {len(flags)} entries but num_hidden_layers="
                     f"{num_layers}: it needs one per layer")
  # Without layer_types, transformers slides the NoPE layers when both settings are there; with
  # it, its mask follows layer_types and sliding_window (not nulled by use_sliding_window).
  window = hf.get("sliding_window")
  slides = hf.get("use_sliding_window") and window is not None
  windows = _layer_windows(hf, window, ["sliding_attention" if slides and not flag
                                        else "full_attention" for flag in flags])
  return _rope_config(hf, **_attention_bias(hf), mlp_bias=bool(hf.get("mlp_bias", False)),
                      rope_layers=tuple(bool(x) for x in flags), attention_windows=windows)


def _phi3(hf: dict) -> ModelConfig:
  return _rope_config(hf, attention_windows=_every_layer_window(hf))


def _gpt2(hf: dict) -> ModelConfig:
  if (not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx")
      or hf.get("add_cross_attention")):
    raise ValueError("gpt2 with scale_attn_weights=false, scale_attn_by_inverse_layer_idx=true or "
                     "add_cross_attention=true is unsupported: only standard GPT-2 attention is")
  d_model = _get(hf, "n_embd", "hidden_size", required=True)
  num_heads = _get(hf, "n_head", "num_attention_heads", required=True)
  return ModelConfig(
      vocab_size=_get(hf, "vocab_size", required=True),
      num_layers=_get(hf, "n_layer", "num_hidden_layers", required=True),
      d_model=d_model, num_heads=num_heads, num_kv_heads=num_heads,
      head_dim=d_model // num_heads, d_ff=_get(hf, "n_inner", default=4 * d_model),
      norm="layer", norm_eps=float(_get(hf, "layer_norm_epsilon", default=1e-5)),
      mlp="plain", act=_activation(_get(hf, "activation_function", default="gelu_new")),
      pos="learned", max_position=_get(hf, "n_positions", "max_position_embeddings",
                                      default=1024),
      qkv_bias=True, out_bias=True, mlp_bias=True,
      tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def _gpt2_to_hf(cfg: ModelConfig) -> dict:
  return dict(n_embd=cfg.d_model, n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.d_ff,
              n_positions=cfg.max_position, layer_norm_epsilon=cfg.norm_eps,
              activation_function=dict(gelu_tanh="gelu_new").get(cfg.act, cfg.act))


def _bloom(hf: dict) -> ModelConfig:
  if hf.get("apply_residual_connection_post_layernorm"):
    raise ValueError("bloom apply_residual_connection_post_layernorm=true is unsupported: only "
                     "pre-norm residuals are")
  d_model = _get(hf, "hidden_size", "n_embed", required=True)
  num_heads = _get(hf, "n_head", "num_attention_heads", required=True)
  return ModelConfig(
      vocab_size=_get(hf, "vocab_size", required=True),
      num_layers=_get(hf, "n_layer", "num_hidden_layers", required=True),
      d_model=d_model, num_heads=num_heads, num_kv_heads=num_heads,
      head_dim=d_model // num_heads, d_ff=4 * d_model,
      norm="layer", norm_eps=float(_get(hf, "layer_norm_epsilon", default=1e-5)),
      mlp="plain", act="gelu_tanh", pos="alibi", qkv_bias=True, out_bias=True, mlp_bias=True,
      embed_norm=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def _bloom_to_hf(cfg: ModelConfig) -> dict:
  return dict(hidden_size=cfg.d_model, n_layer=cfg.num_layers, n_head=cfg.num_heads,
              layer_norm_epsilon=cfg.norm_eps)


# ----------------------------------------------------------------------------------------------
# Tensor names.

_LLAMA_LAYER = {
    "input_layernorm.weight": "attn_norm.scale",
    "post_attention_layernorm.weight": "mlp_norm.scale",
    "self_attn.q_proj.weight": "attn.q", "self_attn.q_proj.bias": "attn.q_bias",
    "self_attn.k_proj.weight": "attn.k", "self_attn.k_proj.bias": "attn.k_bias",
    "self_attn.v_proj.weight": "attn.v", "self_attn.v_proj.bias": "attn.v_bias",
    "self_attn.o_proj.weight": "attn.o", "self_attn.o_proj.bias": "attn.o_bias",
    "self_attn.q_norm.weight": "attn.q_norm.scale", "self_attn.k_norm.weight": "attn.k_norm.scale",
    "mlp.gate_proj.weight": "mlp.gate", "mlp.gate_proj.bias": "mlp.gate_bias",
    "mlp.up_proj.weight": "mlp.up", "mlp.up_proj.bias": "mlp.up_bias",
    "mlp.down_proj.weight": "mlp.down", "mlp.down_proj.bias": "mlp.down_bias",
}
_PHI3_LAYER = {
    "input_layernorm.weight": "attn_norm.scale",
    "post_attention_layernorm.weight": "mlp_norm.scale",
    "self_attn.qkv_proj.weight": "attn.qkv", "self_attn.o_proj.weight": "attn.o",
    "mlp.gate_up_proj.weight": "mlp.gate_up", "mlp.down_proj.weight": "mlp.down",
}
_GPT2_LAYER = {
    "ln_1.weight": "attn_norm.scale", "ln_1.bias": "attn_norm.bias",
    "ln_2.weight": "mlp_norm.scale", "ln_2.bias": "mlp_norm.bias",
    "attn.c_attn.weight": "attn.qkv", "attn.c_attn.bias": "attn.qkv_bias",
    "attn.c_proj.weight": "attn.o", "attn.c_proj.bias": "attn.o_bias",
    "mlp.c_fc.weight": "mlp.up", "mlp.c_fc.bias": "mlp.up_bias",
    "mlp.c_proj.weight": "mlp.down", "mlp.c_proj.bias": "mlp.down_bias",
}
_BLOOM_LAYER = {
    "input_layernorm.weight": "attn_norm.scale", "input_layernorm.bias": "attn_norm.bias",
    "post_attention_layernorm.weight": "mlp_norm.scale",
    "post_attention_layernorm.bias": "mlp_norm.bias",
    "self_attention.query_key_value.weight": "attn.qkv",
    "self_attention.query_key_value.bias": "attn.qkv_bias",
    "self_attention.dense.weight": "attn.o", "self_attention.dense.bias": "attn.o_bias",
    "mlp.dense_h_to_4h.weight": "mlp.up", "mlp.dense_h_to_4h.bias": "mlp.up_bias",
    "mlp.dense_4h_to_h.weight": "mlp.down", "mlp.dense_4h_to_h.bias": "mlp.down_bias",
}
_GEMMA_LAYER = {
    **{k: v for k, v in _LLAMA_LAYER.items() if "layernorm" not in k},
    "input_layernorm.weight": "attn_norm.scale",
    "post_attention_layernorm.weight": "attn_post_norm.scale",
    "pre_feedforward_layernorm.weight": "mlp_norm.scale",
    "post_feedforward_layernorm.weight": "mlp_post_norm.scale",
}
_LLAMA_TOP = {"embed_tokens.weight": "embed", "norm.weight": "final_norm.scale"}
_GPT2_TOP = {"wte.weight": "embed", "wpe.weight": "pos_embed", "ln_f.weight": "final_norm.scale",
             "ln_f.bias": "final_norm.bias"}
_BLOOM_TOP = {"word_embeddings.weight": "embed", "word_embeddings_layernorm.weight":
              "embed_norm.scale", "word_embeddings_layernorm.bias": "embed_norm.bias",
              "ln_f.weight": "final_norm.scale", "ln_f.bias": "final_norm.bias"}


# ----------------------------------------------------------------------------------------------
# The registry.

def _entries() -> dict[str, Family]:
  plain_rope = lambda cfg: _is_rope(cfg) and not cfg.qk_norm and cfg.rope_layers is None
  one_window = lambda cfg: cfg.attention_windows == (_one_window(cfg),) * cfg.num_layers
  gemma = lambda cfg: cfg.pos == "rope" and cfg.norm == "rms_plus_one" and cfg.post_norms
  families = [
      Family("llama", "LlamaForCausalLM", _llama,
             lambda cfg: dict(**_rope_to_hf(cfg), attention_bias=cfg.qkv_bias,
                              mlp_bias=cfg.mlp_bias),
             _LLAMA_LAYER, _LLAMA_TOP,
             default_for=lambda cfg: (plain_rope(cfg) and cfg.attention_windows is None
                                      and not (cfg.qkv_bias and not cfg.out_bias))),
      Family("mistral", "MistralForCausalLM", _mistral,
             lambda cfg: dict(**_rope_to_hf(cfg), **_every_layer_window_to_hf(cfg)),
             _LLAMA_LAYER, _LLAMA_TOP,
             default_for=lambda cfg: (plain_rope(cfg) and one_window(cfg) and not cfg.qkv_bias
                                      and not cfg.out_bias and not cfg.mlp_bias)),
      Family("qwen2", "Qwen2ForCausalLM", _qwen2,
             lambda cfg: dict(**_rope_to_hf(cfg), **_max_window_layers_to_hf(cfg)),
             _LLAMA_LAYER, _LLAMA_TOP,
             default_for=lambda cfg: plain_rope(cfg) and cfg.qkv_bias and not cfg.out_bias,
             layer_types=True),
      Family("qwen3", "Qwen3ForCausalLM", _qwen3,
             lambda cfg: dict(**_rope_to_hf(cfg), attention_bias=cfg.qkv_bias,
                              **_max_window_layers_to_hf(cfg)),
             _LLAMA_LAYER, _LLAMA_TOP, default_for=lambda cfg: _is_rope(cfg) and cfg.qk_norm,
             layer_types=True),
      Family("smollm3", "SmolLM3ForCausalLM", _smollm3,
             lambda cfg: dict(**_rope_to_hf(cfg), attention_bias=cfg.qkv_bias,
                              mlp_bias=cfg.mlp_bias, use_sliding_window=_one_window(cfg) is not None,
                              sliding_window=_one_window(cfg), layer_types=layer_types(cfg),
                              no_rope_layers=[int(cfg.uses_rope(i))
                                              for i in range(cfg.num_layers)]),
             _LLAMA_LAYER, _LLAMA_TOP,
             default_for=lambda cfg: (_is_rope(cfg) and not cfg.qk_norm
                                      and cfg.rope_layers is not None), layer_types=True),
      Family("phi3", "Phi3ForCausalLM", _phi3,
             lambda cfg: dict(**_rope_to_hf(cfg), **_every_layer_window_to_hf(cfg)),
             _PHI3_LAYER, _LLAMA_TOP),
      Family("gemma2", "Gemma2ForCausalLM", lambda hf: _gemma(hf, qk_norm=False, pattern=2),
             _gemma_to_hf, _GEMMA_LAYER, _LLAMA_TOP, layer_types=True,
             default_for=lambda cfg: gemma(cfg) and not cfg.qk_norm),
      Family("gemma3_text", "Gemma3ForCausalLM", lambda hf: _gemma(hf, qk_norm=True, pattern=6),
             _gemma_to_hf, _GEMMA_LAYER, _LLAMA_TOP, layer_types=True,
             default_for=lambda cfg: gemma(cfg) and cfg.qk_norm),
      Family("gpt2", "GPT2LMHeadModel", _gpt2, _gpt2_to_hf, _GPT2_LAYER, _GPT2_TOP,
             default_for=lambda cfg: cfg.pos == "learned", base="transformer.", layer_list="h",
             num_layers_key="n_layer", conv1d=True),
      Family("bloom", "BloomForCausalLM", _bloom, _bloom_to_hf, _BLOOM_LAYER, _BLOOM_TOP,
             default_for=lambda cfg: cfg.pos == "alibi", base="transformer.", layer_list="h",
             num_layers_key="n_layer", interleaved_qkv=True),
  ]
  return {family.model_type: family for family in families}


FAMILIES: dict[str, Family] = _entries()


def _check_skippable(hf: dict) -> None:
  """One line naming why ULS cannot apply as is to an architecture whose layers are not all
  attention blocks with their own KV cache."""
  kinds = sorted(set(hf.get("layer_types") or ()) - set(_ATTENTION_LAYER_TYPES))
  if kinds:
    raise ValueError(f"model_type={hf.get('model_type')!r} has {', '.join(kinds)} layers: they "
                     "carry a recurrent state instead of a KV cache, which this model does not "
                     "implement, so layer skipping cannot apply as is")
  if hf.get("num_kv_shared_layers"):
    raise ValueError(f"model_type={hf.get('model_type')!r} shares KV caches across layers "
                     f"(num_kv_shared_layers={hf['num_kv_shared_layers']}): skipping a layer "
                     "that owns a shared cache would remove it from the layers that read it, so "
                     "layer skipping cannot apply as is")


def family(model_type: str | None, hf: dict | None = None) -> Family:
  """The entry for `model_type`; with `hf` (its config.json), also checks its layers skippable."""
  if hf is not None:
    _check_skippable(hf)
  if model_type == "gemma3":
    raise ValueError("model_type='gemma3' is Gemma 3's image-text model "
                     "(Gemma3ForConditionalGeneration), unsupported: its text-only form, "
                     "model_type 'gemma3_text' (Gemma3ForCausalLM, as Gemma 3 1B ships), loads")
  if model_type not in FAMILIES:
    raise ValueError(f"model_type={model_type!r} is unsupported: supported are "
                     f"{', '.join(FAMILIES)}")
  return FAMILIES[model_type]


def infer(cfg: ModelConfig) -> Family:
  """The family `config_to_hf` writes for a ModelConfig when no model_type is given: the one that
  claims it, else llama, so that the check of the written config names what Llama cannot express."""
  claims = [f for f in FAMILIES.values() if f.default_for(cfg)]
  assert len(claims) <= 1, f"families {[f.model_type for f in claims]} all claim {cfg}"
  return claims[0] if claims else FAMILIES["llama"]
