"""Speculative decoding: greedy output equals full-model greedy decoding for every family and batch
shape (EOS included); sampling keeps the full model's distribution; the caches are the size the
design says and are updated in place; options and errors.

Greedy tests share buckets (4 rows or 1 row, 16 prompt slots, 16 new-token slots, k = 4) so each
model structure compiles each executable once for the whole file.
"""

from __future__ import annotations

import math
import re

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from ulskip_jax.testing import compile_generate, loop_layer_ops
from ulskip_jax import testing as tiny
from tests.test_decode import PROMPTS, QUEUE, _eos_with_spread
from ulskip_jax import SkipPlan, decode, engine, hf, plan_layers
from ulskip_jax import speculative as spec
from ulskip_jax.kv_cache import cache_bytes

MAX_NEW = 10
K = 4  # draft tokens a round (k > 2 runs the inner draft loop)
SPEC = dict(draft_ratio=2, num_draft_tokens=K)


# Fast compiles, with XLA's older CPU emitters: the speculative executable (prefill, two draft
# graphs, verify, commits) then builds in half the time.
pytestmark = pytest.mark.usefixtures("fast_engine_compile")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """family -> our model loaded from a saved tiny Hugging Face folder."""
  out = {}
  for family in tiny.FAMILIES:
    path = tmp_path_factory.mktemp(family)
    tiny.save_hf_model(family, path)
    out[family] = hf.from_pretrained(path)[0]
  return out


def generate(model, prompts, *, batch_size=None, **kw):
  """Speculative decoding through `decode`'s API: the draft's options (spec.OPTION_KEYS) go in
  speculative=dict(...); with batch_size, continuous batching on that many rows."""
  speculative = {key: kw.pop(key) for key in spec.OPTION_KEYS if key in kw}
  return decode.generate(model, prompts, batch_size=batch_size, speculative=speculative, **kw)


def cut(rows, eos):
  return [row[:row.index(eos)] if eos in row else row for row in rows]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_greedy_equals_full_model_greedy(models, family):
  """Token for token, batch 1 and a batch of different lengths, with and without EOS. The two
  cache designs alternate over the families (both are covered for each kind of model code)."""
  model = models[family]
  index = tiny.FAMILIES.index(family)
  draft_cache = spec.DRAFT_CACHES[index % 2]
  batch_free, _ = decode.generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_id=None)
  # Batch 1: the batch's row 1 (test_decode checks that batching changes no row), which saves
  # compiling the plain decoder once more per family. That row is the batch's longest, unpadded
  # there too, so batch 1 differs from the batch only in its bucket, not in the model code: it is
  # checked for the first family of each cache design, sparing a speculative compile per family.
  cases = [(PROMPTS, batch_free)] + [(PROMPTS[1:2], batch_free[1:2])] * (index < 2)
  for prompts, free in cases:
    got, stats = generate(model, prompts, **SPEC, draft_cache=draft_cache,
                          max_new_tokens=MAX_NEW, eos_id=None)
    assert got == free
    assert stats.generated_tokens == len(prompts) * MAX_NEW
    assert 0 < stats.verify_passes <= MAX_NEW - 1
    # EOS: a token that row 0 emits; every row must stop before its first EOS.
    eos = free[0][3]
    got, stats = generate(model, prompts, **SPEC, draft_cache=draft_cache,
                          max_new_tokens=MAX_NEW, eos_id=eos)
    assert got == cut(free, eos) and len(got[0]) <= 3
    assert stats.generated_tokens == sum(min(len(r) + 1, MAX_NEW) for r in got)
    assert stats.executables_built == 0  # eos_id is traced


def test_draft_mode_everywhere_is_lossless_too(models):
  model = models["qwen2"]
  free, _ = decode.generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_id=None)
  got, _ = generate(model, PROMPTS, **SPEC, draft_cache="separate", mode="everywhere",
                    max_new_tokens=MAX_NEW, eos_id=None)
  assert got == free


def test_full_depth_draft_accepts_every_token(models):
  """A draft with no skipped layers is the full model: every draft is accepted, so each verify
  pass emits k + 1 tokens. With the separate draft cache this checks the carried last draft and
  the compaction of both caches (a hole would change the draft's tokens)."""
  model = models["llama"]
  free, _ = decode.generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_id=None)
  got, stats = generate(model, PROMPTS, draft_skip=(), num_draft_tokens=K,
                        draft_cache="separate", max_new_tokens=MAX_NEW, eos_id=None)
  assert got == free
  assert stats.verify_passes == math.ceil((MAX_NEW - 1) / (K + 1))
  # Per row: the first round emits 4 drafts + 1, the second 4 drafts (the budget of 10).
  assert stats.accepted_tokens == len(PROMPTS) * (K + K)
  assert stats.drafted_tokens == len(PROMPTS) * 2 * K


def test_cache_sizes_and_stats(models):
  model = models["llama"]
  cfg = model.cfg
  _, sep = generate(model, PROMPTS, **SPEC, draft_cache="separate", max_new_tokens=MAX_NEW,
                    eos_id=None)
  _, shared = generate(model, PROMPTS, **SPEC, max_new_tokens=MAX_NEW, eos_id=None)
  slots = 16 + 16 + 2 * K + 1  # prompt + new-token buckets, k + 1 slack, k + 1 scratch
  assert sep.verify_cache_bytes == shared.verify_cache_bytes == cache_bytes(cfg, 4, slots)
  pos_bytes = 4 * slots * 4
  assert sep.draft_cache_bytes - pos_bytes == (sep.verify_cache_bytes - pos_bytes) // 2
  assert shared.draft_cache_bytes == 0
  assert sep.cache_bytes == sep.verify_cache_bytes + sep.draft_cache_bytes
  assert 0 <= sep.accepted_tokens <= sep.drafted_tokens
  assert sep.drafted_tokens == K * sep.row_passes and sep.row_passes <= 3 * sep.verify_passes
  assert sep.tokens_per_row_pass == 1 + sep.accepted_tokens / sep.row_passes
  assert sep.as_dict()["acceptance_rate"] == sep.acceptance_rate
  # The output is the full model's; the reported draft is the plan the draft ran.
  assert sep.plan == shared.plan == plan_layers(4, 1)
  assert sep.draft_plan == shared.draft_plan == plan_layers(4, 2)
  total = engine.DecodeStats() + sep + sep  # generate_text's running sum keeps the counts
  assert isinstance(total, spec.SpeculativeStats) and total.draft_plan == sep.draft_plan
  assert total.drafted_tokens == 2 * sep.drafted_tokens and total.calls == 2


@pytest.mark.parametrize("draft_cache", spec.DRAFT_CACHES)
def test_continuous_batching_equals_full_model_greedy(models, draft_cache):
  """7 prompts on 2 rows, a finished row taking the next prompt: each prompt's output is still
  the full model's greedy output, cut at an EOS that stops the rows at different rounds."""
  model = models["llama"]
  eos = _eos_with_spread(model)
  free, _ = decode.generate(model, QUEUE, max_new_tokens=MAX_NEW, eos_id=None)
  got, stats = generate(model, QUEUE, batch_size=2, **SPEC, draft_cache=draft_cache,
                        max_new_tokens=MAX_NEW, eos_id=eos)
  assert got == cut(free, eos) and len(set(map(len, got))) > 2
  assert stats.generated_tokens == sum(min(len(r) + 1, MAX_NEW) for r in got)


@pytest.mark.parametrize("draft_cache", spec.DRAFT_CACHES)
@pytest.mark.parametrize("rows", [None, 2])
def test_loop_commits_in_place(models, draft_cache, rows):
  """In the round loop (and continuous batching's refills), every op that makes a cache layer
  ([B, K, S, Hd]) is an in-place dynamic-update-slice or scatter (no per-round copy of a
  cache); the temporaries stay small."""
  model = models["llama"]
  compiled = compile_generate(model, 3, 9, speculative=dict(SPEC, draft_cache=draft_cache),
                                     continuous_rows=rows, max_new_tokens=MAX_NEW, eos_id=None)
  cfg, B = model.cfg, rows or 4
  slots = 16 + 16 + 2 * K + 1
  in_place, others = loop_layer_ops(compiled.as_text(),
                                        (B, cfg.num_kv_heads, slots, cfg.head_dim))
  assert not others, others[:2]
  assert in_place >= 2 * (4 + 2)  # K and V of every verify and draft layer
  caches = cache_bytes(cfg, B, slots, () if draft_cache == "shared" else plan_layers(4, 2).skipped)
  caches += cache_bytes(cfg, B, slots)
  memory = compiled.memory_analysis()
  assert memory.temp_size_in_bytes < 3 * caches + 300_000, (memory, caches)


# ----------------------------------------------------------------------------------------------
# Sampling keeps the full model's distribution.

def exact_first_two(model, prompt, temperature, top_k):
  """The full model's joint distribution of the first two sampled tokens [V, V], computed from
  cache-free forwards, and the same with the second token drawn from the draft (ratio 2, paper
  mode: the prompt at full depth), which speculative sampling must NOT produce."""
  V = model.cfg.vocab_size
  call = tiny.jit_call(model)
  seqs = np.array([prompt + [t] for t in range(V)], np.int32)  # [V, T]: every first token
  full = np.asarray(call(seqs))
  paper = np.arange(seqs.shape[1])[None] < len(prompt)
  draft = np.asarray(call(seqs, skip=plan_layers(4, 2).skipped,
                          full_depth_BT=jnp.asarray(np.repeat(paper, V, 0))))

  def probs(logits):
    logits = logits.astype(np.float64) / temperature
    kth = np.sort(logits, -1)[..., -top_k][..., None]
    logits = np.where(logits < kth, -np.inf, logits)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  first = probs(full[0, len(prompt) - 1])
  return first[:, None] * probs(full[:, -1]), first[:, None] * probs(draft[:, -1])


def test_sampling_keeps_the_full_model_distribution(tmp_path, monkeypatch):
  """Chi-square of 4096 samples of the first two tokens against the exact joint (64 cells);
  the draft's own joint is far enough away that the same test would reject it."""
  monkeypatch.setattr(tiny, "VOCAB", 8)  # a Llama with 8 tokens (NNX init op by op is slower)
  tiny.save_hf_model("llama", tmp_path, seed=3)
  model = hf.from_pretrained(tmp_path)[0]
  prompt, temperature, top_k, rows, seeds = [1, 5, 3], 1.5, 6, 256, 16
  exact, drafted = exact_first_two(model, prompt, temperature, top_k)
  counts = np.zeros((8, 8))
  accepted = drafted_tokens = 0
  for seed in range(seeds):
    out, stats = generate(model, [prompt] * rows, draft_ratio=2, num_draft_tokens=2,
                          max_new_tokens=2, eos_id=None, temperature=temperature,
                          top_k=top_k, seed=seed)
    for t1, t2 in out:
      counts[t1, t2] += 1
    accepted += stats.accepted_tokens
    drafted_tokens += stats.drafted_tokens
  n = rows * seeds
  assert 0.2 < accepted / drafted_tokens < 0.95  # both acceptance and rejection happen

  def chi_square_p(expected_probs):
    expected = n * expected_probs.ravel() / expected_probs.sum()
    big = expected >= 5  # lump rare cells so the chi-square approximation holds
    obs = np.append(counts.ravel()[big], counts.ravel()[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    assert obs[~keep].sum() == 0  # never a token the filtered full model cannot produce
    return scipy.stats.chisquare(obs[keep], exp[keep]).pvalue, keep.sum() - 1

  p_value, dof = chi_square_p(exact)
  assert p_value > 1e-3, p_value
  # Power: the statistic expected if the second token came from the draft unchecked.
  noncentral = n * np.sum(np.where(exact > 0, (drafted - exact) ** 2 / np.maximum(exact, 1e-12), 0))
  assert noncentral > scipy.stats.chi2.isf(1e-6, dof) * 2, noncentral


# ----------------------------------------------------------------------------------------------
# Options and errors.

def test_bad_arguments_raise_one_line_errors(models):
  model = models["gpt2"]
  cases = [
      (dict(num_draft_tokens=3), "needs a draft"),
      (dict(draft_ratio=2, num_draft_tokens=0), "num_draft_tokens=0 is out of range"),
      (dict(draft_ratio=2, draft_cache="both"), "draft_cache='both' is unknown"),
      (dict(draft_ratio=2, draft_skip=(1,)), "pass one or the other"),
      (dict(draft_ratio=9), "out of range"),
      (dict(draft_ratio=2, draft_cache="shared", mode="everywhere"), "is impossible"),
      (dict(draft_ratio=2, max_new_tokens=200), "prompt 0 has"),
  ]
  for kw, message in cases:
    kw = dict(dict(max_new_tokens=5, eos_id=2), **kw)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
      generate(model, PROMPTS, **kw)
    assert "\n" not in str(info.value)


def test_decode_generate_and_infer_dispatch(models, tmp_path, capsys):
  """decode.generate(speculative=...) and infer.py --speculative give the full model's output
  (with the greedy test's shapes, so they reuse its executables)."""
  import infer
  model = models["llama"]
  free, _ = decode.generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_id=None)
  got, stats = decode.generate(model, PROMPTS, speculative=SPEC, max_new_tokens=MAX_NEW,
                               eos_id=None)
  assert got == free and stats.drafted_tokens > 0
  for kw, message in [(dict(ratio=2), "skip/ratio given with speculative"),
                      (dict(num_beams=2), "num_beams=2"),
                      (dict(speculative=dict(SPEC, k=4)), "['k'] unknown")]:
    kw = dict(dict(speculative=SPEC, max_new_tokens=MAX_NEW, eos_id=None), **kw)
    with pytest.raises(ValueError, match=re.escape(message)):
      decode.generate(model, PROMPTS, **kw)
  # infer.py: the same tiny Llama (seed 0) with a tokenizer; 3 prompts fill the 4-row bucket.
  tiny.save_hf_model("llama", tmp_path)
  tiny.save_tiny_tokenizer(tmp_path)
  (tmp_path / "in.txt").write_text("w5 w6 w7\nw8 w9 w10 w11 w12 w13 w14 w15\nw3\n")
  common = ["--checkpoint", str(tmp_path), "--input", str(tmp_path / "in.txt"),
            "--batch-size", "4", "--max-new-tokens", str(MAX_NEW), "--no-progress"]
  assert infer.main(common + ["--output", str(tmp_path / "full.txt")]) == 0
  assert infer.main(common + ["--output", str(tmp_path / "spec.txt"),
                              "--speculative", "draft_ratio=2,k=4",
                              "--metrics-out", str(tmp_path / "m.json")]) == 0
  assert (tmp_path / "spec.txt").read_text() == (tmp_path / "full.txt").read_text()
  out = capsys.readouterr().out
  assert "drafts accepted" in out and f"spec: {SkipPlan.full(4)}, " in out
  assert f"drafted by {plan_layers(4, 2)}, " in out
  import json
  run = json.loads((tmp_path / "m.json").read_text())["runs"][0]
  assert run["drafted_tokens"] > 0 and 0 <= run["acceptance_rate"] <= 1
  assert run["draft_plan"]["kept"] == [0, 3] and run["kept_layers"] == 4
  assert infer.main(common + ["--output", str(tmp_path / "x.txt"), "--speculative", "k=4"]) == 2
  assert "needs a draft" in capsys.readouterr().err
