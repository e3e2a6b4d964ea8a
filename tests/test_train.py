"""Skip-aware training: the step's maths, the loop, resumes, meshes, hosts and the configs.

The step's maths (paper-mode loss, accumulation, frozen embeddings, one compile per ratio) runs in
this process on tiny models. Whatever needs another device count, a second host or a killed
process runs `train.py` (through tests/train_worker.py where a test hook is needed) in child
processes, because XLA_FLAGS must be set before jax is imported. The children share one
persistent compilation cache with this process, so each distinct program compiles once, and the
four runs that other tests compare against start in the background when this module starts.

Every run of `train.py` here is the tiny config for 24 steps at lr 1e-2 (the loss falls from 5.7
to ~4.1), with a checkpoint every 4 steps (the last 3 kept): a wrong optimizer state, data
position or skip plan after a resume moves the loss far beyond the tolerances below.
"""

import functools
import glob
import importlib.util
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

import tolerance
from ulskip_jax import batching, corpora
from ulskip_jax.tokenizer import Tokenizer
from ulskip_jax import checkpoint as ckpt_lib
from ulskip_jax import config_schema, gguf_io, hf, train_lib
from ulskip_jax.model import Decoder
from ulskip_jax import skipping
from ulskip_jax.skipping import plan_layers

REPO = pathlib.Path(__file__).resolve().parents[1]
from configs import tiny  # noqa: E402

NUM_STEPS = 24
RUN_FLAGS = ("--config", "configs/tiny.py", f"--config.num_steps={NUM_STEPS}",
             "--config.checkpoint.every=4", "--config.optim.lr=1e-2")  # tiny keeps 3 steps
SAME_MESH_TOL = 1e-6   # the same programs on the same devices: a resume must reproduce the run
OTHER_MESH_TOL = 1e-5  # other meshes reduce in another order (measured: <= 2.4e-6 over 30 steps)
TIMEOUT_S = 300
STEP_DELAY_S = 0.2     # the reference run's steps, a tiny model's, take a large one's time
PREEMPT_AT = 9         # the two-host chain is preempted in this step (0-based; saves 10 or later)


# ----------------------------------------------------------------------------------------------
# Helpers.

@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  """One persistent compilation cache for this module's own jits and its child processes."""
  path = tmp_path_factory.mktemp("jax_cache")
  saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                               "jax_persistent_cache_min_compile_time_secs")}
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  compilation_cache.reset_cache()  # the cache is set up once per process: make it see the dir
  yield path
  for k, v in saved.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


class _Children:
  """Child runs started in the background; `result(name)` waits for one and checks its exit."""

  def __init__(self, root: pathlib.Path):
    self.root, self.procs, self.results, self.threads = root, {}, {}, []
    self.stopping = threading.Event()  # set at teardown: threads start nothing more

  def start(self, name, proc):
    self.procs[name] = proc

  def start_later(self, target):
    """Runs `target` (which starts children) in a thread, e.g. once another run has a checkpoint."""
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    self.threads.append(thread)

  def result(self, name):
    for thread in self.threads:
      thread.join()
    assert name in self.procs, f"{name} never started"
    if name not in self.results:
      self.results[name] = _finish(self.procs[name])
    return self.results[name]

  def kill_unfinished(self):
    self.stopping.set()
    for thread in self.threads:
      thread.join()
    for proc in self.procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module", autouse=True)
def start_children_early(request):
  """Starts `children` with the module, so they run while the in-process tests do, if needed."""
  if any("children" in item.fixturenames for item in request.session.items
         if item.module is request.module):
    request.getfixturevalue("children")


@pytest.fixture(scope="module")
def children(tmp_path_factory, compile_cache):
  """Starts, in the background, the runs that tests compare against.

  one:       1 device, the reference run (its final params are also dumped, for inference;
             each step made STEP_DELAY_S slower on the device, its values unchanged)
  eight:     8 devices as mesh (2, 2, 2), with each parameter's sharding recorded, every
             checkpoint kept
  preempted0, 1: two processes (jax.distributed on localhost) of 1 device each, as mesh
             (1, 2, 1), so that fsdp splits every parameter across the hosts; they resume from
             eight's step-4 checkpoint, pause in step PREEMPT_AT + 1, host 1 gets SIGTERM and
             both must save the same step and stop;
  host0, 1:  the same two processes resumed from that step, to the end. One chain checks a change
             of mesh on resume, a multi-host preemption and two hosts against one: a separate
             2-device resume cost another ~17 CPU seconds.
  """
  runs = _Children(tmp_path_factory.mktemp("children"))
  root = runs.root
  runs.start("one", _start(compile_cache, root / "one", *RUN_FLAGS,
                           ULSKIP_TEST_FINAL_PARAMS=root / "final_params.npz",
                           ULSKIP_TEST_STEP_DELAY_S=STEP_DELAY_S))
  runs.start("eight", _start(compile_cache, root / "eight", *RUN_FLAGS,
                             "--config.mesh.shape=(2,2,2)", "--config.checkpoint.keep=6",
                             devices=8, ULSKIP_TEST_SHARDINGS=root / "shardings.json"))

  def start_hosts():
    step4 = root / "eight" / "checkpoints" / "4"
    deadline = time.monotonic() + TIMEOUT_S
    while not step4.is_dir() and runs.procs["eight"].poll() is None:
      if time.monotonic() > deadline or runs.stopping.is_set():
        return
      time.sleep(0.05)
    if not step4.is_dir() or runs.stopping.is_set():
      return  # the eight-device run failed (its own test reports why), or the tests are over
    hosts = root / "hosts"
    _copy_run(root / "eight", hosts, steps=[4])

    def start_pair(name, **env):
      port = _free_port()
      for i in range(2):
        runs.start(f"{name}{i}", _start(compile_cache, hosts, *RUN_FLAGS,
                                        "--config.mesh.shape=(1,2,1)",
                                        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                                        "--config.distributed.num_processes=2",
                                        f"--config.distributed.process_id={i}", **env))
      return [runs.procs[f"{name}{i}"] for i in range(2)]

    pair = start_pair("preempted", ULSKIP_TEST_PAUSE_AT=PREEMPT_AT)
    paused = lambda: all((hosts / f"paused{i}").exists() for i in range(2))
    deadline = time.monotonic() + TIMEOUT_S
    while not paused() and all(p.poll() is None for p in pair) and not runs.stopping.is_set():
      if time.monotonic() > deadline:
        break
      time.sleep(0.05)
    if paused():
      pair[1].send_signal(signal.SIGTERM)  # one host is preempted; both must stop together
      # JAX's SIGTERM notifier polls once a second: resumed after it has passed the notice on,
      # the hosts agree on a step soon after the pause even on a busy machine.
      time.sleep(2)
      (hosts / "go").touch()
    for i, proc in enumerate(pair):  # the test checks the exit codes
      runs.results[f"preempted{i}"] = proc.communicate(timeout=TIMEOUT_S)
    if all(p.returncode == 0 for p in pair) and not runs.stopping.is_set():
      start_pair("host")

  runs.start_later(start_hosts)
  yield runs
  runs.kill_unfinished()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(cache: pathlib.Path, devices: int = 1, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
  xla_flags = [f for f in env.get("XLA_FLAGS", "").split()  # e.g. conftest's compile options
               if not f.startswith("--xla_force_host_platform_device_count")]
  env.update(XLA_FLAGS=" ".join(xla_flags + [f"--xla_force_host_platform_device_count={devices}"]),
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             # A closed port: a hub dataset fails at once, and never downloads, even online.
             HF_ENDPOINT="http://127.0.0.1:9")
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _start(cache, workdir, *flags, devices=1, worker=True, **env) -> subprocess.Popen:
  """train.py in a child; through tests/train_worker.py (its hooks, no torch) unless told not."""
  script = REPO / "tests" / "train_worker.py" if worker else REPO / "train.py"
  cmd = [sys.executable, str(script), "--workdir", str(workdir), *flags]
  return subprocess.Popen(cmd, cwd=REPO, env=_env(cache, devices, **env), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen, expect_rc: int | None = 0) -> tuple[str, str]:
  out, err = proc.communicate(timeout=TIMEOUT_S)
  if expect_rc is not None:
    assert proc.returncode == expect_rc, f"rc {proc.returncode}\n{out[-2000:]}\n{err[-4000:]}"
  return out, err


def _losses(workdir) -> dict[int, float]:
  """Loss per step from log.jsonl; a step logged twice (a resumed run) keeps its last value."""
  losses = {}
  with open(os.path.join(workdir, "log.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "loss" in record:
        losses[record["step"]] = record["loss"]
  return losses


def _assert_losses_match(got: dict, want: dict, steps, tol: float):
  steps = list(steps)
  assert set(steps) <= set(got), f"steps {sorted(set(steps) - set(got))} were not logged"
  diff = max(abs(got[s] - want[s]) for s in steps)
  assert diff <= tol, (f"max loss difference {diff:.2e} > {tol:.0e} over steps {steps}: "
                       f"got {[got[s] for s in steps]}, want {[want[s] for s in steps]}")


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout_s: float = TIMEOUT_S):
  deadline = time.monotonic() + timeout_s
  while not predicate():
    if proc.poll() is not None:
      out, err = proc.communicate()
      pytest.fail(f"process ended (rc {proc.returncode}) before {what}\n{out}\n{err[-3000:]}")
    if time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f"timed out waiting for {what}")
    time.sleep(0.05)


def _copy_run(src, dst, steps=()):
  """A fresh workdir holding src's tokenizer and the given checkpoint steps (no log)."""
  os.makedirs(os.path.join(dst, "checkpoints"))
  shutil.copytree(os.path.join(src, "tokenizer"), os.path.join(dst, "tokenizer"))
  for step in steps:
    shutil.copytree(os.path.join(src, "checkpoints", str(step)),
                    os.path.join(dst, "checkpoints", str(step)))


def _example_batch(rows: int, seq_len: int = 32, vocab: int = 97, seed: int = 0):
  """A batch of random examples packed two per row, and the examples as (prompt, target)."""
  rng = np.random.default_rng(seed)
  examples = [(rng.integers(3, vocab, rng.integers(4, 9)).tolist(),
               rng.integers(3, vocab, rng.integers(3, 7)).tolist()) for _ in range(2 * rows)]
  packed = [batching.pack_row(examples[2 * r:2 * r + 2], seq_len) for r in range(rows)]
  batch = {k: jnp.asarray(np.stack([row[k] for row in packed])) for k in packed[0]}
  return batch, examples


def _tiny_model_config(**overrides):
  c = tiny.get_config()
  for k, v in overrides.items():
    setattr(c.model, k, v)
  return config_schema.model_config(c, vocab_size=97)


@functools.cache
def _params_and_graphdef(**overrides):
  model = Decoder(_tiny_model_config(**overrides), rngs=nnx.Rngs(0))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.graphdef(model)


# ----------------------------------------------------------------------------------------------
# The step, in process.

def test_paper_mode_loss_is_response_cross_entropy_with_prompt_at_full_depth():
  params, graphdef = _params_and_graphdef()
  batch, examples = _example_batch(rows=3)
  skip = plan_layers(4, 2).skipped
  assert skip, "ratio 2 must skip layers of the 4-layer model"

  # The same examples unpacked, one per row: model(tokens, skip, full_depth_BT=prompt mask), and
  # the cross-entropy of each response token (and eos) given everything before it.
  width = max(len(p) + len(t) for p, t in examples)
  tokens = np.zeros((len(examples), width), np.int32)
  full_depth = np.zeros((len(examples), width), bool)
  for row, (prompt, target) in enumerate(examples):
    tokens[row, :len(prompt) + len(target)] = prompt + target
    full_depth[row, :len(prompt)] = True
  forward = jax.jit(lambda p, x, f: nnx.merge(graphdef, p)(x, skip=skip, full_depth_BT=f))
  logp = np.asarray(jax.nn.log_softmax(forward(params, tokens, full_depth)))
  want_sum = -sum(logp[row, t, tokens[row, t + 1]]
                  for row, (prompt, target) in enumerate(examples)
                  for t in range(len(prompt) - 1, len(prompt) + len(target) - 1))
  want_count = sum(len(t) for _, t in examples)

  sums_and_grads = jax.jit(jax.value_and_grad(train_lib.loss_sums, has_aux=True),
                           static_argnums=(1, 3, 4))
  (paper_sum, count), paper_grads = sums_and_grads(params, graphdef, batch, skip, True)
  assert int(count) == want_count
  np.testing.assert_allclose(float(paper_sum), want_sum, **tolerance.close(rtol=1e-5))

  (everywhere_sum, _), everywhere_grads = sums_and_grads(params, graphdef, batch, skip, False)
  assert abs(float(everywhere_sum) - float(paper_sum)) > 1e-3 * want_count

  for i in skip:
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(paper_grads["layers"][i])), (
        f"skipped layer {i} gets no gradient in paper mode, though the prompt runs it")
    assert all(float(jnp.abs(g).max()) == 0
               for g in jax.tree.leaves(everywhere_grads["layers"][i]))
  kept = [i for i in range(4) if i not in skip]
  assert all(float(jnp.abs(g).max()) > 0 for i in kept
             for g in jax.tree.leaves(everywhere_grads["layers"][i]))


def _run_train_steps(params, graphdef, batch, optimizer, *, accum_steps=1, num_steps=3):
  """num_steps jitted updates of the module-level train_step on one batch: params, metrics."""
  step_fn = jax.jit(functools.partial(train_lib.train_step, graphdef=graphdef, optimizer=optimizer,
                                      paper=True, accum_steps=accum_steps), static_argnums=2)
  state = dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))
  for _ in range(num_steps):
    state, metrics = step_fn(state, batch, plan_layers(4, 2).skipped)
  return state["params"], {k: float(v) for k, v in metrics.items()}


def _leaf(tree, path):
  return functools.reduce(lambda t, k: t[k.key], path, tree)


def test_gradient_accumulation_gives_the_same_update():
  """Two micro-batches of 2 rows update the params as one batch of 4 rows does.

  One plain SGD step, because its update is the accumulated gradient itself. Through Adam a 1e-6
  comparison means nothing: it divides by sqrt(v) + 1e-8, so a gradient that cancels to rounding
  noise (~1e-9, its sign set by summation order) becomes an update of up to ~0.1 lr either way
  (measured: embedding rows 1.4e-5 apart after 3 AdamW steps at lr 1e-2). Several SGD steps
  compound rounding the same way (3e-7 apart after 1 step at lr 1, 3e-6 after 2).
  """
  params, graphdef = _params_and_graphdef()
  batch, _ = _example_batch(rows=4)
  one, metrics_one = _run_train_steps(params, graphdef, batch, optax.sgd(0.5), num_steps=1)
  two, metrics_two = _run_train_steps(params, graphdef, batch, optax.sgd(0.5), accum_steps=2,
                                      num_steps=1)
  assert metrics_two["tokens"] == metrics_one["tokens"] == float(batch["loss_mask"].sum())
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(metrics_two[key], metrics_one[key], err_msg=key,
                               **tolerance.close(rtol=1e-6))
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one),
                                                          jax.tree.leaves(params)))
  assert moved > 1e-2, "the update did not move the parameters: the comparison is vacuous"
  for path, a in jax.tree_util.tree_leaves_with_path(one):
    np.testing.assert_allclose(np.asarray(_leaf(two, path)), np.asarray(a), **tolerance.close(1e-6),
                               err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------------------------
# The Trainer in process: one compile per ratio, frozen embeddings.

@pytest.fixture(scope="module")
def multi_ratio_run(tmp_path_factory):
  """9 Trainer steps of the tiny config, a ratio drawn from (1, 2) each, embeddings frozen."""
  cfg = tiny.get_config()
  cfg.skip.ratios = (1.0, 2.0)
  # Two plans show both halves (a new plan compiles, a drawn-again one does not) at two
  # compiles, the most expensive part of this test.
  cfg.skip.strategy = "top"
  cfg.optim.freeze_embeddings = True
  trainer = train_lib.Trainer(cfg, str(tmp_path_factory.mktemp("multi_ratio")))
  ratio_of = {plan_layers(4, r, "top").skipped: r for r in cfg.skip.ratios}
  assert len(ratio_of) == 2, "the ratios' skip plans must differ for this test to mean anything"
  state = trainer.init_state()
  initial = jax.device_get(state["params"])  # a copy: the step donates the state
  steps = []  # (ratio, executables built by this step)
  for step in range(9):
    ratio = ratio_of[train_lib.skip_for_step(cfg, 4, step)]
    compiles_before = trainer.num_compiles
    state, _ = trainer.step(state, next(trainer.batcher), step)
    steps.append((ratio, trainer.num_compiles - compiles_before))
  trainer.ckpt.close()
  return dict(steps=steps, num_compiles=trainer.num_compiles, initial=initial,
              final=jax.device_get(state["params"]))


def test_each_ratio_compiles_once(multi_ratio_run):
  steps = multi_ratio_run["steps"]
  drawn = [ratio for ratio, _ in steps]
  for i, (ratio, compiles) in enumerate(steps):
    assert compiles == (ratio not in drawn[:i]), (
        f"step {i} (ratio {ratio}, drawn before: {drawn[:i]}) compiled {compiles} times")
  assert multi_ratio_run["num_compiles"] == len(set(drawn)) == 2, steps
  assert len(drawn) > len(set(drawn)), "no ratio was reused: draw more steps"


def test_frozen_embeddings_stay_and_everything_else_trains(multi_ratio_run):
  initial, final = multi_ratio_run["initial"], multi_ratio_run["final"]
  np.testing.assert_array_equal(final["embed"], initial["embed"])
  for path, new in jax.tree_util.tree_leaves_with_path(final):
    if path[0].key != "embed":
      assert np.abs(new - _leaf(initial, path)).max() > 0, f"{jax.tree_util.keystr(path)} froze"


# ----------------------------------------------------------------------------------------------
# train.py in child processes.

def test_loss_decreases(children):
  children.result("one")
  losses = _losses(children.root / "one")
  assert sorted(losses) == list(range(1, NUM_STEPS + 1))
  first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean(
      [losses[s] for s in range(NUM_STEPS - 2, NUM_STEPS + 1)])
  assert last < first - 0.5, f"loss went from {first:.3f} to {last:.3f} in {NUM_STEPS} steps"


def test_tokens_per_s_counts_every_token_and_response_tokens_apart(children):
  """tokens_per_s: every row's tokens (batch x seq_len) per second, what the step processed;
  response_tokens_per_s: the loss tokens among them (it was the only rate, named tokens/s)."""
  children.result("one")
  cfg = tiny.get_config()
  with open(children.root / "one" / "log.jsonl") as f:
    records = [r for r in map(json.loads, f) if "tokens_per_s" in r]
  assert records
  for r in records:
    assert 0 < r["tokens"] < cfg.batch_size * cfg.data.seq_len, r
    np.testing.assert_allclose(r["response_tokens_per_s"] / r["tokens_per_s"],
                               r["tokens"] / (cfg.batch_size * cfg.data.seq_len), rtol=1e-6)


def test_a_step_a_save_waits_for_keeps_its_time_in_tokens_per_s(children):
  """A save (every 4 steps, and the last) waits for its step: that wait is the step's compute,
  not a pause, so its tokens/s is like the others' (it was taken for a pause: the last step of
  the quick start logged 406,145 tokens/s against about 30). The run's steps are made
  STEP_DELAY_S slower on the device, so that host noise of a few ms cannot hide it."""
  children.result("one")
  with open(children.root / "one" / "log.jsonl") as f:
    rates = {r["step"]: r["tokens_per_s"] for r in map(json.loads, f) if "tokens_per_s" in r}
  saved = [s for s in rates if s % 4 == 0]
  assert saved and rates.keys() >= set(range(2, NUM_STEPS + 1)), sorted(rates)
  typical = float(np.median([rates[s] for s in rates if s not in saved and s > 1]))
  # With the bug a saved step reads tens of times typical (its delay taken for a pause); fixed, 1x.
  at_saves = float(np.median([rates[s] for s in saved]))
  assert at_saves < 3 * typical, (typical, {s: rates[s] for s in saved})


def test_load_for_inference_matches_the_trained_params(children):
  children.result("one")
  workdir = children.root / "one"
  model, tok = ckpt_lib.load_for_inference(str(workdir))
  trained = np.load(children.root / "final_params.npz")
  tokenizer = Tokenizer.load(str(workdir / "tokenizer"))
  model_cfg = config_schema.model_config(tiny.get_config(), tokenizer.vocab_size)
  assert model.cfg == model_cfg
  graphdef, loaded = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
  params = jax.tree_util.tree_map_with_path(
      lambda path, _: jnp.asarray(trained[jax.tree_util.keystr(path)]), loaded)
  assert len(trained.files) == len(jax.tree.leaves(params))

  text = "And God said, Let there be light: and there was light."
  ids = tok.encode(text)
  assert ids == tokenizer.encode(text) and tok.decode(ids) == text
  tokens = jnp.asarray([ids])
  full_depth = jnp.arange(len(ids))[None] < len(ids) // 2  # a prompt, then a response
  skip = plan_layers(model_cfg.num_layers, 2).skipped
  forward = jax.jit(lambda p: nnx.merge(graphdef, p)(tokens, skip=skip, full_depth_BT=full_depth))
  np.testing.assert_array_equal(np.asarray(forward(loaded)), np.asarray(forward(params)))


def test_eight_devices_match_one_device(children):
  children.result("one")
  children.result("eight")
  one, eight = _losses(children.root / "one"), _losses(children.root / "eight")
  assert sorted(one) == sorted(eight) == list(range(1, NUM_STEPS + 1))
  _assert_losses_match(eight, one, range(1, NUM_STEPS + 1), OTHER_MESH_TOL)
  with open(children.root / "shardings.json") as f:
    shardings = json.load(f)
  # The mesh must really split the tiny model: fsdp on its width, tensor on vocab, heads, MLP.
  specs = shardings["params"]
  assert specs["['embed']"] == ["tensor", "fsdp"], specs
  assert specs["['layers'][0]['mlp']['up']"] == ["fsdp", "tensor"], specs
  # Adam's moments are sharded like their parameters, its step count replicated.
  mu = [spec for path, spec in shardings["opt_state"].items() if path.endswith(".mu['embed']")]
  assert mu == [["tensor", "fsdp"]], shardings["opt_state"]


def test_resume_on_another_mesh(children):
  """Step 4 of the (2, 2, 2) run on 8 devices, resumed as (1, 2, 1) on 2, continues it (the
  two-host chain: preempted, then resumed again)."""
  out, _ = children.result("preempted0")
  children.result("host0")
  assert f"steps 4..{NUM_STEPS}" in out, out
  resumed = _losses(children.root / "hosts")
  assert sorted(resumed) == list(range(5, NUM_STEPS + 1))
  _assert_losses_match(resumed, _losses(children.root / "eight"), range(5, NUM_STEPS + 1),
                       OTHER_MESH_TOL)


def test_two_processes_preempted_together_then_match_one(children):
  """Two hosts (jax.distributed on localhost, one mesh over both), one of them sent SIGTERM: both
  save the same step and stop; resumed, they train like one process."""
  hosts = children.root / "hosts"
  for i in range(2):  # both stop cleanly: a host left behind would hang in the collective save
    out, err = children.result(f"preempted{i}")
    rc = children.procs[f"preempted{i}"].returncode
    assert rc == 0, f"rc {rc}\n{out[-2000:]}\n{err[-4000:]}"
  out, _ = children.result("preempted0")  # process 0 logs
  stopped = [int(s) for s in re.findall(r"preempted: saved step (\d+) and stopping", out)]
  assert len(stopped) == 1 and stopped[0] > PREEMPT_AT, out
  out, _ = children.result("host0")
  children.result("host1")
  assert f"steps {stopped[0]}..{NUM_STEPS}" in out, out  # resumed from the step both saved
  assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 1}" in out, out
  children.result("one")
  _assert_losses_match(_losses(hosts), _losses(children.root / "one"), range(5, NUM_STEPS + 1),
                       OTHER_MESH_TOL)
  saved = sorted(int(p) for p in os.listdir(hosts / "checkpoints") if p.isdigit())
  # The multiples of 4 and the step both hosts saved (JAX's preemption service picks it), the
  # latest 3 kept.
  assert saved == sorted({*range(4, NUM_STEPS + 1, 4), stopped[0]})[-3:], (saved, stopped)
  # Each host wrote its half of every parameter: one process reads the whole of them back.
  model, _ = ckpt_lib.load_for_inference(str(hosts))
  trained = np.load(children.root / "final_params.npz")  # the one-process run's
  for path, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param))):
    assert x.shape == trained[jax.tree_util.keystr(path)].shape and np.isfinite(x).all()

  # Each host read its own rows of the global batch: together they are the one-host batch.
  cfg = tiny.get_config()
  pairs = corpora.load_pairs(cfg.data)["train"]
  tok = Tokenizer.load(str(hosts / "tokenizer"))
  make = lambda i, n: batching.Batcher.from_pairs(
      tok, cfg.data.template, pairs, cfg.batch_size // n, cfg.data.seq_len, seed=cfg.seed,
      process_index=i, process_count=n)
  single, per_host = make(0, 1), [make(0, 2), make(1, 2)]
  for _ in range(3):
    want, got = next(single), [next(h) for h in per_host]
    for key in want:
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
    assert not np.array_equal(got[0]["tokens"], got[1]["tokens"])


def test_killed_then_preempted_run_resumes_exactly(children, compile_cache, tmp_path):
  """SIGKILL after the step-4 checkpoint, resume, SIGTERM at step 7, resume: the same losses."""
  ckpt_dir, paused = tmp_path / "checkpoints", tmp_path / "paused"
  saved_steps = lambda: sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())

  killed = _start(compile_cache, tmp_path, *RUN_FLAGS, ULSKIP_TEST_PAUSE_AT=5)
  _wait_for(paused.exists, killed, "the run to pause in its 6th step")
  killed.send_signal(signal.SIGKILL)
  _finish(killed, expect_rc=-signal.SIGKILL)
  assert saved_steps() == [4], saved_steps()
  paused.unlink()

  preempted = _start(compile_cache, tmp_path, *RUN_FLAGS, ULSKIP_TEST_PAUSE_AT=6)
  _wait_for(paused.exists, preempted, "the resumed run to pause in its 7th step")
  preempted.send_signal(signal.SIGTERM)
  out, _ = _finish(preempted, expect_rc=0)
  assert f"steps 4..{NUM_STEPS}" in out, out
  assert "preempted: saved step 7 and stopping" in out, out
  assert saved_steps() == [4, 7], saved_steps()  # 7 is no multiple of checkpoint.every

  out, _ = _finish(_start(compile_cache, tmp_path, *RUN_FLAGS))
  assert f"steps 7..{NUM_STEPS}" in out, out
  children.result("one")
  _assert_losses_match(_losses(tmp_path), _losses(children.root / "one"),
                       range(5, NUM_STEPS + 1), SAME_MESH_TOL)


def test_corrupt_latest_checkpoint_is_one_line_and_resume_step_works(children, compile_cache,
                                                                     tmp_path):
  children.result("one")
  _copy_run(children.root / "one", tmp_path, steps=[16, 20, 24])
  files = [p for p in glob.glob(str(tmp_path / "checkpoints" / "24" / "**"), recursive=True)
           if os.path.isfile(p)]
  largest = max(files, key=os.path.getsize)  # an array's data, not a metadata file
  os.truncate(largest, os.path.getsize(largest) // 2)

  _, err = _finish(_start(compile_cache, tmp_path, *RUN_FLAGS, worker=False), expect_rc=2)
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  assert "step 24" in lines[0] and "--config.checkpoint.resume_step" in lines[0], lines[0]
  assert "earlier steps: [16, 20]" in lines[0], lines[0]

  out, _ = _finish(_start(compile_cache, tmp_path, *RUN_FLAGS,
                          "--config.checkpoint.resume_step=20"))
  assert f"steps 20..{NUM_STEPS}" in out, out
  resumed = _losses(tmp_path)
  assert sorted(resumed) == list(range(21, NUM_STEPS + 1))
  _assert_losses_match(resumed, _losses(children.root / "one"), range(21, NUM_STEPS + 1),
                       SAME_MESH_TOL)


def test_bad_config_key_and_offline_hub_dataset_fail_in_one_line(compile_cache, tmp_path):
  start = time.monotonic()
  bogus = _start(compile_cache, tmp_path / "bogus", "--config", "configs/tiny.py",
                 "--config.bogus=1", worker=False)
  hub = _start(compile_cache, tmp_path / "hub", "--config", "configs/tiny.py",
               "--config.data.source=hf", "--config.data.hf_name=wmt14",
               "--config.data.hf_config=de-en", worker=False)
  for proc, words in ((bogus, ("bogus", "configs/base.py")),
                      (hub, ("wmt14", "configs/bible_2x.py"))):
    out, err = _finish(proc, expect_rc=2)
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 1 and all(w in lines[0] for w in words), out + err
  assert time.monotonic() - start < 30, "failing on a config should take seconds"


# ----------------------------------------------------------------------------------------------
# Every config loads and builds its model at a tiny size.

CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "__init__")
TINY_MODEL = dict(num_layers=4, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64)
# config.json of a tiny BLOOM: what an `init_from` folder contributes to the model config.
TINY_BLOOM = dict(model_type="bloom", architectures=["BloomForCausalLM"], vocab_size=97,
                  hidden_size=32, n_layer=4, n_head=4, layer_norm_epsilon=1e-5,
                  bos_token_id=1, eos_token_id=2, pad_token_id=3)


def _load_config(name):
  spec = importlib.util.spec_from_file_location(f"configs.{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _run_configs(name, cfg) -> list:
  """The train.py run configs of a config file: itself, or those a benchmark's config nests."""
  is_run = lambda c: isinstance(c, ml_collections.ConfigDict) and "model" in c and "skip" in c
  if is_run(cfg):
    return [cfg]
  nested = [v for v in cfg.values() if is_run(v)]
  assert nested, f"configs/{name}.py holds no run config (model, skip, ...), nor nests one"
  return nested


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_at_tiny_size(name, tmp_path):
  for i, cfg in enumerate(_run_configs(name, _load_config(name))):
    _check_run_config(name, cfg, tmp_path / str(i))


def _check_run_config(name, cfg, workdir):
  assert cfg.skip.mode in ("paper", "everywhere") and cfg.num_steps > 0
  batching.check_template(cfg.data.template)
  if cfg.skip.strategy == "calibrated":  # its plan file has a plan for each ratio it runs
    assert cfg.skip.plan_file, f"{name}: a shipped calibrated config names its plan file"
    layer_scores = skipping.read_plan(cfg.skip.plan_file)
    for ratio in tuple(cfg.skip.ratios) + (cfg.skip.ratio,) + tuple(cfg.eval_ratios):
      assert layer_scores.plan(ratio).num_layers == layer_scores.num_layers
    cfg.skip.strategy, cfg.skip.plan_file = "uls", ""  # the tiny model below has 4 layers
  for ratio in tuple(cfg.skip.ratios) or (cfg.skip.ratio,):  # each ratio fits the model's depth
    plan_layers(cfg.model.num_layers, ratio, cfg.skip.strategy, seed=cfg.seed)
  if cfg.model.init_from:  # only the packaged model may be named: nothing else exists offline
    if cfg.model.init_from.lower() not in gguf_io.SMOLLM2_ALIASES:
      pytest.fail(f"{name} hard-codes model.init_from={cfg.model.init_from!r}; it must come "
                  "from the command line, or be the packaged model")
    cfg.model.init_from = ""  # at tiny size, from scratch: the config's other fields are checked
    if cfg.data.chat:  # a BPE trained here has no chat template; the chat tests cover that path
      cfg.data.chat = False
  for k, v in TINY_MODEL.items():
    setattr(cfg.model, k, v)
  cfg.data.max_examples, cfg.batch_size, cfg.optim.accum_steps = 40, 4, 1
  cfg.data.vocab_size, cfg.data.seq_len = 300, min(cfg.data.seq_len, 128)
  cfg.mesh.shape = (-1, 1, 1)

  if cfg.data.source != "bible":  # hub / TFDS data: no network here, check the models only
    # From scratch (the run config's fields), and from an init_from folder (its config.json).
    for model_cfg in (config_schema.model_config(cfg, vocab_size=97),
                      hf.config_from_hf(TINY_BLOOM)):
      nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0)))
    train_lib.make_optimizer(cfg.optim, cfg.num_steps)
    return
  trainer = train_lib.Trainer(cfg, str(workdir))
  assert trainer.model_cfg.num_layers == 4 and trainer.model_cfg.d_model == 32
  batch = next(trainer.batcher)
  assert batch["tokens"].shape == (4, cfg.data.seq_len)
  trainer.ckpt.close()
