"""Sliding-window models through every cached decoder: continuous batching and speculative decoding
(both draft caches, refilling rows) equal plain greedy decoding, which equals transformers'.

Phi-3 slides every layer by a window of 5 tokens; the Gemma 3 model mixes sliding (0, 2) and global
(1, 3) layers, and its draft keeps the global ones. Prompts and generations are longer than the
window, so every decoder's cache holds keys the window must hide.
"""

from __future__ import annotations

import pytest

from ulskip_jax import testing as tiny
from ulskip_jax import decode, hf

QUEUE = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 3], [1, 8, 9, 10, 11, 12, 13, 14, 15], [1, 4, 4, 4, 4, 4],
         [1, 20, 21, 22, 23, 24, 25], [1, 30, 31]]
MAX_NEW = 10
EOS = 2


pytestmark = pytest.mark.usefixtures("fast_engine_compile", "one_torch_thread")


@pytest.mark.parametrize("family,draft_cache", [("phi3", "shared"), ("gemma3", "separate")])
def test_every_decoder_equals_plain_greedy(tmp_path, family, draft_cache):
  torch_model = tiny.save_hf_model(family, tmp_path)
  model = hf.from_pretrained(tmp_path)[0]
  assert model.cfg.attention_windows is not None
  kw = dict(max_new_tokens=MAX_NEW, eos_id=EOS)
  plain, _ = decode.generate(model, QUEUE, **kw)
  # Each prompt alone, unpadded: transformers' sliding mask counts slots, ours positions.
  assert plain == [tiny.torch_generate(torch_model, [p], MAX_NEW, EOS)[0] for p in QUEUE]
  continuous, _ = decode.generate(model, QUEUE, batch_size=2, **kw)
  assert continuous == plain
  speculative, stats = decode.generate(
      model, QUEUE, batch_size=2, speculative=dict(draft_ratio=2, num_draft_tokens=3,
                                                   draft_cache=draft_cache), **kw)
  assert speculative == plain and stats.drafted_tokens > 0
