"""Decode speed of ULS plans: tokens/s per ratio and batch, against the byte-count ceiling and
against transformers' `generate` on the same weights.

  python -m benchmarks.decode_speed            # 24 layers, d_model 1024: ~12 min on 2 busy cores
  python -m benchmarks.decode_speed --quick    # 24 layers, d_model 256: ~2 min
  python -m benchmarks.decode_speed --checkpoint smollm2 --dtype bfloat16   # a real model
  python -m benchmarks.decode_speed --checkpoint smollm2 --no-torch --skip-unit sublayer \
      --plan-file runs/sublayer_plans/plan_sublayer_64.json --ratios 1,1.5,2   # a calibrated plan

Greedy decoding of `--new-tokens` tokens after random `--prompt-len`-token prompts (no EOS, so
every row generates the full budget). Generated tokens/s is timed over whole `generate` calls
(prefill included, compile excluded: each shape is warmed up first), best of the repeats; the
"speedup (CPU s)" column uses this process's CPU seconds instead, which vary less when other
processes share the machine. transformers runs with the best of 1 and all torch threads.

The ceiling is what ratio r could give if a decode step were bound by the bytes it reads:
(U + L w) / (U + n w), with U the final norm + unembedding bytes and w one layer's weights plus
its KV cache bytes at this batch size; n = int(L / r) kept layers. Steps that are compute-bound
(the prefill, large batches) can beat it, up to L / n. With --skip-unit or --plan-file the plan of
each ratio is that unit's (ULS's spread, or the plan file's scores) and its ceiling counts the
blocks it runs.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import tempfile
import time

import numpy as np

from ulskip_jax import decode, engine, hf, plan_layers
from ulskip_jax.kv_cache import cache_bytes
from ulskip_jax.model import layer_bytes
from ulskip_jax.skipping import SkipPlan, read_plan


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="a small model and fewer cases (~1 min)")
  p.add_argument("--checkpoint", help="a real model instead of a random one: an HF folder, a "
                 ".gguf file or 'smollm2' (then --layers ... --vocab are ignored)")
  p.add_argument("--layers", type=int, default=24)
  p.add_argument("--d-model", type=int, default=1024)
  p.add_argument("--d-ff", type=int, default=2816)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv-heads", type=int, default=4)
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--batches", default="1,8,32")
  p.add_argument("--ratios", default="1,2,3,5")
  p.add_argument("--skip-unit", default="layer", help="layer, mlp, attention or sublayer")
  p.add_argument("--plan-file", default="", help="a calibrated plan.json to plan every ratio by")
  p.add_argument("--modes", default="everywhere,paper")
  p.add_argument("--dtype", default="float32", help="compute and parameter dtype")
  p.add_argument("--attention-impl", default="einsum",
                 help="the random model's model.attention_impl: einsum | xla | cudnn | auto")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--min-seconds", type=float, default=20.0,
                 help="repeat short cases until the timed rounds last this long")
  p.add_argument("--torch-repeats", type=int, default=1)
  p.add_argument("--no-torch", action="store_true", help="skip the transformers baseline")
  p.add_argument("--torch-threads", default=f"1,{os.cpu_count()}",
                 help="torch thread counts to try; the best is reported")
  args = p.parse_args(argv)
  if args.quick:
    args.d_model, args.d_ff, args.heads, args.kv_heads, args.vocab = 256, 704, 4, 2, 2048
    args.batches, args.modes, args.repeats = "1,8", "everywhere", 1
  return args


def random_model(args):
  """A random Llama of the flags' shape, initialised on the default device in args.dtype."""
  from flax import nnx

  from ulskip_jax.model import Decoder, ModelConfig
  cfg = ModelConfig(vocab_size=args.vocab, num_layers=args.layers, d_model=args.d_model,
                    num_heads=args.heads, num_kv_heads=args.kv_heads,
                    head_dim=args.d_model // args.heads, d_ff=args.d_ff, max_position=1024,
                    dtype=args.dtype, param_dtype=args.dtype,
                    attention_impl=args.attention_impl)
  return Decoder(cfg, rngs=nnx.Rngs(0))  # eager: jitting a 7B init compiled for minutes on a GPU


def torch_model(args):
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_ff,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads, max_position_embeddings=1024, bos_token_id=1,
      eos_token_id=2, pad_token_id=0)
  return transformers.LlamaForCausalLM(cfg).eval()


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def plan_for(model, ratio: float, args) -> SkipPlan:
  """The plan timed at `ratio`: --plan-file's scores, else ULS's spread, of --skip-unit."""
  L, costs = model.cfg.num_layers, layer_bytes(model.cfg)
  if args.plan_file:
    return read_plan(args.plan_file, L).plan(ratio, args.skip_unit, costs)
  return plan_layers(L, ratio, unit=args.skip_unit, costs=costs)


def time_ours(model, prompts, args, ratios, mode) -> dict[float, tuple[float, float]]:
  """(generated tokens per wall second, per CPU second) for each ratio, best of the repeats.

  Every shape is compiled first; then the repeats (at least --repeats, and enough rounds to last
  --min-seconds) go round the ratios in turn, so that load from other processes hits every ratio
  alike. CPU seconds (all threads of this process) hardly move
  with such load, so speedups by CPU time are the steadier estimate on a shared machine.
  """
  kw = dict(max_new_tokens=args.new_tokens, eos_id=None, mode=mode)
  plans = {ratio: plan_for(model, ratio, args) for ratio in ratios}
  round_s = sum(decode.generate(model, prompts, skip=plans[r], **kw)[1].wall_s for r in ratios)
  wall = {ratio: float("inf") for ratio in ratios}
  cpu = dict(wall)
  for _ in range(max(args.repeats, math.ceil(args.min_seconds / round_s))):
    for ratio in ratios:
      start = cpu_seconds()
      _, stats = decode.generate(model, prompts, skip=plans[ratio], **kw)
      cpu[ratio] = min(cpu[ratio], cpu_seconds() - start)
      wall[ratio] = min(wall[ratio], stats.wall_s)
  tokens = len(prompts) * args.new_tokens
  return {ratio: (tokens / wall[ratio], tokens / cpu[ratio]) for ratio in ratios}


def time_torch(tmodel, prompts, args) -> tuple[float, int]:
  """(generated tokens/s, torch threads) of transformers' greedy generate, the best over the
  thread counts in --torch-threads: with other processes on the machine, OpenMP on every core
  can be 100x slower than one thread (its barriers spin while a thread is descheduled)."""
  import torch
  ids = torch.tensor(prompts)
  kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
  best = (0.0, 0)
  with torch.inference_mode():
    for threads in (int(t) for t in args.torch_threads.split(",")):
      torch.set_num_threads(threads)
      tmodel.generate(ids, max_new_tokens=2, **kw)  # warm-up
      for _ in range(args.torch_repeats):
        start = time.perf_counter()
        tmodel.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)
        best = max(best, (len(prompts) * args.new_tokens / (time.perf_counter() - start), threads))
  return best


def ceiling(model, batch: int, ratio: float, args) -> float:
  """Bytes a step reads at full depth over those at `ratio`: the weights (`layer_bytes`, what a
  sublayer plan's ratio counts) and the KV cache of the layers whose attention runs."""
  cfg = model.cfg
  L, costs = cfg.num_layers, layer_bytes(cfg)
  slots = engine.prompt_bucket(args.prompt_len) + engine.bucket(args.new_tokens,
                                                               engine.MIN_BUCKET)
  kv = cache_bytes(cfg, batch, slots) / L
  read = lambda plan: costs.read(plan) + len(plan.attention_layers) * kv
  return read(SkipPlan.full(L)) / read(plan_for(model, ratio, args))


def main(argv=None):
  args = parse_args(argv)
  batches = [int(b) for b in args.batches.split(",")]
  ratios = [float(r) for r in args.ratios.split(",")]
  if args.checkpoint:  # transformers gets the same weights, through an HF folder we write
    import transformers
    model, _ = hf.from_pretrained(args.checkpoint, dtype=args.dtype, param_dtype=args.dtype)
    cfg = model.cfg
    args.layers, args.d_model, args.d_ff, args.vocab = (cfg.num_layers, cfg.d_model, cfg.d_ff,
                                                        cfg.vocab_size)
    args.heads, args.kv_heads = cfg.num_heads, cfg.num_kv_heads
    f32, _ = hf.from_pretrained(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
      hf.save_pretrained(f32, tmp)
      tmodel = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
    del f32
  elif args.no_torch:  # built where it runs: a 7B shape would take minutes through torch
    model = random_model(args)
  else:
    tmodel = torch_model(args)
    with tempfile.TemporaryDirectory() as tmp:
      tmodel.save_pretrained(tmp)
      model, _ = hf.from_pretrained(tmp, dtype=args.dtype, param_dtype=args.dtype)
  if args.no_torch:
    tmodel = None
  rng = np.random.default_rng(0)
  print(f"# decode speed: {args.checkpoint or 'random model'}, L={args.layers} d_model={args.d_model} d_ff={args.d_ff} "
        f"heads={args.heads}/{args.kv_heads} vocab={args.vocab} dtype={args.dtype} "
        f"prompt={args.prompt_len} new={args.new_tokens}, {os.cpu_count()} CPU cores\n")
  print("| mode | batch | ratio | kept | tok/s | speedup | speedup (CPU s) | ceiling | "
        "% of ceiling | transformers tok/s | ours / transformers |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  hf_tps = {}
  for mode in args.modes.split(","):
    for batch in batches:
      start = time.perf_counter()
      prompts = rng.integers(3, args.vocab, (batch, args.prompt_len)).tolist()
      tps = time_ours(model, prompts, args, ratios, mode)
      if not args.no_torch and batch not in hf_tps:
        hf_tps[batch] = time_torch(tmodel, prompts, args)
      for ratio in ratios:
        (wall_tps, cpu_tps), (base_wall, base_cpu) = tps[ratio], tps[ratios[0]]
        speedup, ceil = wall_tps / base_wall, ceiling(model, batch, ratio, args)
        plan = plan_for(model, ratio, args)
        kept = (len(plan.attention_layers) + len(plan.mlp_layers)) / 2  # layers' worth of blocks
        hf_cols = "| |"
        if ratio == 1 and batch in hf_tps:
          hf_cols = (f"| {hf_tps[batch][0]:.1f} ({hf_tps[batch][1]} thr) | "
                     f"{wall_tps / hf_tps[batch][0]:.2f}x |")
        print(f"| {mode} | {batch} | {ratio:g} | {kept:g} | {wall_tps:.1f} | {speedup:.2f}x | "
              f"{cpu_tps / base_cpu:.2f}x | {ceil:.2f}x | {100 * speedup / ceil:.0f}% {hf_cols}",
              flush=True)
      print(f"<!-- {mode} batch {batch}: {time.perf_counter() - start:.0f} s, load "
            f"{os.getloadavg()[0]:.1f} -->", flush=True)


if __name__ == "__main__":
  main()
