"""The families beyond tests/test_hf.py's (tiny.MORE_FAMILIES): Qwen3, SmolLM3, Phi-3 and Qwen2
with sliding windows, Gemma 3 and Gemma 2 (prompts and generations longer than the window)
against transformers on tiny random models: full-depth logits, ULS plans against the torch model with
those layers deleted, cached greedy decoding against `generate`, save -> reload, pruned export;
and unsupported architectures refused in one line."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from ulskip_jax import testing as tiny
import tolerance
from ulskip_jax import decode, hf, lora
from ulskip_jax.model import Decoder
from ulskip_jax.skipping import plan_layers

B, T, PAD = 2, 12, 4  # row 0 of the padded batch has PAD left-padding tokens
ATOL = 1e-4
PLANS = [plan_layers(4, 2), plan_layers(4, 4 / 3)]  # keep (0, 3) and (0, 2, 3)
PROMPTS = [[1, 5, 6, 7], [1, 8, 9, 10, 11, 12, 13, 14, 15], [1, 3]]
MAX_NEW, EOS = 8, 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=tiny.MORE_FAMILIES)
def family(request, tmp_path_factory):
  """(folder with the saved torch model, the torch model, our model loaded from the folder)."""
  path = tmp_path_factory.mktemp(request.param)
  torch_model = tiny.save_hf_model(request.param, path)
  return path, torch_model, hf.from_pretrained(path)[0]


def _tokens(seed=0):
  return np.random.default_rng(seed).integers(3, tiny.VOCAB, (B, T))


def _max_err(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_full_depth_logits_match_torch(family):
  _, torch_model, model = family
  tokens = _tokens()
  assert _max_err(model(jnp.asarray(tokens)), tiny.torch_logits(torch_model, tokens)) < tolerance.bound(ATOL)
  mask = np.ones((B, T), np.int32)
  mask[0, :PAD] = 0
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  ours = model(jnp.asarray(tokens), positions_BT=jnp.asarray(positions),
               segment_ids_BT=jnp.asarray(mask))
  ref = tiny.torch_logits(torch_model, tokens, mask, positions)
  assert _max_err(np.asarray(ours)[mask.astype(bool)], ref[mask.astype(bool)]) < tolerance.bound(ATOL)


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: "keep" + "".join(map(str, p.kept)))
def test_skip_everywhere_matches_deleted_layers(family, plan):
  _, torch_model, model = family
  tokens = _tokens(1)
  ref = tiny.torch_logits(tiny.pruned_torch(torch_model, plan.kept), tokens)
  assert _max_err(model(jnp.asarray(tokens), skip=plan.skipped), ref) < tolerance.bound(ATOL)


def test_cached_greedy_equals_transformers_generate(family):
  _, torch_model, model = family
  got, _ = decode.generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_id=EOS)
  assert got == tiny.torch_generate(torch_model, PROMPTS, MAX_NEW, EOS)
  plan = PLANS[0]
  got, _ = decode.generate(model, PROMPTS, skip=plan.skipped, mode="everywhere",
                           max_new_tokens=MAX_NEW, eos_id=EOS)
  assert got == tiny.torch_generate(tiny.pruned_torch(torch_model, plan.kept), PROMPTS, MAX_NEW,
                                    EOS)


def test_save_pretrained_loads_in_transformers(family, tmp_path):
  path, torch_model, model = family
  tokens = _tokens(2)
  ref = tiny.torch_logits(torch_model, tokens)
  original = json.loads((path / "config.json").read_text())
  # Derived from the ModelConfig alone, a Phi-3 (sliding every layer) is written as the Mistral it
  # computes (unfused).
  derived_type = {"phi3": "mistral"}.get(original["model_type"], original["model_type"])
  for name, hf_config, model_type in (("derived", None, derived_type),
                                      ("kept", original, original["model_type"])):
    hf.save_pretrained(model, tmp_path / name, hf_config=hf_config)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
    assert reloaded.config.model_type == model_type
    assert _max_err(tiny.torch_logits(reloaded, tokens), ref) == 0


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: "keep" + "".join(map(str, p.kept)))
def test_save_pretrained_pruned(family, tmp_path, plan):
  path, torch_model, model = family
  original = json.loads((path / "config.json").read_text())
  layer_types = original.get("layer_types")
  if original.get("max_window_layers") is not None:
    del original["layer_types"]  # the pattern from max_window_layers alone, as older files give it
  hf.save_pretrained(model, tmp_path, skip=plan.skipped, hf_config=original)
  pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert pruned.config.num_hidden_layers == len(pruned.model.layers) == len(plan.kept)
  if "no_rope_layers" in original:  # each kept layer keeps its own RoPE / NoPE flag
    assert pruned.config.no_rope_layers == [original["no_rope_layers"][i] for i in plan.kept]
  if model.cfg.attention_windows is not None and layer_types:  # and its window or none
    assert pruned.config.layer_types == [layer_types[i] for i in plan.kept]
  tokens = _tokens(3)
  skipped = model(jnp.asarray(tokens), skip=plan.skipped)
  assert _max_err(tiny.torch_logits(pruned, tokens), skipped) < tolerance.bound(ATOL)
  reloaded, _ = hf.from_pretrained(tmp_path)
  assert reloaded.cfg.num_layers == len(plan.kept)
  assert _max_err(reloaded(jnp.asarray(tokens)), skipped) < 1e-6


def test_config_round_trip():
  for name in tiny.MORE_FAMILIES:
    config = tiny.hf_config(name).to_dict()
    cfg = hf.config_from_hf(config)
    derived = hf.config_to_hf(cfg, config["model_type"])
    assert hf.config_from_hf(derived) == cfg
  qwen3 = hf.config_from_hf(tiny.hf_config("qwen3").to_dict())
  assert qwen3.qk_norm and qwen3.head_dim == 16 and not qwen3.qkv_bias
  assert hf.config_to_hf(qwen3)["model_type"] == "qwen3"  # inferred from the q/k norms
  smollm3 = hf.config_from_hf(tiny.hf_config("smollm3").to_dict())
  assert smollm3.rope_layers == (True, False, True, False)
  assert hf.config_to_hf(smollm3)["no_rope_layers"] == [1, 0, 1, 0]
  # A SmolLM3 whose layers all use RoPE computes what a Llama does: the same ModelConfig.
  all_rope = {**tiny.hf_config("smollm3").to_dict(), "no_rope_layers": [1, 1, 1, 1]}
  assert hf.config_from_hf(all_rope).rope_layers is None
  assert hf.config_to_hf(hf.config_from_hf(all_rope))["model_type"] == "llama"
  W = tiny.WINDOW
  mistral = {**tiny.hf_config("llama").to_dict(), "model_type": "mistral", "sliding_window": W}
  assert hf.config_from_hf(mistral).attention_windows == (W,) * 4
  assert hf.config_to_hf(hf.config_from_hf(mistral))["model_type"] == "mistral"
  qwen2 = {**tiny.hf_config("qwen2_sliding").to_dict(), "layer_types": None}
  assert hf.config_from_hf(qwen2).attention_windows == (None, None, W, W)  # max_window_layers=2
  assert hf.config_from_hf({**qwen2, "use_sliding_window": False}).attention_windows is None
  phi3 = hf.config_from_hf({**tiny.hf_config("phi3").to_dict(), "sliding_window": None})
  assert phi3.attention_windows is None
  assert hf.config_to_hf(phi3)["model_type"] == "llama"  # what an unfused Phi-3 computes
  # SmolLM3 slides its NoPE layers when both settings are given and layer_types is not.
  smollm3 = {**tiny.hf_config("smollm3").to_dict(), "layer_types": None,
             "use_sliding_window": True, "sliding_window": W}
  cfg = hf.config_from_hf(smollm3)
  assert cfg.attention_windows == (None, W, None, W)
  assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
  qwen3 = {**tiny.hf_config("qwen3").to_dict(), "layer_types": None, "use_sliding_window": True,
           "sliding_window": W, "max_window_layers": 1}
  cfg = hf.config_from_hf(qwen3)
  assert cfg.attention_windows == (None, W, W, W)
  assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
  gemma3 = tiny.hf_config("gemma3").to_dict()
  cfg = hf.config_from_hf(gemma3)
  assert cfg.attention_windows == (W, None, W, None) and cfg.local_rope_theta == 1e3
  assert cfg.rope(0) == (1e3, None) and cfg.rope(1) == (1e5, (("factor", 4.0), ("rope_type", "linear")))
  # The older keys (transformers 4, and hub files): rope_local_base_freq, rope_scaling on the
  # global layers, sliding_window_pattern instead of layer_types.
  old_keys = {**gemma3, "rope_parameters": None, "layer_types": None, "rope_theta": 1e5,
              "rope_local_base_freq": 1e3, "rope_scaling": {"rope_type": "linear", "factor": 4.0},
              "sliding_window_pattern": 2}
  assert hf.config_from_hf(old_keys) == cfg
  gemma2 = hf.config_from_hf(tiny.hf_config("gemma2").to_dict())
  assert gemma2.attn_softcap == 2.0 and gemma2.final_softcap == 3.0 and not gemma2.qk_norm
  assert hf.config_to_hf(gemma2)["model_type"] == "gemma2"


def _raises(match, fn, *args):
  with pytest.raises(ValueError, match=match) as error:
    fn(*args)
  assert "\n" not in str(error.value)


def test_unsupported_architectures():
  qwen3_next = transformers.Qwen3NextConfig(num_hidden_layers=4).to_dict()
  _raises(r"model_type='qwen3_next' has linear_attention layers: they carry a recurrent state "
          r"instead of a KV cache.*layer skipping cannot apply as is", hf.config_from_hf,
          qwen3_next)
  gemma4_like = {**tiny.hf_config("llama").to_dict(), "num_kv_shared_layers": 2}
  _raises(r"shares KV caches across layers \(num_kv_shared_layers=2\).*layer skipping cannot "
          r"apply as is", hf.config_from_hf, gemma4_like)
  _raises(r"model_type='gemma3' is Gemma 3's image-text model", hf.config_from_hf,
          {**tiny.hf_config("gemma3").to_dict(), "model_type": "gemma3"})
  _raises(r"gemma3_text use_bidirectional_attention=true is unsupported", hf.config_from_hf,
          {**tiny.hf_config("gemma3").to_dict(), "use_bidirectional_attention": True})
  _raises(r"partial_rotary_factor != 1 is unsupported", hf.config_from_hf,
          {**tiny.hf_config("phi3").to_dict(), "partial_rotary_factor": 0.5,
           "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                               "partial_rotary_factor": 0.5}})


def test_lora_adapters_export_merged(family, tmp_path):
  """Adapters on every projection (q/k before Qwen3's norms, Phi-3's fused parts) export merged."""
  _, _, model = family
  cfg = dataclasses.replace(model.cfg, lora_rank=2, lora_targets=lora.TARGETS)
  adapted = Decoder(cfg, rngs=nnx.Rngs(1))
  flat = dict(nnx.to_flat_state(nnx.state(adapted, nnx.Param)))
  base = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  rng = np.random.default_rng(0)
  for path, var in flat.items():
    value = base[path].get_value() if path in base else var.get_value()
    if path[-1] == "b":  # a fresh adapter's B is zero: random, so each one changes the output
      value = 0.1 * rng.standard_normal(value.shape).astype(np.float32)
    var.set_value(jnp.asarray(value))
  nnx.update(adapted, nnx.from_flat_state(list(flat.items())))
  tokens = _tokens(4)
  ours = adapted(jnp.asarray(tokens))
  assert _max_err(ours, model(jnp.asarray(tokens))) > 1e-2
  hf.save_pretrained(adapted, tmp_path)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert _max_err(tiny.torch_logits(reloaded, tokens), ours) < tolerance.bound(ATOL)
