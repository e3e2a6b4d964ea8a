"""Greedy decoding and sampling (`Sample`, over static batches or continuously: a finished row
takes the next prompt), beam search (`Beam`) and the public `generate`, which also runs
speculative decoding (`speculative.Speculative`). One call of `generate` runs ONE compiled
executable (`engine.decode_loop`): a batched prefill and a `lax.while_loop` until every prompt has
finished or spent its budget; the cache is created inside it, so XLA updates it in place.

Shapes: B rows, P prompt slots, N new-token slots (`engine.inputs` buckets them),
S = P + N cache slots, V vocabulary, R = B * num_beams beam rows. Prompts are left padded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import flax.struct

from ulskip_jax import engine, sampling
from ulskip_jax import speculative as speculative_lib
from ulskip_jax.engine import QUEUE_ROUNDS, DecodeStats
from ulskip_jax.checks import as_int
from ulskip_jax.kv_cache import KVCache, cache_bytes
from ulskip_jax.model import Decoder
from ulskip_jax.skipping import SkipPlan

Array = jax.Array
NEG = -1.0e9  # Hugging Face's "impossible" beam score; finite so sums stay ordered


def _ban_repeated_ngrams(logits_RV: Array, buf_RL: Array, first_valid_R: Array, cur_R: Array,
                         n: int) -> Array:
  """-inf on every token that would repeat an n-gram of buf[r, first_valid_r:cur_r] (prompt
  included, as Hugging Face's NoRepeatNGramLogitsProcessor does for decoder-only models; pads
  excluded)."""
  R, L = buf_RL.shape
  J = L - n + 1  # n-gram start slots
  starts = jnp.arange(J)
  windows = jnp.stack([buf_RL[:, k:k + J] for k in range(n)], -1)  # [R, J, n]
  last = jnp.take_along_axis(buf_RL, jnp.maximum(cur_R[:, None] - (n - 1) + jnp.arange(n - 1), 0),
                             1)  # [R, n - 1]
  ngram_ok = (starts[None] >= first_valid_R[:, None]) & (starts[None] + n - 1 < cur_R[:, None])
  last_ok = (cur_R - (n - 1) >= first_valid_R)[:, None]
  match = ngram_ok & last_ok & jnp.all(windows[..., :n - 1] == last[:, None], -1)
  banned = jnp.zeros(logits_RV.shape, bool).at[jnp.arange(R)[:, None], windows[..., -1]].max(match)
  return jnp.where(banned, -jnp.inf, logits_RV)


def one_token(model: Decoder, plan: SkipPlan, tokens_R: Array, positions_R: Array, cache: KVCache,
              slot: Array) -> tuple[Array, KVCache]:
  """One token per row through the plan's kept layers, its K/V written at `slot`: logits [R, V]
  and the updated cache."""
  x, cache = model.hidden(tokens_R[:, None], skip=plan, positions_BT=positions_R[:, None],
                          cache=cache, cache_index=slot)
  return model.unembed(x)[:, 0], cache


@dataclasses.dataclass(frozen=True)
class Sample(engine.Queued):
  """Greedy (sample=False) or sampling over a prompt queue; the result is each prompt's new
  tokens [Q, N]. The cache is a ring of S = P + N slots: step g writes every row's token at slot
  g % S (one shared dynamic_update_slice), and a prompt started at step g occupies slots
  [g - P, g) % S, so the P + N - 1 slots of its life never wrap onto each other; attention masks
  by the positions in `cache.pos`, so slot order does not matter."""
  plan: SkipPlan            # the layers the generated tokens run
  paper_mode: bool          # prompt through all layers, response through the kept ones
  max_new_slots: int        # N, the bucketed token budget
  sample: bool = False
  top_k: int | None = None
  use_top_p: bool = False
  no_repeat_ngram_size: int = 0
  continuous: bool = False  # prompts wait for free rows (else each has a row from the start)

  def prefill(self, model: Decoder, prompts, pad, num_slots: int) -> tuple[Array, KVCache]:
    return engine.prefill(model, prompts, pad, num_slots, skip=self.plan,
                          paper_mode=self.paper_mode)

  def _choose(self, x: engine.Inputs, logits_RV, prompt_R, count_R, out_QN):
    """The next token of each row, whose prompt prompt_R has generated count_R tokens so far."""
    if self.no_repeat_ngram_size:
      history = jnp.concatenate([x.prompts[prompt_R], out_QN[prompt_R]], 1)
      logits_RV = _ban_repeated_ngrams(logits_RV, history, x.pad[prompt_R],
                                       x.prompts.shape[1] + count_R, self.no_repeat_ngram_size)
    if not self.sample:
      return sampling.argmax(logits_RV)
    # A key per (prompt, token): a prompt samples the same tokens whichever row or step runs it.
    keys = jax.vmap(lambda i, c: jax.random.fold_in(jax.random.fold_in(x.rng, i), c))(
        prompt_R, count_R)
    return jax.vmap(lambda lg, key: jax.random.categorical(key, sampling.filtered_logits(
        lg, x.temperature, self.top_k, x.top_p if self.use_top_p else None)))(
            logits_RV, keys).astype(jnp.int32)

  def start(self, model, x):
    (Q, P), B, N = x.prompts.shape, x.rows.shape[0], self.max_new_slots
    logits, cache = self.prefill(model, x.prompts[:B], x.pad[:B], P + N)
    zeros = jnp.zeros((B,), jnp.int32)
    tok = self._choose(x, logits, jnp.arange(B), zeros, jnp.zeros((Q, N), jnp.int32))
    return SampleState(**self.start_queue(x, tok, N), step=jnp.int32(P), cache=cache)

  def refill(self, model, x, s: SampleState, b, i, prompt_1P, pad_1) -> SampleState:
    P = x.prompts.shape[1]
    logits, prompt_cache = self.prefill(model, prompt_1P, pad_1, P)
    tok = self._choose(x, logits, i[None], jnp.zeros((1,), jnp.int32), s.out)[0]
    return self.start_row(x, s, b, i, tok, pad_1[0]).replace(
        cache=s.cache.insert(b, prompt_cache, (s.step - P) % (P + self.max_new_slots)))

  def step(self, model, x, s: SampleState) -> SampleState:
    s = self.fill_rows(model, x, s)
    logits, cache = one_token(model, self.plan, s.tok, s.prompt_len + s.count - 1, s.cache,
                              s.step % (x.prompts.shape[1] + self.max_new_slots))
    tok = self._choose(x, logits, jnp.maximum(s.owner, 0), s.count, s.out)
    s, _ = self.emit(x, s, tok[:, None], jnp.ones_like(tok))
    return s.replace(step=s.step + 1, cache=cache)

  def result(self, x, s: SampleState):
    return s.out

  def stats(self, cfg, x, stats, rest):
    return dataclasses.replace(stats, cache_bytes=cache_bytes(
        cfg, x.rows.shape[0], x.prompts.shape[1] + self.max_new_slots, self.plan))


@flax.struct.dataclass
class SampleState(engine.QueueState):
  """The loop state of greedy decoding and sampling."""
  step: Array         # [] the global step g: the next decode step writes slot g % S
  cache: KVCache      # [B] rows of S ring slots, kept layers only


@dataclasses.dataclass(frozen=True)
class Beam(engine.Strategy):
  """Beam search with Hugging Face's semantics (transformers' vectorised `_beam_search`), over a
  static batch (a prompt per row, num_beams cache rows each).

  Each step keeps the top 2 * num_beams continuations of all beams; those ending in EOS (or at the
  budget) that rank in the first num_beams become finished hypotheses scored
  sum(logprob) / generated_len ** length_penalty (EOS counted); the best num_beams unfinished ones
  run on. `early_stopping`: True stops a row once it has num_beams finished hypotheses; False and
  "never" use Hugging Face's heuristics. The result is the best finished hypothesis' tokens.
  """
  plan: SkipPlan            # the layers the generated tokens run
  paper_mode: bool          # prompt through all layers, response through the kept ones
  max_new_slots: int        # N, the bucketed token budget
  num_beams: int = 2
  early_stopping: bool | str = True
  no_repeat_ngram_size: int = 0

  def _select_beams(self, model, x: engine.Inputs, logits_RV, s: BeamState) -> BeamState:
    (B, P), nb, V = x.prompts.shape, self.num_beams, model.cfg.vocab_size
    R, K2 = B * nb, 2 * nb
    t, run_seq, run_score, improvable = s.t, s.run_seq, s.run_score, s.improvable
    fin_seq, fin_score, fin_flag = s.fin_seq, s.fin_score, s.fin_flag
    cur, length_penalty, active_B = P + t, x.length_penalty, x.rows
    take = lambda a, idx: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), 1)
    logp = jax.nn.log_softmax(logits_RV, -1)
    if self.no_repeat_ngram_size:
      logp = _ban_repeated_ngrams(logp, run_seq.reshape(R, -1), jnp.repeat(x.pad, nb),
                                  jnp.full((R,), cur), self.no_repeat_ngram_size)
    acc = (logp.reshape(B, nb, V) + run_score[:, :, None]).reshape(B, nb * V)
    top_score, top_idx = jax.lax.top_k(acc, K2)
    parent, tok = top_idx // V, (top_idx % V).astype(jnp.int32)
    cand_seq = take(run_seq, parent).at[:, :, cur].set(tok)
    hits = (tok == x.eos_id) | (t + 1 >= x.max_new)
    # Running beams: the best num_beams continuations that did not finish.
    live = top_score + jnp.where(hits, NEG, 0.0)
    keep = jax.lax.top_k(live, nb)[1]
    run_seq, run_score, parent = take(cand_seq, keep), take(live, keep), take(parent, keep)
    # Finished hypotheses: merge the new ones (length-penalised) and keep the best num_beams.
    new = top_score / (t + 1.0) ** length_penalty
    full = jnp.all(fin_flag, -1, keepdims=True) & (self.early_stopping is True)
    just_finished = hits & (jnp.arange(K2) < nb)[None]
    new = new + jnp.where(full | ~improvable[:, None], NEG, 0.0) + jnp.where(just_finished, 0.0, NEG)
    merged = jnp.concatenate([fin_score, new], 1)
    best = jax.lax.top_k(merged, nb)[1]
    fin_seq = take(jnp.concatenate([fin_seq, cand_seq], 1), best)
    fin_score = take(merged, best)
    fin_flag = take(jnp.concatenate([fin_flag, just_finished], 1), best)
    # Hugging Face's early-stop heuristic, evaluated at the new length t + 1.
    hyp_len = jnp.where((self.early_stopping == "never") & (length_penalty > 0), x.max_new, t + 1)
    best_running = run_score[:, :1] / hyp_len.astype(jnp.float32) ** length_penalty
    worst_fin = jnp.where(fin_flag, jnp.min(fin_score, 1, keepdims=True), NEG)
    improvable = improvable & jnp.any(best_running > worst_fin, -1)
    all_full = jnp.all(fin_flag | ~active_B[:, None]) & (self.early_stopping is True)
    go_on = jnp.any(improvable) & ~all_full & ~jnp.all(hits | ~active_B[:, None])
    parents = (jnp.arange(B)[:, None] * nb + parent).reshape(R)
    return s.replace(t=t + 1, parents=parents, run_seq=run_seq, run_score=run_score,
                     fin_seq=fin_seq, fin_score=fin_score, fin_flag=fin_flag,
                     improvable=improvable, go_on=go_on)

  def start(self, model, x):
    (B, P), nb, N = x.prompts.shape, self.num_beams, self.max_new_slots
    prompt_buf = jnp.concatenate([x.prompts, jnp.full((B, N), x.pad_id, jnp.int32)], 1)
    run_seq = jnp.repeat(prompt_buf[:, None], nb, 1)                 # [B, nb, P + N]
    logits, cache = engine.prefill(model, x.prompts, x.pad, P + N, skip=self.plan,
                                   paper_mode=self.paper_mode)
    rows = jnp.arange(B).repeat(nb)  # the prompt ran once a row: its beams copy it
    logits, cache = logits[rows], cache.reorder(rows)
    return self._select_beams(model, x, logits, BeamState(
        t=jnp.int32(0), parents=jnp.arange(B * nb), cache=cache, run_seq=run_seq,
        run_score=jnp.tile(jnp.array([0.0] + [NEG] * (nb - 1), jnp.float32), (B, 1)),
        fin_seq=run_seq, fin_score=jnp.full((B, nb), NEG, jnp.float32),
        fin_flag=jnp.zeros((B, nb), bool), improvable=x.rows, go_on=jnp.array(True)))

  def step(self, model, x, s: BeamState) -> BeamState:
    cache = s.cache.reorder(s.parents)  # each beam takes its parent's K/V
    slot = x.prompts.shape[1] + s.t - 1
    logits, cache = one_token(model, self.plan, s.run_seq[:, :, slot].reshape(-1),
                              slot - jnp.repeat(x.pad, self.num_beams), cache, slot)
    return self._select_beams(model, x, logits, s.replace(cache=cache))

  def running(self, x, s: BeamState):
    return s.go_on

  def result(self, x, s: BeamState):
    return s.fin_seq[:, 0, x.prompts.shape[1]:]  # the best (finished ones are sorted by score)

  def stats(self, cfg, x, stats, rest):
    return dataclasses.replace(stats, cache_bytes=cache_bytes(
        cfg, x.rows.shape[0] * self.num_beams, x.prompts.shape[1] + self.max_new_slots,
        self.plan))


@flax.struct.dataclass
class BeamState:
  """Beam search's loop state (B rows, nb beams, L = P + N token slots)."""
  t: Array           # [] tokens generated so far
  parents: Array     # [B * nb] the flat cache row each running beam continues
  cache: KVCache     # [B * nb] rows, one per running beam
  run_seq: Array     # [B, nb, L] running beams' tokens (prompt included)
  run_score: Array   # [B, nb] their summed log-probabilities
  fin_seq: Array     # [B, nb, L] finished hypotheses, best first
  fin_score: Array   # [B, nb] their length-penalised scores
  fin_flag: Array    # [B, nb] bool: the slot holds a finished hypothesis
  improvable: Array  # [B] bool: Hugging Face's is_early_stop_heuristic_unsatisfied
  go_on: Array       # [] bool


# ----------------------------------------------------------------------------------------------
# The public API.

def check_generate(model: Decoder, prompts=None, **kw) -> engine.Strategy:
  """Raises the one-line ValueError `generate(model, prompts, **kw)` would, running nothing; with
  prompts=None, for a one-token prompt (e.g. to check options before any input is read). Returns
  the strategy `generate` would run (its `plan` is the plan the tokens run)."""
  if prompts is None and as_int("max_new_tokens", kw.get("max_new_tokens"), min=1) >= (
      model.cfg.max_position):
    raise ValueError(f"max_new_tokens={kw['max_new_tokens']} leaves no room for a prompt: the "
                     f"model allows {model.cfg.max_position} positions in all")
  return plan_call(model, [[0]] if prompts is None else prompts, **kw)[0]


def strategy_for(cfg, *, continuous: bool = False, speculative: dict | None = None,
                 **kw) -> tuple[engine.Strategy, engine.Options]:
  """The options checked (`engine.check_options`: the plan resolved once) and the strategy that
  runs them: `speculative.Speculative` with `speculative`, else `Beam` or `Sample` (over a prompt
  queue that waits for free rows when `continuous`)."""
  draft = None if speculative is None else speculative_lib.check(cfg, speculative, **kw)
  o = engine.check_options(cfg, **kw)
  choice = dict(max_new_slots=o.max_new_slots, sample=o.sample, top_k=o.top_k,
                use_top_p=o.top_p is not None, continuous=continuous)
  if draft is not None:
    return speculative_lib.Speculative(**draft, **choice), o
  if o.num_beams > 1:
    if continuous:
      raise ValueError(f"num_beams={o.num_beams} with continuous batching is unsupported: "
                       "beam search runs static batches (generate)")
    return Beam(plan=o.plan, paper_mode=o.paper_mode, max_new_slots=o.max_new_slots,
                num_beams=o.num_beams, early_stopping=o.early_stopping,
                no_repeat_ngram_size=o.no_repeat_ngram_size), o
  return Sample(plan=o.plan, paper_mode=o.paper_mode,
                no_repeat_ngram_size=o.no_repeat_ngram_size, **choice), o


def plan_call(model: Decoder, prompts, *, continuous_rows: int | None = None,
              **kw) -> tuple[engine.Strategy, engine.Inputs]:
  """`strategy_for` and the checked prompts as its `Inputs`: with continuous_rows, that many
  rows decode a queue of the prompts, else each prompt has a row."""
  strategy, o = strategy_for(model.cfg, continuous=bool(continuous_rows), **kw)
  prompts = engine.check_prompts(model.cfg, prompts, o.max_new_tokens)
  return strategy, engine.inputs(o, prompts, rows=continuous_rows)


def generate(model: Decoder, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             eos_id: int | None, batch_size: int | None = None,
             **options) -> tuple[list[list[int]], DecodeStats]:
  """Generate up to `max_new_tokens` after each prompt, in one compiled prefill + while loop.

  prompts: lists of token ids, any lengths.
  eos_id: a row stops after emitting it (None = never); outputs are cut before it.
  batch_size: None runs every prompt in a row of one left-padded batch until the slowest is done;
    a number decodes the prompts with continuous batching on that many rows: a row that finishes
    takes the next waiting prompt (each prompt's greedy output is unchanged), in calls of at most
    QUEUE_ROUNDS * rows prompts, which bounds the executables' buckets. Not for beam search.
  options (`engine.check_options` checks them, with their defaults):
  skip / ratio: a `SkipPlan` (e.g. `plan_layers(...)`, a calibrated plan) or an explicit
    skipped-layer tuple, or a speedup ratio for the ULS plan (`plan_layers(L, ratio)`, keeping a
    local/global model's global layers); neither = full depth; both = ValueError. The stats'
    `plan` is the plan that ran.
  mode: "paper" (default) runs the prompt through all layers (K/V kept for the kept layers only)
    and the generated tokens through the kept layers; "everywhere" skips the same layers for both.
  pad_id: the filler token (0).
  temperature: 0 = greedy; > 0 samples (after top_k, then top_p) with `jax.random.key(seed)`.
  num_beams > 1: beam search like transformers' `generate(num_beams=..., early_stopping=...)`,
    hypotheses scored sum(logprob) / generated_len ** length_penalty.
  no_repeat_ngram_size: ban tokens that would repeat an n-gram of prompt + generated tokens
    (pads excluded), as transformers' NoRepeatNGramLogitsProcessor does for decoder-only models.
  speculative: self-speculative decoding, the ULS sub-model drafting and the full model
    verifying, e.g. dict(draft_ratio=2, num_draft_tokens=4, draft_cache="shared") (or draft_skip;
    `speculative.py`). The output is the full model's (greedy: token for token; sampling: its
    distribution); stats are `SpeculativeStats`, with the acceptance rate.

  Returns (token ids per prompt, in input order, EOS excluded; DecodeStats). Raises ValueError
  (one line) for an empty prompt or one longer than `cfg.max_position - max_new_tokens`: prompts
  are never truncated silently.
  """
  kw = dict(options, max_new_tokens=max_new_tokens, eos_id=eos_id)
  if batch_size is None:
    strategy, x = plan_call(model, prompts, **kw)
    outputs, _, stats = engine.run(strategy, model, x)
    return outputs, stats
  return _in_batches(model, prompts, batch_size, continuous=True, **kw)


def _in_batches(model: Decoder, prompts, batch_size, *, continuous: bool, by_length=False,
                progress=False, **kw):
  """One strategy over batches, the options and every prompt checked once first: continuous
  batching on batch_size rows, or static batches of batch_size prompts. progress: a tqdm bar (on
  stderr)."""
  batch_size = as_int("batch_size", batch_size, min=1)
  strategy, o = strategy_for(model.cfg, continuous=continuous, **kw)
  prompts = engine.check_prompts(model.cfg, prompts, o.max_new_tokens)
  rows = min(batch_size, len(prompts)) if continuous else None

  def run(chunk):
    outputs, _, stats = engine.run(strategy, model, engine.inputs(o, chunk, rows=rows))
    return outputs, stats

  return engine.in_chunks(run, prompts, QUEUE_ROUNDS * rows if continuous else batch_size,
                          by_length=by_length, progress=progress)


def encode_prompt(tokenizer, text: str, chat: bool = False) -> list[int]:
  """Prompt ids of `text`. A `ulskip_jax.tokenizer.Tokenizer` encodes as in training (its own chat
  setting; `chat` is ignored). A Hugging Face tokenizer adds its own special tokens (BOS for Llama,
  none for GPT-2), or with `chat` wraps the text as a user turn of its chat template."""
  if hasattr(tokenizer, "prompt_ids"):
    return tokenizer.prompt_ids(text)
  if chat:
    text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
  return tokenizer(text)["input_ids"]


def decode_ids(tokenizer, ids: Sequence[int]) -> str:
  """Text of `ids` without special tokens, for either tokenizer kind."""
  if hasattr(tokenizer, "bos_id"):
    return tokenizer.decode(ids)
  return tokenizer.decode(ids, skip_special_tokens=True)


def special_ids(tokenizer) -> tuple[int | None, int]:
  """(eos_id, pad_id) of either tokenizer kind; pad falls back to eos, then 0."""
  if hasattr(tokenizer, "eos_id"):
    return tokenizer.eos_id, tokenizer.pad_id
  eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
  return eos, pad if pad is not None else eos if eos is not None else 0


def generate_text(model: Decoder, tokenizer, texts: Sequence[str], *, batch_size: int = 8,
                  progress: bool = False, sort_by_length: bool = True, chat: bool = False,
                  static_batches: bool = False, **kw) -> tuple[list[str], DecodeStats]:
  """Tokenize `texts` (`encode_prompt`, with `chat`), `generate` on batch_size rows, detokenize:
  one string per text, in input order. Greedy, sampling and speculative decoding batch
  continuously; beams and `static_batches=True` run static batches, sorted by length when
  `sort_by_length`. eos_id / pad_id default to the tokenizer's. progress: a tqdm bar."""
  if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
    raise ValueError(f"texts={texts!r:.60} is not a list of strings: give one string per prompt")
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise ValueError(f"texts[{i}]={text!r:.60} is not a string: give one string per prompt")
  eos_id, pad_id = special_ids(tokenizer)
  kw = dict(dict(eos_id=eos_id, pad_id=pad_id), **kw)
  continuous = not static_batches and kw.get("num_beams", 1) == 1
  ids, stats = _in_batches(model, [encode_prompt(tokenizer, t, chat) for t in texts], batch_size,
                           continuous=continuous, by_length=sort_by_length and not continuous,
                           progress=progress, **kw)
  return [decode_ids(tokenizer, row) for row in ids], stats
