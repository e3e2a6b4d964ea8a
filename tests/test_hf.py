"""hf.py: our logits equal transformers' on the same weights: full depth, skipped, round-tripped."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
import torch
import transformers
from flax import nnx

from ulskip_jax import testing as tiny
import tolerance
from ulskip_jax import hf
from ulskip_jax.skipping import plan_layers

B, T, PAD = 2, 12, 4  # row 0 of the padded batch has PAD left-padding tokens
ATOL = 1e-4
PLANS = [plan_layers(4, 2), plan_layers(4, 4 / 3)]  # keep (0, 3) and (0, 2, 3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def family_dir(request, tmp_path_factory):
  """(folder with the saved torch model, the torch model)."""
  path = tmp_path_factory.mktemp(request.param)
  return path, tiny.save_hf_model(request.param, path)


def _tokens(seed=0):
  return np.random.default_rng(seed).integers(3, tiny.VOCAB, (B, T))


def _max_err(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_full_depth_logits_match_torch(family_dir):
  path, torch_model = family_dir
  model, tokenizer = hf.from_pretrained(path)
  assert tokenizer is None
  tokens = _tokens()
  assert _max_err(model(jnp.asarray(tokens)), tiny.torch_logits(torch_model, tokens)) < tolerance.bound(ATOL)

  mask = np.ones((B, T), np.int32)
  mask[0, :PAD] = 0
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  ours = model(jnp.asarray(tokens), positions_BT=jnp.asarray(positions),
               segment_ids_BT=jnp.asarray(mask))
  ref = tiny.torch_logits(torch_model, tokens, mask, positions)
  keep = mask.astype(bool)
  assert _max_err(np.asarray(ours)[keep], ref[keep]) < tolerance.bound(ATOL)


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: "keep" + "".join(map(str, p.kept)))
def test_skip_everywhere_matches_deleted_layers(family_dir, plan):
  path, torch_model = family_dir
  model, _ = hf.from_pretrained(path)
  tokens = _tokens(1)
  ours = model(jnp.asarray(tokens), skip=plan.skipped)
  assert _max_err(ours, tiny.torch_logits(tiny.pruned_torch(torch_model, plan.kept), tokens)) < tolerance.bound(ATOL)


def test_save_pretrained_loads_in_transformers(family_dir, tmp_path):
  path, torch_model = family_dir
  model, _ = hf.from_pretrained(path)
  tokens = _tokens(2)
  ref = tiny.torch_logits(torch_model, tokens)

  hf.save_pretrained(model, tmp_path / "derived")  # config.json derived from ModelConfig
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "derived").eval()
  assert _max_err(tiny.torch_logits(reloaded, tokens), ref) < 1e-5

  original = json.loads((path / "config.json").read_text())
  hf.save_pretrained(model, tmp_path / "kept", hf_config=original)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "kept").eval()
  assert reloaded.config.model_type == original["model_type"]
  assert _max_err(tiny.torch_logits(reloaded, tokens), ref) < 1e-5


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: "keep" + "".join(map(str, p.kept)))
def test_save_pretrained_pruned(family_dir, tmp_path, plan):
  path, _ = family_dir
  model, _ = hf.from_pretrained(path)
  hf.save_pretrained(model, tmp_path, skip=plan.skipped,
                     hf_config=json.loads((path / "config.json").read_text()))
  pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert pruned.config.num_hidden_layers == len(plan.kept)
  assert len(pruned.base_model.layers if hasattr(pruned.base_model, "layers")
             else pruned.base_model.h) == len(plan.kept)
  tokens = _tokens(3)
  skipped = model(jnp.asarray(tokens), skip=plan.skipped)
  assert _max_err(tiny.torch_logits(pruned, tokens), skipped) < tolerance.bound(ATOL)
  reloaded, _ = hf.from_pretrained(tmp_path)  # and back: the pruned folder is a plain n-layer model
  assert reloaded.cfg.num_layers == len(plan.kept)
  assert _max_err(reloaded(jnp.asarray(tokens)), skipped) < 1e-6


def test_sharded_checkpoint(family_dir, tmp_path):
  _, torch_model = family_dir
  torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  assert not (tmp_path / "model.safetensors").exists()
  model, _ = hf.from_pretrained(tmp_path)
  tokens = _tokens(4)
  assert _max_err(model(jnp.asarray(tokens)), tiny.torch_logits(torch_model, tokens)) < tolerance.bound(ATOL)


def test_bfloat16(family_dir, tmp_path):
  path, torch_model = family_dir
  f32, _ = hf.from_pretrained(path)
  tokens = jnp.asarray(_tokens(5))
  ref = np.asarray(f32(tokens))
  tolerance = 0.05 * np.abs(ref).max()  # bf16 keeps ~3 significant digits
  bf16, _ = hf.from_pretrained(path, dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16))} == {jnp.dtype("float32")}
  out = np.asarray(bf16(tokens))
  assert np.isfinite(out).all() and _max_err(out, ref) < tolerance
  bf16_params, _ = hf.from_pretrained(path, dtype="bfloat16", param_dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16_params))} == {jnp.dtype("bfloat16")}
  assert _max_err(bf16_params(tokens), ref) < tolerance
  copy.deepcopy(torch_model).to(torch.bfloat16).save_pretrained(tmp_path)  # as most hubs store
  from_bf16, _ = hf.from_pretrained(tmp_path)
  assert {x.dtype for x in jax.tree.leaves(nnx.state(from_bf16))} == {jnp.dtype("float32")}
  assert _max_err(from_bf16(tokens), ref) < tolerance


def _random_torch_model(config, seed=0):
  """Like tiny.hf_model, for configs tiny.FAMILIES does not cover."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_norm = "norm" in name or name.split(".")[-2].startswith("ln")
      p.copy_(1.0 + 0.1 * torch.randn_like(p) if is_norm and name.endswith("weight")
              else 0.1 * torch.randn_like(p) if is_norm else 0.2 * torch.randn_like(p))
  return model


VARIANTS = {
    # Llama with every bias, MQA, a head_dim unrelated to hidden_size and a tanh GELU.
    "llama_bias_mqa": ("llama", dict(attention_bias=True, mlp_bias=True, num_key_value_heads=1,
                                     head_dim=16, hidden_act="gelu_pytorch_tanh")),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "gpt2_gelu": ("gpt2", dict(activation_function="gelu", n_inner=48)),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_variants(variant, tmp_path):
  family, changes = VARIANTS[variant]
  config = tiny.hf_config(family)
  for key, value in changes.items():
    setattr(config, key, value)
  torch_model = _random_torch_model(config)
  torch_model.save_pretrained(tmp_path / "in")
  model, _ = hf.from_pretrained(tmp_path / "in")
  tokens = _tokens(6)
  ref = tiny.torch_logits(torch_model, tokens)
  assert _max_err(model(jnp.asarray(tokens)), ref) < tolerance.bound(ATOL)
  hf.save_pretrained(model, tmp_path / "out")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert _max_err(tiny.torch_logits(reloaded, tokens), ref) < 1e-5


def test_tokenizer_is_returned(tmp_path):
  tiny.save_hf_model("llama", tmp_path)
  vocab = {f"w{i}": i for i in range(tiny.VOCAB)}
  word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
  word_level.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="w0",
                                       pad_token="w0").save_pretrained(tmp_path)
  model, tokenizer = hf.from_pretrained(tmp_path)
  assert tokenizer.encode("w5 w7 w11") == [5, 7, 11]
  hf.save_pretrained(model, tmp_path / "out", tokenizer=tokenizer)
  assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").encode("w7") == [7]
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert (config["bos_token_id"], config["pad_token_id"]) == (None, 0)  # the tokenizer's ids


def test_config_round_trip():
  for family in tiny.FAMILIES:
    cfg = hf.config_from_hf(tiny.hf_config(family).to_dict())
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
  # Older config.json files keep rope_theta and rope_scaling at the top level.
  legacy = tiny.hf_config("llama3").to_dict()
  rope = legacy.pop("rope_parameters")
  legacy.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
  assert hf.config_from_hf(legacy) == hf.config_from_hf(tiny.hf_config("llama3").to_dict())
  with pytest.raises(ValueError, match=r"num_kv_heads=2 in the model but 4"):
    hf.config_to_hf(tiny.tiny_config(norm="layer", mlp="plain", pos="learned"))


def _raises(match, fn, *args, **kwargs):
  with pytest.raises(ValueError, match=match) as error:
    fn(*args, **kwargs)
  assert "\n" not in str(error.value)


def _with_config(path, **changes):
  config = json.loads((path / "config.json").read_text())
  config.update(changes)
  (path / "config.json").write_text(json.dumps(config))


def test_errors(tmp_path):
  _raises(r"is not a directory", hf.from_pretrained, tmp_path / "nowhere")
  _raises(r"has no config.json", hf.from_pretrained, tmp_path)

  folder = tmp_path / "llama"
  torch_model = tiny.save_hf_model("llama", folder)
  _with_config(folder, intermediate_size=48)
  _raises(r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \(64, 32\) but config\.json "
          r"implies \(48, 32\)", hf.from_pretrained, folder)
  _with_config(folder, intermediate_size=64)

  state = safetensors.numpy.load_file(folder / "model.safetensors")
  del state["model.layers.1.mlp.up_proj.weight"]
  safetensors.numpy.save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
  _raises(r"lacks 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight", hf.from_pretrained, folder)

  (folder / "model.safetensors").unlink()
  torch.save(torch_model.state_dict(), folder / "pytorch_model.bin")
  _raises(r"only PyTorch \.bin weights: convert them to safetensors, e\.g\. "
          r"model\.save_pretrained\(path, safe_serialization=True\)", hf.from_pretrained, folder)

  _with_config(folder, model_type="falcon")
  _raises(r"model_type='falcon' is unsupported: supported are llama, mistral, qwen2, qwen3, "
          r"smollm3, phi3, gemma2, gemma3_text, gpt2, bloom$",
          hf.from_pretrained, folder)

  llama = tiny.hf_config("llama").to_dict()
  _raises(r"qwen2 layer_types has 3 entries but num_hidden_layers=4: it needs one per layer",
          hf.config_from_hf, {**tiny.hf_config("qwen2").to_dict(), "use_sliding_window": True,
                              "sliding_window": 8, "layer_types": ["sliding_attention"] * 3})
  _raises(r"activation 'relu' is unsupported", hf.config_from_hf, {**llama, "hidden_act": "relu"})
  _raises(r"rope type 'yarn' is unsupported", hf.config_from_hf,
          {**llama, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
  _raises(r"hf_config \(model_type='llama'\) does not describe this model: num_layers=4 in the "
          r"model but 3", hf.save_pretrained, nnx.eval_shape(tiny.tiny_model), tmp_path / "out",
          hf_config={**llama, "num_hidden_layers": 3})
