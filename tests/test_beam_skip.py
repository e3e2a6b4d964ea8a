"""Beam search with a skip plan equals transformers' beam search on the pruned model: the Hugging
Face folder `hf.save_pretrained(..., skip=...)` writes, holding only the kept layers (mode
"everywhere": prompt and generated tokens both skip)."""

from __future__ import annotations

import pytest
import torch
import transformers

from ulskip_jax import testing as tiny
from ulskip_jax import decode, hf, plan_layers

PROMPTS = [[1, 5, 6, 7, 5, 6], [1, 9, 8, 7, 6, 5], [1, 11, 12, 13, 14, 3]]
MAX_NEW, EOS = 10, 2


pytestmark = pytest.mark.usefixtures("fast_engine_compile", "one_torch_thread")


def test_beam_search_with_skip_equals_transformers_on_the_pruned_model(tmp_path):
  tiny.save_hf_model("qwen2", tmp_path / "full", seed=2)
  model = hf.from_pretrained(tmp_path / "full")[0]
  skip = plan_layers(4, 2).skipped
  hf.save_pretrained(model, tmp_path / "pruned", skip=skip)
  pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
  assert pruned.config.num_hidden_layers == 4 - len(skip)
  kw = dict(num_beams=4, early_stopping=True, length_penalty=0.8)
  got, _ = decode.generate(model, PROMPTS, skip=skip, mode="everywhere", max_new_tokens=MAX_NEW,
                           eos_id=EOS, **kw)
  with torch.no_grad():
    out = pruned.generate(input_ids=torch.tensor(PROMPTS), max_new_tokens=MAX_NEW,
                          do_sample=False, eos_token_id=EOS, pad_token_id=0, **kw)
  want = [row[:row.index(EOS)] if EOS in row else row for row in out[:, len(PROMPTS[0]):].tolist()]
  assert got == want
