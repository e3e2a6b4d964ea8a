"""Self-speculative decoding against full-depth decoding and plain ULS: tokens/s and acceptance.

  python -m benchmarks.speculative --checkpoint runs/bible_multi            # ~5 min, 2 CPU cores
  python -m benchmarks.speculative --checkpoint runs/bible_multi --quick    # ~1.5 min
  python -m benchmarks.speculative --quick                                  # random weights

For each batch size, greedy decoding of the same prompts (held-out Bible verses in the checkpoint's
prompt template; random tokens for random weights) by: the full model; plain ULS at each draft
ratio (paper mode; a different, lossy output); and speculative decoding for every (draft ratio, k),
whose output is checked to be identical to the full model's ("same" column). EOS ends a row, so
every method that is exact generates the same tokens.

Generated tokens/s is timed over whole `generate` calls (prefill included, compile excluded: every
shape is warmed up first), the best of the repeats, the methods taken in turn each round so that
load from other processes hits them alike; "x full (CPU)" is the speedup by this process's CPU
seconds, the steadier figure on a shared machine. Acceptance = accepted drafts / drafted tokens;
"tok/pass" = tokens a row gains per verify pass, 1 + its accepted drafts (at most k + 1; the batch
runs as many passes as its slowest row needs). KV MiB: the caches allocated (speculative: the
full-depth verify cache + the draft's kept-layer cache).

--checkpoint takes a Hugging Face folder, a .gguf file, "smollm2" or a training workdir
(`checkpoint.load_for_inference`); without one, a random model of the bible_2x shape (12 layers,
d_model 128), on which the draft rarely agrees with the full model: its acceptance and speed say
little about a trained model.

--widen-mlp F zero-pads the checkpoint's MLP to width F: the same logits (checked) and hence the
same acceptance, with the weight bytes of a bigger model, for this CPU's weight-bandwidth-bound
regime; the 3.5M-parameter checkpoint itself fits in the L3 cache. --balance first times a
weight-streaming matmul per row count: where verifying B (k + 1) rows stops being nearly free;
--pass-costs times the model's own draft step and verify pass instead of decoding, and says how
many tokens per verify pass speculation needs to break even with full depth.
Measured results: benchmarks/results/smollm2/speculative*.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import time

import numpy as np

from ulskip_jax import decode, plan_layers, sampling

TEMPLATE = "KJV: {source}\nWEB:"  # configs/base.py's, for Hugging Face folders


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", help="Hugging Face folder or training workdir (default: random)")
  p.add_argument("--quick", action="store_true", help="batches 1,8; k 2,4; draft ratio 2")
  p.add_argument("--batches", default="1,8,32")
  p.add_argument("--ks", default="2,4,6", help="draft tokens per round")
  p.add_argument("--draft-ratios", default="2,3")
  p.add_argument("--draft-cache", default="shared", help="shared | separate | shared,separate")
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--rows", type=int, default=32,
                 help="prompts per batch size: max(rows, batch), decoded in batches of batch")
  p.add_argument("--repeats", type=int, default=3, help="timed calls per case (best reported)")
  p.add_argument("--min-seconds", type=float, default=0.0,
                 help="repeat short cases until each batch size's timed rounds last this long")
  p.add_argument("--widen-mlp", type=int, default=0, metavar="F",
                 help="zero-pad the MLP to width F: the same function and acceptance with more "
                      "weight bytes per step (a weight-bandwidth-bound stand-in; see docstring)")
  p.add_argument("--balance", action="store_true",
                 help="first time x[B, 4096] @ W[4096, 16384] (f32, 256 MiB) per batch size: "
                      "where a step stops being weight-bandwidth-bound on this machine")
  p.add_argument("--pass-costs", action="store_true",
                 help="instead of decoding, time the model's cached forward of 1 and k + 1 tokens "
                      "(full depth, each draft plan): the tokens per verify pass speculation must "
                      "reach to break even with full depth on this machine")
  p.add_argument("--continuous", action="store_true",
                 help="continuous batching (`decode.generate` with batch_size): a finished row takes "
                 "the next prompt, so no batch waits for its slowest row")
  p.add_argument("--out", help="also write the markdown table here")
  args = p.parse_args(argv)
  if args.quick:
    args.batches, args.ks, args.draft_ratios, args.repeats = "1,8", "2,4", "2", 2
  return args


def load(args):
  """(model, prompts: list of token lists, eos_id, description, calibrated plans or None)."""
  from ulskip_jax import batching, corpora
  if args.checkpoint is None:
    from flax import nnx

    from ulskip_jax.model import Decoder, ModelConfig
    cfg = ModelConfig(vocab_size=4096, num_layers=12, d_model=128, num_heads=4, num_kv_heads=2,
                      head_dim=32, d_ff=512, tie_embeddings=True)
    model = nnx.jit(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, int(rng.integers(16, 33))).tolist()
               for _ in range(64)]
    return model, prompts, None, "random weights (bible_2x shape)", None
  from ulskip_jax import skipping
  path = args.checkpoint
  layer_scores = None
  if not os.path.isdir(os.path.join(path, "checkpoints")):  # HF folder, .gguf, "smollm2"
    from ulskip_jax import hf
    model, tokenizer = hf.from_pretrained(path)
    template = TEMPLATE
  else:
    from ulskip_jax import checkpoint
    model, tokenizer, config = checkpoint.load_for_inference(os.path.abspath(path),
                                                            with_config=True)
    template = config.get("data", {}).get("template", TEMPLATE)
    # A calibrated run drafts with the plan it trained (its plan.json), not ULS's even spread.
    layer_scores = skipping.workdir_plan(os.path.abspath(path), model.cfg.num_layers)
  import ml_collections
  pairs = corpora.load_pairs(ml_collections.ConfigDict(dict(source="bible")))["validation"]
  texts = [batching.format_prompt(template, pair["source"]) for pair in pairs[:96]]
  # Long prompts are dropped, not cut: a cut chat prompt would lose its assistant header.
  prompts = [p for p in (decode.encode_prompt(tokenizer, t) for t in texts) if len(p) <= 128][:64]
  eos_id, _ = decode.special_ids(tokenizer)
  return model, prompts, eos_id, path, layer_scores


def widen_mlp(model, d_ff: int):
  """The same model with its MLP zero-padded to width d_ff: gate / up columns and down rows of
  zeros add exactly 0 to every output (act(0) * 0 = 0), so logits and hence acceptance are
  unchanged, while each decode step streams d_ff / F times the MLP weights."""
  import dataclasses

  import jax
  from flax import nnx

  from ulskip_jax.model import Decoder
  if d_ff < model.cfg.d_ff:
    raise SystemExit(f"--widen-mlp {d_ff} is below the model's d_ff {model.cfg.d_ff}")
  wide = nnx.eval_shape(lambda: Decoder(dataclasses.replace(model.cfg, d_ff=d_ff),
                                        rngs=nnx.Rngs(0)))
  target = nnx.state(wide, nnx.Param)
  padded = jax.tree.map(
      lambda x, t: np.pad(np.asarray(x), [(0, n - m) for m, n in zip(x.shape, t.shape)]),
      nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(target))
  nnx.replace_by_pure_dict(target, jax.tree.map(jax.numpy.asarray, padded))
  nnx.update(wide, target)
  tokens = jax.numpy.arange(16)[None] % model.cfg.vocab_size
  diff = float(jax.numpy.abs(wide(tokens) - model(tokens)).max())
  if diff > 1e-4:
    raise AssertionError(f"the widened model's logits differ by {diff}")
  return wide


def machine_balance(batches) -> str:
  """A decode step's matmuls on this machine: time of x[B, D] @ W[D, F] with W far larger than
  any cache. While W's bytes dominate, the time stays flat in B (speculative verification of
  k + 1 tokens is nearly free); once the FLOPs dominate it grows with B (verification costs
  k + 1 steps and speculation cannot win)."""
  import jax
  import jax.numpy as jnp
  D, F = 4096, 16384
  w = jax.random.normal(jax.random.key(0), (D, F), jnp.float32)
  matmul = jax.jit(lambda x, w: x @ w)
  lines = ["| B rows | ms | GB/s of W | GFLOP/s | x the B=1 time |", "|---|---|---|---|---|"]
  base = None
  for b in sorted({1, 2, 4, *batches, 16, 32}):
    x = jnp.ones((b, D), jnp.float32)
    matmul(x, w).block_until_ready()
    times = []
    for _ in range(20):
      start = time.perf_counter()
      matmul(x, w).block_until_ready()
      times.append(time.perf_counter() - start)
    t = min(times)
    base = base or t
    lines.append(f"| {b} | {t * 1e3:.1f} | {D * F * 4 / t / 1e9:.1f} | "
                 f"{2 * b * D * F / t / 1e9:.1f} | {t / base:.2f} |")
  return "\n".join(lines)


def pass_costs(model, plans: dict, ks, batches, prompt_len: int = 48, repeats: int = 20) -> str:
  """The cost of one round, from the model's own cached forwards: a draft step (1 token, the
  draft's layers) and a verify pass (k + 1 tokens, every layer), against a full-depth step.
  A round of k drafts and one verify pass emits (tokens per pass) tokens per row, so speculation
  beats full depth only when tokens per pass > (k t_draft + t_verify) / t_full: the break-even.
  Above k + 1 it cannot win at any acceptance."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from ulskip_jax import engine
  from ulskip_jax.skipping import SkipPlan
  graphdef, state = nnx.split(model)
  L, S = model.cfg.num_layers, prompt_len + 2 * max(ks) + 64
  full = SkipPlan.full(L)

  @functools.partial(jax.jit, static_argnums=(0,))
  def prefill(b, state):
    prompt = jnp.ones((b, prompt_len), jnp.int32)
    return engine.prefill(nnx.merge(graphdef, state), prompt, jnp.zeros((b,), jnp.int32), S,
                          skip=full, paper_mode=False)[1]

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def forward(t, plan, state, cache, index):
    m = nnx.merge(graphdef, state)
    b = cache.pos.shape[0]
    view = cache.kept_view(plan.attention_layers) if not plan.is_full else cache
    h, view = m.hidden(jnp.ones((b, t), jnp.int32), skip=plan,
                       positions_BT=index + jnp.zeros((b, 1), jnp.int32) + jnp.arange(t),
                       segment_ids_BT=jnp.ones((b, t), jnp.int32), cache=view, cache_index=index)
    return sampling.argmax(m.unembed(h)), view

  def ms(b, t, plan):
    cache = prefill(b, state)
    jax.block_until_ready(forward(t, plan, state, cache, jnp.int32(prompt_len)))
    times = []
    for i in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(forward(t, plan, state, cache, jnp.int32(prompt_len + i % 8)))
      times.append(time.perf_counter() - start)
    return min(times) * 1e3

  lines = ["| batch | draft | k | full step ms | draft step ms | verify pass ms (k + 1 tokens) "
           "| break-even tok/pass | at most (k + 1) |", "|---|---|---|---|---|---|---|---|"]
  for b in batches:
    t_full, t_verify = ms(b, 1, full), {k: ms(b, k + 1, full) for k in ks}
    for r, plan in plans.items():
      t_draft = ms(b, 1, plan)
      for k in ks:
        lines.append(f"| {b} | r{r:g} | {k} | {t_full:.1f} | {t_draft:.1f} | {t_verify[k]:.1f} | "
                     f"{(k * t_draft + t_verify[k]) / t_full:.2f} | {k + 1} |")
  return "\n".join(lines)


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def draft_plans(args, num_layers: int, layer_scores=None) -> dict:
  """{ratio: SkipPlan}: a calibrated workdir's plans, else ULS's."""
  ratios = [float(r) for r in args.draft_ratios.split(",")]
  return {r: layer_scores.plan(r) if layer_scores else plan_layers(num_layers, r) for r in ratios}


def methods(args, plans: dict):
  """[(name, generate keyword arguments)]: full, plain skipping per ratio, speculative per case."""
  out = [("full", {})]
  out += [(f"{p.strategy} r{r:g}", dict(skip=p)) for r, p in plans.items()]
  for cache in args.draft_cache.split(","):
    for r, p in plans.items():
      for k in (int(k) for k in args.ks.split(",")):
        name = f"spec r{r:g} k{k}" + ("" if cache == "shared" else " separate")
        out.append((name, dict(speculative=dict(draft_skip=p.skipped, num_draft_tokens=k,
                                                draft_cache=cache))))
  return out


def bench_batch(model, prompts, batch, eos_id, cases, args):
  """{name: (tok/s wall, tok/s CPU, stats, outputs)}: `prompts` decoded in batches of `batch`
  (with --continuous, on `batch` rows that each take the next prompt when done)."""
  kw = dict(max_new_tokens=args.new_tokens, eos_id=eos_id)
  chunks = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]

  def run(case):
    if args.continuous:
      return decode.generate(model, prompts, batch_size=batch, **case, **kw)
    outputs, stats = [], None
    for chunk in chunks:
      out, s = decode.generate(model, chunk, **case, **kw)
      outputs, stats = outputs + out, s if stats is None else stats + s
    return outputs, stats

  results = {}
  for name, case in cases:  # warm up: compile every shape
    outputs, stats = run(case)
    results[name] = [float("inf"), float("inf"), stats, outputs]
  start = time.perf_counter()
  rounds = 0
  while rounds < args.repeats or time.perf_counter() - start < args.min_seconds:
    for name, case in cases:
      cpu0 = cpu_seconds()
      _, stats = run(case)
      best = results[name]
      best[0] = min(best[0], stats.wall_s)
      best[1] = min(best[1], cpu_seconds() - cpu0)
      best[2] = stats
    rounds += 1
  return {name: (r[2].generated_tokens / r[0], r[2].generated_tokens / r[1], r[2], r[3])
          for name, r in results.items()}


def table(model, batches, per_batch) -> str:
  lines = ["| batch | method | tok/s | x full | x full (CPU) | same | acceptance | tok/pass | "
           "KV MiB |", "|---|---|---|---|---|---|---|---|---|"]
  for batch in batches:
    res = per_batch[batch]
    full_wall, full_cpu, _, full_out = res["full"]
    for name, (wall, cpu, stats, out) in res.items():
      spec = hasattr(stats, "acceptance_rate")
      same = ("yes" if out == full_out else "NO") if spec else "-"
      acceptance = f"{stats.acceptance_rate:.2f}" if spec else "-"
      per_pass = f"{stats.tokens_per_row_pass:.2f}" if spec else "-"
      lines.append(f"| {batch} | {name} | {wall:.0f} | {wall / full_wall:.2f} | "
                   f"{cpu / full_cpu:.2f} | {same} | {acceptance} | {per_pass} | "
                   f"{stats.cache_bytes / 2**20:.2f} |")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  if args.balance:
    print(machine_balance([int(b) for b in args.batches.split(",")]), flush=True)
  model, prompts, eos_id, what, layer_scores = load(args)
  if args.widen_mlp:
    model = widen_mlp(model, args.widen_mlp)
    what += f" with its MLP zero-padded to d_ff {args.widen_mlp}"
  cfg = model.cfg
  batches = [int(b) for b in args.batches.split(",")]
  draft = draft_plans(args, cfg.num_layers, layer_scores)
  if args.pass_costs:
    print(pass_costs(model, draft, [int(k) for k in args.ks.split(",")], batches), flush=True)
    return
  cases = methods(args, draft)
  plans = ", ".join(f"r{r:g} ({p.strategy}): kept {p.kept}" for r, p in draft.items())
  print(f"# speculative decoding: {what}; L={cfg.num_layers} d_model={cfg.d_model} "
        f"vocab={cfg.vocab_size}; {plans}; greedy, {args.new_tokens} new tokens, "
        f"EOS {'on' if eos_id is not None else 'off'}; "
        f"{'continuous batching' if args.continuous else 'static batches'}",
        flush=True)
  per_batch = {}
  start = time.perf_counter()
  for batch in batches:
    rows = prompts[:max(batch, args.rows)]
    per_batch[batch] = bench_batch(model, rows, batch, eos_id, cases, args)
    print(f"batch {batch} done at {time.perf_counter() - start:.0f} s", flush=True)
  text = table(model, batches, per_batch)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
