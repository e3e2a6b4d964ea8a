"""Bad input, table-driven: every mistake is one line, before the work starts; nothing silently
wrong.

Each case of a table runs one mistake through the path a user takes: the run-config validation
(`config_check.validate_run`, what train.py and train_and_evaluate call first), `infer.main`, or
the Python API (decode, skipping, hf), all through `cli.run`, the error reporting both command
lines share. Each asserts the exit code (2: bad input), that stderr is exactly one line naming the
bad value, and that the files present before are unchanged (nothing created, written or removed).

What only a real process shows (Ctrl-C, a config file that does not exist, --verbose, Orbax's
teardown after a corrupt checkpoint, the time to a config error, the import-time notices) runs
train.py / infer.py in children, started in the background when this module starts so that they
overlap the in-process cases; the tests that need their results come last. The Ctrl-C run (tiny
config, interrupted in its second step) is also the one workdir the resume cases use; the
children share one persistent compilation cache with this process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import ml_collections
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

import infer
from ulskip_jax import testing as tiny
from ulskip_jax import cli, config_check, decode, engine, run_log, train_lib
from ulskip_jax.skipping import plan_layers

REPO = pathlib.Path(__file__).resolve().parents[1]
from configs import reproduce as reproduce_config  # noqa: E402
from configs import tiny as tiny_config  # noqa: E402

TIMEOUT_S = 300
TINY_RUN = ("--config", "configs/tiny.py", "--config.num_steps=4")
CONFIG_ERROR_CPU_S = 10  # the bound on the time to a config error, as CPU seconds


# ----------------------------------------------------------------------------------------------
# Children: started with the module, collected by the tests that need them.

def _env(root: pathlib.Path, **extra) -> dict:
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", HF_ENDPOINT="http://127.0.0.1:9")
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _child(root, *cmd, **env) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, *map(str, cmd)], cwd=REPO, env=_env(root, **env),
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# Runs a command and writes its wall time and CPU time (user + sys of it and its children).
_TIMED = """
import json, resource, subprocess, sys, time
start = time.monotonic()
proc = subprocess.run(sys.argv[2:])
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
  json.dump(dict(wall_s=time.monotonic() - start, cpu_s=usage.ru_utime + usage.ru_stime), f)
sys.exit(proc.returncode)
"""


class _Children:
  def __init__(self, root: pathlib.Path):
    self.root, self.procs, self.results, self.threads = root, {}, {}, []

  def result(self, name) -> tuple[int, str, str]:
    for thread in self.threads:
      thread.join()
    if name not in self.results:
      out, err = self.procs[name].communicate(timeout=TIMEOUT_S)
      self.results[name] = (self.procs[name].returncode, out, err)
    return self.results[name]

  def kill(self):
    for proc in self.procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("bad_input")


@pytest.fixture(scope="module", autouse=True)
def compile_cache(root, fast_engine_compile):
  """One persistent compilation cache for this module's jits and its children."""
  saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                               "jax_persistent_cache_min_compile_time_secs")}
  jax.config.update("jax_compilation_cache_dir", str(root / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  compilation_cache.reset_cache()
  yield
  for k, v in saved.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module", autouse=True)
def children(root):
  """train.py / infer.py runs that need a process of their own, all started now."""
  runs = _Children(root)
  # Ctrl-C in the second step (the worker pauses there until a signal comes): saves step 2.
  interrupted = root / "interrupted"
  runs.procs["ctrl_c"] = _child(root, REPO / "tests" / "train_worker.py", "--workdir",
                                interrupted, *TINY_RUN, ULSKIP_TEST_PAUSE_AT=1)

  def interrupt():
    deadline = time.monotonic() + TIMEOUT_S
    while not (interrupted / "paused").exists() and time.monotonic() < deadline:
      if runs.procs["ctrl_c"].poll() is not None:
        return
      time.sleep(0.05)
    runs.procs["ctrl_c"].send_signal(signal.SIGINT)
  runs.threads.append(threading.Thread(target=interrupt, daemon=True))
  runs.threads[-1].start()
  # A late-validation case of the issue (bible_2x's skip phase starts after 400 steps), timed,
  # where torch cannot be imported: transformers' notice about that must not show either.
  no_torch = root / "no_torch" / "torch"
  no_torch.mkdir(parents=True)
  (no_torch / "__init__.py").write_text("raise ImportError('no torch here')\n")
  runs.procs["late_ratio"] = _child(
      root, "-c", _TIMED, root / "late_ratio.json", sys.executable, REPO / "train.py",
      "--config", "configs/bible_2x.py", "--config.skip.ratio=50", "--workdir", root / "late",
      PYTHONPATH=os.pathsep.join([str(no_torch.parent), str(REPO)]))
  missing = ("--config", "configs/nope.py", "--workdir", root / "never")
  runs.procs["missing_config"] = _child(root, REPO / "train.py", *missing)
  runs.procs["verbose"] = _child(root, REPO / "train.py", *missing, "--verbose")
  yield runs
  runs.kill()


# ----------------------------------------------------------------------------------------------
# Shared inputs: one tiny workdir, one tiny Hugging Face folder.

@pytest.fixture(scope="module")
def workdir(children, root):
  """configs/tiny.py interrupted by Ctrl-C after 2 steps: a checkpoint at 2, log.jsonl at 2."""
  children.result("ctrl_c")
  return root / "interrupted"


@pytest.fixture(scope="module")
def model():
  return tiny.tiny_model(seed=1, max_position=128)


@pytest.fixture(scope="module")
def hf_folder(root, model):
  """The tiny model as a Hugging Face folder (written by save_pretrained: no torch model)."""
  from ulskip_jax import hf
  path = root / "hf"
  hf.save_pretrained(model, path)
  tiny.save_tiny_tokenizer(path)
  return path


@pytest.fixture(scope="module")
def inputs(root):
  path = root / "inputs"
  path.mkdir()
  (path / "in.txt").write_text("w4 w5 w6\nw7 w8\n")
  (path / "refs.txt").write_text("w5\n")
  (path / "empty.txt").write_text("")
  (path / "long.txt").write_text("w5 " * 125 + "\n")
  (path / "not_a_dir").write_text("a file\n")
  (path / "folder").mkdir()
  (path / "hf_without_config").mkdir()
  return path


def _config(**overrides) -> ml_collections.ConfigDict:
  """configs/tiny.py with overrides by key path; not type-safe, so any value can be tried."""
  c = ml_collections.ConfigDict(tiny_config.get_config().to_dict(), type_safe=False)
  c.update_from_flattened_dict(overrides)
  return c


def _snapshot(*roots) -> dict:
  files = {}
  for r in roots:
    for dirpath, dirnames, filenames in os.walk(r):
      for name in dirnames + filenames:
        p = os.path.join(dirpath, name)
        st = os.lstat(p)
        files[p] = (st.st_size, st.st_mtime_ns, os.path.isdir(p))
  return files


def _one_error_line(code: int, err: str) -> str:
  """stderr of a bad-input exit: exactly one line, no traceback."""
  assert code == cli.BAD_INPUT, f"exit code {code}, stderr: {err}"
  assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
  assert "Traceback" not in err
  return err


def _run(fn) -> tuple[int, str]:
  """`fn` through cli.run, as train.py and infer.py run their work: (exit code, stderr)."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = cli.run(fn)
  return code, err.getvalue()


# ----------------------------------------------------------------------------------------------
# The run config: one validation pass, every field's type and range, plans, workdir.

CONFIG_CASES = [
    # The late validation: the skip plans are built for every ratio the run will use.
    ({"skip.ratio": 50.0}, "skip.ratio=50.0"),
    ({"skip.ratio": 0.0}, "skip.ratio=0.0"),
    ({"skip.ratio": -1.0}, "skip.ratio=-1.0"),
    ({"skip.ratio": float("nan")}, "skip.ratio=nan"),
    ({"skip.ratio": 3.0}, "skip.ratio=3.0"),  # keeps 1 of 4 layers: ULS keeps first and last
    ({"skip.strategy": "foo"}, "skip.strategy='foo'"),
    ({"skip.keep": (1, "x")}, "skip.keep[1]='x'"),
    ({"skip.keep": (1,), "skip.strategy": "top"},
     "keep works with strategy='uls' or 'calibrated' only"),
    ({"skip.calibration_tokens": 0}, "skip.calibration_tokens=0 is out of range"),
    ({"skip.calibration_method": "angular"}, "skip.calibration_method='angular' is unknown"),
    ({"skip.strategy": "calibrated"}, "skip.strategy='calibrated' needs model.init_from"),
    ({"skip.strategy": "calibrated", "skip.plan_file": "/missing/plan.json"},
     "skip.plan_file '/missing/plan.json' cannot be used: plan file /missing/plan.json cannot be "
     "read"),
    ({"skip.keep": (1, 2)}, "skip.keep=(1, 2)): keep=(1, 2) with the first and last layers is "
     "4 layers but the ratio keeps n=2"),
    ({"skip.ratios": (1.0, "x")}, "skip.ratios[1]='x'"),
    ({"skip.ratios": (2.0, 9.0)}, "skip.ratios[1]=9.0"),
    ({"skip.ratios": "1,2"}, "skip.ratios='1,2'"),
    ({"eval_ratios": (1.0, 9.0)}, "eval_ratios[1]=9.0"),
    ({"skip.mode": "sometimes"}, "skip.mode='sometimes'"),
    ({"skip.full_depth_steps": -5}, "skip.full_depth_steps=-5"),
    ({"skip.prompt_capacity": 0.0}, "skip.prompt_capacity=0.0"),
    ({"skip.prompt_capacity": 1.5}, "skip.prompt_capacity=1.5"),
    # Types and ranges of the other fields.
    ({"model.dtype": "bogus"}, "model.dtype='bogus'"),
    ({"model.param_dtype": "int8"}, "model.param_dtype='int8'"),
    ({"model.num_layers": 0}, "model.num_layers=0"),
    ({"model.num_layers": True}, "model.num_layers=True"),
    ({"model.num_layers": 2.5}, "model.num_layers=2.5"),
    ({"model.num_heads": 3}, "model.num_heads=3"),
    ({"model.norm": "batch"}, "model.norm='batch'"),
    ({"model.rope_theta": 0.0}, "model.rope_theta=0.0"),
    ({"model.rope_layers": "1010"}, "model.rope_layers='1010'"),
    ({"model.qk_norm": "yes"}, "model.qk_norm='yes'"),
    ({"model.foo": 1}, "model.foo"),
    ({"num_steps": 0}, "num_steps=0"),
    ({"num_steps": "10"}, "num_steps='10'"),
    ({"batch_size": -1}, "batch_size=-1"),
    ({"batch_size": 7, "optim.accum_steps": 2}, "batch_size=7"),
    ({"seed": -1}, "seed=-1"),
    ({"log_every": 0}, "log_every=0"),
    ({"eval_batches": 0}, "eval_batches=0"),
    ({"progress_bar": "yes"}, "progress_bar='yes'"),
    ({"optim.lr": float("nan")}, "optim.lr=nan"),
    ({"optim.lr": -1e-3}, "optim.lr=-0.001"),
    ({"optim.b2": 1.0}, "optim.b2=1.0"),
    ({"optim.clip_norm": 0.0}, "optim.clip_norm=0.0"),
    ({"optim.accum_steps": 0}, "optim.accum_steps=0"),
    ({"data.seq_len": 4096}, "data.seq_len=4096"),
    ({"data.template": "KJV {src}"}, "data.template='KJV {src}'"),
    ({"data.template": "KJV {source"}, "data.template='KJV {source'"),
    ({"data.source": "web"}, "data.source='web'"),
    ({"data.source": "hf"}, "data.source='hf'"),
    ({"data.max_examples": -1}, "data.max_examples=-1"),
    ({"checkpoint.every": 0}, "checkpoint.every=0"),
    ({"checkpoint.keep": 0}, "checkpoint.keep=0"),
    ({"mesh.shape": (4, 1, 1)}, "mesh.shape=(4, 1, 1)"),
    ({"mesh.shape": (-1, -1, 1)}, "mesh.shape=(-1, -1, 1)"),
    ({"mesh.shape": (1, 1)}, "mesh.shape=(1, 1)"),
    ({"distributed.process_id": 3}, "distributed.process_id=3"),
    ({"model.init_from": "/missing"}, "model.init_from='/missing'"),
    ({"optim.lora.rank": -1}, "optim.lora.rank=-1"),
    ({"optim.lora.rank": 2.5}, "optim.lora.rank=2.5"),
    ({"optim.lora.targets": ("qkv",)}, "optim.lora.targets=('qkv',) has 'qkv', which is unknown: "
                                       "allowed are 'q', 'k', 'v', 'o', 'gate', 'up', 'down'"),
    ({"optim.lora.alpha": 0.0}, "optim.lora.alpha=0.0"),
    ({"distill.teacher": "self", "distill.alpha": 1.5}, "distill.alpha=1.5"),
    ({"distill.teacher": "self", "distill.alpha": -0.1}, "distill.alpha=-0.1"),
    ({"distill.teacher": "self", "distill.temperature": 0.0}, "distill.temperature=0.0"),
    ({"distill.teacher": "self", "distill.temperature": -1.0}, "distill.temperature=-1.0"),
    ({"distill.teacher": "/missing/teacher"}, "distill.teacher='/missing/teacher' cannot be used"),
    ({"distill.teacher": "init"}, "distill.teacher='init' needs model.init_from"),
    ({"distill.sandwich": True, "distill.teacher": ""}, "distill.sandwich=True needs "
     "distill.teacher='self'"),
]


@pytest.mark.parametrize("overrides,named", CONFIG_CASES,
                         ids=[",".join(o) for o, _ in CONFIG_CASES])
def test_config_value(root, inputs, overrides, named):
  before = _snapshot(inputs)
  code, err = _run(lambda: config_check.validate_run(_config(**overrides), str(root / "fresh")))
  assert named in _one_error_line(code, err), err
  assert not (root / "fresh").exists() and _snapshot(inputs) == before


def test_a_plan_file_for_another_depth(root, inputs, hf_folder, tmp_path):
  """A calibrated plan for 6 layers, given to a 4-layer run or found beside a 4-layer model."""
  from ulskip_jax import skipping
  plan = skipping.LayerScores(6, "kl_greedy", (None, 0, 1, 2, 3, None))
  skipping.write_plan(str(tmp_path / "plan.json"), plan)
  code, err = _run(lambda: config_check.validate_run(_config(**{
      "skip.strategy": "calibrated", "skip.plan_file": str(tmp_path / "plan.json")}),
      str(root / "fresh")))
  assert "is for 6 layers but the model has 4" in _one_error_line(code, err), err
  shutil.copytree(hf_folder, tmp_path / "hf")
  skipping.write_plan(str(tmp_path / "hf" / "plan.json"), plan)
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = infer.main(["--checkpoint", str(tmp_path / "hf"), "--input", str(inputs / "in.txt"),
                       "--output", str(tmp_path / "out.txt"), "--ratio", "2", "--no-progress"])
  assert "is for 6 layers but the model has 4" in _one_error_line(code, err.getvalue())
  assert not (tmp_path / "out.txt").exists()


def test_init_from_is_a_model_folder_not_a_tokenizer_folder(root, inputs):
  for folder, message in ((root / "missing", "is not a directory"),
                          (inputs / "hf_without_config", "has no config.json")):
    code, err = _run(lambda: config_check.validate_run(
        _config(**{"model.init_from": str(folder)}), str(root / "fresh")))
    line = _one_error_line(code, err)
    assert f"model.init_from='{folder}'" in line and message in line, line
    assert "tokenizer folder" not in line


@pytest.mark.parametrize("case", ["a_file", "under_a_file", "read_only"])
def test_workdir_not_writable(inputs, case):
  workdir = {"a_file": inputs / "not_a_dir", "under_a_file": inputs / "not_a_dir" / "run",
             "read_only": pathlib.Path("/sys/ulskip_test_run")}[case]
  if case == "read_only":
    try:
      with open("/sys/ulskip_probe", "w"):
        pass
    except OSError:
      pass
    else:
      os.remove("/sys/ulskip_probe")
      pytest.skip("/sys is writable here: no read-only folder to try")
  before = _snapshot(inputs)
  code, err = _run(lambda: config_check.validate_run(_config(), str(workdir)))
  line = _one_error_line(code, err)
  assert str(workdir) in line, line
  assert ("is a file" if case == "a_file" else "cannot be created") in line, line
  assert _snapshot(inputs) == before and (case == "a_file" or not workdir.exists())


def test_a_teacher_of_another_architecture_or_vocabulary(root, hf_folder):
  """A teacher folder of another width, or of the student's architecture and another
  vocabulary, is refused by name in one line, from its config alone."""
  from ulskip_jax import hf
  other_vocab = root / "teacher_other_vocab"
  hf.save_pretrained(tiny.tiny_model(seed=1, max_position=128, vocab_size=50), other_vocab)
  tiny.save_tiny_tokenizer(other_vocab)
  for overrides, named in (
      ({"distill.teacher": str(hf_folder), "model.d_model": 64}, "d_model=32 (student: 64)"),
      ({"distill.teacher": str(other_vocab), "model.init_from": str(hf_folder)},
       "vocab_size=50 (student: 97)")):
    code, err = _run(lambda: config_check.validate_run(_config(**overrides), str(root / "fresh")))
    assert f"distill.teacher={overrides['distill.teacher']!r}" in _one_error_line(code, err)
    assert named in err, err
  assert not (root / "fresh").exists()


def test_a_config_that_is_no_run_config(root):
  code, err = _run(lambda: config_check.validate_run(reproduce_config.get_config(),
                                                     str(root / "fresh")))
  assert "not a train.py run config" in _one_error_line(code, err)


def test_every_base_field_has_a_check_and_every_config_passes(root):
  """FIELDS covers configs/base.py exactly, and the shipped run configs validate."""
  leaves = dict(config_check._leaves(tiny_config.get_config()))
  assert set(leaves) <= set(config_check.FIELDS), set(leaves) - set(config_check.FIELDS)
  for name in ("tiny", "bible_2x", "wmt_2x", "wmt_multi", "cnndm_2x"):
    module = __import__(f"configs.{name}", fromlist=["get_config"])
    config_check.validate_run(module.get_config(), str(root / "fresh"))
  assert not (root / "fresh").exists()


# ----------------------------------------------------------------------------------------------
# infer.py: option, file and folder mistakes, in one line, before any decoding.

INFER_CASES = [
    (["--temperature", "nan"], "--temperature=nan"),       # decoded greedily before
    (["--temperature", "-1"], "--temperature=-1.0"),
    (["--length-penalty", "nan", "--num-beams", "2"], "--length-penalty=nan"),
    (["--top-k", "0", "--temperature", "1"], "--top-k=0"),
    (["--top-k", "1000", "--temperature", "1"], "--top-k=1000"),
    (["--top-p", "0", "--temperature", "1"], "--top-p=0.0"),
    (["--top-p", "nan", "--temperature", "1"], "--top-p=nan"),
    (["--top-k", "3"], "top_k / top_p need sampling"),
    (["--num-beams", "2", "--temperature", "1"], "--num-beams=2"),
    (["--no-repeat-ngram-size", "20"], "--no-repeat-ngram-size=20"),
    (["--seed", "-1"], "--seed=-1"),
    (["--max-new-tokens", "500"], "--max-new-tokens=500"),
    (["--max-new-tokens", "0"], "--max-new-tokens=0"),
    (["--batch-size", "0"], "--batch-size=0"),
    (["--batch-size", "x"], "'x'"),
    (["--mode", "sometimes"], "'sometimes'"),
    (["--ratio", "50"], "ratio=50.0"),
    (["--ratio", "0"], "ratio=0.0"),
    (["--ratio", "abc"], "'abc'"),
    (["--ratio", "2", "--skip", "1"], "--ratio and --skip both given"),
    (["--skip", "1,x"], "'1,x'"),
    (["--skip", "7"], "skip index 7"),
    (["--skip", "0,1,2,3"], "skips all 4 layers"),
    (["--speculative", "k=4"], "needs a draft"),
    (["--speculative", "draft_ratio=2", "--num-beams", "2"], "--num-beams=2"),
    (["--speculative", "draft_ratio=2,k=99"], "num_draft_tokens=99"),
    (["--output", "{inputs}/missing_dir/out.txt"], "missing_dir"),   # failed after decoding
    (["--metrics-out", "{inputs}/missing_dir/m.json"], "missing_dir"),
    (["--output", "{inputs}/folder"], "is a directory"),
    (["--input", "{inputs}/none.txt"], "none.txt"),
    (["--input", "{inputs}/empty.txt"], "is empty"),
    (["--input", "{inputs}/long.txt"], "prompt 0 has 125 tokens"),
    (["--references", "{inputs}/refs.txt"], "references"),
    (["--references", "{inputs}/none.txt"], "none.txt"),
    (["--template", "{{lang}}: {{source}}"], "template field {lang}"),
    (["--checkpoint", "{inputs}/nowhere"], "nowhere"),
    (["--checkpoint", "{inputs}/hf_without_config"], "hf_without_config"),
    (["--step", "3"], "--step 3"),
    (["--step", "-2"], "--step -2"),
]


@pytest.mark.parametrize("extra,named", INFER_CASES, ids=[" ".join(e) for e, _ in INFER_CASES])
def test_infer_option(hf_folder, inputs, extra, named):
  args = dict(checkpoint=str(hf_folder), input=str(inputs / "in.txt"),
              output=str(inputs / "out.txt"), max_new_tokens="4")
  extra = [e.format(inputs=inputs) for e in extra]
  for flag, value in zip(extra[::2], extra[1::2]):
    args[flag[2:].replace("-", "_")] = value
  argv = [x for k, v in args.items() for x in ("--" + k.replace("_", "-"), v)] + ["--no-progress"]
  before = _snapshot(inputs, hf_folder)
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = infer.main(argv)
  line = _one_error_line(code, err.getvalue())
  assert named in line, line
  assert not line.startswith(f"error: {inputs}/in.txt:") or "prompt" in line  # options: no file
  assert _snapshot(inputs, hf_folder) == before


def test_internal_error_is_one_line_exit_1_and_verbose_shows_the_traceback(hf_folder, inputs,
                                                                           monkeypatch):
  def broken(*args, **kwargs):
    raise RuntimeError("something inside broke\nsecond line")
  monkeypatch.setattr(decode, "generate_text", broken)
  argv = ["--checkpoint", str(hf_folder), "--input", str(inputs / "in.txt"), "--output",
          str(inputs / "out.txt"), "--no-progress"]
  for verbose in (False, True):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
      code = infer.main(argv + ["--verbose"] * verbose)
    text = err.getvalue()
    assert code == 1, text
    assert text.splitlines()[-1].startswith("internal error: RuntimeError: something inside broke")
    assert ("Traceback" in text) == verbose and (text.count("\n") == 1) != verbose


# ----------------------------------------------------------------------------------------------
# The Python API: ids, special ids, NaN / inf, integer options, types; numpy scalars accepted.

API_CASES = [
    (dict(prompts="w5 w6"), "prompts='w5 w6' is text"),
    (dict(prompts=["w5 w6"]), "prompt 0 is text"),
    (dict(prompts=[[5, 6], "w7"]), "prompt 1 is text"),
    (dict(prompts=[[5, 97]]), "token id 97"),          # NaN logits, out-of-vocabulary ids
    (dict(prompts=[[5, -1]]), "token id -1"),          # wrapped to another token
    (dict(prompts=[[5, 1.5]]), "holds 1.5"),
    (dict(prompts=[[5, [6]]]), "prompt 0"),
    (dict(prompts=[[[5, 6]]]), "shape (1, 2)"),
    (dict(prompts=[[5], []]), "prompt 1 is empty"),
    (dict(prompts=[]), "prompts is empty"),
    (dict(prompts=5), "prompts=5"),
    (dict(pad_id=97), "pad_id=97"),                    # garbled every row
    (dict(pad_id=-1), "pad_id=-1"),
    (dict(eos_id=500), "eos_id=500"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(temperature=float("inf")), "temperature=inf"),
    (dict(temperature="0.5"), "temperature='0.5'"),
    (dict(temperature=1.0, top_p=float("nan")), "top_p=nan"),
    (dict(temperature=1.0, top_k=1.5), "top_k=1.5"),   # a JAX shape error before
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty=nan"),  # returned zeros
    (dict(num_beams=2.0), "num_beams=2.0"),
    (dict(num_beams=0), "num_beams=0"),
    (dict(max_new_tokens=3.0), "max_new_tokens=3.0"),
    (dict(max_new_tokens="4"), "max_new_tokens='4'"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size=-1"),
    (dict(seed=2**40), "seed=1099511627776"),          # jax.random.key truncated it
    (dict(skip="1,2"), "skip='1,2'"),
    (dict(ratio="2"), "ratio='2'"),
    (dict(mode="sometimes"), "mode='sometimes'"),
    (dict(early_stopping="yes", num_beams=2), "early_stopping='yes'"),
    (dict(speculative=dict(draft_ratio=2, num_draft_tokens=2.5)), "num_draft_tokens=2.5"),
    (dict(speculative=dict(draft_ratio=2), temperature=float("nan")), "temperature=nan"),
]


@pytest.mark.parametrize("kw,named", API_CASES, ids=[",".join(k) + str(i) for i, (k, _) in
                                                     enumerate(API_CASES)])
def test_generate_argument(model, kw, named):
  kw = dict(dict(prompts=[[5, 6, 7]], max_new_tokens=4, eos_id=2), **kw)
  compiles = engine.num_compiles()
  code, err = _run(lambda: decode.generate(model, **kw))
  assert named in _one_error_line(code, err), err
  assert engine.num_compiles() == compiles  # refused before anything was compiled


TEXT_CASES = [
    (dict(texts="w5 w6"), "texts='w5 w6'"),
    (dict(texts=[1, 2]), "texts[0]=1"),
    (dict(texts=["w5"], batch_size=0), "batch_size=0"),
    (dict(texts=["w5"], batch_size=2.0), "batch_size=2.0"),
    (dict(texts=["w5"], pad_id=97), "pad_id=97"),
]


@pytest.mark.parametrize("kw,named", TEXT_CASES, ids=[str(k) for k, _ in TEXT_CASES])
def test_generate_text_argument(hf_folder, kw, named):
  from ulskip_jax import hf
  model, tokenizer = hf.from_pretrained(hf_folder)
  kw = dict(dict(max_new_tokens=4), **kw)
  code, err = _run(lambda: decode.generate_text(model, tokenizer, **kw))
  assert named in _one_error_line(code, err), err


PLAN_CASES = [
    ((12, float("nan")), "ratio=nan"),
    ((12, "2"), "ratio='2'"),
    ((12, 2, "foo"), "strategy='foo'"),
    ((12, 2, 5), "strategy=5"),
    ((True, 2), "num_layers=True"),
    ((12.0, 2), "num_layers=12.0"),
    ((12, None, [1, 1]), "appear more than once"),
    ((12, None, [1.0]), "skip index 1.0"),
]


@pytest.mark.parametrize("args,named", PLAN_CASES, ids=[str(a) for a, _ in PLAN_CASES])
def test_plan_layers_argument(args, named):
  code, err = _run(lambda: plan_layers(*args))
  assert named in _one_error_line(code, err), err


@pytest.mark.parametrize("kw,named", [(dict(dtype="float8"), "dtype='float8'"),
                                      (dict(param_dtype="int8"), "param_dtype='int8'")])
def test_model_dtype(hf_folder, kw, named):
  """Refused when the config is made, before any weight is read (a TypeError at the first
  forward pass before)."""
  from ulskip_jax import hf
  code, err = _run(lambda: hf.from_pretrained(hf_folder, **kw))
  assert named in _one_error_line(code, err), err
  code, err = _run(lambda: tiny.tiny_model(**kw))
  assert named in _one_error_line(code, err), err


def test_numpy_scalars_are_numbers(model):
  assert plan_layers(12, np.float32(2)) == plan_layers(12, 2) == plan_layers(np.int64(12), 2)
  assert plan_layers(12, strategy=[np.int64(3)]).skipped == (3,)
  want, _ = decode.generate(model, [[5, 6, 7]], ratio=2, max_new_tokens=4, eos_id=2)
  got, _ = decode.generate(model, np.array([[5, 6, 7]]), ratio=np.float32(2),
                           max_new_tokens=np.int64(4), eos_id=np.int32(2), pad_id=np.int64(0),
                           temperature=np.float64(0.0))
  assert got == want


def test_progress_bar_pauses_for_evaluation():
  from tqdm import tqdm
  bar = tqdm(total=10, file=io.StringIO())
  t0 = [time.perf_counter()]
  start_t, last_print_t, before = bar.start_t, bar.last_print_t, t0[0]
  with run_log.paused(bar, t0, "evaluating"):
    assert bar.desc == "evaluating"
    time.sleep(0.2)
  assert bar.start_t - start_t >= 0.2 and bar.last_print_t - last_print_t >= 0.2
  assert t0[0] - before >= 0.2 and bar.desc == ""
  bar.close()


# ----------------------------------------------------------------------------------------------
# What needs the children: command lines, time to a config error, Ctrl-C, the workdir it leaves.

def test_late_config_error_comes_within_seconds(children, root):
  """bible_2x's skip plan, once built after 400 full-depth steps (341 s), is checked before any
  data is read; and without torch, transformers' import-time notice does not show."""
  code, out, err = children.result("late_ratio")
  assert "skip.ratio=50.0" in _one_error_line(code, err) and not out and "PyTorch" not in err
  timing = json.loads((root / "late_ratio.json").read_text())
  # CPU seconds: what the process did before the error, whatever else shares the machine.
  assert timing["cpu_s"] < CONFIG_ERROR_CPU_S, timing
  assert timing["wall_s"] < 6 * CONFIG_ERROR_CPU_S, timing
  assert not (root / "late").exists()


def test_missing_config_file_and_verbose(children):
  """Two chained OSErrors before: one line; --verbose adds the traceback before that line."""
  code, out, err = children.result("missing_config")
  line = _one_error_line(code, err)
  assert "configs/nope.py" in line and "No such file" in line and not out, line
  code, _, verbose = children.result("verbose")
  assert code == 2 and "Traceback" in verbose and verbose.splitlines()[-1] == line.strip()


def test_an_unknown_key_is_named_by_its_full_path():
  import train
  assert "'model.foo'" in train._unknown_key(["train.py", "--config.model.foo=1"], "foo")
  assert "'foo'" in train._unknown_key(["train.py", "--config.foo=1"], "foo")



def test_ctrl_c_saves_and_exits_130(children, root):
  code, out, err = children.result("ctrl_c")
  assert code == 130, err[-3000:]
  assert "Traceback" not in err and "saved step 2" in err.splitlines()[-1], err
  assert "interrupted (Ctrl-C): saved step 2 and stopping" in out
  assert out.startswith("model 4 layers"), "blank lines before the first line"
  assert config_check.checkpoint_steps(str(root / "interrupted" / "checkpoints")) == [2]


RESUME_CASES = [
    ({"num_steps": 1}, "num_steps=1"),                      # trained nothing, exit 0, before
    ({"model.num_layers": 6}, "model.num_layers=6"),        # was "unreadable or corrupt"
    ({"model.d_model": 64, "model.d_ff": 128}, "model.d_model=64"),
    ({"checkpoint.resume": False}, "checkpoint.resume=False"),
    ({"checkpoint.resume_step": 5}, "checkpoint.resume_step=5"),
]


@pytest.mark.parametrize("overrides,named", RESUME_CASES,
                         ids=[",".join(o) for o, _ in RESUME_CASES])
def test_resuming_a_workdir(workdir, overrides, named):
  before = _snapshot(workdir)
  code, err = _run(lambda: config_check.validate_run(_config(**overrides), str(workdir)))
  line = _one_error_line(code, err)
  assert named in line and "corrupt" not in line, line
  assert _snapshot(workdir) == before


def test_infer_on_a_workdir_step_and_corrupt_checkpoint(workdir, inputs, root):
  """--step of a workdir that lacks it; a corrupt latest step: one line hinting --step N (not a
  train.py flag), in a child so that Orbax's teardown is seen too (no 'Exception ignored')."""
  common = ["--input", inputs / "in.txt", "--output", inputs / "out.txt", "--no-progress"]
  before = _snapshot(inputs, workdir)
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = infer.main([str(a) for a in ["--checkpoint", workdir, "--step", "7", *common]])
  assert "step 7 not in" in _one_error_line(code, err.getvalue())
  corrupt = root / "corrupt"
  shutil.copytree(workdir, corrupt)
  files = [p for p in (corrupt / "checkpoints" / "2" / "params").rglob("*") if p.is_file()]
  largest = max(files, key=lambda p: p.stat().st_size)
  os.truncate(largest, largest.stat().st_size // 2)
  proc = _child(root, REPO / "infer.py", "--checkpoint", corrupt, *common)
  out, err = proc.communicate(timeout=TIMEOUT_S)
  line = _one_error_line(proc.returncode, err)
  assert "step 2" in line and "--step N" in line and "--config." not in line, line
  assert "Exception ignored" not in err + out
  assert _snapshot(inputs, workdir) == before




def test_resume_logs_each_step_once(workdir, root):
  """A run killed after its last checkpoint logged steps beyond it (and a cut line): resuming
  drops those, so every step is in log.jsonl once."""
  resumed = root / "resumed"
  shutil.copytree(workdir, resumed)
  with open(resumed / "log.jsonl", "a") as f:
    f.write(json.dumps(dict(step=3, loss=9.0)) + "\n" + '{"step": 4, "lo')
  # The Ctrl-C run's settings (num_steps is in the program): its compiled step is reused.
  train_lib.train_and_evaluate(_config(num_steps=4), str(resumed))
  records = [json.loads(line) for line in open(resumed / "log.jsonl")]
  assert [r["step"] for r in records] == [1, 2, 3, 4] and records[2]["loss"] != 9.0
