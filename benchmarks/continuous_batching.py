"""Continuous against static batching: generated tokens/s of `generate_text` on a workload whose
output lengths spread, with greedy outputs compared prompt by prompt.

  python -m benchmarks.continuous_batching                      # SmolLM2-135M, batch 16, ~8 min
  python -m benchmarks.continuous_batching --quick              # a tiny random model, ~1 min

The workload: the 64 KJV test verses (`examples/kjv_test64.txt`, in file order) as chat prompts
asking for a modern-English rewrite, greedy, up to --max-new-tokens tokens with the model's EOS,
so rows finish at different steps. Static batching decodes batches of --batch-size prompts sorted
by prompt length, each until its slowest row is done (`static_batches=True`); continuous batching
gives a finished row the next prompt. Each case is warmed up first (compile excluded); the wall
time, this process's CPU time and the load average are reported for the timed run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from ulskip_jax import decode, hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = "Rewrite this King James verse in modern English.\nKJV: {}"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="a tiny random model (smoke run)")
  p.add_argument("--checkpoint", default="smollm2")
  p.add_argument("--input", default=os.path.join(ROOT, "examples", "kjv_test64.txt"))
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--ratios", default="1,2")
  p.add_argument("--mode", default="paper", choices=("paper", "everywhere"))
  p.add_argument("--output", help="append the markdown table to this file")
  return p.parse_args(argv)


def load_model(args):
  if args.quick:
    from ulskip_jax import testing
    import tempfile
    folder = tempfile.mkdtemp()
    testing.save_hf_model("llama", folder)
    tokenizer = testing.save_tiny_tokenizer(folder)
    return hf.from_pretrained(folder)[0], tokenizer, False
  model, tokenizer = hf.from_pretrained(args.checkpoint)
  return model, tokenizer, bool(getattr(tokenizer, "chat_template", None))


def timed(fn):
  cpu, wall = time.process_time(), time.perf_counter()
  out = fn()
  return out, time.perf_counter() - wall, time.process_time() - cpu, os.getloadavg()[0]


def main(argv=None):
  args = parse_args(argv)
  model, tokenizer, chat = load_model(args)
  with open(args.input) as f:
    texts = [TEMPLATE.format(line.strip()) for line in f if line.strip()]
  if args.quick:
    texts = texts[:24]
  lines = [f"`python -m benchmarks.continuous_batching {' '.join(argv or sys.argv[1:])}`".strip(),
           "", f"{len(texts)} prompts, batch {args.batch_size}, max_new_tokens "
           f"{args.max_new_tokens}, greedy, EOS, chat={chat}, mode {args.mode}.", "",
           "| ratio | batching | generated tokens | wall s | CPU s | load (1 min) "
           "| generated tok/s | continuous / static | outputs identical |", "|---|---|---|---|---|---|---|---|---|"]
  print("\n".join(lines), flush=True)
  for ratio in (float(r) for r in args.ratios.split(",")):
    kw = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, chat=chat,
              ratio=ratio if ratio != 1 else None, mode=args.mode)
    results = {}
    for name, static in (("static", True), ("continuous", False)):
      decode.generate_text(model, tokenizer, texts, static_batches=static, **kw)  # compile
      (outs, stats), wall, cpu, load = timed(
          lambda: decode.generate_text(model, tokenizer, texts, static_batches=static, **kw))
      results[name] = outs, stats, wall, cpu, load
    static_rate = results["static"][1].generated_tokens / results["static"][2]
    for name, (outs, stats, wall, cpu, load) in results.items():
      rate = stats.generated_tokens / wall
      same = sum(a == b for a, b in zip(outs, results["static"][0]))
      line = (f"| {ratio:g} | {name} | {stats.generated_tokens} | {wall:.1f} | {cpu:.1f} | "
              f"{load:.2f} | {rate:.1f} | {rate / static_rate:.2f}x | {same}/{len(texts)} |")
      print(line, flush=True)
      lines.append(line)
  if args.output:
    with open(args.output, "a") as f:
      f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
  main()
