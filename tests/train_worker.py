"""Runs train.py unchanged in a child process for tests/test_train.py, with test hooks.

  python tests/train_worker.py --config configs/tiny.py --workdir DIR [--config.x=y ...]

torch is kept out of tensorboardX: torch is only a test dependency (the parity reference), but
tensorboardX imports it whenever it is installed, which costs each child ~1.5 s of a ~5 s run.

Environment:
  ULSKIP_TEST_PAUSE_AT=STEP       once step STEP (0-based) is dispatched, write <workdir>/paused
                                  and wait there (up to 5 min) for SIGTERM or SIGINT, so that a
                                  test can kill, preempt or interrupt the run at a known step
                                  however slow it runs;
                                  with several processes, write paused<process index> and wait
                                  for <workdir>/go instead (JAX's preemption service, not a Python
                                  handler, receives SIGTERM there)
  ULSKIP_TEST_SHARDINGS=PATH      write {param path: PartitionSpec as a list} as JSON once the
                                  state is initialised, to check that params are really sharded
  ULSKIP_TEST_FINAL_PARAMS=PATH   write the last step's params as .npz (keys: their key paths),
                                  to compare with what the checkpoint gives back
  ULSKIP_TEST_STEP_DELAY_S=S      each step's state and metrics become ready S seconds later
                                  (a host callback that sleeps, values unchanged): a tiny
                                  model's step with a large model's compute time
"""

import json
import os
import pathlib
import runpy
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.modules["torch"] = None  # `import torch` raises ImportError, as where it is not installed
import tensorboardX  # noqa: E402,F401  (its writer imports torch whenever it can)
del sys.modules["torch"]  # others (datasets) must see torch as not imported, not as broken

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ulskip_jax import checkpoint as ckpt_lib  # noqa: E402
from ulskip_jax import train_lib  # noqa: E402

PAUSE_LIMIT_S = 300


def _patch_trainer():
  pause_at = int(os.environ.get("ULSKIP_TEST_PAUSE_AT", "-1"))
  shardings_path = os.environ.get("ULSKIP_TEST_SHARDINGS")
  params_path = os.environ.get("ULSKIP_TEST_FINAL_PARAMS")
  delay_s = float(os.environ.get("ULSKIP_TEST_STEP_DELAY_S", "0"))
  trainer = train_lib.Trainer
  original_step, original_init_state, original_save = trainer.step, trainer.init_state, trainer.save

  @jax.jit
  def delayed(out):
    sleep = lambda loss: (time.sleep(delay_s), np.zeros((), np.float32))[1]
    zero = jax.pure_callback(sleep, jax.ShapeDtypeStruct((), jnp.float32), out[1]["loss"])
    return jax.tree.map(lambda x: x + zero.astype(x.dtype), out)  # x + 0: the same values

  if delay_s:
    trainer.step = lambda self, *args, step=original_step: delayed(step(self, *args))
    original_step = trainer.step

  guard = ckpt_lib.PreemptionGuard
  original_on_sigterm, original_on_sigint = guard._on_sigterm, guard._on_sigint
  sigterm = []  # SIGTERM or SIGINT, whichever ends the pause

  def on_sigterm(self, signum, frame):
    sigterm.append(signum)
    original_on_sigterm(self, signum, frame)

  def on_sigint(self, signum, frame):
    sigterm.append(signum)
    original_on_sigint(self, signum, frame)

  def pausing_step(self, state, local_batch, step):
    out = original_step(self, state, local_batch, step)
    if step == pause_at:
      multihost = jax.process_count() > 1
      name = f"paused{jax.process_index()}" if multihost else "paused"
      with open(os.path.join(self.workdir, name), "w") as f:
        f.write(str(step))
      go = os.path.join(self.workdir, "go")
      deadline = time.monotonic() + PAUSE_LIMIT_S
      while not (sigterm or multihost and os.path.exists(go)) and time.monotonic() < deadline:
        time.sleep(0.02)  # the SIGTERM handler runs between these sleeps
    return out

  def recording_init_state(self):
    state = original_init_state(self)
    specs = lambda tree: {jax.tree_util.keystr(path): [list(a) if isinstance(a, tuple) else a
                                                       for a in x.sharding.spec]
                          for path, x in jax.tree_util.tree_leaves_with_path(tree)}
    with open(shardings_path, "w") as f:
      json.dump(dict(params=specs(state["params"]), opt_state=specs(state["opt_state"])), f)
    return state

  def dumping_save(self, state, step, force=False):
    if step == self.config.num_steps:
      np.savez(params_path, **{jax.tree_util.keystr(path): np.asarray(x) for path, x in
                               jax.tree_util.tree_leaves_with_path(state["params"])})
    return original_save(self, state, step, force=force)

  if pause_at >= 0:
    trainer.step = pausing_step
    guard._on_sigterm = on_sigterm
    guard._on_sigint = on_sigint
  if shardings_path:
    trainer.init_state = recording_init_state
  if params_path:
    trainer.save = dumping_save


if __name__ == "__main__":
  _patch_trainer()
  sys.argv[0] = str(REPO / "train.py")
  runpy.run_path(str(REPO / "train.py"), run_name="__main__")
