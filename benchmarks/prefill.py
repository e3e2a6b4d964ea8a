"""Prefill speed: the jitted `engine.prefill` alone, against the training forward on the same tokens.

  python -m benchmarks.prefill --checkpoint smollm2 --batches 1,8,32 --prompt-len 96

Each batch of random `--prompt-len`-token prompts is left padded as `generate` pads it (to the
prompt bucket, into a cache of bucket + `--new-tokens` bucket slots) and prefilled at full depth.
Rows: the prefill as `generate` runs it, and `model.hidden` over the same padded tokens with no
cache (the training step's forward, its own [T, T] causal attention). Timed warm, best of
`--repeats`, as wall and as this process's CPU seconds (steadier when other processes share the
cores). GFLOP/s counts the matmuls of the prompt tokens (projections, MLP, attention over the
keys each call attends to, the unembedding of the positions each unembeds).
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ulskip_jax import engine, hf
from ulskip_jax.skipping import SkipPlan


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def best_of(fn, args, repeats: int) -> tuple[float, float]:
  """(best wall s, best CPU s) of `fn(*args)` after a warm-up call."""
  jax.block_until_ready(fn(*args))
  wall = cpu = float("inf")
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), cpu_seconds()
    jax.block_until_ready(fn(*args))
    wall, cpu = min(wall, time.perf_counter() - start), min(cpu, cpu_seconds() - start_cpu)
  return wall, cpu


def gflop(cfg, B: int, T: int, S: int, unembedded: int) -> float:
  """Matmul GFLOP of a T-token forward attending to S keys per query, unembedding `unembedded`
  positions per row."""
  D, H, K, Hd, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff
  per_token = 2 * (D * (H + 2 * K) * Hd + H * Hd * D + 3 * D * F) + 4 * H * Hd * S
  return (B * T * per_token * cfg.num_layers + 2 * B * unembedded * D * cfg.vocab_size) / 1e9


def torch_prefill(args):
  """transformers' prefill of the same weights, as its `generate` runs it: a function of
  (state, prompts, pad) like ours, which takes the prompts unpadded."""
  import tempfile

  import torch
  import transformers
  torch.set_num_threads(args.torch_threads)
  f32, _ = hf.from_pretrained(args.checkpoint)
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(f32, tmp)
    tmodel = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()

  def run(state, prompts, pad):
    ids = torch.tensor(prompts[:, pad[0]:])
    with torch.inference_mode():
      return tmodel(ids, use_cache=True, logits_to_keep=1).logits.numpy()

  return run


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", default="smollm2")
  p.add_argument("--batches", default="1,8,32")
  p.add_argument("--prompt-len", type=int, default=96)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--prompt-slots", type=int,
                 help="prompt slots instead of generate's bucket (e.g. the power of two it used)")
  p.add_argument("--torch-threads", type=int, default=0,
                 help="also time transformers' prefill (its forward over the unpadded prompts, "
                 "a cache, the last position's logits) with this many torch threads; 0 = not")
  p.add_argument("--no-forward", action="store_true", help="time the prefill only")
  args = p.parse_args(argv)
  model, _ = hf.from_pretrained(args.checkpoint)
  cfg = model.cfg
  graphdef, state = nnx.split(model)
  plan = SkipPlan.full(cfg.num_layers)
  P = args.prompt_slots or engine.prompt_bucket(args.prompt_len)
  S = P + engine.bucket(args.new_tokens, engine.MIN_BUCKET)

  @jax.jit
  def prefill(state, prompts, pad):
    return engine.prefill(nnx.merge(graphdef, state), prompts, pad, S, skip=plan,
                          paper_mode=False)

  @jax.jit
  def forward(state, prompts, pad):  # the training step's forward: no cache, every position
    positions = jnp.arange(P, dtype=jnp.int32)[None] - pad[:, None]
    x, _ = nnx.merge(graphdef, state).hidden(prompts, positions_BT=positions,
                                             segment_ids_BT=(positions >= 0).astype(jnp.int32))
    return x

  print(f"# prefill: {args.checkpoint}, prompt {args.prompt_len} tokens in {P} slots, cache {S} "
        f"slots, {jax.device_count()} device(s)\n")
  print("| batch | what | wall ms | CPU ms | prompt tok/s (wall) | GFLOP | GFLOP/s (wall) |")
  print("|---|---|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  for B in (int(b) for b in args.batches.split(",")):
    prompts = np.zeros((B, P), np.int32)
    prompts[:, P - args.prompt_len:] = rng.integers(3, cfg.vocab_size, (B, args.prompt_len))
    pad = np.full((B,), P - args.prompt_len, np.int32)
    runs = [("prefill", prefill, gflop(cfg, B, P, S, 1))]
    if not args.no_forward:
      runs.append(("training forward", forward, gflop(cfg, B, P, P, 0)))
    if args.torch_threads:
      runs.append(("transformers", torch_prefill(args), gflop(cfg, B, args.prompt_len,
                                                            args.prompt_len, 1)))
    for name, fn, flops in runs:
      wall, cpu = best_of(fn, (state, prompts, pad), args.repeats)
      print(f"| {B} | {name} | {1e3 * wall:.0f} | {1e3 * cpu:.0f} | "
            f"{B * args.prompt_len / wall:.0f} | {flops:.1f} | {flops / wall:.0f} |", flush=True)


if __name__ == "__main__":
  main()
