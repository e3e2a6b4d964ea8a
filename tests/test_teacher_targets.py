"""Sequence-level distillation (`data.targets = "teacher"`): the train targets are the teacher's
greedy full-depth outputs (equal to a full-recompute argmax loop, independent of the engine),
cached on disk and reused, regenerated when the teacher or the prompt changes; validation and
test keep their references; bad input is one line before any work; a run trains on them."""

import numpy as np
import pytest

from configs import tiny as tiny_config
from ulskip_jax import batching, config_check, engine, hf, teacher_targets, train_lib
from ulskip_jax import testing as tiny
from ulskip_jax.tokenizer import Tokenizer

SEQ_LEN = 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """Two tiny teachers of one architecture (other weights) and one of another vocabulary."""
  root = tmp_path_factory.mktemp("teachers")
  out = {}
  for name, seed, vocab in (("a", 5, tiny.VOCAB), ("b", 6, tiny.VOCAB), ("other_vocab", 5, 50)):
    out[name] = root / name
    MODELS[str(out[name])] = tiny.tiny_model(seed=seed, max_position=128, vocab_size=vocab)
    hf.save_pretrained(MODELS[str(out[name])], out[name])
    TOKENIZERS[str(out[name])] = Tokenizer(tiny.save_tiny_tokenizer(out[name]))
  return out


def _words(rng, n):
  return " ".join(f"w{i}" for i in rng.integers(4, tiny.VOCAB, n))


@pytest.fixture(scope="module")
def pairs():
  """Word sentences of the tiny tokenizer's vocabulary, of varying lengths."""
  rng = np.random.default_rng(0)
  make = lambda n: [dict(source=_words(rng, rng.integers(2, 9)), target=_words(rng, 4))
                    for _ in range(n)]
  return dict(train=make(8), validation=make(3), test=make(3))


def _config(folder, cache_dir, **data):
  config = tiny_config.get_config()
  config.model.init_from = str(folder)
  config.data.cache_dir = str(cache_dir)
  config.data.seq_len = SEQ_LEN
  config.data.targets = "teacher"
  config.batch_size = 4
  for key, value in data.items():
    config.data[key] = value
  return config


# folder -> the model and the tokenizer saved there (loading them from the files takes seconds)
MODELS, TOKENIZERS = {}, {}


def _tok(folder):
  return TOKENIZERS[str(folder)]


def _rewrite(config, pairs, loads=None):
  """teacher_targets.rewrite as train_lib calls it, the teacher read from data.teacher or
  model.init_from; loads: a list that counts the teacher loads."""
  def load():
    if loads is not None:
      loads.append(1)
    return MODELS[teacher_targets.teacher_path(config)]
  return teacher_targets.rewrite(config, pairs, _tok(config.model.init_from), 128, load)


@pytest.fixture
def engine_calls(monkeypatch):
  """The engine's decoding calls, counted."""
  calls = []
  run = engine.run

  def counted(*args, **kw):
    calls.append(1)
    return run(*args, **kw)
  monkeypatch.setattr(engine, "run", counted)
  return calls


def _greedy_by_recompute(model, prompts, budget, eos_id):
  """Greedy outputs by a full forward over the whole sequence at every step (no cache, no
  engine), all rows in one [N, SEQ_LEN + budget] buffer: causal, so the zeros after a row's last
  token change nothing."""
  call = tiny.jit_call(model)
  buf = np.zeros((len(prompts), SEQ_LEN + budget), np.int32)
  for r, p in enumerate(prompts):
    buf[r, :len(p)] = p
  cur = np.array([len(p) for p in prompts])
  outs, done = [[] for _ in prompts], np.zeros(len(prompts), bool)
  for _ in range(budget):
    logits = np.asarray(call(buf))
    for r in np.flatnonzero(~done):
      tok = int(np.argmax(logits[r, cur[r] - 1]))
      if tok == eos_id:
        done[r] = True
        continue
      outs[r].append(tok)
      buf[r, cur[r]] = tok
      cur[r] += 1
  return outs


def test_targets_are_the_teachers_greedy_outputs_and_only_the_train_split_changes(
    folders, pairs, tmp_path, engine_calls, fast_engine_compile):
  config = _config(folders["a"], tmp_path)
  out = _rewrite(config, pairs)
  assert engine_calls, "nothing was generated"
  tok = _tok(folders["a"])
  # The prompts the run trains with, as batching encodes a training example.
  prompts = [batching.encode_example(tok, config.data.template, p["source"], "w5", SEQ_LEN)[0]
             for p in pairs["train"]]
  budget = SEQ_LEN - min(map(len, prompts))  # what a row has room for after the shortest
  want = [tok.decode(ids).strip() for ids in _greedy_by_recompute(MODELS[str(folders["a"])],
                                                                  prompts, budget, tok.eos_id)]
  # An empty output (EOS first) is dropped: it would teach nothing.
  assert out["train"] == [dict(p, target=w) for p, w in zip(pairs["train"], want) if w]
  assert sum(map(bool, want)) >= len(want) // 2, want
  for split in ("validation", "test"):
    assert out[split] == pairs[split]


def test_the_cache_is_reused_and_changes_with_the_teacher_and_the_prompt(
    folders, pairs, tmp_path, engine_calls, capsys, fast_engine_compile):
  config = _config(folders["a"], tmp_path)
  loads = []
  first = _rewrite(config, pairs, loads)
  assert engine_calls and loads == [1]
  assert "generated 8" in capsys.readouterr().out
  del engine_calls[:]
  again = _rewrite(config, pairs, loads)
  assert again == first and not engine_calls and loads == [1], "the cache was not read"
  (line,) = capsys.readouterr().out.splitlines()
  assert line.startswith(f"data.targets='teacher' ({folders['a']}): read 8 from {tmp_path}")
  cached = sorted((tmp_path / teacher_targets.CACHE_FOLDER).iterdir())
  assert len(cached) == 1
  by_teacher = _rewrite(_config(folders["a"], tmp_path, teacher=str(folders["b"])), pairs)
  assert engine_calls and by_teacher != first
  del engine_calls[:]
  by_template = _rewrite(_config(folders["a"], tmp_path, template="w9 {source} w10"), pairs)
  assert engine_calls and by_template != first
  assert len(list((tmp_path / teacher_targets.CACHE_FOLDER).iterdir())) == 3


@pytest.mark.parametrize("data,line", [
    (dict(targets="bogus"), "data.targets='bogus' is unknown"),
    (dict(teacher="/missing/teacher"), "data.teacher='/missing/teacher' cannot be used"),
    (dict(teacher="other_vocab"), "is not the student's architecture: vocab_size=50 (student: "
     "97)"),
    (dict(init_from=""), "data.targets='teacher' needs a model to generate the targets"),
    (dict(targets="reference", teacher="b"), "is set but data.targets='reference' ignores it"),
])
def test_bad_input_is_one_line_before_any_work(folders, tmp_path, data, line):
  config = _config(folders["a"], tmp_path / "cache")
  if "init_from" in data:
    config.model.init_from = data.pop("init_from")
  for key, value in data.items():
    config.data[key] = str(folders.get(value, value))
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate_run(config, str(tmp_path / "run"))
  assert line in str(e.value) and "\n" not in str(e.value), str(e.value)
  assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_a_run_trains_on_the_teachers_targets(folders, pairs, tmp_path, monkeypatch,
                                              fast_engine_compile):
  """train_and_evaluate with data.targets='teacher' (the teacher data.teacher): the train
  batches hold the teacher's targets, tokenized as training tokenizes a target."""
  monkeypatch.setattr(train_lib.corpora, "load_pairs", lambda data: pairs)
  seen = []
  step = train_lib.Trainer.step

  def recorded(self, state, batch, i):
    seen.append(batch)
    return step(self, state, batch, i)
  monkeypatch.setattr(train_lib.Trainer, "step", recorded)
  config = _config(folders["a"], tmp_path / "cache", teacher=str(folders["b"]))
  config.num_steps, config.skip.prompt_capacity = 1, 1.0
  train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  teacher = _rewrite(config, pairs)["train"]  # read back from the run's cache
  tok = _tok(folders["a"])
  encode = lambda ps: {tuple(batching.encode_example(tok, config.data.template, p["source"],
                                                     p["target"], SEQ_LEN)[1]) for p in ps}
  want, references = encode(teacher), encode(pairs["train"])
  (batch,) = seen
  got = set()
  for row in range(batch["tokens"].shape[0]):
    for segment in set(batch["segment_ids"][row]) - {0}:
      mask = (batch["segment_ids"][row] == segment) & (batch["loss_mask"][row] > 0)
      got.add(tuple(batch["targets"][row][mask]))
  assert got and got <= want, (got, want)
  assert not got & references


def test_a_workdir_teacher_is_known_by_its_latest_checkpoint(tmp_path):
  """A training workdir's fingerprint changes when it is trained further (a new latest step),
  and not with a half-written step (Orbax names a step's folder only once it is complete)."""
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  before = teacher_targets.fingerprint(str(tmp_path))
  (tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp").mkdir()
  assert teacher_targets.fingerprint(str(tmp_path)) == before
  (tmp_path / "checkpoints" / "8").mkdir()
  after = teacher_targets.fingerprint(str(tmp_path))
  assert (before["step"], after["step"]) == (4, 8)
