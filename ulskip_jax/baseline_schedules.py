"""Which layers the dynamic-depth baselines run: early exit's exit points and SkipDecode's depth
schedule (monotone, so that its cache never has a hole: `baseline_decode.py` says why). Training
(`baseline_losses.py`) and decoding (`baseline_decode.py`) both read them."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


def exit_layers(num_layers: int, exit_every: int) -> tuple[int, ...]:
  """Layer indices after which a token may exit (the last layer is not an exit point: a token
  that reaches it is done anyway)."""
  if not 1 <= exit_every < num_layers:
    raise ValueError(f"exit_every={exit_every} is out of range: allowed is 1 <= exit_every < "
                     f"num_layers={num_layers}")
  return tuple(range(exit_every - 1, num_layers - 1, exit_every))


@dataclasses.dataclass(frozen=True)
class SkipDecodeSchedule:
  """Decode step s runs the top depths[b] layers, b the last level with starts[b] <= s.

  depths strictly decrease and starts strictly increase from 0, so the skipped set only grows.
  Hashable: it is a static argument of the executable and of the training step.
  """
  num_layers: int
  starts: tuple[int, ...]
  depths: tuple[int, ...]

  def __post_init__(self):
    if not self.starts or self.starts[0] != 0 or len(self.starts) != len(self.depths):
      raise ValueError(f"starts={self.starts} must begin at 0 and match depths={self.depths}")
    if any(b <= a for a, b in zip(self.starts, self.starts[1:])):
      raise ValueError(f"starts={self.starts} must strictly increase")
    if any(b >= a for a, b in zip(self.depths, self.depths[1:])):
      raise ValueError(f"depths={self.depths} must strictly decrease (monotone schedule)")
    if not 1 <= self.depths[-1] <= self.depths[0] <= self.num_layers:
      raise ValueError(f"depths={self.depths} must lie in [1, num_layers={self.num_layers}]")

  def level(self, step):
    """Level index of decode step(s) `step` (int or array; negative = the prompt, level 0)."""
    return jnp.maximum(jnp.searchsorted(jnp.asarray(self.starts), step, side="right") - 1, 0)

  def depth(self, step):
    return jnp.asarray(self.depths)[self.level(step)]

  def skip(self, level: int) -> tuple[int, ...]:
    """The static skip tuple of a level: the lowest L - depth layers."""
    return tuple(range(self.num_layers - self.depths[level]))

  def mean_depth(self, num_steps: int) -> float:
    return float(np.mean([self.depths[int(self.level(s))] for s in range(num_steps)]))


def skipdecode_schedule(num_layers: int, ratio: float, horizon: int,
                        num_levels: int = 4) -> SkipDecodeSchedule:
  """A linear-decay schedule whose mean depth over the first `horizon` steps is L / ratio.

  Depths are `num_levels` values spread evenly from 1.5 m down to 0.5 m (m = L / ratio, clipped
  to [1, L], rounded, deduplicated), the shape of SkipDecode's linear decay quantised to a few
  static branches. Levels start with equal lengths; the first and last then trade steps until the
  mean over `horizon` steps is m (to a step). Past the horizon the last level continues, so a
  longer generation reaches a higher average ratio and a shorter one a lower: report the ratio
  measured on the data, not this nominal one.
  """
  L, m = num_layers, num_layers / ratio
  if not 1 <= m <= L:
    raise ValueError(f"ratio={ratio} is out of range: allowed is 1 <= ratio <= {L}")
  if horizon < num_levels:
    raise ValueError(f"horizon={horizon} is shorter than num_levels={num_levels}")
  hi, lo = min(L, round(1.5 * m)), max(1, round(0.5 * m))
  depths = sorted({round(hi - (hi - lo) * i / max(num_levels - 1, 1)) for i in range(num_levels)},
                  reverse=True)
  if len(depths) == 1:
    return SkipDecodeSchedule(L, (0,), tuple(depths))
  frac = np.full(len(depths), 1.0 / len(depths))
  shift = (np.dot(frac, depths) - m) / (depths[0] - depths[-1])
  frac[0] -= shift
  frac[-1] += shift
  frac = np.clip(frac, 1.0 / horizon, None)
  lengths = np.maximum(1, np.round(frac / frac.sum() * horizon)).astype(int)
  starts = tuple(int(s) for s in np.concatenate([[0], np.cumsum(lengths)[:-1]]))
  return SkipDecodeSchedule(L, starts, tuple(depths))
