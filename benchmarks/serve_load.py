"""Load on the OpenAI server: Poisson arrivals of chat requests at several rates, per plan.

  python -m benchmarks.serve_load --checkpoint smollm2 --ratios 1,2 --rates 0.25,0.5,1 \
      --requests 12 --output benchmarks/results/smollm2/serve_load   # starts serve.py itself
  python -m benchmarks.serve_load --url http://127.0.0.1:8000 --models smollm2,smollm2@2x ...

The workload: chat requests asking to rewrite 1 to 3 consecutive KJV verses
(`examples/kjv_test64.txt`) in one of a few instructions, so prompts spread from about 50 to 200
tokens (SmolLM2's chat template included); greedy, streamed, up to --max-tokens tokens each. For each plan (model name) and rate,
--requests requests arrive with exponential gaps (seeded), each on its own connection. Per run:
generated tokens/s (all completion tokens over the first arrival to the last finish), p50 / p99
time to first token (arrival to the first content chunk) and p50 / p99 inter-token latency
((last chunk - first chunk) / (tokens - 1) per request: the server sends a chunk per decode call,
of up to --steps-per-call tokens). Writes OUTPUT.json, OUTPUT.md (a table) and OUTPUT.png
(latency against load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTRUCTIONS = ("Rewrite this in modern English:", "Summarise this passage in one sentence:",
                "Explain what happens here, simply:", "Translate this into plain English:")


def prompts(n: int, seed: int) -> list[str]:
  verses = open(os.path.join(ROOT, "examples", "kjv_test64.txt"), encoding="utf-8").read().split(
      "\n")
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    start, count = rng.randrange(len(verses) - 3), rng.choice([1, 1, 2, 2, 3])
    out.append(rng.choice(INSTRUCTIONS) + "\n" + " ".join(verses[start:start + count]))
  return out


async def one(client, model: str, text: str, max_tokens: int) -> dict:
  body = dict(model=model, messages=[dict(role="user", content=text)], max_tokens=max_tokens,
              temperature=0, stream=True, stream_options=dict(include_usage=True))
  start, chunks, usage = time.perf_counter(), [], None
  async with client.stream("POST", "/v1/chat/completions", json=body) as r:
    r.raise_for_status()
    async for line in r.aiter_lines():
      if not line.startswith("data: {"):
        continue
      chunk = json.loads(line[6:])
      usage = chunk.get("usage") or usage
      if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
        chunks.append(time.perf_counter())
  tokens = usage["completion_tokens"]
  return dict(start=start, end=time.perf_counter(), tokens=tokens,
              prompt_tokens=usage["prompt_tokens"],
              ttft=(chunks[0] - start) if chunks else None,
              itl=(chunks[-1] - chunks[0]) / (tokens - 1) if len(chunks) > 1 else None)


async def run_rate(url: str, model: str, texts: list[str], rate: float, max_tokens: int,
                   seed: int) -> dict:
  rng = np.random.default_rng(seed)
  gaps = rng.exponential(1 / rate, len(texts))
  async with httpx.AsyncClient(base_url=url, timeout=None,
                               limits=httpx.Limits(max_connections=len(texts))) as client:
    async def delayed(delay, text):
      await asyncio.sleep(delay)
      return await one(client, model, text, max_tokens)
    t0 = time.perf_counter()
    cpu0 = os.times()
    results = await asyncio.gather(*(delayed(d, t) for d, t in zip(np.cumsum(gaps), texts)))
  wall = max(r["end"] for r in results) - t0
  pct = lambda xs, q: float(np.percentile([x for x in xs if x is not None], q))
  ttft, itl = [r["ttft"] for r in results], [r["itl"] for r in results]
  generated = sum(r["tokens"] for r in results)
  return dict(model=model, rate=rate, requests=len(results), wall_s=wall,
              generated_tokens=generated, prompt_tokens=sum(r["prompt_tokens"] for r in results),
              generated_tokens_per_s=generated / wall, ttft_p50_s=pct(ttft, 50),
              ttft_p99_s=pct(ttft, 99), itl_p50_s=pct(itl, 50), itl_p99_s=pct(itl, 99),
              client_cpu_s=os.times().user - cpu0.user)


def start_server(args) -> tuple[str, subprocess.Popen]:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  cmd = [sys.executable, "serve.py", "--checkpoint", args.checkpoint, "--ratios", args.ratios,
         *(["--speculative", args.speculative] if args.speculative else []),
         "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
         "--steps-per-call", str(args.steps_per_call), "--port", str(port)]
  proc = subprocess.Popen(cmd, cwd=ROOT)
  url = f"http://127.0.0.1:{port}"
  while True:
    if proc.poll() is not None:
      sys.exit(f"serve.py exited with {proc.returncode}")
    try:
      if httpx.get(url + "/health", timeout=1).status_code == 200:
        return url, proc
    except httpx.HTTPError:
      time.sleep(1)


def server_cpu_s(proc) -> float:
  """The server process's user + system CPU seconds so far (Linux), 0 without one."""
  if proc is None:
    return 0.0
  with open(f"/proc/{proc.pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def table(runs: list[dict]) -> str:
  lines = ["| model | rate (req/s) | requests | generated tok/s | TTFT p50 / p99 (s) | "
           "inter-token p50 / p99 (ms) |", "|---|---|---|---|---|---|"]
  for r in runs:
    lines.append(f"| {r['model']} | {r['rate']:g} | {r['requests']} | "
                 f"{r['generated_tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} / "
                 f"{r['ttft_p99_s']:.2f} | {1e3 * r['itl_p50_s']:.0f} / "
                 f"{1e3 * r['itl_p99_s']:.0f} |")
  return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for model in dict.fromkeys(r["model"] for r in runs):
    mine = [r for r in runs if r["model"] == model]
    load = [r["generated_tokens_per_s"] for r in mine]
    axes[0].plot(load, [r["ttft_p99_s"] for r in mine], "o-", label=f"{model} p99")
    axes[0].plot(load, [r["ttft_p50_s"] for r in mine], "o--", label=f"{model} p50")
    axes[1].plot(load, [1e3 * r["itl_p99_s"] for r in mine], "o-", label=f"{model} p99")
    axes[1].plot(load, [1e3 * r["itl_p50_s"] for r in mine], "o--", label=f"{model} p50")
  axes[0].set(xlabel="generated tokens/s", ylabel="time to first token (s)")
  axes[1].set(xlabel="generated tokens/s", ylabel="inter-token latency (ms)")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--url", help="a running server (else serve.py is started with the flags below)")
  p.add_argument("--models", help="model names to load, comma-separated (default: all served)")
  p.add_argument("--checkpoint", default="smollm2")
  p.add_argument("--ratios", default="1,2")
  p.add_argument("--speculative", default="draft_ratio=2,k=4", help="the lossless plan's "
                 "drafts ('' for none)")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--max-seq-len", type=int, default=384)
  p.add_argument("--steps-per-call", type=int, default=4)
  p.add_argument("--rates", default="0.25,0.5,1", help="request rates (req/s), comma-separated")
  p.add_argument("--requests", type=int, default=12, help="requests per (model, rate)")
  p.add_argument("--max-tokens", type=int, default=32)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", help="OUTPUT.json / .md / .png")
  args = p.parse_args(argv)
  url, proc = (args.url, None) if args.url else start_server(args)
  try:
    models = (args.models.split(",") if args.models else
              [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]])
    texts = prompts(args.requests, args.seed)
    asyncio.run(run_rate(url, models[0], texts[:2], 10.0, 4, args.seed))  # first-use costs
    runs = []
    for model in models:
      for rate in (float(r) for r in args.rates.split(",")):
        cpu = server_cpu_s(proc)
        runs.append(asyncio.run(run_rate(url, model, texts, rate, args.max_tokens, args.seed)))
        if proc is not None:
          runs[-1]["server_cpu_s"] = server_cpu_s(proc) - cpu
        print(table(runs[-1:]).splitlines()[-1], flush=True)
  finally:
    if proc is not None:
      proc.terminate()
      proc.wait()
  print(table(runs))
  if args.output:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    meta = dict(args=vars(args), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                commit=commit, load_average_after=os.getloadavg())
    with open(args.output + ".json", "w") as f:
      json.dump(dict(meta, runs=runs), f, indent=2)
    with open(args.output + ".md", "w") as f:
      f.write(table(runs))
    plot(runs, args.output + ".png")


if __name__ == "__main__":
  main()
