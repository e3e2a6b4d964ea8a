"""How fast can a full-depth train step of SmolLM2-135M get on this CPU? A roofline against the
PyTorch loop of `train_speed.py`, in one sitting.

  python -m benchmarks.train_roofline            # random weights of SmolLM2-135M's shape
  python -m benchmarks.train_roofline --tiny     # a smoke run

It measures, one after another on the same machine:
  * the step's floating-point work, from XLA's cost analysis of the compiled step (forward,
    backward, AdamW; the same batch shape as train_speed.py: 8 x 128, packed);
  * the best matmul throughput XLA and torch reach here, on the step's own matmul shapes
    (forward [T, D] x [D, F] and the two backward products), 2 threads;
  * our step and the PyTorch loop's step (median of the rounds).

The lower bound of our step is its work at the best matmul rate measured (every flop a matmul
flop at peak; the elementwise work, the copies and the optimizer come on top of it). If that
bound is slower than a target fraction of the PyTorch step, no change to our code outside the
matmul kernels can reach the target.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import train_speed  # the model, batch and steps
from configs import smollm2_2x
from ulskip_jax.model import Decoder, ModelConfig


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true", help="a random 4-layer width-32 model")
  p.add_argument("--rounds", type=int, default=3, help="timed steps per side")
  p.add_argument("--threads", type=int, default=2, help="torch threads")
  return p.parse_args(argv)


def matmul_rates(shapes, threads: int, repeats: int = 5) -> list[tuple]:
  """[(shape, XLA GF/s, torch GF/s)] of [m, k] x [k, n] products, best of `repeats`."""
  import torch
  torch.set_num_threads(threads)
  out = []
  for m, k, n in shapes:
    a = np.random.default_rng(0).standard_normal((m, k), np.float32)
    b = np.random.default_rng(1).standard_normal((k, n), np.float32)
    f = jax.jit(jnp.matmul)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    f(ja, jb).block_until_ready()
    t_jax = min(train_speed.timed(lambda: f(ja, jb).block_until_ready())[0]
                for _ in range(repeats))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ta @ tb
    t_torch = min(train_speed.timed(lambda: ta @ tb)[0] for _ in range(repeats))
    flops = 2 * m * k * n
    out.append(((m, k, n), flops / t_jax / 1e9, flops / t_torch / 1e9))
  return out


def main():
  args = parse_args()
  import torch
  config = smollm2_2x.get_config()
  shape = train_speed.TINY if args.tiny else train_speed.SMOLLM2_135M
  model = Decoder(ModelConfig(**shape), rngs=nnx.Rngs(0))
  cfg = model.cfg
  batch = train_speed.random_batch(config.batch_size, config.data.seq_len, cfg.vocab_size, 40, 40)
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  tx = train_speed.optimizer(config.optim)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  step = train_speed.jax_step(graphdef, tx, paper=False)
  state = train_speed.jax_state(params, tx)
  compiled = step.lower(state, jbatch, ()).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gflop = cost["flops"] / 1e9

  T = config.batch_size * config.data.seq_len
  D, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
  # Forward x @ W, backward dy @ W^T and x^T @ dy, for the MLP and the unembedding.
  shapes = [(T, D, F), (T, F, D), (D, T, F), (T, D, V), (T, V, D), (D, T, V)]
  rates = matmul_rates(shapes, args.threads)
  best_xla = max(r[1] for r in rates)

  def run_jax():
    nonlocal state
    state, metrics = compiled(state, jbatch)
    jax.block_until_ready(metrics)

  run_jax()
  ours = sorted(train_speed.timed(run_jax) for _ in range(args.rounds))[args.rounds // 2]

  torch.set_num_threads(args.threads)
  with tempfile.TemporaryDirectory() as folder:
    tmodel = train_speed.torch_model(model, folder)
  topt = train_speed.torch_optimizer(tmodel, config.optim)
  tinputs = train_speed.torch_inputs(batch)
  clip = config.optim.clip_norm
  train_speed.torch_step(tmodel, topt, tinputs, clip)
  theirs = sorted(train_speed.timed(lambda: train_speed.torch_step(tmodel, topt, tinputs, clip))
                  for _ in range(args.rounds))[args.rounds // 2]

  bound = gflop / best_xla
  print(f"# Full-depth train step roofline ({'tiny' if args.tiny else 'SmolLM2-135M shape'}, "
        f"batch {config.batch_size} x {config.data.seq_len}, f32, jax {jax.__version__}, torch "
        f"{torch.__version__}, {args.threads} threads, {os.cpu_count()} cores)\n")
  print("| matmul [m, k] x [k, n] | XLA GF/s | torch GF/s |\n|---|---|---|")
  for (m, k, n), xla, tor in rates:
    print(f"| {m} x {k} x {n} | {xla:.0f} | {tor:.0f} |")
  print(f"\nstep work (XLA cost analysis): {gflop:.0f} GFLOP")
  print(f"our step: {ours[0]:.2f} s wall ({ours[1]:.2f} s CPU), {gflop / ours[0]:.0f} GF/s")
  print(f"PyTorch loop step: {theirs[0]:.2f} s wall ({theirs[1]:.2f} s CPU), "
        f"{gflop / theirs[0]:.0f} GF/s on the same work")
  print(f"lower bound of our step (all work at the best XLA matmul rate, {best_xla:.0f} GF/s): "
        f"{bound:.2f} s, so at most {theirs[0] / bound:.2f}x the PyTorch loop's tokens/s "
        f"(today {theirs[0] / ours[0]:.2f}x)")


if __name__ == "__main__":
  main()
