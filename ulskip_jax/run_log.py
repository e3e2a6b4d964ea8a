"""A training run's log: JSONL and TensorBoard scalars and text lines on the lead process, and the
progress bar's pauses (checkpoints, evaluations) kept out of its rates."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time


@contextlib.contextmanager
def paused(bar, t0: list, what: str = ""):
  """Leaves the block's time (an evaluation, a checkpoint) out of the bar's rate and ETA and of
  the next tokens/s; `what` shows on the bar meanwhile."""
  start = time.perf_counter()
  if what and not bar.disable:
    bar.set_description_str(what)
  try:
    yield
  finally:
    paused = time.perf_counter() - start
    t0[0] += paused
    if not bar.disable:
      bar.start_t += paused
      bar.last_print_t += paused
      if what:
        bar.set_description_str("")


class RunLog:
  """JSONL + TensorBoard on the lead process. A run resumed at `start_step` first drops what a
  killed or preempted run logged after that step (it is about to be logged again)."""

  def __init__(self, workdir: str, enabled: bool, start_step: int = 0):
    self.enabled = enabled
    if enabled:
      from tensorboardX import SummaryWriter
      path = os.path.join(workdir, "log.jsonl")
      truncate_log(path, start_step)
      self.jsonl = open(path, "a")
      self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start_step + 1)

  def scalars(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    self.jsonl.write(json.dumps(dict(step=step, time=time.time(), **metrics)) + "\n")
    self.jsonl.flush()
    for k, v in metrics.items():
      if k != "step":
        self.tb.add_scalar(k, v, step)

  def text(self, msg: str) -> None:
    if self.enabled:
      from tqdm import tqdm
      tqdm.write(msg, file=sys.stdout)  # clears the bar first: never glued onto its line
      sys.stdout.flush()

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      self.tb.close()


def truncate_log(path: str, last_step: int) -> None:
  """Keeps the records of steps <= last_step (and drops a line a kill cut short)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= last_step:
        keep.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # the last line of a killed run, cut short
  if len(keep) != len(lines):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)
