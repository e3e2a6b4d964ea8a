"""Where a decode step's time goes: an XLA profile of greedy decoding, op by op.

  python -m benchmarks.profile_decode --checkpoint smollm2 --batch 1 --dtype float32

One `generate` call (compiled first) runs under `jax.profiler.trace`; the trace's per-op events
inside the executable are summed by kind (weight matmuls, attention over the cache, the
unembedding and token choice, the rest), per generated token. Each matmul's bytes come from the
optimized HLO (dumped by XLA at compile time), so the table shows the bandwidth each reaches
against the best a single large matvec reaches on this machine (`--peak-mb` of weights, timed
alone).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

DUMP = tempfile.mkdtemp(prefix="ulskip_hlo_")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_dump_to={DUMP} --xla_dump_hlo_as_text"
                           " --xla_dump_hlo_module_re=.*generate.*|.*_fn.*").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ulskip_jax import decode, hf  # noqa: E402

_SHAPE = re.compile(r"(bf16|f32|f16|s32|u32|pred|s8|u8)\[([0-9,]*)\]")
_BYTES = dict(bf16=2, f16=2, f32=4, s32=4, u32=4, pred=1, s8=1, u8=1)


def _nbytes(dtype: str, dims: str) -> int:
  return _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))


def hlo_ops(dump_dir: str) -> dict[str, dict]:
  """{instruction name: dict(opcode, bytes read, line)} from the largest optimized module in the
  dump (the decode executable; the prefill is inside it). Optimized HLO text names operands
  without their shapes, so bytes read are summed over the operands' own definitions."""
  files = sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")),
                 key=os.path.getsize)
  text = open(files[-1]).read()
  parsed, shapes = [], {}
  for line in text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*?) (\w[\w\-]*)\((.*)", line)
    if not m:
      continue
    name, result, opcode, rest = m.groups()
    shape = _SHAPE.match(result)
    shapes[name] = _nbytes(*shape.groups()) if shape and not result.startswith("(") else 0
    parsed.append((name, opcode, rest.split(")", 1)[0], line.strip()))
  ops = {}
  for name, opcode, args, line in parsed:
    operands = re.findall(r"%([\w.\-]+)", args)
    ops[name] = dict(opcode=opcode, read=sum(shapes.get(o, 0) for o in operands), line=line)
  return ops


def kind(name: str, op: dict | None, vocab: int) -> str:
  line = op["line"] if op else name
  if ("dot" in name or "convolution" in name or (op and op["opcode"] == "dot")
      or " dot(" in line):
    return "unembedding" if f",{vocab}]" in line or f"[{vocab}," in line else "matmul"
  if "while" in name or "conditional" in name or name.startswith("call"):
    return "control"
  return "other"


def profile(model, batch: int, prompt_len: int, new_tokens: int, vocab: int, ratio: float):
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, vocab, (batch, prompt_len)).tolist()
  kw = dict(max_new_tokens=new_tokens, eos_id=None, ratio=ratio, mode="everywhere")
  decode.generate(model, prompts, **kw)  # compile
  _, stats = decode.generate(model, prompts, **kw)
  trace_dir = tempfile.mkdtemp(prefix="ulskip_trace_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    _, traced = decode.generate(model, prompts, **kw)
  path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
  events = json.load(gzip.open(path))
  events = events["traceEvents"] if isinstance(events, dict) else events
  return stats, traced, [e for e in events if e.get("ph") == "X"]


def peak_matvec_gbs(mb: float, dtype) -> float:
  """Best GB/s of one [1, K] x [K, N] matvec over `mb` MB of weights, timed alone."""
  k = 1024
  n = int(mb * 2**20 / (k * jnp.dtype(dtype).itemsize))
  w = jnp.ones((k, n), dtype)
  x = jnp.ones((1, k), dtype)
  f = jax.jit(lambda x, w: x @ w)
  f(x, w).block_until_ready()
  best = float("inf")
  for _ in range(20):
    start = time.perf_counter()
    f(x, w).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return w.nbytes / best / 1e9


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", default="smollm2")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--ratio", type=float, default=1.0)
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--new-tokens", type=int, default=32)
  p.add_argument("--peak-mb", type=float, default=64.0)
  p.add_argument("--top", type=int, default=12, help="ops listed one by one")
  args = p.parse_args(argv)

  model, _ = hf.from_pretrained(args.checkpoint, dtype=args.dtype, param_dtype=args.dtype)
  cfg = model.cfg
  stats, traced, events = profile(model, args.batch, args.prompt_len, args.new_tokens,
                                  cfg.vocab_size, args.ratio)
  ops = hlo_ops(DUMP)
  per_op = collections.defaultdict(lambda: [0, 0.0])
  for e in events:
    name = e["name"]
    if name.startswith(("$", "end: ")) or name not in ops:
      continue
    per_op[name][0] += 1
    per_op[name][1] += e.get("dur", 0.0) * 1e-6
  leaf = {n: v for n, v in per_op.items() if kind(n, ops.get(n), cfg.vocab_size) != "control"}
  by_kind = collections.defaultdict(lambda: [0.0, 0])
  for n, (count, secs) in leaf.items():
    k = kind(n, ops[n], cfg.vocab_size)
    by_kind[k][0] += secs
    by_kind[k][1] += ops[n]["read"] * count
  steps = args.new_tokens
  wall = traced.wall_s
  peak = peak_matvec_gbs(args.peak_mb, args.dtype)
  print(f"# decode profile: {args.checkpoint}, {args.dtype}, batch {args.batch}, ratio "
        f"{args.ratio:g}, prompt {args.prompt_len}, {steps} new tokens, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}\n")
  print(f"Traced call: {wall * 1e3:.0f} ms ({steps * args.batch / wall:.1f} tok/s; untraced "
        f"{stats.generated_tokens_per_s:.1f} tok/s). One {args.peak_mb:g} MB matvec alone: "
        f"{peak:.1f} GB/s.\n")
  total = sum(v[0] for v in by_kind.values())
  print("| kind | ms per token | share of op time | GB read per token | GB/s | % of lone matvec |")
  print("|---|---|---|---|---|---|")
  for k, (secs, nbytes) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
    gbs = nbytes / secs / 1e9 if secs else 0.0
    print(f"| {k} | {secs / steps * 1e3:.2f} | {secs / total:.0%} | {nbytes / steps / 1e9:.3f} | "
          f"{gbs:.1f} | {gbs / peak:.0%} |")
  print(f"| ops, all | {total / steps * 1e3:.2f} | 100% | | | |")
  print(f"| wall, per token (incl. prefill, loop and launch) | {wall / steps * 1e3:.2f} | | | | |")
  print(f"\nTop {args.top} ops by time (count over the call):\n")
  print("| op | kind | count | ms total | MB read per call | GB/s |")
  print("|---|---|---|---|---|---|")
  for n, (count, secs) in sorted(leaf.items(), key=lambda kv: -kv[1][1])[:args.top]:
    read = ops[n]["read"]
    print(f"| {n} | {kind(n, ops[n], cfg.vocab_size)} | {count} | {secs * 1e3:.1f} | "
          f"{read / 2**20:.2f} | {read * count / secs / 1e9 if secs else 0:.1f} |")


if __name__ == "__main__":
  main()
