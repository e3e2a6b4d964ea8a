"""Runs train.py unchanged in a child process for tests/test_train.py, with test hooks.

  python tests/train_worker.py --config configs/tiny.py --workdir DIR [--config.x=y ...]

torch is kept out of tensorboardX: torch is only a test dependency (the parity reference), but
tensorboardX imports it whenever it is installed, which costs each child ~1.5 s of a ~5 s run.

Environment:
  ULSKIP_TEST_STEP_SLEEP=SECONDS  sleep after dispatching each step, so that a test can kill or
                                  preempt the run between two checkpoints (tiny steps take ~10 ms)
  ULSKIP_TEST_SHARDINGS=PATH      write {param path: PartitionSpec as a list} as JSON once the
                                  state is initialised, to check that params are really sharded
  ULSKIP_TEST_FINAL_PARAMS=PATH   write the last step's params as .npz (keys: their key paths),
                                  to compare with what the checkpoint gives back
"""

import json
import os
import pathlib
import runpy
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.modules["torch"] = None  # `import torch` raises ImportError, as where it is not installed
import tensorboardX  # noqa: E402,F401  (its writer imports torch whenever it can)
del sys.modules["torch"]  # others (datasets) must see torch as not imported, not as broken

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ulskip_jax import train_lib  # noqa: E402


def _patch_trainer():
  sleep_s = float(os.environ.get("ULSKIP_TEST_STEP_SLEEP", "0"))
  shardings_path = os.environ.get("ULSKIP_TEST_SHARDINGS")
  params_path = os.environ.get("ULSKIP_TEST_FINAL_PARAMS")
  trainer = train_lib.Trainer
  original_step, original_init_state, original_save = trainer.step, trainer.init_state, trainer.save

  def slow_step(self, *args, **kwargs):
    out = original_step(self, *args, **kwargs)
    time.sleep(sleep_s)
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

  if sleep_s:
    trainer.step = slow_step
  if shardings_path:
    trainer.init_state = recording_init_state
  if params_path:
    trainer.save = dumping_save


if __name__ == "__main__":
  _patch_trainer()
  sys.argv[0] = str(REPO / "train.py")
  runpy.run_path(str(REPO / "train.py"), run_name="__main__")
