"""Sequence-level distillation (`data.targets = "teacher"`): the train split's targets rewritten
by a full-depth teacher's greedy output, generated once with the decoding engine and cached on
disk beside the data.

  rewrite(config, pairs, tok, load_teacher) -> pairs, train targets the teacher's

Each training source becomes the prompt the run trains with (`data.template`, the chat template
with `data.chat`: `batching.eval_prompts`), decoded greedily at full depth until EOS or the row is
full (`max_new_tokens`). Validation and test keep their references: evaluation stays against
real targets. A teacher output that is empty is dropped from the train split (an empty target
teaches nothing).

The cache, <data.cache_dir>/teacher_targets/<key>.jsonl, holds one {source, target} record per
training pair, in order; `key` hashes everything that changes the outputs (`cache_key`): the
teacher's identity (`fingerprint`), the dtypes it runs in, the template, the chat flag, the token
budget, the prompts' ids and the sources. The student's tokenizer writes the prompts and reads
the outputs: a teacher shares the student's vocabulary (config_check refuses another one).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence

import jax
import tqdm

from ulskip_jax import batching, config_check, corpora, decode, engine, gguf_io

CACHE_FOLDER = "teacher_targets"
# Bump when what a cache file holds, or how its outputs are made, changes.
FORMAT = 1


def teacher_path(config) -> str:
  """The model the targets come from: data.teacher, else model.init_from."""
  return config.data.teacher or config.model.init_from


def fingerprint(path: str) -> dict:
  """What identifies a teacher's weights without reading them: a workdir's latest checkpoint step
  (and when it was written), a file's or a folder's files' sizes and modification times; a name
  that is no local path (a hub id) stands for itself."""
  if str(path).lower() in gguf_io.SMOLLM2_ALIASES:
    path = str(gguf_io.smollm2_path())
  if not os.path.exists(path):
    return dict(name=str(path))
  path = os.path.abspath(path)
  steps = config_check.checkpoint_steps(os.path.join(path, "checkpoints"))
  if steps:
    step_dir = os.path.join(path, "checkpoints", str(steps[-1]))
    return dict(workdir=path, step=steps[-1], mtime_ns=os.stat(step_dir).st_mtime_ns)
  files = [path] if os.path.isfile(path) else sorted(
      os.path.join(path, name) for name in os.listdir(path)
      if os.path.isfile(os.path.join(path, name)))
  return dict(path=path, files=[(os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns)
                                for f in files])


def max_new_tokens(prompts: Sequence[Sequence[int]], seq_len: int, max_position: int) -> int:
  """The token budget of every output: what the row has room for after the shortest prompt (a
  longer output would be cut in training), within the model's positions after the longest."""
  lengths = [len(p) for p in prompts]
  return max(1, min(seq_len - min(lengths), max_position - max(lengths)))


def _digest(value) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def cache_key(config, prompts: Sequence[Sequence[int]], sources: Sequence[str],
              budget: int) -> str:
  """The cache file's name: changes with anything that changes the outputs."""
  d, m = config.data, config.model
  return _digest(dict(format=FORMAT, teacher=fingerprint(teacher_path(config)), dtype=m.dtype,
                      param_dtype=m.param_dtype, template=d.template, chat=bool(d.chat),
                      max_new_tokens=budget, prompts=_digest([list(map(int, p)) for p in prompts]),
                      sources=_digest(list(sources))))[:24]


def generate(model, tok, prompts: Sequence[Sequence[int]], budget: int, rows: int,
             progress: bool = False) -> list[str]:
  """Each prompt's greedy full-depth output as text (stripped), continuously batched on `rows`
  rows; progress: a tqdm bar over calls of the engine."""
  size = engine.QUEUE_ROUNDS * rows  # one engine call's queue
  texts = []
  for i in tqdm.trange(0, len(prompts), size, desc="teacher targets", disable=not progress):
    ids, _ = decode.generate(model, prompts[i:i + size], max_new_tokens=budget,
                             eos_id=tok.eos_id, pad_id=tok.pad_id, batch_size=rows)
    texts += [tok.decode(row).strip() for row in ids]
  return texts


def rewrite(config, pairs: dict[str, list[dict[str, str]]], tok, max_position: int,
            load_teacher: Callable[[], object]) -> dict[str, list[dict[str, str]]]:
  """`pairs` with the train split's targets the teacher's outputs, read from the cache or
  generated (the teacher loaded by `load_teacher()` only then, and the file written atomically);
  the other splits unchanged. max_position: the student's, which the teacher shares. Prints one
  line saying which, on the lead host."""
  d = config.data
  train = pairs["train"]
  sources = [pair["source"] for pair in train]
  prompts, _ = batching.eval_prompts(tok, d.template, train, d.seq_len - 1)
  budget = max_new_tokens(prompts, d.seq_len, max_position)
  path = os.path.join(os.path.expanduser(d.cache_dir), CACHE_FOLDER,
                      cache_key(config, prompts, sources, budget) + ".jsonl")
  lead = jax.process_index() == 0
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      targets = [json.loads(line)["target"] for line in f]
    what = f"read {len(targets)} from {path}"
  else:
    start = time.perf_counter()
    targets = generate(load_teacher(), tok, prompts, budget,
                       rows=min(config.batch_size, len(prompts)),
                       progress=lead and config.progress_bar)
    corpora.write_jsonl_atomic(path, ({"source": s, "target": t}
                                      for s, t in zip(sources, targets)))
    what = (f"generated {len(targets)} in {time.perf_counter() - start:.0f} s (greedy, full "
            f"depth, at most {budget} new tokens) into {path}")
  rewritten = [dict(pair, target=t) for pair, t in zip(train, targets) if t]
  if lead:
    dropped = len(train) - len(rewritten)
    print(f"data.targets='teacher' ({teacher_path(config)}): {what}"
          + (f"; {dropped} empty outputs dropped" if dropped else ""), flush=True)
  return dict(pairs, train=rewritten)
