"""Examples to batches: prompts from a template, encoded examples (the source truncated first),
and packed numpy batches for skip-aware training.

  encode_example(tok, template, ...) -> (prompt_ids, target_ids), source truncated first
  Batcher(...)                       -> numpy batches [B, T]

Batch layout, per row of T tokens holding one or more packed examples (segments):
  tokens       int32   prompt ids then target ids (target = " " + text + eos), then 0 padding
  targets      int32   the next token of the same segment, 0 where there is none
  loss_mask    float32 1.0 where targets is a response token (target text or eos)
  positions    int32   0, 1, ... restarting at every segment
  segment_ids  int32   1, 2, ... per segment, 0 on padding
  full_depth   bool    True on prompt tokens: in ULS paper mode they run through every layer,
                       response tokens only through the kept layers
"""

from __future__ import annotations

import string
from typing import Any, Sequence

import numpy as np

from ulskip_jax.tokenizer import Tokenizer

TEMPLATE_FIELDS = ('source',)


def check_template(template: str) -> None:
  """Raises ValueError unless `template` uses only {source}, exactly once."""
  try:
    fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
  except ValueError as e:
    raise ValueError(f'template {template!r} is malformed: {e}') from None
  for field in fields:
    if field not in TEMPLATE_FIELDS:
      raise ValueError(
          f'template field {{{field}}} is unknown; allowed: '
          + ', '.join(f'{{{name}}}' for name in TEMPLATE_FIELDS)
      )
  if fields.count('source') != 1:
    raise ValueError(f'template {template!r} must contain {{source}} exactly once')


def format_prompt(template: str, source: str) -> str:
  check_template(template)
  return template.format(source=source)


def encode_example(
    tok: Tokenizer, template: str, source: str, target: str, max_len: int
) -> tuple[list[int], list[int]]:
  """(prompt_ids, target_ids) with len(prompt_ids) + len(target_ids) <= max_len.

  prompt = [bos] + template(source); target = " " + target + [eos]. In chat format
  (`tok.chat`) the prompt is the chat template's user turn holding template(source), then the
  opening of the assistant turn, and target = target + [eos] (the end-of-turn token of instruct
  tokenizers). An example that is too long loses the end of its source first, then the end of
  its target.
  """
  (example,), _ = encode_examples(tok, template, [{'source': source, 'target': target}], max_len)
  return example


def encode_examples(
    tok: Tokenizer, template: str, pairs: Sequence[dict[str, str]], max_len: int
) -> tuple[list[tuple[list[int], list[int]]], int]:
  """encode_example over many pairs, batched; also returns how many were truncated."""
  check_template(template)
  full = tok.prompt_template(template)
  prompts = tok.encode_batch([full.format(source=pair['source']) for pair in pairs])
  targets = tok.encode_batch([tok.target_text(pair['target']) for pair in pairs])
  bos, eos = tok.prefix_ids, [tok.eos_id]
  too_long = [i for i, (p, t) in enumerate(zip(prompts, targets))
              if len(bos) + len(p) + len(t) + 1 > max_len]
  sources = {}
  if too_long:  # cut the end of the source first (one batched encode of those sources)
    head_ids, tail_ids = _prompt_frame(tok, template)
    fixed_len = len(head_ids) + len(tail_ids)
    if fixed_len >= max_len:
      raise ValueError(
          f'max_len={max_len} leaves no room for a target after the {fixed_len}-token '
          f'template {template!r}; raise max_len'
      )
    sources = dict(zip(too_long, tok.encode_batch([pairs[i]['source'] for i in too_long])))
  examples = []
  for i, (prompt_ids, target_ids) in enumerate(zip(prompts, targets)):
    prompt_ids, target_ids = bos + prompt_ids, target_ids + eos
    if i in sources:
      prompt_budget = max(max_len - len(target_ids), fixed_len)
      prompt_ids = _fit(prompt_ids, sources[i], (head_ids, tail_ids), prompt_budget)
      target_ids = target_ids[: max_len - len(prompt_ids)]
    examples.append((prompt_ids, target_ids))
  num_truncated = len(too_long)
  return examples, num_truncated


def eval_prompts(
    tok: Tokenizer, template: str, pairs: Sequence[dict[str, str]], max_len: int
) -> tuple[list[list[int]], list[str]]:
  """Prompt ids (at most max_len each, source truncated first) and reference targets."""
  check_template(template)
  prompts = [_truncated_prompt(tok, template, pair['source'], max_len) for pair in pairs]
  return prompts, [pair['target'] for pair in pairs]


def _truncated_prompt(tok: Tokenizer, template: str, source: str, max_len: int) -> list[int]:
  """prefix + template(source) (chat markup included), cutting the end of the source to fit
  max_len tokens.

  A prompt that fits is tokenized whole, exactly as at inference. One that does not is
  tokenized in three pieces (before, source, after), so the cut is exact and the end of the
  template, which cues the answer, always survives.
  """
  prompt_ids = tok.prefix_ids + tok.encode(tok.prompt_template(template).format(source=source))
  if len(prompt_ids) <= max_len:
    return prompt_ids
  frame = _prompt_frame(tok, template)
  if len(frame[0]) + len(frame[1]) > max_len:
    raise ValueError(
        f'max_len={max_len} is shorter than the template {template!r} '
        f'({len(frame[0]) + len(frame[1])} tokens); raise max_len'
    )
  return _fit(prompt_ids, tok.encode(source), frame, max_len)


def _fit(prompt_ids: list[int], source_ids: list[int], frame: tuple[list[int], list[int]],
         max_len: int) -> list[int]:
  """prompt_ids if they fit in max_len, else the frame around as much of the source as fits."""
  if len(prompt_ids) <= max_len:
    return prompt_ids
  head_ids, tail_ids = frame
  return head_ids + source_ids[: max_len - len(head_ids) - len(tail_ids)] + tail_ids


def _prompt_frame(tok: Tokenizer, template: str) -> tuple[list[int], list[int]]:
  """Token ids of the prefix + the prompt text before {source}, and of the text after it."""
  # Formatting with a NUL marker resolves escaped braces ({{ }}) before splitting.
  head, tail = tok.prompt_template(template).format(source='\0').split('\0')
  return tok.prefix_ids + tok.encode(head), tok.encode(tail)


def pack_row(examples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int) -> dict:
  """One row of a batch holding `examples` (prompt_ids, target_ids) back to back.

  Token i predicts targets[i] = token i+1 of the same segment; the loss counts exactly the
  predictions of target tokens, including the last prompt token's prediction of the first.
  """
  row = {
      'tokens': np.zeros(seq_len, np.int32),
      'targets': np.zeros(seq_len, np.int32),
      'loss_mask': np.zeros(seq_len, np.float32),
      'positions': np.zeros(seq_len, np.int32),
      'segment_ids': np.zeros(seq_len, np.int32),
      'full_depth': np.zeros(seq_len, bool),
  }
  start = 0
  for segment_id, (prompt_ids, target_ids) in enumerate(examples, start=1):
    if not prompt_ids or not target_ids:
      raise ValueError(
          f'example {segment_id} has {len(prompt_ids)} prompt and {len(target_ids)} target '
          'tokens; both must be at least 1'
      )
    ids = list(prompt_ids) + list(target_ids)
    end = start + len(ids)
    if end > seq_len:
      raise ValueError(f'examples of {end} tokens do not fit a row of seq_len={seq_len}')
    prompt_end = start + len(prompt_ids)
    row['tokens'][start:end] = ids
    row['targets'][start : end - 1] = ids[1:]
    row['loss_mask'][prompt_end - 1 : end - 1] = 1.0
    row['positions'][start:end] = np.arange(len(ids))
    row['segment_ids'][start:end] = segment_id
    row['full_depth'][start:prompt_end] = True
    start = end
  return row


def plan_epoch(
    lengths: Sequence[int], order: Sequence[int], rows: int, seq_len: int, pack: bool
) -> list[list[list[int]]]:
  """Groups example indices, taken in `order`, into batches of `rows` rows of seq_len tokens.

  With `pack`, each example goes to the first row of the current batch with room for it
  (first fit); when none has room the batch is closed. Without, one example per row.
  Returns batches -> rows -> example indices; the last batch of an epoch may be short.
  """
  if not pack:
    singles = [[int(i)] for i in order]
    return [singles[k : k + rows] for k in range(0, len(singles), rows)]
  batches = []
  free = np.full(rows, seq_len)
  batch = [[] for _ in range(rows)]
  for i in order:
    fits = free >= lengths[i]
    if not fits.any():
      batches.append([row for row in batch if row])
      free[:] = seq_len
      batch = [[] for _ in range(rows)]
      fits = free >= lengths[i]
    r = int(np.argmax(fits))
    batch[r].append(int(i))
    free[r] -= lengths[i]
  if any(batch):
    batches.append([row for row in batch if row])
  return batches


class Batcher:
  """Iterator of numpy batches [batch_size, seq_len] (see the module docstring for fields).

  `batch_size` is per host: every host plans the same global batch of
  batch_size * process_count rows and keeps rows [process_index * batch_size, ...), so the
  hosts' batches, concatenated in process order, equal the one-host batch.

  Examples are tokenized once; a batch is then assembled from indices, and the order of an
  epoch depends only on (seed, epoch), so `restore(state())` resumes exactly, at the cost of
  planning one epoch from the example lengths.
  """

  def __init__(
      self,
      examples: Sequence[tuple[list[int], list[int]]],
      batch_size: int,
      seq_len: int,
      *,
      pack: bool = True,
      shuffle: bool = True,
      repeat: bool = True,
      seed: int = 0,
      process_index: int = 0,
      process_count: int = 1,
  ):
    if not examples:
      raise ValueError('the corpus is empty: no examples to batch')
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size} must be at least 1')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index} must be in [0, {process_count})')
    self._examples = examples
    self._lengths = np.array([len(p) + len(t) for p, t in examples])
    too_long = int(np.argmax(self._lengths))
    if self._lengths[too_long] > seq_len:
      raise ValueError(
          f'example {too_long} has {self._lengths[too_long]} tokens > seq_len={seq_len}; '
          'encode it with max_len=seq_len (Batcher.from_pairs does)'
      )
    self.batch_size = batch_size
    self.seq_len = seq_len
    self.num_truncated = 0
    self._pack, self._shuffle, self._repeat, self._seed = pack, shuffle, repeat, seed
    self._host_rows = slice(process_index * batch_size, (process_index + 1) * batch_size)
    self._global_rows = batch_size * process_count
    self._epoch, self._step = 0, 0
    self._plan_cache: tuple[int, list] | None = None

  @classmethod
  def from_pairs(
      cls,
      tok: Tokenizer,
      template: str,
      pairs: Sequence[dict[str, str]],
      batch_size: int,
      seq_len: int,
      **kwargs: Any,
  ) -> Batcher:
    """Tokenizes `pairs` once (truncating to seq_len, counted in `num_truncated`)."""
    examples, num_truncated = encode_examples(tok, template, pairs, seq_len)
    batcher = cls(examples, batch_size, seq_len, **kwargs)
    batcher.num_truncated = num_truncated
    return batcher

  def state(self) -> dict[str, int]:
    """Where the next batch comes from; JSON-able."""
    return {'epoch': self._epoch, 'step': self._step}

  def restore(self, state: dict[str, int]) -> Batcher:
    epoch, step = int(state['epoch']), int(state['step'])
    if epoch < 0 or not 0 <= step <= len(self._plan(epoch)):
      raise ValueError(f'batcher state {state} is out of range for this data')
    self._epoch, self._step = epoch, step
    return self

  def __iter__(self) -> Batcher:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._step >= len(self._plan(self._epoch)):
      if not self._repeat:
        raise StopIteration
      self._epoch, self._step = self._epoch + 1, 0
    global_rows = self._plan(self._epoch)[self._step]
    self._step += 1
    host_rows = global_rows[self._host_rows]
    rows = [pack_row([self._examples[i] for i in row], self.seq_len) for row in host_rows]
    empty_row = pack_row([], self.seq_len)
    rows += [empty_row] * (self.batch_size - len(rows))
    return {key: np.stack([row[key] for row in rows]) for key in empty_row}

  def _plan(self, epoch: int) -> list[list[list[int]]]:
    if self._plan_cache is None or self._plan_cache[0] != epoch:
      num_examples = len(self._examples)
      if self._shuffle:
        order = np.random.default_rng([self._seed, epoch]).permutation(num_examples)
      else:
        order = np.arange(num_examples)
      plan = plan_epoch(self._lengths, order, self._global_rows, self.seq_len, self._pack)
      self._plan_cache = (epoch, plan)
    return self._plan_cache[1]
