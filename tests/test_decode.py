"""Decoding: cached decode equals recomputation, transformers' generate, batching, EOS, beams,
sampling, executable reuse, and no cache copy in the decode loop.

Most tests share one bucket (4 rows, 16 prompt slots, 16 new-token slots) so that each model
structure compiles each executable once for the whole file.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ulskip_jax.testing import compile_generate, loop_layer_ops
from ulskip_jax import testing as tiny
from ulskip_jax import decode, engine, hf, plan_layers, speculative
from ulskip_jax.kv_cache import cache_bytes
from ulskip_jax.model import ModelConfig

PROMPTS = [[1, 5, 6, 7], [1, 8, 9, 10, 11, 12, 13, 14, 15], [1, 3]]  # lengths 4, 9, 2
MAX_NEW = 10
EOS = 2  # the tiny configs' eos_token_id
RATIO = 2  # 4 layers -> kept (0, 3)
# Compile time dominates tests of tiny models: build without LLVM optimisations (~3x faster).
FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)


@pytest.fixture(autouse=True, scope="module")
def fast_settings(fast_engine_compile):
  """Fast compiles, and one torch thread: tiny models gain nothing from more, and on a busy
  machine OpenMP's spinning barriers made transformers' generate 100x slower."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """family -> (torch model, our model from its saved folder), built once for the file."""
  out = {}
  for family in tiny.FAMILIES:
    path = tmp_path_factory.mktemp(family)
    torch_model = tiny.save_hf_model(family, path)
    out[family] = torch_model, hf.from_pretrained(path)[0]
  return out


@functools.partial(jax.jit, static_argnames=("graphdef", "skip", "paper"),
                   compiler_options=FAST_COMPILE)
def _recompute_logits(graphdef, state, tokens_BT, prompt_len_B, *, skip, paper):
  """Logits of a cache-free forward over right-padded rows (causal, so padding is invisible)."""
  model = nnx.merge(graphdef, state)
  full_depth = jnp.arange(tokens_BT.shape[1])[None] < prompt_len_B[:, None] if paper else None
  return model(tokens_BT, skip=skip, full_depth_BT=full_depth)


def greedy_by_recompute(model, prompts, skip, paper, max_new=MAX_NEW, eos_id=None):
  """Greedy decoding by re-running the whole sequence every step: the reference for the cache."""
  T = 32
  graphdef, state = nnx.split(model)
  seqs = [list(p) for p in prompts]
  done = [False] * len(prompts)
  lens = np.array([len(p) for p in prompts])
  for _ in range(max_new):
    tokens = np.zeros((len(prompts), T), np.int32)
    for i, s in enumerate(seqs):
      tokens[i, :len(s)] = s
    logits = _recompute_logits(graphdef, state, tokens, lens, skip=skip, paper=paper)
    for i, s in enumerate(seqs):
      if not done[i]:
        s.append(int(jnp.argmax(logits[i, len(s) - 1])))
        done[i] = s[-1] == eos_id
  return [s[len(p):len(s) - (s[-1] == eos_id)] for s, p in zip(seqs, prompts)]


def torch_generate(torch_model, prompts, **kw):
  """transformers' generate on a left-padded batch; new tokens per row, cut before EOS."""
  P = max(len(p) for p in prompts)
  ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
  with torch.no_grad():
    out = torch_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW,
                               do_sample=False, eos_token_id=EOS, pad_token_id=0, **kw)
  rows = out[:, P:].tolist()
  return [row[:row.index(EOS)] if EOS in row else row for row in rows]


@pytest.mark.parametrize("mode", ["paper", "everywhere"])
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_cached_greedy_equals_recompute(models, family, mode):
  model = models[family][1]
  skip = plan_layers(4, RATIO).skipped
  got, _ = decode.generate(model, PROMPTS, ratio=RATIO, mode=mode, max_new_tokens=MAX_NEW,
                           eos_id=None)
  # Each prompt alone, unpadded: so this also checks that batching changes nothing.
  assert got == greedy_by_recompute(model, PROMPTS, skip, mode == "paper")


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_full_depth_equals_transformers_generate(models, family):
  torch_model, model = models[family]
  got, stats = decode.generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_id=EOS)
  assert got == torch_generate(torch_model, PROMPTS)
  assert stats.prompt_tokens == sum(map(len, PROMPTS))


def test_batch_equals_each_prompt_alone(models):
  model = models["qwen2"][1]
  batch, _ = decode.generate(model, PROMPTS, ratio=RATIO, max_new_tokens=MAX_NEW, eos_id=None)
  alone = [decode.generate(model, [p], ratio=RATIO, max_new_tokens=MAX_NEW, eos_id=None)[0][0]
           for p in PROMPTS]
  assert batch == alone


def test_eos_stops_rows(models):
  model = models["gpt2"][1]
  free, _ = decode.generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_id=None)
  eos = free[0][3]  # a token greedy decoding emits: row 0 must stop before it
  got, stats = decode.generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_id=eos)
  want = [row[:row.index(eos)] if eos in row else row for row in free]
  assert got == want and len(got[0]) <= 3
  assert stats.generated_tokens == sum(min(len(r) + 1, MAX_NEW) for r in want)
  assert stats.executables_built == 0  # eos_id is traced: the same executable


def test_beam_search_with_one_beam_is_greedy(models):
  model = models["llama"][1]
  greedy, _ = decode.generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_id=EOS)
  strategy, x = decode.plan_call(model, PROMPTS, num_beams=2, max_new_tokens=MAX_NEW, eos_id=EOS)
  beam, _, _ = engine.run(dataclasses.replace(strategy, num_beams=1), model, x)
  assert beam == greedy


@pytest.mark.parametrize("family,early_stopping,length_penalty",
                         [("llama3", True, 1.0), ("bloom", False, 0.7)])
def test_beam_search_equals_transformers(models, family, early_stopping, length_penalty):
  torch_model, model = models[family]
  prompts = [[1, 5, 6, 7, 5, 6], [1, 9, 8, 7, 6, 5]]  # equal lengths: HF's n-grams include pads
  kw = dict(num_beams=4, no_repeat_ngram_size=3, early_stopping=early_stopping,
            length_penalty=length_penalty)
  got, _ = decode.generate(model, prompts, max_new_tokens=MAX_NEW, eos_id=EOS, **kw)
  assert got == torch_generate(torch_model, prompts, **kw)
  for prompt, row in zip(prompts, got):
    ngrams = [tuple(prompt + row)[i:i + 3] for i in range(len(prompt + row) - 2)]
    assert len(ngrams) == len(set(ngrams))


def test_sampling_is_seeded_and_top_k_1_is_greedy(models):
  model = models["mistral"][1]
  kw = dict(max_new_tokens=MAX_NEW, eos_id=None, temperature=1.0, top_p=0.9)
  first, _ = decode.generate(model, PROMPTS, seed=3, **kw)
  assert decode.generate(model, PROMPTS, seed=3, **kw)[0] == first
  assert decode.generate(model, PROMPTS, seed=4, **kw)[0] != first
  greedy, _ = decode.generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_id=None)
  top1, _ = decode.generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_id=None,
                            temperature=1.0, top_k=1, seed=5)
  assert top1 == greedy


def test_prompt_bucket_takes_half_steps_and_decodes_as_recompute(models):
  """A 20-token prompt runs in 24 prompt slots, not 32 (the prefill's work grows with its slots,
  padding included), and decodes as recomputation does."""
  model = models["qwen2"][1]
  prompts = [list(range(3, 23)), [1, 5, 6]]
  _, x = engine.checked_inputs(model.cfg, prompts, max_new_tokens=MAX_NEW)
  assert x.prompts.shape[1] == 24
  assert [engine.prompt_bucket(n) for n in (16, 17, 24, 25, 96, 97)] == [16, 24, 24, 32, 96, 128]
  got, _ = decode.generate(model, prompts, ratio=RATIO, mode="paper", max_new_tokens=MAX_NEW,
                           eos_id=None)
  assert got == greedy_by_recompute(model, prompts, plan_layers(4, RATIO).skipped, True)


def test_one_executable_per_skip_and_bucket():
  model = tiny.tiny_model(d_ff=48)  # a structure no other test uses
  before = engine.num_compiles()
  first, stats = decode.generate(model, [[1, 2, 3], [4, 5]], ratio=2, max_new_tokens=5,
                                 eos_id=None)
  assert engine.num_compiles() == before + 1 and stats.executables_built == 1
  assert stats.compile_s > 0
  assert stats.plan == plan_layers(4, 2) and stats.plan.strategy == "uls"
  # The reported plan is the one that ran: given back, it reuses the executable and the tokens.
  again, stats = decode.generate(model, [[1, 2, 3], [4, 5]], skip=stats.plan, max_new_tokens=5,
                                 eos_id=None)
  assert again == first and stats.executables_built == 0
  # Other lengths, budget and eos in the same buckets (2 rows, 16 + 16 slots): no new executable.
  _, stats = decode.generate(model, [[1] * 12, [4, 5, 6, 7]], ratio=2, max_new_tokens=9, eos_id=7)
  assert engine.num_compiles() == before + 1 and stats.executables_built == 0
  assert stats.compile_s == 0
  _, stats = decode.generate(model, [[1, 2], [3]], skip=(1,), max_new_tokens=5, eos_id=None)
  assert engine.num_compiles() == before + 2
  assert stats.plan.skipped == (1,) and stats.plan.strategy == "explicit"
  decode.generate(model, [[1, 2], [3]], ratio=2, max_new_tokens=5, eos_id=None)
  decode.generate(model, [[1, 2], [3]], skip=plan_layers(4, 2).skipped, max_new_tokens=5,
                  eos_id=None)
  assert engine.num_compiles() == before + 2


def test_decode_loop_updates_the_cache_in_place(models):
  """No op in the while loop (fusions included) makes a cache-layer-sized array except in-place
  dynamic-update-slices: no per-step copy or transpose of the cache."""
  model = models["llama"][1]
  compiled = compile_generate(model, 3, 9, ratio=RATIO, mode="everywhere",
                                     max_new_tokens=MAX_NEW, eos_id=None)
  cfg = model.cfg
  in_place, others = loop_layer_ops(compiled.as_text(), (4, cfg.num_kv_heads, 32, cfg.head_dim))
  assert not others, others[:2]
  assert in_place >= 2 * 2  # K and V of both kept layers are written in place
  memory = compiled.memory_analysis()
  total_cache = cache_bytes(cfg, 4, 32, plan_layers(4, RATIO).skipped)
  assert memory.temp_size_in_bytes < 4 * total_cache + 200_000, (memory, total_cache)


def test_cache_holds_kept_layers_only(models):
  model = models["llama"][1]
  _, full = decode.generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_id=EOS)
  _, half = decode.generate(model, PROMPTS, ratio=RATIO, mode="everywhere",
                            max_new_tokens=MAX_NEW, eos_id=EOS)
  pos_bytes = 4 * 32 * 4
  assert half.cache_bytes - pos_bytes == (full.cache_bytes - pos_bytes) // 2


def test_ratio_keeps_the_global_layers_of_a_local_global_model():
  """A ratio on a model mixing sliding-window and global layers keeps the global layers in
  decoding and in the speculative draft, as training's and evaluation's plans do."""
  windows = (3, 3, 3, None, None, 3, 3, 3)
  cfg = ModelConfig(vocab_size=32, num_layers=8, d_model=16, num_heads=2, num_kv_heads=1,
                    head_dim=8, d_ff=32, attention_windows=windows)
  with_globals = plan_layers(8, 2, keep=(3, 4)).skipped
  assert with_globals != plan_layers(8, 2).skipped  # plain ULS drops both global layers
  assert engine.check_options(cfg, ratio=2, max_new_tokens=4).plan.skipped == with_globals
  assert speculative.check(cfg, dict(draft_ratio=2))["draft"].skipped == with_globals
  assert engine.check_options(cfg, skip=(1, 2), max_new_tokens=4).plan.skipped == (1, 2)


def test_bad_arguments_raise_one_line_errors(models):
  model = models["gpt2"][1]  # max_position 128
  cases = [
      (dict(prompts=[[1] * 120], max_new_tokens=10), "prompt 0 has 120 tokens"),
      (dict(prompts=[[1], []], max_new_tokens=10), "prompt 1 is empty"),
      (dict(prompts=PROMPTS, max_new_tokens=10, ratio=2, skip=(1,)), "pass one or the other"),
      (dict(prompts=PROMPTS, max_new_tokens=10, ratio=9), "out of range"),
      (dict(prompts=PROMPTS, max_new_tokens=10, top_k=3), "temperature > 0"),
      (dict(prompts=PROMPTS, max_new_tokens=10, mode="sometimes"), "mode='sometimes'"),
      (dict(prompts=PROMPTS, max_new_tokens=0), "max_new_tokens=0"),
      (dict(prompts=PROMPTS, max_new_tokens=10, batch_size=0), "batch_size=0"),
      (dict(prompts=[[1], []], max_new_tokens=10, batch_size=1), "prompt 1 is empty"),
  ]
  for kw, message in cases:
    kw.setdefault("eos_id", EOS)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
      decode.generate(model, **kw)
    assert "\n" not in str(info.value)


# Continuous batching: 7 prompts through 2 rows, so most rows are refilled mid-loop.
QUEUE = PROMPTS + [[1, 4], [1, 7, 7, 7, 7, 7], [1, 20, 21, 22, 23], [1, 30]]


def _eos_with_spread(model, **kw):
  """A token greedy decoding emits at different steps in different rows, so that as eos_id it
  makes outputs of different lengths (and rows finish at different times)."""
  free, _ = decode.generate(model, QUEUE, max_new_tokens=MAX_NEW, eos_id=None, **kw)
  def lengths(tok):
    return {row.index(tok) if tok in row else len(row) for row in free}
  return max({tok for row in free for tok in row}, key=lambda tok: len(lengths(tok)))


@pytest.mark.parametrize("family,kw", [("llama", {}), ("bloom", {}), ("gpt2", dict(ratio=RATIO)),
                                       ("qwen2", dict(ratio=RATIO, mode="everywhere")),
                                       ("mistral", dict(no_repeat_ngram_size=2))])
def test_continuous_batching_equals_each_prompt_alone(models, family, kw):
  model = models[family][1]
  eos = _eos_with_spread(model, **kw)
  alone = [decode.generate(model, [p], max_new_tokens=MAX_NEW, eos_id=eos, **kw)[0][0]
           for p in QUEUE]
  assert len(set(map(len, alone))) > 2  # rows finish at different steps
  if "no_repeat_ngram_size" in kw:  # the bans change outputs (the rows keep their histories)
    assert alone != [decode.generate(model, [p], max_new_tokens=MAX_NEW, eos_id=eos)[0][0]
                     for p in QUEUE]
  got, stats = decode.generate(model, QUEUE, batch_size=2, max_new_tokens=MAX_NEW, eos_id=eos,
                               **kw)
  assert got == alone
  assert stats.generated_tokens == sum(min(len(r) + 1, MAX_NEW) for r in alone)
  assert stats.prompt_tokens == sum(map(len, QUEUE))
  # 3 rows in use of a 4-row bucket, 4 prompts: one waits although the queue has no more slots.
  # The schedule is the engine's, the same for every model code: checked on plain decoding and
  # with the bans (whose histories the waiting prompt must keep), each a compile of its own.
  if family in ("llama", "mistral"):
    assert decode.generate(model, QUEUE[:4], batch_size=3, max_new_tokens=MAX_NEW, eos_id=eos,
                           **kw)[0] == alone[:4]


def test_continuous_batching_compiles_once_per_bucket_and_samples_per_prompt(models):
  model = models["qwen2"][1]
  kw = dict(max_new_tokens=MAX_NEW, eos_id=EOS)
  before = engine.num_compiles()
  decode.generate(model, QUEUE, batch_size=2, **kw)
  # Other queue lengths, prompt lengths, budgets and eos in the same buckets: no new executable.
  for queue, max_new, eos in ((QUEUE[:5], 3, None), (QUEUE[2:] + QUEUE[:1], 7, 9)):
    _, stats = decode.generate(model, queue, batch_size=2, max_new_tokens=max_new, eos_id=eos)
    assert stats.executables_built == 0
  assert engine.num_compiles() == before + 1
  # Each prompt samples with its own keys, so the schedule (rows) does not change its tokens.
  sample = dict(kw, temperature=1.0, top_p=0.9, seed=3)
  two, _ = decode.generate(model, QUEUE, batch_size=2, **sample)
  four, _ = decode.generate(model, QUEUE, batch_size=4, **sample)
  assert two == four
  assert decode.generate(model, QUEUE, batch_size=2, **dict(sample, seed=4))[0] != two
  with pytest.raises(ValueError, match="num_beams=2 with continuous batching"):
    decode.generate(model, QUEUE, batch_size=8, num_beams=2, **kw)


def test_continuous_batching_updates_the_cache_in_place(models):
  """No op of the continuous executable copies a cache layer: decode steps write in place, and
  refills write one row (the refill's while loop carries the cache without copying it)."""
  model = models["llama"][1]
  before = set(engine.EXECUTABLES)
  decode.generate(model, QUEUE, batch_size=2, ratio=RATIO, max_new_tokens=MAX_NEW, eos_id=EOS)
  cfg = model.cfg
  texts = [v.as_text() for k, v in engine.EXECUTABLES.items() if k not in before]
  assert texts
  for text in texts:  # S = 16 + 16 slots
    in_place, others = loop_layer_ops(text, (2, cfg.num_kv_heads, 32, cfg.head_dim))
    assert in_place and not others, others[:2]


def test_summed_stats_keep_the_plan_they_ran():
  """generate_text sums the stats of its batches from an empty DecodeStats: the plan stays; a
  sum over different plans has none."""
  half, full = plan_layers(4, 2), plan_layers(4, 1)
  one = engine.DecodeStats(generated_tokens=3, calls=1, plan=half)
  assert (engine.DecodeStats() + one + one).plan == half
  assert (one + engine.DecodeStats()).plan == half
  assert (one + dataclasses.replace(one, plan=full)).plan is None
  spec = speculative.SpeculativeStats(calls=1, plan=full, draft_plan=half)
  total = engine.DecodeStats() + spec + spec
  assert (total.plan, total.draft_plan, total.calls) == (full, half, 2)
