"""Train step time of full depth against paper mode 2x / 3x / 5x, on a model of SmolLM2-135M's shape.

  python benchmarks/train_speed.py            # 7 timed rounds
  python benchmarks/train_speed.py --quick    # 2 timed rounds
  python benchmarks/train_speed.py --tiny --quick --ratios 2   # a smoke run on a 4-layer model

The model is random (30 layers, d_model 576, 9 heads, 3 KV heads, d_ff 1536, vocabulary 49152,
tied embeddings): the step's cost depends on shapes only. The batch is `--batch` rows of
`--seq-len` tokens packed with examples whose prompt and response lengths are drawn around
`--prompt-len` and `--response-len`. Every case is one jitted train step (forward, backward,
AdamW), compiled and warmed up first, then timed in rounds of one step per case so that a change
in the machine's load hits all cases alike; the table gives the median.

Paper mode runs twice: on whole rows (`skip.prompt_capacity` 1.0, the computation before the
prompt buffer) and on the buffer of `--capacity` x seq_len prompt tokens. "ceiling" is the
paper step's layer-token work relative to full depth: (prompt x L + response x n) / (tokens x L).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from ulskip_jax import data as data_lib  # noqa: E402
from ulskip_jax import prompt_buffer, train_lib  # noqa: E402
from ulskip_jax.model import Decoder, ModelConfig  # noqa: E402
from ulskip_jax.skipping import plan_layers  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, num_layers=30, d_model=576, num_heads=9, num_kv_heads=3,
                    head_dim=64, d_ff=1536, rope_theta=100000.0, tie_embeddings=True,
                    norm_eps=1e-5)
TINY = dict(vocab_size=97, num_layers=4, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
            d_ff=64)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="2 timed rounds")
  p.add_argument("--tiny", action="store_true", help="a 4-layer width-32 model (smoke run)")
  p.add_argument("--timing-steps", type=int, default=7)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--prompt-len", type=int, default=40, help="mean prompt tokens per example")
  p.add_argument("--response-len", type=int, default=40, help="mean response tokens per example")
  p.add_argument("--capacity", type=float, default=0.75, help="skip.prompt_capacity")
  p.add_argument("--ratios", default="2,3,5")
  p.add_argument("--remat", action="store_true")
  args = p.parse_args(argv)
  if args.quick:
    args.timing_steps = 2
  return args


def packed_batch(args, vocab: int) -> dict:
  """Rows packed greedily with random examples, as `data.pack_row` lays them out."""
  rng = np.random.default_rng(0)
  rows = []
  for _ in range(args.batch):
    examples, used = [], 0
    while True:
      p = max(1, int(rng.integers(args.prompt_len // 2, args.prompt_len * 3 // 2 + 1)))
      r = max(1, int(rng.integers(args.response_len // 2, args.response_len * 3 // 2 + 1)))
      if used + p + r > args.seq_len:
        break
      examples.append((list(rng.integers(3, vocab, p)), list(rng.integers(3, vocab, r))))
      used += p + r
    rows.append(data_lib.pack_row(examples, args.seq_len))
  return {k: jnp.asarray(np.stack([row[k] for row in rows])) for k in rows[0]}


def main():
  args = parse_args()
  cfg = ModelConfig(**(TINY if args.tiny else SMOLLM2_135M), remat=args.remat)
  graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  params = nnx.to_pure_dict(params)
  optimizer = optax.adamw(1e-4)
  batch = packed_batch(args, cfg.vocab_size)
  capacity = prompt_buffer.capacity_for(args.capacity, args.seq_len)
  prompt = int(batch["full_depth"].sum())
  tokens = int((batch["segment_ids"] > 0).sum())
  step_fn = jax.jit(functools.partial(train_lib.train_step, graphdef=graphdef, optimizer=optimizer,
                                      paper=True, accum_steps=1),
                    static_argnums=2, static_argnames="prompt_capacity", donate_argnums=0)
  L = cfg.num_layers
  cases = [dict(name="full depth", skip=(), capacity=None, ceiling=1.0)]
  for ratio in (float(r) for r in args.ratios.split(",")):
    skip = plan_layers(L, ratio).skipped
    n = L - len(skip)
    ceiling = (prompt * L + (tokens - prompt) * n) / (tokens * L)
    for name, cap in (("whole rows", None), ("buffer", capacity)):
      cases.append(dict(name=f"paper {ratio:g}x, {name}", skip=skip, capacity=cap,
                        ceiling=ceiling))
  for case in cases:
    case["state"] = dict(params=jax.tree.map(jnp.copy, params),
                         opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))
    case["wall"] = []
    for _ in range(2):  # compile, then one more so that nothing first-time is timed
      case["state"], metrics = step_fn(case["state"], batch, case["skip"],
                                       prompt_capacity=case["capacity"])
      jax.block_until_ready(metrics)
    case["overflows"] = int(metrics.get("prompt_overflow_rows", 0))
  for _ in range(args.timing_steps):
    for case in cases:
      t0 = time.perf_counter()
      case["state"], metrics = step_fn(case["state"], batch, case["skip"],
                                       prompt_capacity=case["capacity"])
      jax.block_until_ready(metrics)
      case["wall"].append(time.perf_counter() - t0)

  full_ms = 1e3 * float(np.median(cases[0]["wall"]))
  print(f"## Train step: {L} layers, d_model {cfg.d_model}, batch {args.batch} x {args.seq_len} "
        f"({tokens} tokens, {prompt} prompt), buffer {capacity} slots/row, {os.cpu_count()} cores, "
        f"jax {jax.__version__}, load average {os.getloadavg()[0]:.1f}\n")
  print("| case | ms/step | relative to full depth | ceiling | overflowing rows |")
  print("|---|---|---|---|---|")
  for case in cases:
    ms = 1e3 * float(np.median(case["wall"]))
    print(f"| {case['name']} | {ms:.0f} | {ms / full_ms:.2f} | {case['ceiling']:.2f} | "
          f"{case['overflows']} |")


if __name__ == "__main__":
  main()
