"""Self-speculative decoding: the ULS sub-model drafts, the full model verifies. Lossless.

Shapes: B batch rows, P prompt slots, N new-token slots (bucketed as in `decode.py`), k draft
tokens per round, V vocabulary, S cache slots.

One call runs ONE compiled executable: a full-depth prefill of the prompt, then a `lax.while_loop`
of rounds. A round drafts k tokens with the kept layers of the draft plan (one token per draft
step, an inner `fori_loop`), verifies them in one full-depth pass over the k + 1 positions
[pending token, drafts], and per row accepts the longest prefix of drafts the full model agrees
with plus the full model's own next token (so every round emits 1 to k + 1 tokens per row).
Greedy: a draft is accepted when it is the full model's argmax, so the output equals full-model
greedy decoding token for token. Sampling: speculative sampling (Leviathan et al. 2023; Chen et
al. 2023): accept draft d ~ q with probability min(1, p(d) / q(d)), else sample from
norm(max(0, p - q)); every emitted token is then distributed exactly as the full model's
(temperature, top_k and top_p filtering apply to both p and q).

Cache design (`draft_cache`). The draft's kept layers see other inputs than the same layers
inside the full model (the skipped layers are missing below them), so their K/V for generated
tokens differs from the full model's. Two designs, both lossless (only acceptance differs):
  * "shared" (default): one cache of L layers, the full model's. Each draft step writes its
    kept-layer K/V into the scratch slots (below) and the verify pass overwrites them, so the
    draft attends to the full model's K/V of every committed token (as in Draft & Verify, Zhang
    et al. 2023, and LayerSkip). Paper mode comes free: the prompt K/V the draft reads is the full
    model's from the one prefill.
  * "separate": the shared verify cache plus a draft cache for the n kept layers, in which
    generated tokens keep the K/V the kept layers gave them: the draft is then exactly the ULS
    sub-model as fine-tuned (paper mode: its prompt K/V copied from the verify cache after the
    prefill; mode="everywhere": a second prefill through the kept layers). When a row accepts all
    k drafts, the last one never ran through the draft; it is carried into the next round's first
    draft step (a 2-token chunk), so the draft cache has no holes.
  Shared is the default because it was never worse, in acceptance or in speed: on every trained
  checkpoint measured (runs/bible_multi, ULS-fine-tuned r2 and the full-depth base; 32 validation
  verses, k = 2 and 4, draft ratios 2 and 3) its acceptance rate was 0 to 0.02 higher, its rounds
  skip the draft cache's commit and 2-token first step, and it needs 1x, not 1 + n / L, the
  memory. Measured for the bible_2x shape (L = 12, 32 prompt + 64 new-token slots, k = 4, batch 8):
  plain full-depth decoding 4.50 MiB of KV cache; shared 4.93 MiB (1.09x: the k + 1 slack and
  k + 1 scratch slots); separate 4.93 + 2.46 = 7.39 MiB (1.64x). `SpeculativeStats` reports both.
  Recomputing the draft's K/V each round instead of caching it would cost a pass over the whole
  prefix per round, which is what a cache is there to avoid.

Rows accept different numbers of tokens, so rows are compacted, not holed: each cache has P + N + k
committed slots and a scratch of k + 1 slots at the end. Every pass writes its chunk into the
scratch at one slot index shared by all rows (the model's `cache_index`); attention masks by the
per-slot positions, so the committed prefix plus the scratch is exactly each row's context. After
verification each row copies its accepted entries (at most k + 1 slots a layer) from the scratch
to its own next committed slots (a batched dynamic_update_slice, in place) and the scratch is
marked empty (pos = -1). Marking rejected slots empty in place instead would leave up to k holes a
round: the cache would need P + N (k + 1) slots and every attention would read all of them.

Positions fed to the model are clamped to the position limit: a draft beyond a row's budget may
run past it (a learned position table would give NaN there), and no query whose output is used
can see a clamped slot (they are all at the last position, which no needed query reaches).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from ulskip_jax import decode, engine, kv_cache, sampling
from ulskip_jax.checks import as_int
from ulskip_jax.kv_cache import KVCache, cache_bytes
from ulskip_jax.model import Decoder, ModelConfig
from ulskip_jax.skipping import kept_layers

Array = jax.Array
DRAFT_CACHES = ("shared", "separate")


@dataclasses.dataclass(frozen=True)
class SpeculativeOptions:
  """Everything static about one executable (hashable: part of the executable cache key)."""
  draft_skip: tuple[int, ...]
  num_draft_tokens: int     # k
  shared_cache: bool        # draft_cache == "shared"
  paper_mode: bool          # the draft's prompt K/V is the full model's (else kept layers only)
  max_new_slots: int        # N
  sample: bool
  top_k: int | None
  use_top_p: bool


@dataclasses.dataclass
class SpeculativeStats(decode.DecodeStats):
  """DecodeStats plus speculation counts.

  drafted_tokens: k per round per row still generating; accepted_tokens: drafts that matched (or
  passed the p / q test) and were emitted. verify_passes: full-depth passes (rounds) of the batch;
  row_passes: the same summed over the rows still generating (a batch runs as many passes as its
  slowest row needs). cache_bytes = verify_cache_bytes + draft_cache_bytes (0 when shared).
  """
  drafted_tokens: int = 0
  accepted_tokens: int = 0
  verify_passes: int = 0
  row_passes: int = 0
  verify_cache_bytes: int = 0
  draft_cache_bytes: int = 0

  @property
  def acceptance_rate(self) -> float:
    return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

  @property
  def tokens_per_row_pass(self) -> float:
    """Tokens a row gains per verify pass: 1 + its accepted drafts (at most k + 1)."""
    return 1 + self.accepted_tokens / self.row_passes if self.row_passes else 0.0

  def __add__(self, other: decode.DecodeStats) -> SpeculativeStats:
    def total(name):  # a plain DecodeStats has none of these counts
      return getattr(self, name) + getattr(other, name, 0)

    def largest(name):
      return max(getattr(self, name), getattr(other, name, 0))

    return SpeculativeStats(
        **dataclasses.asdict(decode.DecodeStats.__add__(self, other)),
        drafted_tokens=total("drafted_tokens"), accepted_tokens=total("accepted_tokens"),
        verify_passes=total("verify_passes"), row_passes=total("row_passes"),
        verify_cache_bytes=largest("verify_cache_bytes"),
        draft_cache_bytes=largest("draft_cache_bytes"))

  def __radd__(self, other: decode.DecodeStats) -> SpeculativeStats:
    return self + other  # DecodeStats() + SpeculativeStats (generate_text's running sum)

  def as_dict(self) -> dict[str, Any]:
    return dict(super().as_dict(), acceptance_rate=self.acceptance_rate,
                tokens_per_row_pass=self.tokens_per_row_pass)


# ----------------------------------------------------------------------------------------------
# Token selection.

def _filtered_logits(logits: Array, opts: SpeculativeOptions, temperature: Array,
                     top_p: Array) -> Array:
  return sampling.filtered_logits(logits, temperature, opts.top_k,
                                  top_p if opts.use_top_p else None)


def _choose(logits_BV: Array, rng: Array, opts: SpeculativeOptions, temperature, top_p):
  """(token [B], its distribution [B, V] or None when greedy)."""
  if not opts.sample:
    return sampling.argmax(logits_BV), None
  filtered = _filtered_logits(logits_BV, opts, temperature, top_p)
  tok = jax.random.categorical(rng, filtered, -1).astype(jnp.int32)
  return tok, jax.nn.softmax(filtered, -1)


def _leading_true(x_BK: Array) -> Array:
  """The number of leading True per row: the first False's index (a min, which XLA's CPU runs
  faster than the reduce-window of a cumprod)."""
  iota = jax.lax.broadcasted_iota(jnp.int32, x_BK.shape, 1)
  return jnp.min(jnp.where(x_BK, x_BK.shape[1], iota), 1)


def _accept(logits_BKV: Array, drafts_BK: Array, q_BKV: Array | None, rng: Array,
            opts: SpeculativeOptions, temperature, top_p) -> tuple[Array, Array]:
  """(accepted drafts a [B] in 0..k, the full model's token after them [B]).

  logits_BKV: verify logits at the k + 1 chunk positions (position i predicts draft i + 1).
  """
  B, k = drafts_BK.shape
  rows = jnp.arange(B)
  if not opts.sample:
    target = sampling.argmax(logits_BKV)  # [B, k + 1]
    a = _leading_true(drafts_BK == target[:, :k])
    return a, target[rows, a]
  accept_rng, bonus_rng = jax.random.split(rng)
  p = jax.nn.softmax(_filtered_logits(logits_BKV, opts, temperature, top_p), -1)  # [B, k+1, V]
  p_draft = jnp.take_along_axis(p[:, :k], drafts_BK[..., None], -1)[..., 0]
  q_draft = jnp.take_along_axis(q_BKV, drafts_BK[..., None], -1)[..., 0]
  u = jax.random.uniform(accept_rng, (B, k))
  a = _leading_true(u * q_draft < p_draft)  # u < p / q, q > 0 (d was drawn from q)
  # Rejected at a < k: the residual norm(max(0, p - q)); all accepted: p itself.
  q_next = jnp.concatenate([q_BKV, jnp.zeros_like(q_BKV[:, :1])], 1)[rows, a]
  p_next = p[rows, a]
  residual = jnp.maximum(p_next - q_next, 0.0)
  # p == q up to rounding can leave nothing (a rejection there has probability ~0): fall back to p.
  residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 1e-9, residual, p_next)
  bonus = jax.random.categorical(bonus_rng, jnp.log(residual), -1).astype(jnp.int32)
  return a, bonus


# ----------------------------------------------------------------------------------------------
# The executable.

@flax.struct.dataclass
class SpeculativeState:
  """The loop state between rounds (B rows, N new-token slots, k drafts a round)."""
  rnd: Array                   # [] this round's number, from 1
  out: Array                   # [B, N + k + 1] emitted tokens, pad_id after EOS and the budget
  generated: Array             # [B] tokens emitted so far
  done: Array                  # [B] bool
  pending: Array               # [B] the last emitted token: its K/V is not in the caches yet
  cache: KVCache               # the full model's (verify) cache; with a shared cache, the draft's
  draft_cache: KVCache | None  # the draft's own cache (draft_cache="separate"), else None
  carry_tok: Array             # [B] separate cache: the last draft, which the draft never ran
  carry_valid: Array           # [B] bool: carry_tok was accepted, so the draft runs it first
  accepted: Array              # [B] accepted drafts so far
  drafted: Array               # [B] drafted tokens so far
  last_commit: tuple           # (count, dest, first_pos) [B] each: last round's verify commit


def _speculative_fn(graphdef, state, prompt_BP, pad_B, active_B, max_new, eos_id, pad_id, rng,
                    temperature, top_p, length_penalty, *, opts: SpeculativeOptions):
  """Returns (new tokens [B, N + k + 1] (pad after EOS and the budget), accepted drafts [B],
  drafted tokens [B], rounds)."""
  del length_penalty
  model = nnx.merge(graphdef, state)
  cfg = model.cfg
  B, P = prompt_BP.shape
  N, k = opts.max_new_slots, opts.num_draft_tokens
  Z = P + N + k          # scratch slots [Z, Z + k + 1); committed slots before
  S = Z + k + 1
  kept = kept_layers(cfg.num_layers, opts.draft_skip)
  separate = not opts.shared_cache
  prompt_len_B = P - pad_B
  rows = jnp.arange(B)
  steps = jnp.arange(k + 1, dtype=jnp.int32)
  limit = cfg.max_position - 1

  def prefill(skip):
    return engine.prefill(model, prompt_BP, pad_B, S, skip=skip, paper_mode=False)

  def run(tokens_BT, positions_BT, cache, index, skip, segment_ids_BT=None):
    x, cache = model.hidden(tokens_BT, skip=skip, positions_BT=jnp.minimum(positions_BT, limit),
                            segment_ids_BT=segment_ids_BT, cache=cache, cache_index=index)
    return model.unembed(x), cache

  logits, cache = prefill(())
  draft_cache = None
  if separate:
    draft_cache = (cache.kept_view(kept) if opts.paper_mode or not opts.draft_skip
                   else prefill(opts.draft_skip)[1])
  tok, _ = _choose(logits, jax.random.fold_in(rng, 0), opts, temperature, top_p)
  tok = jnp.where(active_B, tok, pad_id)
  out = jnp.full((B, N + k + 1), pad_id, jnp.int32).at[:, 0].set(tok)
  generated = jnp.ones((B,), jnp.int32)
  done = ~active_B | (tok == eos_id) | (max_new <= 1)
  zeros = jnp.zeros((B,), jnp.int32)

  def draft(cache, draft_cache, pending, carry_tok, carry_valid, pos0, rng):
    """k draft tokens [B, k] (and their distributions [B, k, V] when sampling)."""
    dcache = draft_cache if separate else cache.kept_view(kept)
    if separate:  # first step: [carried last draft, pending] at scratch slots Z, Z + 1
      logits, dcache = run(jnp.stack([carry_tok, pending], 1),
                           pos0[:, None] + jnp.array([-1, 0], jnp.int32), dcache, Z,
                           opts.draft_skip, jnp.stack([carry_valid.astype(jnp.int32),
                                                       jnp.ones_like(pending)], 1))
      first_slot = Z + 1
    else:
      logits, dcache = run(pending[:, None], pos0[:, None], dcache, Z, opts.draft_skip)
      first_slot = Z
    tok, q = _choose(logits[:, -1], jax.random.fold_in(rng, 0), opts, temperature, top_p)
    drafts = jnp.zeros((B, k), jnp.int32).at[:, 0].set(tok)
    qs = None if q is None else jnp.zeros((B, k, q.shape[-1]), q.dtype).at[:, 0].set(q)

    def step(i, carry):
      drafts, qs, dcache = carry
      logits, dcache = run(drafts[:, i - 1, None], pos0[:, None] + i, dcache, first_slot + i,
                           opts.draft_skip)
      tok, q = _choose(logits[:, 0], jax.random.fold_in(rng, i), opts, temperature, top_p)
      drafts = drafts.at[:, i].set(tok)
      qs = None if q is None else qs.at[:, i].set(q)
      return drafts, qs, dcache

    drafts, qs, dcache = jax.lax.fori_loop(1, k, step, (drafts, qs, dcache))
    if separate:
      return drafts, qs, cache, dcache
    return drafts, qs, cache.merge_view(dcache, kept), None

  def cond(s: SpeculativeState):
    return ~jnp.all(s.done)

  def body(s: SpeculativeState) -> SpeculativeState:
    generated, done, pending, draft_cache = s.generated, s.done, s.pending, s.draft_cache
    carry_tok, carry_valid = s.carry_tok, s.carry_valid
    # The previous round's verify commit, done here rather than right after its verify pass:
    # there, between the pass's in-place write and the commit's, attention reads the cache, and
    # XLA copied every verify layer twice a round (measured in the HLO; test_speculative checks).
    cache = s.cache.commit(Z, k + 1, zeros, *s.last_commit)
    round_rng = jax.random.fold_in(rng, s.rnd)
    pos0 = prompt_len_B + generated - 1  # the pending token's position
    committed = generated - 1            # generated tokens whose K/V is in the verify cache
    drafts, qs, cache, draft_cache = draft(cache, draft_cache, pending, carry_tok, carry_valid,
                                           pos0, jax.random.fold_in(round_rng, 0))
    logits, cache = run(jnp.concatenate([pending[:, None], drafts], 1), pos0[:, None] + steps,
                        cache, Z, ())
    a, bonus = _accept(logits, drafts, qs, jax.random.fold_in(round_rng, 1), opts, temperature,
                       top_p)
    # Emitted: the a accepted drafts, then the full model's token; cut after EOS and the budget.
    block = jnp.where(steps[None] < a[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), bonus[:, None])
    count = a + 1
    is_eos = (block == eos_id) & (steps[None] < count[:, None])
    hit_eos = jnp.any(is_eos, 1)
    count = jnp.where(hit_eos, _leading_true(~is_eos) + 1, count)
    count = jnp.where(done, 0, jnp.minimum(count, max_new - generated))
    block = jnp.where(steps[None] < count[:, None], block, pad_id)
    out = kv_cache.write_rows(s.out, block, generated, 1)
    accepted = s.accepted + jnp.minimum(a, count)
    drafted = s.drafted + jnp.where(done, 0, k)
    # Commit: the verify cache keeps pending + the emitted drafts (count entries, the last emitted
    # token becomes the next pending one; done at the start of the next round); the draft cache
    # keeps the same tokens, those it has run.
    last_commit = (count, P + committed, pos0)
    if separate:
      carry_int = carry_valid.astype(jnp.int32)
      draft_count = jnp.where(done, 0, carry_int + jnp.minimum(count, k))
      draft_cache = draft_cache.commit(Z, k + 1, 1 - carry_int, draft_count,
                                       P + committed - carry_int, pos0 - carry_int)
      carry_valid = (count == k + 1) & ~done
      carry_tok = drafts[:, k - 1]
    pending = jnp.where(count > 0, block[rows, jnp.maximum(count - 1, 0)], pending)
    generated = generated + count
    done = done | hit_eos | (generated >= max_new)
    return SpeculativeState(s.rnd + 1, out, generated, done, pending, cache, draft_cache,
                            carry_tok, carry_valid, accepted, drafted, last_commit)

  start = SpeculativeState(jnp.int32(1), out, generated, done, tok, cache, draft_cache, zeros,
                           zeros > 0, zeros, zeros, (zeros, zeros + P, zeros))
  end = jax.lax.while_loop(cond, body, start)
  return end.out, end.accepted, end.drafted, end.rnd - 1


# ----------------------------------------------------------------------------------------------
# The public API.

def resolve_draft(num_layers: int, draft_skip: Sequence[int] | None, draft_ratio: float | None,
                  windows: Sequence[int | None] | None = None) -> tuple[int, ...]:
  """The draft's skipped layers: `draft_ratio` -> the ULS plan (`decode.resolve_skip`, windows
  included); `draft_skip` as given."""
  if draft_skip is None and draft_ratio is None:
    raise ValueError("speculative decoding needs a draft: give draft_ratio (e.g. 2) or draft_skip")
  return decode.resolve_skip(num_layers, draft_skip, draft_ratio, windows)


def parse_speculative(text: str) -> dict[str, Any]:
  """'draft_ratio=2,k=4' -> dict(draft_ratio=2.0, num_draft_tokens=4), for command lines.

  Keys: draft_ratio, draft_skip (layers joined by '-', e.g. 1-3-5), k or num_draft_tokens,
  draft_cache (separate | shared). One-line ValueError for anything else.
  """
  out: dict[str, Any] = {}
  for item in (t.strip() for t in text.split(",") if t.strip()):
    key, sep, value = item.partition("=")
    key = key.strip()
    try:
      if not sep:
        raise ValueError
      if key == "draft_ratio":
        out["draft_ratio"] = float(value)
      elif key == "draft_skip":
        out["draft_skip"] = tuple(int(i) for i in value.split("-") if i.strip())
      elif key in ("k", "num_draft_tokens"):
        out["num_draft_tokens"] = int(value)
      elif key == "draft_cache":
        out["draft_cache"] = value.strip()
      else:
        raise KeyError
    except KeyError:
      raise ValueError(f"speculative option {key!r} is unknown: allowed are draft_ratio, "
                       "draft_skip, k (num_draft_tokens), draft_cache")
    except ValueError:
      raise ValueError(f"speculative option {item!r} is invalid: write e.g. "
                       "'draft_ratio=2,k=4' or 'draft_skip=1-2,k=4,draft_cache=shared'")
  return out


OPTION_KEYS = ("draft_skip", "draft_ratio", "num_draft_tokens", "draft_cache")


def _check_combination(speculative: dict[str, Any], skip, ratio, num_beams,
                       no_repeat_ngram_size) -> None:
  """What `decode.generate(..., speculative=...)` cannot combine with speculation."""
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


def generate_from_decode(model: Decoder, prompts, speculative: dict[str, Any], *, skip, ratio,
                         num_beams, no_repeat_ngram_size, **kw
                         ) -> tuple[list[list[int]], SpeculativeStats]:
  """`decode.generate(..., speculative=dict(...))`: refuse what speculation cannot combine with,
  then `generate` with the dict's options (OPTION_KEYS) and the remaining keyword arguments."""
  _check_combination(speculative, skip, ratio, num_beams, no_repeat_ngram_size)
  return generate(model, prompts, **speculative, **kw)


def check_options(cfg: ModelConfig, speculative: dict[str, Any], *, skip=None, ratio=None,
                  num_beams=1, no_repeat_ngram_size=0, mode="paper", **kw) -> None:
  """Raises what `decode.generate(..., speculative=...)` would for these options, running
  nothing (`decode.check_generate` calls it)."""
  _check_combination(speculative, skip, ratio, num_beams, no_repeat_ngram_size)
  _check_draft(cfg, mode=mode, **speculative)
  decode.check_options(cfg, mode=mode, **kw)


def _check_draft(cfg: ModelConfig, *, draft_skip=None, draft_ratio=None, num_draft_tokens=4,
                 draft_cache="shared", mode="paper") -> tuple[tuple[int, ...], int]:
  """The draft's skipped layers and num_draft_tokens, checked."""
  skip = resolve_draft(cfg.num_layers, draft_skip, draft_ratio, cfg.attention_windows)
  num_draft_tokens = as_int("num_draft_tokens", num_draft_tokens, 1, decode.MIN_BUCKET)
  if draft_cache not in DRAFT_CACHES:
    raise ValueError(f"draft_cache={draft_cache!r} is unknown: allowed are "
                     f"{', '.join(DRAFT_CACHES)}")
  if draft_cache == "shared" and mode != "paper":
    raise ValueError(f"mode={mode!r} with draft_cache='shared' is impossible: the shared cache "
                     "holds the full model's prompt K/V (paper mode); use draft_cache='separate'")
  return skip, num_draft_tokens


def _plan(model: Decoder, prompts, *, draft_skip=None, draft_ratio=None, num_draft_tokens=4,
          draft_cache="shared", mode="paper", **kw):
  """Validate; return (static options, array arguments, B, S)."""
  skip, num_draft_tokens = _check_draft(model.cfg, draft_skip=draft_skip, draft_ratio=draft_ratio,
                                        num_draft_tokens=num_draft_tokens,
                                        draft_cache=draft_cache, mode=mode)
  _, dec_opts, args, B, P = decode.plan_call(model, prompts, beam_search=False, mode=mode, **kw)
  opts = SpeculativeOptions(draft_skip=skip, num_draft_tokens=num_draft_tokens,
                            shared_cache=draft_cache == "shared", paper_mode=mode == "paper",
                            max_new_slots=dec_opts.max_new_slots, sample=dec_opts.sample,
                            top_k=dec_opts.top_k, use_top_p=dec_opts.use_top_p)
  return opts, args, B, P + opts.max_new_slots + 2 * num_draft_tokens + 1


def compile_generate(model: Decoder, batch_size: int, prompt_len: int, **kw):
  """The executable `generate` runs for this batch size, prompt length and keyword arguments
  (built if needed), for inspecting its HLO or memory."""
  opts, args, _, _ = _plan(model, [[0] * prompt_len] * batch_size, **kw)
  graphdef, state = nnx.split(model)
  return engine.executable(_speculative_fn, graphdef, state, args, opts)[0]


def generate(model: Decoder, prompts: Sequence[Sequence[int]], *,
             draft_skip: Sequence[int] | None = None, draft_ratio: float | None = None,
             num_draft_tokens: int = 4, draft_cache: str = "shared", max_new_tokens: int,
             eos_id: int | None, pad_id: int = 0, mode: str = "paper", temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0
             ) -> tuple[list[list[int]], SpeculativeStats]:
  """Decode with the full model, drafting `num_draft_tokens` tokens a round with the ULS plan.

  The output is the full model's: greedy (temperature 0) equals `decode.generate(model, prompts,
  ...)` without skip token for token; sampling has the full model's distribution (not its exact
  samples: the random numbers are used differently).
  draft_skip / draft_ratio: the draft's skipped layers, or a ratio for the ULS plan.
  draft_cache: "shared" or "separate" (module docstring). mode: "paper" gives the draft the full
    model's prompt K/V; "everywhere" runs the prompt through the kept layers for the draft cache.
  Other arguments as in `decode.generate`. Returns (token ids per prompt, EOS excluded;
  SpeculativeStats).
  """
  opts, args, B, S = _plan(model, prompts, draft_skip=draft_skip, draft_ratio=draft_ratio,
                           num_draft_tokens=num_draft_tokens, draft_cache=draft_cache, mode=mode,
                           max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                           temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
  outputs, generated, (accepted, drafted, rounds), compile_s, wall_s = engine.run(
      _speculative_fn, model, args, opts, count=len(prompts), max_new_tokens=max_new_tokens,
      eos_id=eos_id)
  verify_bytes = cache_bytes(model.cfg, B, S)
  draft_bytes = 0 if opts.shared_cache else cache_bytes(model.cfg, B, S, opts.draft_skip)
  stats = SpeculativeStats(
      prompt_tokens=sum(len(p) for p in prompts), generated_tokens=generated,
      wall_s=wall_s, compile_s=compile_s,
      cache_bytes=verify_bytes + draft_bytes, executables_built=int(compile_s > 0), calls=1,
      drafted_tokens=int(drafted[:len(prompts)].sum()),
      accepted_tokens=int(accepted[:len(prompts)].sum()), verify_passes=int(rounds),
      row_passes=int(drafted[:len(prompts)].sum()) // num_draft_tokens,
      verify_cache_bytes=verify_bytes, draft_cache_bytes=draft_bytes)
  return outputs, stats
