"""What a training run holds in memory, from shapes alone: parameters, one gradient and the
optimizer state of the trainable part, a distillation teacher; and the startup line reporting it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def tree_bytes(tree) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def memory_bytes(abstract_params, optimizer: optax.GradientTransformation, split_params,
                 teacher_params=None) -> dict:
  """Bytes of the parameters, one gradient and the optimizer state of a run, from shapes only;
  with a distillation teacher kept beside them, its parameters too.

  Gradients and optimizer state cover the trainable part (`split_params(params)[0]`). Global
  sizes: a sharded run holds its share on each device. Gradient accumulation adds one more
  gradient-sized buffer; activations are not counted.
  """
  trainable, _ = split_params(abstract_params)
  out = dict(params=tree_bytes(abstract_params), grads=tree_bytes(trainable),
             opt_state=tree_bytes(jax.eval_shape(optimizer.init, trainable)))
  if teacher_params is not None:
    out["teacher"] = tree_bytes(teacher_params)
  return out


def peak_bytes(device=None) -> int | None:
  """The backend's peak bytes in use on `device` (default the first local one); None where the
  backend does not say (CPU)."""
  stats = (device or jax.local_devices()[0]).memory_stats()
  return (stats or {}).get("peak_bytes_in_use")


def format_bytes(n: int | None) -> str:
  if n is None:
    return "n/a"
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024


def memory_line(memory: dict, peak: int | None) -> str:
  teacher = f", teacher {format_bytes(memory['teacher'])}" if "teacher" in memory else ""
  return (f"memory (from shapes): params {format_bytes(memory['params'])}, grads "
          f"{format_bytes(memory['grads'])}, optimizer state {format_bytes(memory['opt_state'])}{teacher}; "
          f"peak in use {format_bytes(peak)}")
