"""Decode speed of ULS plans: tokens/s per ratio and batch, against the byte-count ceiling and
against transformers' `generate` on the same weights.

  python benchmarks/decode_speed.py            # 24 layers, d_model 1024: about 10 min on 2 cores
  python benchmarks/decode_speed.py --quick    # 24 layers, d_model 256: about 1 min

Greedy decoding of `--new-tokens` tokens after random `--prompt-len`-token prompts (no EOS, so
every row generates the full budget). Generated tokens/s is timed over whole `generate` calls
(prefill included, compile excluded: each shape is warmed up first), best of `--repeats`.

The ceiling is what ratio r could give if a decode step were bound by the bytes it reads:
(U + L w) / (U + n w), with U the final norm + unembedding bytes and w one layer's weights plus
its KV cache bytes at this batch size; n = int(L / r) kept layers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ulskip_jax import decode, hf, plan_layers  # noqa: E402
from ulskip_jax.model import cache_bytes  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="a small model and fewer cases (~1 min)")
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
  p.add_argument("--modes", default="everywhere,paper")
  p.add_argument("--dtype", default="float32", help="compute and parameter dtype")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--no-torch", action="store_true", help="skip the transformers baseline")
  args = p.parse_args(argv)
  if args.quick:
    args.d_model, args.d_ff, args.heads, args.kv_heads, args.vocab = 256, 704, 4, 2, 2048
    args.batches, args.modes, args.repeats = "1,8", "everywhere", 1
  return args


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


def time_ours(model, prompts, args, **kw):
  decode.generate(model, prompts, max_new_tokens=args.new_tokens, eos_id=None, **kw)  # compile
  best = float("inf")
  for _ in range(args.repeats):
    _, stats = decode.generate(model, prompts, max_new_tokens=args.new_tokens, eos_id=None, **kw)
    best = min(best, stats.wall_s)
  return len(prompts) * args.new_tokens / best


def time_torch(tmodel, prompts, args):
  import torch
  ids = torch.tensor(prompts)
  kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
  with torch.inference_mode():
    tmodel.generate(ids, **kw)
    best = float("inf")
    for _ in range(args.repeats):
      start = time.perf_counter()
      tmodel.generate(ids, **kw)
      best = min(best, time.perf_counter() - start)
  return len(prompts) * args.new_tokens / best


def ceiling(model, batch: int, ratio: float, args) -> float:
  cfg = model.cfg
  itemsize = np.dtype(cfg.param_dtype).itemsize
  L, D, H, K, Hd, F, V = (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads,
                          cfg.head_dim, cfg.d_ff, cfg.vocab_size)
  layer = (D * (H + 2 * K) * Hd + H * Hd * D + 3 * D * F + 2 * D) * itemsize
  slots = decode.bucket(args.prompt_len, decode.MIN_BUCKET) + decode.bucket(args.new_tokens,
                                                                            decode.MIN_BUCKET)
  kv = cache_bytes(cfg, batch, slots) / L
  U = (D * V + D) * itemsize
  n = len(plan_layers(L, ratio).kept)
  return (U + L * (layer + kv)) / (U + n * (layer + kv))


def main(argv=None):
  args = parse_args(argv)
  import torch
  torch.set_num_threads(os.cpu_count())
  batches = [int(b) for b in args.batches.split(",")]
  ratios = [float(r) for r in args.ratios.split(",")]
  tmodel = torch_model(args)
  with tempfile.TemporaryDirectory() as tmp:
    tmodel.save_pretrained(tmp)
    model, _ = hf.from_pretrained(tmp, dtype=args.dtype, param_dtype=args.dtype)
  if args.no_torch:
    del tmodel
  rng = np.random.default_rng(0)
  print(f"# decode speed: L={args.layers} d_model={args.d_model} d_ff={args.d_ff} "
        f"heads={args.heads}/{args.kv_heads} vocab={args.vocab} dtype={args.dtype} "
        f"prompt={args.prompt_len} new={args.new_tokens}, {os.cpu_count()} CPU cores\n")
  print("| mode | batch | ratio | kept | tok/s | speedup | ceiling | % of ceiling | transformers "
        "tok/s | ours / transformers |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for mode in args.modes.split(","):
    for batch in batches:
      prompts = rng.integers(3, args.vocab, (batch, args.prompt_len)).tolist()
      base = None
      for ratio in ratios:
        start = time.perf_counter()
        tps = time_ours(model, prompts, args, ratio=ratio, mode=mode)
        base = base or tps
        ceil = ceiling(model, batch, ratio, args)
        hf_cols = "| |"
        if ratio == 1 and not args.no_torch and mode == args.modes.split(",")[0]:
          hf_tps = time_torch(tmodel, prompts, args)
          hf_cols = f"| {hf_tps:.1f} | {tps / hf_tps:.2f}x |"
        kept = len(plan_layers(args.layers, ratio).kept)
        print(f"| {mode} | {batch} | {ratio:g} | {kept} | {tps:.1f} | {tps / base:.2f}x | "
              f"{ceil:.2f}x | {100 * tps / base / ceil:.0f}% {hf_cols}"
              f"  <!-- {time.perf_counter() - start:.0f} s -->", flush=True)


if __name__ == "__main__":
  main()
