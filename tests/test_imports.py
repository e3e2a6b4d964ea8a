"""Inference does not import training: `infer.py` decoding from a training workdir (which imports
the whole Python API, `import ulskip_jax`, on the way) loads neither the trainer (`train_lib`, its
logger) nor the training loss, checked on the import graph of a fresh interpreter
(`python -X importtime`).

optax is the exception we cannot remove: `flax.nnx` imports it itself (for `nnx.Optimizer`), so the
check is that optax comes in through flax and through nothing of ours.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

from flax import nnx

from ulskip_jax import checkpoint as ckpt_lib
from ulskip_jax import testing

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAINING = ("ulskip_jax.train_lib", "ulskip_jax.loss", "tensorboardX")


def _imports(*argv) -> list[tuple[int, str]]:
  """(depth, module) of every import of `python -X importtime *argv`, in the order printed:
  a module's imports come before it, one level deeper."""
  proc = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=REPO, text=True,
                        capture_output=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = []
  for line in proc.stderr.splitlines():
    if line.startswith("import time:") and "|" in line and not line.endswith("| imported package"):
      name = line.rsplit("|", 1)[1]
      rows.append((len(name) - len(name.lstrip()), name.strip()))
  assert rows, proc.stderr[-2000:]
  return rows


def _importer(rows, module: str) -> str | None:
  """The module whose import first pulled `module` in (None if it was never imported)."""
  for i, (depth, name) in enumerate(rows):
    if name == module:
      return next((n for d, n in rows[i + 1:] if d < depth), "<top level>")
  return None


def _assert_no_training(rows):
  names = {name for _, name in rows}
  assert not names & set(TRAINING), sorted(names & set(TRAINING))
  importer = _importer(rows, "optax")
  assert importer is None or importer.startswith("flax."), f"optax imported by {importer}"


def _tiny_workdir(path: pathlib.Path) -> pathlib.Path:
  """A training workdir as the trainer writes it (params, meta, tokenizer), without training."""
  model = testing.tiny_model(seed=1)
  testing.save_tiny_tokenizer(path / "tokenizer")
  meta = dict(model_config=dataclasses.asdict(model.cfg),
              config=dict(data=dict(chat=False, template="{source}")))
  with ckpt_lib.Checkpointer(path / "run" / "checkpoints", async_=False,
                             tokenizer_dir=str(path / "tokenizer")) as ckpt:
    ckpt.save(1, nnx.to_pure_dict(nnx.state(model, nnx.Param)), meta=meta)
  return path / "run"


def test_infer_on_a_workdir_imports_no_training(tmp_path):
  workdir = _tiny_workdir(tmp_path)
  (tmp_path / "in.txt").write_text("w4 w5\nw6\n")
  rows = _imports("infer.py", "--checkpoint", str(workdir), "--input", str(tmp_path / "in.txt"),
                  "--output", str(tmp_path / "out.txt"), "--ratio", "1,2", "--max-new-tokens", "3",
                  "--no-progress")
  assert len((tmp_path / "out.r2.txt").read_text().splitlines()) == 2  # it did decode
  assert "ulskip_jax.checkpoint" in {name for _, name in rows}
  _assert_no_training(rows)
