"""Sampling options reach the sampler: temperature and top_p change the distribution that
`decode.generate` and speculative decoding draw from, to exactly the filtered full model's.

The reference filter is numpy, written from Hugging Face's definitions (logits / temperature; top-p
drops the tokens whose ascending cumulative probability is <= 1 - top_p, keeping the most likely
one), and the exact joint distribution of the first two tokens comes from cache-free forwards. A
chi-square test on 4096 samples must accept it, a token outside the nucleus must never appear, and
the unfiltered model's joint must be far enough away that the same test would reject it.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from ulskip_jax import testing as tiny
from ulskip_jax import decode, hf

TEMPERATURE, TOP_P = 0.5, 0.8
PROMPT = [1, 3, 3]
SAMPLES = 4096
V = 8  # a Llama with 8 tokens: 64 cells for the joint of two tokens


pytestmark = pytest.mark.usefixtures("fast_engine_compile")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama8")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(tiny, "VOCAB", V)
    tiny.save_hf_model("llama", path, seed=0)
  return hf.from_pretrained(path)[0]


def filtered_probs(logits, temperature, top_p=None):
  """Hugging Face's TemperatureLogitsWarper then TopPLogitsWarper, as probabilities (float64)."""
  logits = np.asarray(logits, np.float64) / temperature
  if top_p is not None:
    order = np.argsort(logits, -1)  # ascending
    ascending = np.take_along_axis(logits, order, -1)
    p = np.exp(ascending - ascending.max(-1, keepdims=True))
    cumulative = np.cumsum(p / p.sum(-1, keepdims=True), -1)
    remove_sorted = cumulative <= 1 - top_p
    remove_sorted[..., -1] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, -1)
    logits = np.where(remove, -np.inf, logits)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def joints(model):
  """(the exact joint [V, V] of the first two tokens under temperature and top_p, the joint of
  the unfiltered model at temperature 1)."""
  call = tiny.jit_call(model)
  seqs = np.array([PROMPT + [t] for t in range(V)], np.int32)  # every first token
  logits = np.asarray(call(seqs))
  first, second = logits[0, len(PROMPT) - 1], logits[:, -1]
  exact = filtered_probs(first, TEMPERATURE, TOP_P)[:, None] * filtered_probs(
      second, TEMPERATURE, TOP_P)
  plain = filtered_probs(first, 1.0)[:, None] * filtered_probs(second, 1.0)
  # The options must matter here, and leave enough cells for the test to see a wrong conditional
  # (the model's seed and the prompt were chosen for this).
  assert 3 <= np.sum(exact.sum(1) > 0) < V and np.sum(exact > 0) >= 8
  assert plain[exact == 0].sum() > 0.1
  return exact, plain


def chi_square(counts, probs):
  """(p-value, degrees of freedom, observed count outside the support of probs)."""
  expected = SAMPLES * probs.ravel()
  observed = counts.ravel()
  big = expected >= 5  # lump rare cells so the chi-square approximation holds
  obs = np.append(observed[big], observed[~big & (expected > 0)].sum())
  exp = np.append(expected[big], expected[~big & (expected > 0)].sum())
  keep = exp > 0
  return (scipy.stats.chisquare(obs[keep], exp[keep]).pvalue, keep.sum() - 1,
          observed[expected == 0].sum())


def check_samples(out, exact, plain):
  counts = np.zeros((V, V))
  for t1, t2 in out:
    counts[t1, t2] += 1
  p_value, dof, outside = chi_square(counts, exact)
  assert outside == 0, "a token outside the temperature / top-p nucleus was sampled"
  assert p_value > 1e-3, p_value
  # Power: the statistic expected if the options were ignored (the plain model's joint).
  noncentral = SAMPLES * np.sum(np.where(exact > 0, (plain - exact) ** 2 / np.maximum(exact, 1e-12),
                                         0))
  assert noncentral > 2 * scipy.stats.chi2.isf(1e-6, dof), noncentral


def test_generate_samples_the_filtered_distribution(model, joints):
  out, _ = decode.generate(model, [PROMPT] * SAMPLES, max_new_tokens=2, eos_id=None,
                           temperature=TEMPERATURE, top_p=TOP_P, seed=0)
  check_samples(out, *joints)


def test_speculative_samples_the_filtered_distribution(model, joints):
  out, stats = decode.generate(
      model, [PROMPT] * SAMPLES, max_new_tokens=2, eos_id=None, temperature=TEMPERATURE,
      top_p=TOP_P, seed=1,
      # A draft one layer short of the model: close enough that drafts are often accepted.
      speculative=dict(draft_skip=(1,), num_draft_tokens=2))
  assert 0.2 < stats.acceptance_rate < 0.9  # both acceptance and rejection happen
  check_samples(out, *joints)
