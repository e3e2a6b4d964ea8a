"""Skip plans: which layers a decoder runs at a target speedup ratio.

A plan depends only on (num_layers, ratio, strategy), never on the input, so every row of a batch
runs the same layers: batching and the KV cache work unchanged, and `plan.skipped` is a hashable
tuple that can be a static jit argument (one compiled graph per distinct plan).

The ULS rule (Liu, Meng and Zhou, 2024): keep n = int(L / r) layers, always the first and the last,
and spread the rest evenly. We place kept layer i (i = 0 .. n-1) at

    kept[i] = floor(i * (L - 1) / (n - 1) + 1/2)

i.e. the nearest integer to an exact even spacing (halves round up). Consecutive gaps are then
floor((L-1)/(n-1)) or ceil((L-1)/(n-1)): the largest and smallest gap differ by at most one.

For L = 30:

    r=2  (n=15): 0 2 4 6 8 10 12 15 17 19 21 23 25 27 29
    r=3  (n=10): 0 3 6 10 13 16 19 23 26 29
    r=5  (n=6):  0 6 12 17 23 29
    r=10 (n=3):  0 15 29

The authors' code instead keeps every s-th layer from 0, s = round((L-1)/(n-1)), and then the last
layer: [0, 2, ..., 26, 29] at 2x and [0, 6, 12, 18, 24, 29] at 5x. That rule is `"uls_reference"`;
it is inferred from those two published plans (it reproduces both). Its gaps are equal except the
last one (3 at 2x, 5 at 5x), and for some (L, r) with n close to L it would run past the last
layer, in which case it raises.

`keep` fixes layers every plan keeps (Gemma's global layers, say): with the first and the last
they split the stack into gaps, each free slot goes to the gap whose sub-gaps would be the longest
(the D'Hondt rule: largest length / (slots + 1), the earlier gap on ties), and a gap's slots are
spread evenly inside it by the formula above, so keep=() gives the plain ULS plan.

Models that mix sliding-window and global layers (Gemma 2 and 3; `windows` =
ModelConfig.attention_windows) keep their global layers by default: they are the only layers that
read beyond the window, and plain ULS drops them wholesale (Gemma 3 1B, globals 5 11 17 23 of 26:
two kept at 2x, one at 3x, none at 5x), so every response token past the window would lose the
prompt's start. When they do not all fit beside the first and last, an even spread of them does.

A calibrated plan ("calibrated") is chosen from data instead of a formula: `calibrate.py` scores
each layer on calibration text (lower = skipped first) and the plan skips the L - n lowest-scored
layers. The scores, their method and the calibration data's hash live in a readable `plan.json`
(`LayerScores`, `read_plan` / `write_plan`); a training run keeps it in its workdir, and training,
evaluation and infer.py take every plan from it, so nothing re-plans a calibrated run from the
ratio. Scores are nested by construction (the plan at 3x skips the 2x plan's layers and more), so
one file serves every ratio it reaches.

A plan's `unit` says what a skipped index removes: the whole layer ("layer"), only its MLP block
("mlp": every layer keeps its attention, so the KV cache stays whole) or only its attention
("attention": the KV cache holds the layers whose attention runs). The same strategies choose the
indices (ULS's even spread, calibrated scores, ...); only how many follows the unit: a sublayer
plan's ratio is the weight bytes a generated token reads at full depth over those it reads with
the plan (`LayerBytes`: the sublayers that run plus the unembedding), so "2x" costs the same
whatever the unit, and a ratio no number of skipped sublayers reaches is refused. Unit "sublayer"
skips attention and MLP blocks chosen separately (AdaSkip's idea): only calibration can choose
them, scoring every block of both kinds (2L scores, the attention blocks' first), and a plan skips
the lowest-scored blocks until it reaches its byte ratio.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import random as _random
from collections.abc import Sequence
from typing import Literal, get_args

from ulskip_jax.checks import as_float, as_int

STRATEGIES = ("uls", "uls_reference", "top", "bottom", "middle", "every_other", "random",
              "calibrated")
PLAN_FILE = "plan.json"  # a calibrated run's plan, in its workdir
CALIBRATION_METHODS = ("kl_greedy", "block_influence")  # how calibrate.py scores layers
Unit = Literal["layer", "mlp", "attention", "sublayer"]  # what a skipped index removes
UNITS = get_args(Unit)


@dataclasses.dataclass(frozen=True)
class LayerBytes:
  """Weight bytes a generated token reads: one layer's attention (its norm, projections and
  biases), one layer's MLP (likewise), and what every plan reads (the unembedding and the final
  norm). `model.layer_bytes(cfg)` measures them from the parameter shapes."""
  attention: int
  mlp: int
  fixed: int

  def read(self, plan: SkipPlan) -> int:
    """Bytes per generated token with `plan`."""
    return self.read_blocks(len(plan.attention_layers), len(plan.mlp_layers))

  def read_blocks(self, attention: int, mlp: int) -> int:
    """Bytes per generated token with that many attention and MLP blocks running."""
    return self.fixed + self.attention * int(attention) + self.mlp * int(mlp)

  def ratio(self, plan: SkipPlan) -> float:
    """Full depth's bytes per token over `plan`'s: the plan's byte ratio."""
    return self.read(SkipPlan.full(plan.num_layers)) / self.read(plan)


@dataclasses.dataclass(frozen=True)
class SkipPlan:
  """Kept and skipped layer indices, both sorted: the static argument the model and every
  decoding strategy take (`skip=`), resolved once (`resolve`, `plan_for`) and reported back in
  the decoding stats. `strategy` names what chose the layers and is left out of equality and
  the hash: plans of the same layers are one graph, so they share one executable. `unit`: what
  a skipped index removes (the module docstring); kept / skipped are the indices whose unit runs
  or not. Unit "sublayer" (`sublayers`): kept / skipped index attention blocks, `mlp_skipped` the
  layers whose MLP block is skipped."""
  num_layers: int
  kept: tuple[int, ...]
  skipped: tuple[int, ...]
  strategy: str = dataclasses.field(default="explicit", compare=False)
  unit: Unit = "layer"
  mlp_skipped: tuple[int, ...] = ()

  def __post_init__(self):
    if self.mlp_skipped and self.unit != "sublayer":
      raise ValueError(f"mlp_skipped={self.mlp_skipped} with unit={self.unit!r}: only a "
                       "unit='sublayer' plan skips MLP blocks apart from its skipped indices")
    if not self.skipped and not self.mlp_skipped:  # full depth whatever the unit: one graph
      object.__setattr__(self, "unit", "layer")

  @classmethod
  def sublayers(cls, num_layers: int, attention: Sequence[int] = (), mlp: Sequence[int] = (),
                strategy: str = "explicit") -> SkipPlan:
    """A unit "sublayer" plan skipping the `attention` blocks and the `mlp` blocks of those
    layers (each sorted, checked against the depth)."""
    L = _check_num_layers(num_layers)
    kept = _from_skipped(L, list(attention))
    mlp_kept = _from_skipped(L, list(mlp))
    return cls(L, tuple(kept), tuple(sorted(set(range(L)) - set(kept))), strategy, "sublayer",
               tuple(i for i in range(L) if i not in set(mlp_kept)))

  @classmethod
  def full(cls, num_layers: int) -> SkipPlan:
    """Every layer kept."""
    return cls(num_layers, tuple(range(num_layers)), (), "full")

  @property
  def ratio(self) -> float:
    """Nominal speedup in decoder layers: L / (number kept) (a sublayer plan's counts blocks;
    its ratio in bytes, the one it was planned by, is `LayerBytes.ratio`)."""
    return self.num_layers / len(self.kept)

  @property
  def is_full(self) -> bool:
    """Whether the plan skips nothing (for unit "sublayer", `skipped` alone does not say)."""
    return not self.skipped and not self.mlp_skipped

  @property
  def attention_layers(self) -> tuple[int, ...]:
    """Layers whose attention runs: the ones the KV cache holds."""
    return tuple(range(self.num_layers)) if self.unit == "mlp" else self.kept

  @property
  def mlp_layers(self) -> tuple[int, ...]:
    """Layers whose MLP runs."""
    if self.unit == "sublayer":
      return tuple(i for i in range(self.num_layers) if i not in self.mlp_skipped)
    return tuple(range(self.num_layers)) if self.unit == "attention" else self.kept

  def __str__(self) -> str:
    """e.g. 'uls 20/30 layers (skips 1 4 7 10 13 16 19 22 25 28)', naming the shorter list, for
    logs and infer.py's report."""
    if self.unit == "sublayer":
      return (f"{self.strategy} sublayers: attention {len(self.kept)}/{self.num_layers} (skips "
              f"{' '.join(map(str, self.skipped)) or 'none'}), mlp "
              f"{self.num_layers - len(self.mlp_skipped)}/{self.num_layers} (skips "
              f"{' '.join(map(str, self.mlp_skipped)) or 'none'})")
    unit = "layers" if self.unit == "layer" else f"{self.unit} blocks"
    head = f"{self.strategy} {len(self.kept)}/{self.num_layers} {unit}"
    if not self.skipped:
      return head
    which, layers = (("skips", self.skipped) if len(self.skipped) <= len(self.kept)
                     else ("keeps", self.kept))
    return f"{head} ({which} {' '.join(map(str, layers))})"


def _check_num_layers(num_layers) -> int:
  return as_int("num_layers", num_layers, min=1)


def _check_ratio(num_layers: int, ratio) -> float:
  try:
    value = as_float("ratio", ratio)
  except ValueError:
    raise ValueError(f"ratio={ratio!r} is invalid: it must be a number in [1, {num_layers}]"
                     ) from None
  if not 1 <= value <= num_layers:
    raise ValueError(f"ratio={ratio!r} is out of range: allowed is 1 <= ratio <= num_layers="
                     f"{num_layers}")
  return value


def num_kept(num_layers: int, ratio: float) -> int:
  """n = int(L / r), the paper's layer budget for speedup ratio r (1 <= r <= L)."""
  num_layers = _check_num_layers(num_layers)
  return int(num_layers / _check_ratio(num_layers, ratio))


def _sublayers_kept(L: int, ratio, unit: str, costs, min_kept: int) -> int:
  """L - m for the fewest m skipped `unit` blocks whose byte ratio reaches `ratio` (at least
  `ratio`, as int(L / r) kept layers are)."""
  if not isinstance(costs, LayerBytes):
    raise ValueError(f"unit={unit!r} plans by weight bytes: give costs=model.layer_bytes(cfg)")
  try:
    value = as_float("ratio", ratio, min=1)
  except ValueError:
    raise ValueError(f"ratio={ratio!r} is invalid: it must be a number >= 1") from None
  full = costs.read(SkipPlan.full(L))
  each = costs.mlp if unit == "mlp" else costs.attention
  m = max(0, math.ceil((full - full / value) / each - 1e-9))
  if m > L - min_kept:
    best = math.floor(1000 * full / (full - (L - min_kept) * each)) / 1000
    raise ValueError(f"ratio={ratio!r} is unreachable with unit={unit!r}: skipping {L - min_kept} "
                     f"of the {L} {unit} blocks reads {best:g}x fewer bytes per token; allowed is "
                     f"ratio <= {best:g}")
  return L - m


def _uls(L: int, n: int) -> list[int]:
  if n == 1:
    return [0]
  # Integer form of floor(i * (L-1)/(n-1) + 1/2): exact, no float rounding surprises.
  return [(2 * i * (L - 1) + (n - 1)) // (2 * (n - 1)) for i in range(n)]


def _uls_reference(L: int, n: int) -> list[int]:
  step = round((L - 1) / (n - 1))  # Python rounds halves to even; the published plans have none.
  kept = [i * step for i in range(n - 1)] + [L - 1]
  if kept[-2] >= L - 1:
    raise ValueError(f"strategy='uls_reference' is undefined for num_layers={L}, n={n} kept "
                     f"(stride {step} runs past the last layer): use strategy='uls'")
  return kept


def _from_skipped(L: int, skipped: Sequence[int]) -> list[int]:
  for i in skipped:
    if isinstance(i, bool) or not isinstance(i, numbers.Integral):
      raise ValueError(f"skip index {i!r} is not an int: indices must be ints in [0, {L - 1}]")
  skipped = [int(i) for i in skipped]
  for i in skipped:
    if not 0 <= i < L:
      raise ValueError(f"skip index {i} is out of range: allowed is 0 <= index < {L}")
  if len(set(skipped)) != len(skipped):
    dup = sorted({i for i in skipped if list(skipped).count(i) > 1})
    raise ValueError(f"skip indices {dup} appear more than once: each layer can be skipped once")
  if len(skipped) >= L:
    raise ValueError(f"skip={tuple(skipped)} skips all {L} layers: at least one must be kept")
  return [i for i in range(L) if i not in set(skipped)]


def _check_keep(L: int, keep) -> list[int]:
  if isinstance(keep, (str, bytes)) or not isinstance(keep, Sequence):
    raise ValueError(f"keep={keep!r} is invalid: give a list of layer indices in [0, {L - 1}]")
  for i in keep:
    if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < L:
      raise ValueError(f"keep index {i!r} is out of range: allowed are ints 0 <= index < {L}")
  if len(set(keep)) != len(keep):
    raise ValueError(f"keep={tuple(keep)} has duplicate indices: give each layer once")
  return sorted(int(i) for i in keep)


def _uls_with(L: int, n: int, keep: list[int]) -> list[int]:
  """n layers: `keep`, the first and the last, and the rest spread over the gaps they leave."""
  fixed = sorted({0, L - 1, *keep})
  if len(fixed) > n:
    raise ValueError(f"keep={tuple(keep)} with the first and last layers is {len(fixed)} layers "
                     f"but the ratio keeps n={n}: allowed is ratio <= {L / len(fixed):g}")
  gaps = list(zip(fixed, fixed[1:]))
  slots = [0] * len(gaps)
  for _ in range(n - len(fixed)):
    # Free layers inside a gap (b - a - 1) cap its slots; the longest sub-gap gets the next one.
    open_gaps = [j for j, (a, b) in enumerate(gaps) if slots[j] < b - a - 1]
    j = max(open_gaps, key=lambda j: ((gaps[j][1] - gaps[j][0]) / (slots[j] + 1), -j))
    slots[j] += 1
  kept = set(fixed)
  for (a, b), k in zip(gaps, slots):
    g, parts = b - a, k + 1
    kept.update(a + (2 * i * g + parts) // (2 * parts) for i in range(1, parts))
  return sorted(kept)


def default_keep(windows: Sequence[int | None] | None, n: int) -> tuple[int, ...]:
  """The global layers of a model mixing windowed and global layers (as many as fit in n beside
  the first and last, evenly spread among them); () for any other model."""
  if windows is None or all(w is None for w in windows) or all(w is not None for w in windows):
    return ()
  L = len(windows)
  extra = [i for i, w in enumerate(windows) if w is None and i not in (0, L - 1)]
  room = max(n - len({0, L - 1}), 0)
  if len(extra) > room:
    extra = [extra[(2 * j + 1) * len(extra) // (2 * room)] for j in range(room)]
  return tuple(extra)


def _check_scores(L: int, scores, unit: str = "layer") -> list[float | None]:
  """`scores` checked: one per layer, or for unit "sublayer" one per attention block then one per
  MLP block (2L)."""
  what, count = (("attention block, then per MLP block", 2 * L) if unit == "sublayer"
                 else ("layer", L))
  if scores is None:
    raise ValueError(f"strategy='calibrated' needs scores (one per {what}, lower = skipped "
                     "first): calibrate.calibrate or read_plan gives them")
  if (isinstance(scores, (str, bytes)) or not isinstance(scores, Sequence)
      or len(scores) != count):
    raise ValueError(f"scores={scores!r:.80} is invalid: give one number (or None = never "
                     f"skipped) per {what}, {count} in all")
  for i, v in enumerate(scores):
    if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)
                          or not math.isfinite(v)):
      raise ValueError(f"scores[{i}]={v!r} is invalid: each score is a finite number or None "
                       "(never skipped)")
  return [None if v is None else float(v) for v in scores]


def _calibrated(L: int, n: int, scores: list[float | None], keep: list[int]) -> list[int]:
  """Skips the L - n lowest-scored layers (the lower index first on ties), never a kept one."""
  removable = sorted((v, i) for i, v in enumerate(scores) if v is not None and i not in keep)
  if L - n > len(removable):
    raise ValueError(f"ratio keeps n={n} of {L} layers, but the scores let only {len(removable)} "
                     f"be skipped (None = never, nor keep): allowed is ratio <= "
                     f"{L / (L - len(removable)):g}")
  skipped = {i for _, i in removable[:L - n]}
  return [i for i in range(L) if i not in skipped]


def _calibrated_sublayers(L: int, ratio, scores: list[float | None], keep: list[int],
                          costs) -> SkipPlan:
  """Skips the lowest-scored of the 2L attention and MLP blocks (the attention block first on
  ties), fewest first, until the plan reads `ratio` times fewer weight bytes per token."""
  if not isinstance(costs, LayerBytes):
    raise ValueError("unit='sublayer' plans by weight bytes: give costs=model.layer_bytes(cfg)")
  try:
    value = as_float("ratio", ratio, min=1)
  except ValueError:
    raise ValueError(f"ratio={ratio!r} is invalid: it must be a number >= 1") from None
  full = read = costs.read(SkipPlan.full(L))
  skipped = ([], [])  # attention, MLP
  for _, j in sorted((v, j) for j, v in enumerate(scores) if v is not None and j % L not in keep):
    if full / read >= value - 1e-9:
      break
    skipped[j // L].append(j % L)
    read -= costs.attention if j < L else costs.mlp
  if full / read < value - 1e-9:
    best = math.floor(1000 * full / read) / 1000
    raise ValueError(f"ratio={ratio!r} is unreachable with unit='sublayer': skipping every block "
                     f"the scores allow reads {best:g}x fewer bytes per token; allowed is "
                     f"ratio <= {best:g}")
  return SkipPlan.sublayers(L, sorted(skipped[0]), sorted(skipped[1]), "calibrated")


def plan_layers(num_layers: int, ratio: float | None = None,
                strategy: str | Sequence[int] = "uls", seed: int | None = None,
                keep: Sequence[int] = (),
                windows: Sequence[int | None] | None = None,
                scores: Sequence[float | None] | None = None, unit: Unit = "layer",
                costs: LayerBytes | None = None) -> SkipPlan:
  """Which layers to keep for speedup `ratio` on a `num_layers` decoder.

  strategy:
    "uls":           first and last kept, the rest evenly spread (see the module docstring).
    "uls_reference": the authors' stride rule (every s-th layer from 0, plus the last).
    "top":           keep the first n (a fixed early exit).
    "bottom":        keep the last n.
    "middle":        skip one contiguous block in the middle.
    "every_other":   keep every k-th layer from 0, k = L // n (LayerDrop-style strided pruning; the
                     last layer is not forced).
    "random":        n layers drawn with `seed`.
    "calibrated":    skip the L - n layers with the lowest `scores` (`calibrate.py`).
    a sequence of ints: the skipped layer indices themselves (`ratio` must then be None).
  keep: layers the plan keeps whatever the ratio (strategies "uls" and "calibrated"; see the
    module docstring).
  windows: the model's per-layer sliding windows (ModelConfig.attention_windows); with strategy
    "uls" and no keep, a model mixing windowed and global layers keeps its global layers
    (`default_keep`). None (or a model that does not mix them) changes nothing.
  scores: strategy "calibrated" only: one score per layer, lower = skipped first, None = never
    skipped (the calibration's first and last layers); unit "sublayer": one per attention block,
    then one per MLP block.
  unit: what a skipped index removes: "layer", "mlp" or "attention" (its MLP or attention block
    only). A sublayer unit skips the fewest blocks that reach `ratio` in weight bytes per token,
    which `costs` (`model.layer_bytes(cfg)`) gives; the strategy picks which, as it picks layers.
    "sublayer": attention and MLP blocks chosen separately, by calibrated scores only.
  """
  L = _check_num_layers(num_layers)
  if unit not in UNITS:
    raise ValueError(f"unit={unit!r} is unknown: allowed are {', '.join(UNITS)}")
  keep = _check_keep(L, keep)
  if keep and strategy not in ("uls", "calibrated"):
    raise ValueError(f"keep={tuple(keep)} given with strategy={strategy!r}: keep works with "
                     "strategy='uls' or 'calibrated' only")
  if scores is not None and strategy != "calibrated":
    raise ValueError(f"scores given with strategy={strategy!r}: scores are for "
                     "strategy='calibrated' only")
  if isinstance(strategy, (bytes, numbers.Number)) or not isinstance(strategy, (str, Sequence)):
    raise ValueError(f"strategy={strategy!r} is invalid: give a strategy name ("
                     f"{', '.join(STRATEGIES)}) or a list of skipped indices")
  if not isinstance(strategy, str):
    if ratio is not None:
      raise ValueError(f"ratio={ratio!r} given with an explicit skip list: pass one or the other")
    if unit == "sublayer":
      raise ValueError("an explicit skip list with unit='sublayer' names no block kind: use "
                       "SkipPlan.sublayers(num_layers, attention=..., mlp=...)")
    kept = _from_skipped(L, list(strategy))
    return SkipPlan(L, tuple(kept), tuple(i for i in range(L) if i not in kept), "explicit", unit)
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy={strategy!r} is unknown: allowed are {', '.join(STRATEGIES)} "
                     "or a list of skipped indices")
  if ratio is None:
    raise ValueError(f"strategy={strategy!r} needs a ratio (a number in [1, {L}])")
  if unit == "sublayer":
    if strategy != "calibrated":
      raise ValueError(f"unit='sublayer' with strategy={strategy!r}: attention and MLP blocks are "
                       "chosen separately by calibration only: strategy='calibrated' (or "
                       "SkipPlan.sublayers for an explicit plan)")
    return _calibrated_sublayers(L, ratio, _check_scores(L, scores, unit), keep, costs)
  if unit == "layer":
    n = int(L / _check_ratio(L, ratio))
  else:
    n = _sublayers_kept(L, ratio, unit, costs, 2 if strategy in ("uls", "uls_reference") else 1)
  if strategy in ("uls", "uls_reference") and n < 2 and L > 1:
    raise ValueError(f"ratio={ratio!r} keeps n=int({L}/{ratio})={n} layer(s), but {strategy!r} "
                     f"keeps the first and the last: allowed is ratio <= {L / 2:g}")
  if strategy == "uls":
    if windows is not None and len(windows) != L:
      raise ValueError(f"windows has {len(windows)} entries but num_layers={L}: give one per layer")
    kept = _uls_with(L, n, keep or default_keep(windows, n))
  elif strategy == "uls_reference":
    kept = _uls(L, n) if n < 2 else _uls_reference(L, n)
  elif strategy == "top":
    kept = list(range(n))
  elif strategy == "bottom":
    kept = list(range(L - n, L))
  elif strategy == "middle":
    start = n // 2  # the skipped block [start, start + L - n) sits in the middle
    kept = list(range(start)) + list(range(start + L - n, L))
  elif strategy == "every_other":
    kept = list(range(0, L, L // n))[:n]
  elif strategy == "calibrated":
    kept = _calibrated(L, n, _check_scores(L, scores), keep)
  else:  # random
    kept = sorted(_random.Random(seed).sample(range(L), n))
  kept_set = set(kept)
  return SkipPlan(L, tuple(kept), tuple(i for i in range(L) if i not in kept_set), strategy, unit)


@dataclasses.dataclass(frozen=True)
class LayerScores:
  """A calibrated plan's record, what plan.json holds: one score per layer (or per block of
  `unit`) and their origin."""
  num_layers: int
  method: str                       # how the scores were made (calibrate.METHODS)
  scores: tuple[float | None, ...]  # per layer: lower = skipped first; None = never skipped
  keep: tuple[int, ...] = ()        # layers every plan keeps, besides the None-scored ones
  # The calibration data and run: token count, sha256 of the token arrays, source, seconds.
  calibration: dict = dataclasses.field(default_factory=dict, hash=False)
  # What was scored: whole layers (their scores plan any unit but "sublayer"), one block kind,
  # or both kinds ("sublayer": 2L scores, the attention blocks' first).
  unit: Unit = "layer"

  def plan(self, ratio, unit: Unit = "layer", costs: LayerBytes | None = None) -> SkipPlan:
    """The plan at `ratio`; with layer scores a sublayer unit skips the blocks of the
    lowest-scored layers."""
    if self.unit != unit and (self.unit != "layer" or unit == "sublayer"):
      ranked = "layers" if self.unit == "layer" else f"unit={self.unit!r} blocks"
      raise ValueError(f"the plan's scores rank {ranked}, not what unit={unit!r} skips: "
                       f"calibrate with skip.unit={unit!r}")
    return plan_layers(self.num_layers, ratio, "calibrated", keep=self.keep, scores=self.scores,
                       unit=unit, costs=costs)


def _listed(plan: SkipPlan) -> dict:
  if plan.unit == "sublayer":
    return dict(attention_skipped=list(plan.skipped), mlp_skipped=list(plan.mlp_skipped))
  return dict(kept=list(plan.kept), skipped=list(plan.skipped))


def write_plan(path: str, layer_scores: LayerScores, ratios: Sequence[float] = (),
               costs: LayerBytes | None = None) -> None:
  """plan.json at `path` (atomically), listing the plan of each of `ratios` for the reader (a
  sublayer unit's by the model's weight bytes, `costs`, which the file records)."""
  unit = layer_scores.unit
  if unit != "layer" and not isinstance(costs, LayerBytes):
    raise ValueError(f"a plan of unit={unit!r} lists its plans by weight bytes: give costs")
  record = dict(strategy="calibrated", num_layers=layer_scores.num_layers,
                method=layer_scores.method, unit=unit, scores=list(layer_scores.scores),
                keep=list(layer_scores.keep),
                **({} if unit == "layer" else dict(costs=dataclasses.asdict(costs))),
                plans={f"{r:g}": _listed(layer_scores.plan(r, unit, costs)) for r in ratios},
                calibration=layer_scores.calibration)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(_readable_json(record))
  os.replace(tmp, path)


def _readable_json(record: dict) -> str:
  """One line per key, and per entry of a dict value (a plan, a calibration fact)."""
  def item(key, value, indent):
    if isinstance(value, dict) and value:
      inner = ",\n".join(item(k, v, indent + "  ") for k, v in value.items())
      return f"{indent}{json.dumps(key)}: {{\n{inner}\n{indent}}}"
    return f"{indent}{json.dumps(key)}: {json.dumps(value)}"
  return "{\n" + ",\n".join(item(k, v, "  ") for k, v in record.items()) + "\n}\n"


def read_plan(path: str, num_layers: int | None = None) -> LayerScores:
  """The LayerScores of a plan.json, checked (and against the model's depth when given); its
  listed plans must follow from its scores (edit the scores, not the plans)."""
  try:
    stat = os.stat(path)
  except OSError as e:
    raise ValueError(f"plan file {path} cannot be read: {e.strerror}") from None
  layer_scores = _read_plan(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
  if num_layers is not None and layer_scores.num_layers != num_layers:
    raise ValueError(f"plan file {path} is for {layer_scores.num_layers} layers but the model has "
                     f"{num_layers}: calibrate this model, or give a plan file made for it")
  return layer_scores


@functools.lru_cache(maxsize=8)
def _read_plan(path: str, mtime_ns: int, size: int) -> LayerScores:
  """Parsed once per file version (the training loop asks every step)."""
  del mtime_ns, size  # the cache key: a rewritten file is read again
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"plan file {path} is not a plan.json: {e}") from None
  if not isinstance(record, dict) or record.get("strategy") != "calibrated":
    raise ValueError(f"plan file {path} is not a calibrated plan: it needs "
                     "\"strategy\": \"calibrated\" with num_layers, method and scores")
  try:
    L = _check_num_layers(record.get("num_layers"))
    unit = record.get("unit", "layer")
    if unit not in UNITS:
      raise ValueError(f"unit={unit!r} is unknown: allowed are {', '.join(UNITS)}")
    if unit != "layer" and not isinstance(record.get("costs"), dict):
      raise ValueError(f"unit={unit!r} needs \"costs\": the weight bytes its plans were made by")
    costs = LayerBytes(**record["costs"]) if unit != "layer" else None
    layer_scores = LayerScores(L, str(record.get("method", "")),
                               tuple(_check_scores(L, record.get("scores"), unit)),
                               tuple(_check_keep(L, record.get("keep", []))),
                               dict(record.get("calibration", {})), unit)
    for ratio, listed in dict(record.get("plans", {})).items():
      planned = _listed(layer_scores.plan(float(ratio), unit, costs))
      if any(list(dict(listed).get(k, [])) != v for k, v in planned.items() if k != "kept"):
        raise ValueError(f"plans[{ratio!r}] does not follow from the scores: edit the scores "
                         "(lower = skipped first), not the plans")
  except (ValueError, TypeError, AttributeError) as e:
    raise ValueError(f"plan file {path} is invalid: {e}") from None
  return layer_scores


def workdir_plan(path: str, num_layers: int | None = None) -> LayerScores | None:
  """The plan.json of a model folder or training workdir (or of the workdir above a step folder
  `WORKDIR/checkpoints/N`), checked against the model's depth; None where there is none."""
  if not os.path.isdir(path):
    return None
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  folders = [path] + ([os.path.dirname(parent)] if os.path.basename(parent) == "checkpoints"
                      else [])
  for folder in folders:
    candidate = os.path.join(folder, PLAN_FILE)
    if os.path.isfile(candidate):
      return read_plan(candidate, num_layers)
  return None


def plan_for(config, num_layers: int, ratio: float, windows=None,
             costs: LayerBytes | None = None) -> SkipPlan:
  """A run config's plan at `ratio`: a calibrated run's from its skip.plan_file, the others from
  plan_layers with the config's strategy, seed, keep and unit (a sublayer unit needs `costs`,
  `model.layer_bytes(cfg)`)."""
  s = config.skip
  unit = s.unit
  if s.strategy == "calibrated":
    if not s.plan_file:
      raise ValueError("skip.strategy='calibrated' needs skip.plan_file: the training run writes "
                       "its workdir's plan.json (calibrate.resolve_plan)")
    return read_plan(s.plan_file, num_layers).plan(ratio, unit, costs)
  return plan_layers(num_layers, ratio, s.strategy, seed=config.seed, keep=tuple(s.keep),
                     windows=windows, unit=unit, costs=costs)


def parse_ratios(text: str) -> list[float]:
  """'1,2,5' -> [1.0, 2.0, 5.0], with a one-line error for anything else."""
  try:
    ratios = [float(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise ValueError(f"ratios={text!r} is invalid: give comma-separated numbers >= 1, e.g. 1,2,5")
  if not ratios:
    raise ValueError(f"ratios={text!r} is empty: give comma-separated numbers >= 1, e.g. 1,2,5")
  return ratios


def as_plan(num_layers: int, skip: SkipPlan | Sequence[int] | None) -> SkipPlan:
  """`skip` as a plan of a `num_layers` model: a plan (checked against the depth), a sequence of
  skipped layer indices (checked: one line per bad index), or None / () for full depth."""
  if isinstance(skip, SkipPlan):
    if skip.num_layers != num_layers:
      raise ValueError(f"the plan is for {skip.num_layers} layers but the model has {num_layers}: "
                       "make the plan for this model")
    return skip
  if skip is None:
    return SkipPlan.full(num_layers)
  if isinstance(skip, (str, bytes)) or not hasattr(skip, "__len__"):
    raise ValueError(f"skip={skip!r} is invalid: give a list of layer indices, e.g. (1, 3)")
  return plan_layers(num_layers, strategy=tuple(skip)) if len(skip) else SkipPlan.full(num_layers)


def resolve(num_layers: int, *, skip: SkipPlan | Sequence[int] | None = None,
            ratio: float | None = None,
            windows: Sequence[int | None] | None = None) -> SkipPlan:
  """The plan of a decoding call, checked once: `ratio` -> its ULS plan (a model mixing
  sliding-window and global layers, `windows` = its cfg.attention_windows, keeps its global
  layers, as in training); `skip` (a plan or skipped indices) as given; neither -> full depth."""
  if skip is not None and ratio is not None:
    shown = skip.skipped if isinstance(skip, SkipPlan) else tuple(skip)
    raise ValueError(f"skip={shown} and ratio={ratio!r} both given: pass one or the other")
  if ratio is not None:
    return plan_layers(num_layers, ratio, windows=windows)
  return as_plan(num_layers, skip)


def kept_layers(num_layers: int, skip: SkipPlan | Sequence[int]) -> tuple[int, ...]:
  """Kept layer indices for a plan or a skip tuple, validating it (`as_plan`)."""
  return as_plan(num_layers, skip).kept
