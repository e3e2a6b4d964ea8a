"""Self-speculative decoding: the ULS sub-model drafts, the full model verifies. Lossless.

`decode.generate(..., speculative=dict(draft_ratio=2, num_draft_tokens=4))` runs `Speculative`:
a full-depth prefill, then rounds that draft k tokens with the kept layers, verify them in one
full-depth pass over [pending token, drafts], and per row accept the longest agreeing prefix plus
the full model's own next token. Greedy: a draft is accepted when it is the full model's argmax,
so the output is full-model greedy decoding token for token. Sampling: speculative sampling
(Leviathan et al. 2023): accept d ~ q with probability min(1, p(d) / q(d)), else draw from
norm(max(0, p - q)).

Draft caches (`draft_cache`; only acceptance differs): "shared" (default) drafts in the full
model's cache, writing kept-layer K/V into scratch slots the verify pass overwrites (Draft &
Verify; LayerSkip). "separate" gives the kept layers their own cache, holding the K/V the draft
gave each token (the ULS sub-model as fine-tuned); an accepted last draft never ran through the
draft, so it opens the next round.

Rows accept different numbers of tokens, so each row's cache is compacted: P + N + k committed
slots, then k + 1 scratch slots that every pass writes at one shared index, and `KVCache.commit`
moves each row's accepted entries to its next committed slots. Positions fed to the model are
clamped to the position limit (a draft past a row's budget may run beyond it); no query whose
output is used sees a clamped slot.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from ulskip_jax import engine, sampling
from ulskip_jax.checks import as_choice, as_int
from ulskip_jax.kv_cache import KVCache, cache_bytes
from ulskip_jax.model import ModelConfig
from ulskip_jax.skipping import SkipPlan, resolve

Array = jax.Array
DRAFT_CACHES = ("shared", "separate")


@dataclasses.dataclass
class SpeculativeStats(engine.DecodeStats):
  """DecodeStats plus speculation counts.

  drafted_tokens: k per round per row still generating; accepted_tokens: drafts that matched (or
  passed the p / q test) and were emitted. verify_passes: full-depth passes (rounds) of the batch;
  row_passes: the same summed over the rows still generating (a batch runs as many passes as its
  slowest row needs). cache_bytes = verify_cache_bytes + draft_cache_bytes (0 when shared).
  plan: full depth (the full model verifies, so the output is its); draft_plan: the sub-model
  that drafts.
  """
  drafted_tokens: int = 0
  accepted_tokens: int = 0
  verify_passes: int = 0
  row_passes: int = 0
  verify_cache_bytes: int = 0
  draft_cache_bytes: int = 0
  draft_plan: SkipPlan | None = None

  @property
  def acceptance_rate(self) -> float:
    return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

  @property
  def tokens_per_row_pass(self) -> float:
    """Tokens a row gains per verify pass: 1 + its accepted drafts (at most k + 1)."""
    return 1 + self.accepted_tokens / self.row_passes if self.row_passes else 0.0


# ----------------------------------------------------------------------------------------------
# The strategy.

@flax.struct.dataclass
class SpeculativeState(engine.QueueState):
  """The loop state between rounds (k drafts; `QueueState`'s tok is the pending token, whose K/V
  is not in the caches yet)."""
  rnd: Array                   # [] this round's number, from 1
  cache: KVCache               # the full model's (verify) cache; with a shared cache, the draft's
  draft_cache: KVCache | None  # the draft's own cache (draft_cache="separate"), else None
  carry_tok: Array             # [B] separate cache: the last draft, which the draft never ran
  carry_valid: Array           # [B] bool: carry_tok was accepted, so the draft runs it first
  accepted: Array              # [] accepted drafts so far (all rows)
  drafted: Array               # [] drafted tokens so far (all rows)
  last_commit: tuple           # (count, dest, first_pos) [B] each: last round's verify commit


@dataclasses.dataclass(frozen=True)
class Speculative(engine.Queued):
  """Self-speculative decoding over a prompt queue (x.prompts [Q, P], x.rows [B]). The result is
  (tokens [Q, N + k + 1], accepted drafts, drafted tokens, rounds)."""
  draft: SkipPlan           # the layers that draft
  num_draft_tokens: int     # k
  shared_cache: bool        # draft_cache == "shared"
  paper_mode: bool          # the draft's prompt K/V is the full model's (else kept layers only)
  max_new_slots: int        # N
  sample: bool = False
  top_k: int | None = None
  use_top_p: bool = False
  continuous: bool = False  # prompts wait for free rows (else each has a row from the start)

  @property
  def plan(self) -> SkipPlan:
    """The output's: the full model verifies every token."""
    return SkipPlan.full(self.draft.num_layers)

  def _slots(self, x):
    """(Z, S): scratch slots [Z, Z + k + 1) after the committed ones; S slots a row."""
    Z = x.prompts.shape[1] + self.max_new_slots + self.num_draft_tokens
    return Z, Z + self.num_draft_tokens + 1

  def _filtered(self, x, logits):
    return sampling.filtered_logits(logits, x.temperature, self.top_k,
                                    x.top_p if self.use_top_p else None)

  def _choose(self, x, logits_BV, rng):
    """(token [B], its distribution [B, V] or None when greedy)."""
    if not self.sample:
      return sampling.argmax(logits_BV), None
    filtered = self._filtered(x, logits_BV)
    return (jax.random.categorical(rng, filtered, -1).astype(jnp.int32),
            jax.nn.softmax(filtered, -1))

  def _accept(self, x, logits_BKV, drafts_BK, q_BKV, rng):
    """(accepted drafts a [B] in 0..k, the full model's token after them [B]); logits_BKV:
    verify logits at the k + 1 chunk positions (position i predicts draft i + 1)."""
    B, k = drafts_BK.shape
    rows = jnp.arange(B)
    if not self.sample:
      target = sampling.argmax(logits_BKV)  # [B, k + 1]
      a = engine.leading_true(drafts_BK == target[:, :k])
      return a, target[rows, a]
    accept_rng, bonus_rng = jax.random.split(rng)
    p = jax.nn.softmax(self._filtered(x, logits_BKV), -1)  # [B, k + 1, V]
    p_draft = jnp.take_along_axis(p[:, :k], drafts_BK[..., None], -1)[..., 0]
    q_draft = jnp.take_along_axis(q_BKV, drafts_BK[..., None], -1)[..., 0]
    u = jax.random.uniform(accept_rng, (B, k))
    a = engine.leading_true(u * q_draft < p_draft)  # u < p / q, q > 0 (d was drawn from q)
    # Rejected at a < k: the residual norm(max(0, p - q)); all accepted: p itself.
    q_next = jnp.concatenate([q_BKV, jnp.zeros_like(q_BKV[:, :1])], 1)[rows, a]
    p_next = p[rows, a]
    residual = jnp.maximum(p_next - q_next, 0.0)
    # p == q up to rounding can leave nothing (a rejection there has probability ~0): fall back.
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 1e-9, residual, p_next)
    return a, jax.random.categorical(bonus_rng, jnp.log(residual), -1).astype(jnp.int32)

  def _run(self, model, tokens_BT, positions_BT, cache, index, skip, segment_ids_BT=None):
    limit = model.cfg.max_position - 1
    h, cache = model.hidden(tokens_BT, skip=skip, positions_BT=jnp.minimum(positions_BT, limit),
                            segment_ids_BT=segment_ids_BT, cache=cache, cache_index=index)
    return model.unembed(h), cache

  def _prefill(self, model, prompts, pad, num_slots):
    """(first tokens' logits, verify cache, draft cache or None) of left-padded prompts."""
    logits, cache = engine.prefill(model, prompts, pad, num_slots, skip=self.plan,
                                   paper_mode=False)
    if self.shared_cache:
      return logits, cache, None
    if self.paper_mode or self.draft.is_full:
      return logits, cache, cache.kept_view(self.draft.attention_layers)
    return logits, cache, engine.prefill(model, prompts, pad, num_slots, skip=self.draft,
                                         paper_mode=False)[1]

  def start(self, model, x):
    B, N, k = x.rows.shape[0], self.max_new_slots, self.num_draft_tokens
    logits, cache, draft_cache = self._prefill(model, x.prompts[:B], x.pad[:B], self._slots(x)[1])
    tok = self._choose(x, logits, jax.random.fold_in(x.rng, 0))[0]
    zeros = jnp.zeros((B,), jnp.int32)
    return SpeculativeState(
        **self.start_queue(x, tok, N + k + 1), rnd=jnp.int32(1), cache=cache,
        draft_cache=draft_cache, carry_tok=zeros, carry_valid=zeros > 0, accepted=jnp.int32(0),
        drafted=jnp.int32(0), last_commit=(zeros, zeros + x.prompts.shape[1], zeros))

  def refill(self, model, x, s: SpeculativeState, b, i, prompt_1P, pad_1) -> SpeculativeState:
    logits, cache, draft_cache = self._prefill(model, prompt_1P, pad_1, x.prompts.shape[1])
    tok = self._choose(x, logits, jax.random.fold_in(jax.random.fold_in(x.rng, i), 0))[0][0]
    return self.start_row(x, s, b, i, tok, pad_1[0]).replace(
        cache=s.cache.insert(b, cache, 0), carry_valid=s.carry_valid.at[b].set(False),
        draft_cache=None if draft_cache is None else s.draft_cache.insert(b, draft_cache, 0))

  def _draft(self, model, x, s: SpeculativeState, cache, pos0, rng):
    """k draft tokens [B, k], their distributions [B, k, V] (None when greedy), the caches."""
    B, k = pos0.shape[0], self.num_draft_tokens
    Z = self._slots(x)[0]
    kept = self.draft.attention_layers  # the full cache's layers the draft's cache holds
    run = functools.partial(self._run, model, skip=self.draft)
    if self.shared_cache:
      logits, dcache = run(s.tok[:, None], pos0[:, None], cache.kept_view(kept), Z)
      first_slot = Z
    else:  # first step: [carried last draft, pending] at scratch slots Z, Z + 1
      logits, dcache = run(jnp.stack([s.carry_tok, s.tok], 1),
                           pos0[:, None] + jnp.array([-1, 0], jnp.int32), s.draft_cache, Z,
                           segment_ids_BT=jnp.stack([s.carry_valid.astype(jnp.int32),
                                                     jnp.ones_like(s.tok)], 1))
      first_slot = Z + 1
    tok, q = self._choose(x, logits[:, -1], jax.random.fold_in(rng, 0))
    drafts = jnp.zeros((B, k), jnp.int32).at[:, 0].set(tok)
    qs = None if q is None else jnp.zeros((B, k, q.shape[-1]), q.dtype).at[:, 0].set(q)

    def step(i, carry):
      drafts, qs, dcache = carry
      logits, dcache = run(drafts[:, i - 1, None], pos0[:, None] + i, dcache, first_slot + i)
      tok, q = self._choose(x, logits[:, 0], jax.random.fold_in(rng, i))
      return drafts.at[:, i].set(tok), None if q is None else qs.at[:, i].set(q), dcache

    drafts, qs, dcache = jax.lax.fori_loop(1, k, step, (drafts, qs, dcache))
    if self.shared_cache:
      return drafts, qs, cache.merge_view(dcache, kept), None
    return drafts, qs, cache, dcache

  def step(self, model, x, s: SpeculativeState) -> SpeculativeState:
    P, k = x.prompts.shape[1], self.num_draft_tokens
    Z = self._slots(x)[0]
    steps = jnp.arange(k + 1, dtype=jnp.int32)
    # The previous round's verify commit, done here rather than right after its verify pass:
    # there, between the pass's in-place write and the commit's, attention reads the cache, and
    # XLA copied every verify layer twice a round (test_speculative checks the HLO).
    s = s.replace(cache=s.cache.commit(Z, k + 1, jnp.zeros_like(s.count), *s.last_commit))
    s = self.fill_rows(model, x, s)
    round_rng = jax.random.fold_in(x.rng, s.rnd)
    pos0 = s.prompt_len + s.count - 1  # the pending token's position
    committed = s.count - 1            # generated tokens whose K/V is in the verify cache
    drafts, qs, cache, draft_cache = self._draft(model, x, s, s.cache, pos0,
                                                 jax.random.fold_in(round_rng, 0))
    logits, cache = self._run(model, jnp.concatenate([s.tok[:, None], drafts], 1),
                              pos0[:, None] + steps, cache, Z, self.plan)
    a, bonus = self._accept(x, logits, drafts, qs, jax.random.fold_in(round_rng, 1))
    # Emitted: the a accepted drafts, then the full model's token.
    block = jnp.where(steps[None] < a[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), bonus[:, None])
    live = ~s.done
    s, count = self.emit(x, s, block, a + 1)
    # Commit: the verify cache keeps pending + the emitted drafts (count entries, the last emitted
    # token becomes the next pending one; done at the start of the next round); the draft cache
    # keeps the same tokens, those it has run.
    if not self.shared_cache:
      carry = s.carry_valid.astype(jnp.int32)
      draft_count = jnp.where(live, carry + jnp.minimum(count, k), 0)
      draft_cache = draft_cache.commit(Z, k + 1, 1 - carry, draft_count, P + committed - carry,
                                       pos0 - carry)
      s = s.replace(carry_valid=(count == k + 1) & live, carry_tok=drafts[:, k - 1])
    return s.replace(
        rnd=s.rnd + 1, cache=cache, draft_cache=draft_cache,
        accepted=s.accepted + jnp.sum(jnp.minimum(a, count)),
        drafted=s.drafted + jnp.sum(jnp.where(live, k, 0)),
        last_commit=(count, P + committed, pos0))

  def result(self, x, s: SpeculativeState):
    return s.out, s.accepted, s.drafted, s.rnd - 1

  def stats(self, cfg, x, stats, rest) -> SpeculativeStats:
    accepted, drafted, rounds = (int(a) for a in rest)
    B, S = x.rows.shape[0], self._slots(x)[1]
    verify = cache_bytes(cfg, B, S, self.plan)
    draft = 0 if self.shared_cache else cache_bytes(cfg, B, S, self.draft)
    fields = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
    return SpeculativeStats(**dict(fields, cache_bytes=verify + draft),
                            drafted_tokens=drafted, accepted_tokens=accepted, verify_passes=rounds,
                            row_passes=drafted // self.num_draft_tokens,
                            verify_cache_bytes=verify, draft_cache_bytes=draft,
                            draft_plan=self.draft)


# ----------------------------------------------------------------------------------------------
# Options (`decode.generate(..., speculative=dict(...))` runs the strategy).

OPTION_KEYS = ("draft_skip", "draft_ratio", "num_draft_tokens", "draft_cache")


def check(cfg: ModelConfig, speculative: dict[str, Any], *, mode="paper", skip=None, ratio=None,
          num_beams=1, no_repeat_ngram_size=0, **_) -> dict[str, Any]:
  """`Speculative`'s draft options from `speculative` (keys OPTION_KEYS), checked along with the
  `generate` options speculation cannot combine with (one-line ValueErrors)."""
  if not isinstance(speculative, dict):
    raise ValueError(f"speculative={speculative!r} is invalid: give a dict, e.g. "
                     "dict(draft_ratio=2, num_draft_tokens=4)")
  unknown = sorted(set(speculative) - set(OPTION_KEYS))
  if unknown:
    raise ValueError(f"speculative option(s) {unknown} unknown: allowed are "
                     f"{', '.join(OPTION_KEYS)}")
  if skip is not None or ratio is not None:
    raise ValueError("skip/ratio given with speculative: the full model verifies, so give the "
                     "draft's layers as speculative=dict(draft_ratio=...) or draft_skip")
  if num_beams != 1 or no_repeat_ngram_size:
    raise ValueError(f"num_beams={num_beams} / no_repeat_ngram_size={no_repeat_ngram_size} with "
                     "speculative is unsupported: speculative decoding is greedy or sampling")
  as_choice("mode", mode, ("paper", "everywhere"))
  o = dict(dict(num_draft_tokens=4, draft_cache="shared", draft_skip=None, draft_ratio=None),
           **speculative)
  if o["draft_skip"] is None and o["draft_ratio"] is None:
    raise ValueError("speculative decoding needs a draft: give draft_ratio (e.g. 2) or draft_skip")
  # The ULS plan of draft_ratio keeps a local/global model's global layers (`skipping.resolve`).
  draft = resolve(cfg.num_layers, skip=o["draft_skip"], ratio=o["draft_ratio"],
                  windows=cfg.attention_windows)
  num_draft_tokens = as_int("num_draft_tokens", o["num_draft_tokens"], 1, engine.MIN_BUCKET)
  as_choice("draft_cache", o["draft_cache"], DRAFT_CACHES)
  if o["draft_cache"] == "shared" and mode != "paper":
    raise ValueError(f"mode={mode!r} with draft_cache='shared' is impossible: the shared cache "
                     "holds the full model's prompt K/V (paper mode); use draft_cache='separate'")
  return dict(draft=draft, num_draft_tokens=num_draft_tokens,
              shared_cache=o["draft_cache"] == "shared", paper_mode=mode == "paper")
