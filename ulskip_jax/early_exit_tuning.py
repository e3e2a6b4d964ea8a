"""Early exit's confidence threshold for a target ratio: searched on prompts by decoding, since
the ratio a threshold reaches depends on the model, the data and the batch size."""

from __future__ import annotations

import math

from ulskip_jax import engine
from ulskip_jax.baseline_decode import early_exit_generate
from ulskip_jax.model import Decoder


def tune_threshold(model: Decoder, prompts, target_ratio: float, *, batch_size: int,
                   exit_every: int = 2, iterations: int = 8, **kw) -> tuple[float, float]:
  """Search the confidence threshold until early exit's measured ratio on `prompts` (at this
  batch size: the batch-wide decision depends on it) is closest to `target_ratio`.

  Returns (threshold, ratio reached). The ratio falls as the threshold rises; if even threshold
  0 (always the first exit point) stays below the target, that is what is returned.
  """
  L = model.cfg.num_layers

  def ratio(threshold):
    run = lambda chunk: early_exit_generate(model, chunk, threshold=threshold,
                                            exit_every=exit_every, **kw)
    return engine.in_chunks(run, prompts, batch_size, by_length=True)[1].ratio(L)

  best = (0.0, ratio(0.0))
  if best[1] <= target_ratio:
    return best
  # A top-1 probability lies in [1/V, 1]; a weak model's sit near 1/V, where a bisection on a
  # linear scale has no resolution (6 steps on [0, 1] jumped from 1.8x to 5.2x on a 12-layer model).
  return _log_bisect(ratio, target_ratio, 1.0 / model.cfg.vocab_size, 1.0, iterations, best)


def _log_bisect(ratio, target, lo, hi, iterations, best):
  """Geometric bisection of a decreasing ratio(threshold) on [lo, hi]; the closest (in log
  ratio) of `best` and every point tried."""
  for _ in range(iterations):
    mid = math.sqrt(lo * hi)
    r = ratio(mid)
    if abs(math.log(r / target)) < abs(math.log(best[1] / target)):
      best = (mid, r)
    lo, hi = (mid, hi) if r >= target else (lo, mid)
  return best
