"""Reading compiled HLO text: the ops inside while loops that make a cache-layer-sized array.

Tests call `loop_layer_ops` on the executables they build (`compile_generate`);
`benchmarks/gpu_hlo.py` calls it on XLA:GPU executables compiled without a GPU.
"""

from __future__ import annotations

import re

from flax import nnx

from ulskip_jax import decode, engine

PASS_THROUGH = ("parameter", "get-tuple-element", "tuple", "bitcast")
IN_PLACE = re.compile(r"(dynamic-update-slice|scatter)\(")


def computations(text: str) -> dict[str, list[str]]:
  """Computation name -> its instruction lines."""
  comps, lines = {}, None
  for line in text.splitlines():
    header = re.match(r"^(?:ENTRY )?(%[\w.\-]+) .*\{$", line)
    if header:
      lines = comps.setdefault(header.group(1), [])
    elif lines is not None and line.strip() != "}":
      lines.append(line)
  return comps


def reachable(comps: dict[str, list[str]], root: str) -> set[str]:
  """The computations `root` calls, directly or not (fusions, loops, conditions), and itself."""
  seen, todo = set(), [root]
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    for line in comps[name]:
      todo += [t for t in re.findall(r"%[\w.\-]+", line) if t in comps]
  return seen


def loop_layer_ops(text: str, layer_shape: tuple[int, ...]) -> tuple[int, list[str]]:
  """(in-place writes, other ops) among the ops in while-loop bodies whose result has the dims
  of a cache layer, `layer_shape` ([B, K, S, Hd]), in any order: a copy or a transpose of a layer
  is one of the others. In place: a dynamic-update-slice or scatter, or a fusion holding one."""
  comps = computations(text)
  loops = set(re.findall(r"body=(%[\w.\-]+)", text))
  assert loops, "no while loop in the HLO"
  in_place, others = 0, []
  for name in set().union(*(reachable(comps, body) for body in loops)):
    for line in comps[name]:
      op = re.match(r"\s*(?:ROOT )?%\S+ = \w+\[([\d,]*)\]\S* ([\w\-]+)\(", line)
      dims = op and op.group(1) and [int(d) for d in op.group(1).split(",")]
      if not dims or sorted(dims) != sorted(layer_shape) or op.group(2) in PASS_THROUGH:
        continue
      fused = re.search(r"calls=(%[\w.\-]+)", line) if op.group(2) == "fusion" else None
      if IN_PLACE.search(line) or (fused and any(map(IN_PLACE.search, comps[fused.group(1)]))):
        in_place += 1
      else:
        others.append(line.strip()[:300])
  return in_place, others


def compile_generate(model, batch_size: int, prompt_len: int, **kw):
  """The executable `decode.generate` runs for this batch size, prompt length and options."""
  strategy, x = decode.plan_call(model, [[0] * prompt_len] * batch_size, **kw)
  return engine.executable(strategy, *nnx.split(model), x)[0]
