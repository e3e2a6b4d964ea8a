"""Shared helpers for tests and benchmarks: tiny models, and a check of compiled HLO.

Tiny models: random Hugging Face (torch) models per family, and tiny NNX configs. Every family
gets 4 layers, width 32, 4 query heads and (where the family allows) 2 KV heads, so a test runs in
seconds. Weights are random but seeded; biases and norm parameters are randomised too, so a
parity test fails if any of them is dropped or transposed. torch and transformers (the `test`
extra) are imported by the functions that need them, so the HLO check runs without them.

HLO: the ops inside while loops that make a cache-layer-sized array. Tests call `loop_layer_ops`
on the executables they build (`compile_generate`); `benchmarks/gpu_hlo.py` calls it on XLA:GPU
executables compiled without a GPU.
"""

from __future__ import annotations

import copy
import functools
import re
from typing import TYPE_CHECKING

import jax
from flax import nnx

from ulskip_jax import decode, engine
from ulskip_jax.model import Decoder, ModelConfig
from ulskip_jax.skipping import SkipPlan

if TYPE_CHECKING:
  import transformers

# ----------------------------------------------------------------------------------------------
# Tiny models.

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "gpt2", "bloom")
# Families with their own tests (test_families.py), so the files above stay fast: Qwen3 with an
# explicit head_dim unrelated to the width, tied; Qwen3 untied with biases; SmolLM3 with NoPE
# layer 1 and 3; Phi-3 with fused projections, sliding every layer by WINDOW (as Mistral does);
# Qwen2 sliding layers 2 and 3 (max_window_layers=2); Gemma 3 and Gemma 2 (local/global layers).
MORE_FAMILIES = ("qwen3", "qwen3_untied_bias", "smollm3", "phi3", "qwen2_sliding", "gemma3",
                 "gemma2")
WINDOW = 5  # shorter than the test prompts and generations
VOCAB = 97


def hf_config(family: str, num_layers: int = 4) -> transformers.PretrainedConfig:
  import transformers
  common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                pad_token_id=0)
  if family == "llama":
    return transformers.LlamaConfig(**common)
  if family == "llama3":  # Llama 3: rope_scaling type llama3, big theta, tied embeddings (3.2)
    return transformers.LlamaConfig(
        **common, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=16))
  if family == "mistral":
    return transformers.MistralConfig(**common, sliding_window=None)
  if family == "qwen2_sliding":
    return transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW,
                                    max_window_layers=2)
  if family == "gemma3":  # global layers 1 and 3, each kind with its RoPE; head_dim != D / H
    return transformers.Gemma3TextConfig(
        **{**common, "head_dim": 16}, hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=12, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"] * (num_layers // 2),
        rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1e5),
                         "sliding_attention": dict(rope_type="default", rope_theta=1e3)})
  if family == "gemma2":  # caps small enough to bite on random weights
    return transformers.Gemma2Config(**common, head_dim=8, query_pre_attn_scalar=12,
                                     sliding_window=WINDOW, attn_logit_softcapping=2.0,
                                     final_logit_softcapping=3.0)
  if family == "qwen2":
    return transformers.Qwen2Config(**common, use_sliding_window=False)
  if family == "qwen3":
    return transformers.Qwen3Config(**{**common, "head_dim": 16}, tie_word_embeddings=True,
                                    use_sliding_window=False)
  if family == "qwen3_untied_bias":
    return transformers.Qwen3Config(**common, tie_word_embeddings=False, attention_bias=True,
                                    use_sliding_window=False)
  if family == "smollm3":
    return transformers.SmolLM3Config(**common, no_rope_layers=[1, 0, 1, 0][:num_layers],
                                      use_sliding_window=False)
  if family == "phi3":
    return transformers.Phi3Config(**common, sliding_window=WINDOW)
  if family == "gpt2":
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=num_layers, n_head=4,
                                   n_positions=128, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=0)
  if family == "bloom":
    return transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=num_layers,
                                    n_head=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  raise ValueError(f"unknown family {family!r}: allowed are {FAMILIES + MORE_FAMILIES}")


def hf_model(family: str, num_layers: int = 4, seed: int = 0) -> transformers.PreTrainedModel:
  """A random torch model of `family` in f32 eval mode, every parameter randomised."""
  import torch
  import transformers
  torch.manual_seed(seed)
  cfg = hf_config(family, num_layers)
  model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.split(".")[-2].startswith("ln"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("weight")
                else 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  return model


def save_hf_model(family: str, path, num_layers: int = 4, seed: int = 0) -> transformers.PreTrainedModel:
  model = hf_model(family, num_layers, seed)
  model.save_pretrained(path)
  return model


def torch_logits(model, tokens, mask=None, positions=None):
  """transformers' logits (numpy) without a cache, optionally left-padded by `mask`."""
  import torch
  kwargs = dict(use_cache=False)
  if mask is not None:
    kwargs["attention_mask"] = torch.tensor(mask)
  if positions is not None and model.config.model_type != "bloom":  # BLOOM: ALiBi from the mask
    kwargs["position_ids"] = torch.tensor(positions)
  with torch.no_grad():
    return model(torch.tensor(tokens), **kwargs).logits.numpy()


def pruned_torch(model, kept):
  """A copy of `model` whose layer list holds only `kept`, renumbered for the cache."""
  import torch
  pruned = copy.deepcopy(model)
  holder, name = (pruned.model, "layers") if hasattr(pruned, "model") else (pruned.transformer, "h")
  layers = [getattr(holder, name)[i] for i in kept]
  for j, layer in enumerate(layers):
    for module in layer.modules():
      if hasattr(module, "layer_idx"):
        module.layer_idx = j
  setattr(holder, name, torch.nn.ModuleList(layers))
  pruned.config.num_hidden_layers = len(kept)
  for key in ("layer_types", "no_rope_layers"):  # per-layer lists (each layer read its own)
    if getattr(pruned.config, key, None):
      setattr(pruned.config, key, [getattr(pruned.config, key)[i] for i in kept])
  return pruned


def torch_generate(torch_model, prompts, max_new_tokens: int, eos_id: int):
  """transformers' greedy generate on a left-padded batch; new tokens per row, cut before EOS."""
  import torch
  P = max(len(p) for p in prompts)
  ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
  with torch.no_grad():
    out = torch_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                               do_sample=False, eos_token_id=eos_id, pad_token_id=0)
  rows = out[:, P:].tolist()
  return [row[:row.index(eos_id)] if eos_id in row else row for row in rows]


def tiny_config(**overrides) -> ModelConfig:
  cfg = dict(vocab_size=VOCAB, num_layers=4, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
             d_ff=64)
  cfg.update(overrides)
  return ModelConfig(**cfg)


def tiny_model(seed: int = 0, **overrides) -> Decoder:
  return Decoder(tiny_config(**overrides), rngs=nnx.Rngs(seed))


def save_tiny_tokenizer(path) -> transformers.PreTrainedTokenizerFast:
  """A word-level tokenizer over VOCAB words ("w0" .. "w96", plus the specials), saved to path."""
  import tokenizers
  import transformers
  vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
  vocab.update({f"w{i}": i for i in range(3, VOCAB)})
  word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w3"))
  word_level.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  word_level.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="w3",
                                             pad_token="<pad>", bos_token="<bos>",
                                             eos_token="<eos>")
  tok.save_pretrained(path)
  return tok


def jit_call(model: Decoder):
  """model(tokens, **kw) under one jax.jit (skip static): eager op-by-op runs are slow to start."""
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnames=("skip", "paper_prefill"))
  def call(state, tokens, skip=(), paper_prefill=False, **kw):
    if paper_prefill:
      kw["full_depth_BT"] = True
    return nnx.merge(graphdef, state)(tokens, skip=skip, **kw)

  def wrapped(tokens, *, skip=(), full_depth_BT=None, **kw):
    paper_prefill = full_depth_BT is True
    if full_depth_BT is not None and not paper_prefill:
      kw["full_depth_BT"] = full_depth_BT
    skip = skip if isinstance(skip, SkipPlan) else tuple(skip)  # a plan is hashable itself
    return call(state, tokens, skip=skip, paper_prefill=paper_prefill, **kw)
  return wrapped


# ----------------------------------------------------------------------------------------------
# HLO: cache-layer copies in compiled loops.

PASS_THROUGH = ("parameter", "get-tuple-element", "tuple", "bitcast")
IN_PLACE = re.compile(r"(dynamic-update-slice|scatter)\(")


def computations(text: str) -> dict[str, list[str]]:
  """Computation name -> its instruction lines."""
  comps, lines = {}, None
  for line in text.splitlines():
    header = re.match(r"^(?:ENTRY )?(%[\w.\-]+) .*\{$", line)
    if header:
      lines = comps.setdefault(header.group(1), [])
    elif lines is not None and line.strip() != "}":
      lines.append(line)
  return comps


def reachable(comps: dict[str, list[str]], root: str) -> set[str]:
  """The computations `root` calls, directly or not (fusions, loops, conditions), and itself."""
  seen, todo = set(), [root]
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    for line in comps[name]:
      todo += [t for t in re.findall(r"%[\w.\-]+", line) if t in comps]
  return seen


def loop_layer_ops(text: str, layer_shape: tuple[int, ...]) -> tuple[int, list[str]]:
  """(in-place writes, other ops) among the ops in while-loop bodies whose result has the dims
  of a cache layer, `layer_shape` ([B, K, S, Hd]), in any order: a copy or a transpose of a layer
  is one of the others. In place: a dynamic-update-slice or scatter, or a fusion holding one."""
  comps = computations(text)
  loops = set(re.findall(r"body=(%[\w.\-]+)", text))
  assert loops, "no while loop in the HLO"
  in_place, others = 0, []
  for name in set().union(*(reachable(comps, body) for body in loops)):
    for line in comps[name]:
      op = re.match(r"\s*(?:ROOT )?%\S+ = \w+\[([\d,]*)\]\S* ([\w\-]+)\(", line)
      dims = op and op.group(1) and [int(d) for d in op.group(1).split(",")]
      if not dims or sorted(dims) != sorted(layer_shape) or op.group(2) in PASS_THROUGH:
        continue
      fused = re.search(r"calls=(%[\w.\-]+)", line) if op.group(2) == "fusion" else None
      if IN_PLACE.search(line) or (fused and any(map(IN_PLACE.search, comps[fused.group(1)]))):
        in_place += 1
      else:
        others.append(line.strip()[:300])
  return in_place, others


def compile_generate(model, batch_size: int, prompt_len: int, **kw):
  """The executable `decode.generate` runs for this batch size, prompt length and options."""
  strategy, x = decode.plan_call(model, [[0] * prompt_len] * batch_size, **kw)
  return engine.executable(strategy, *nnx.split(model), x)[0]
