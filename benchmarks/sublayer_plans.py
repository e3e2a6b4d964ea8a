"""Sublayer plans on SmolLM2-135M-Instruct, zero-shot: whole layers, MLP blocks, attention
blocks or both kinds chosen apart, at the same byte ratio (weight bytes read per generated token
at full depth over those with the plan, `skipping.LayerBytes`), by held-out KL to full depth and
perplexity, in paper mode (the prompt at full depth).

  nice python -m benchmarks.sublayer_plans [--ratios 1.1,1.2,1.25,1.5] [--heldout-tokens 512]
  nice python -m benchmarks.sublayer_plans --calibrated --ratios 1.1,1.25,1.5,2 \
      --calibration-tokens 64 --workdir runs/sublayer_plans --tag calibrated

The held-out text is benchmarks/plans.py's (response tokens of the validation books). Rows, ULS's
even spread:
  layer        skip.unit="layer" as configured: n = int(L / r) kept layers (a layer count, so its
               byte ratio is below r: the unembedding is read whatever the plan);
  layer_bytes  whole layers too, but the fewest that reach r in bytes (the fair comparison);
  mlp          skip.unit="mlp";
  attention    skip.unit="attention" (unreachable above what skipping all but the first and last
               attention blocks gives).
With --calibrated, greedy KL removal (`calibrate.py`) on --calibration-tokens response tokens of
training verses (disjoint from the held-out text), calibrated up to the largest ratio and cached
in --workdir:
  cal_layer_bytes   layers (skip.unit="layer"), the fewest that reach r in bytes;
  cal_mlp           MLP blocks (skip.unit="mlp");
  cal_sublayer      attention and MLP blocks chosen apart (skip.unit="sublayer"), by the KL each
                    adds per byte it saves.
Writes benchmarks/results/smollm2/sublayer_plans[_TAG].md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import provenance
from benchmarks.plans import ROOT, Setup
from ulskip_jax import calibrate
from ulskip_jax.model import layer_bytes
from ulskip_jax.skipping import SkipPlan, plan_layers, read_plan, write_plan

UNITS = ("layer", "layer_bytes", "mlp", "attention")
CALIBRATED = ("cal_layer_bytes", "cal_mlp", "cal_sublayer")


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _log_probs(graphdef, state, chunk, *, plan: SkipPlan):
  """Log-probs [N, V] at the chunk's scored tokens under `plan`, paper mode."""
  model = nnx.merge(graphdef, state)
  x, _ = model.hidden(chunk["tokens"], skip=plan, positions_BT=chunk["positions"],
                      segment_ids_BT=chunk["segment_ids"], full_depth_BT=chunk["full_depth"])
  x_ND = x.reshape(-1, x.shape[-1])[chunk["scored"]]
  return jax.nn.log_softmax(model.unembed(x_ND[None])[0], axis=-1)


def _layer_ratio(L: int, ratio: float, costs) -> float:
  """The layer ratio whose int(L / r) kept layers are the fewest that reach `ratio` in bytes."""
  layer = costs.attention + costs.mlp
  full = costs.fixed + L * layer
  n = L - math.ceil((full - full / ratio) / layer - 1e-9)
  return L / n * (1 - 1e-12)


def _plan(L: int, unit: str, ratio: float, costs, scores=None) -> SkipPlan:
  if unit == "layer":
    return plan_layers(L, ratio)
  if unit == "layer_bytes":
    return plan_layers(L, _layer_ratio(L, ratio, costs))
  if unit == "cal_layer_bytes":
    return scores["layer"].plan(_layer_ratio(L, ratio, costs))
  if unit.startswith("cal_"):
    return scores[unit[4:]].plan(ratio, unit[4:], costs)
  return plan_layers(L, ratio, unit=unit, costs=costs)


def _calibrated_scores(s, args, costs) -> dict:
  """unit -> LayerScores, greedy KL on training text, each cached in args.workdir."""
  os.makedirs(args.workdir, exist_ok=True)
  text, out = None, {}
  top = max(float(r) for r in args.ratios.split(","))
  for unit in ("layer", "mlp", "sublayer"):
    path = os.path.join(args.workdir, f"plan_{unit}_{args.calibration_tokens}.json")
    if not os.path.exists(path):
      text = text or s.text("train", args.calibration_tokens)
      max_ratio = _layer_ratio(s.L, top, costs) if unit == "layer" else top
      scores = calibrate.calibrate(s.model, text, "kl_greedy", paper=True, max_ratio=max_ratio,
                                   unit=unit, costs=costs)
      write_plan(path, scores, (), costs)
      c = scores.calibration
      print(f"calibrated {unit}: {c['candidate_forwards']} forwards, {c['wall_s']} s wall, "
            f"{c['cpu_s']} s CPU", flush=True)
    out[unit] = read_plan(path, s.L)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--ratios", default="1.1,1.2,1.25,1.5")
  p.add_argument("--heldout-tokens", type=int, default=512)
  p.add_argument("--rows", type=int, default=4, help="rows of 128 tokens per forward")
  p.add_argument("--calibrated", action="store_true", help="add the calibrated rows")
  p.add_argument("--calibration-tokens", type=int, default=64)
  p.add_argument("--workdir", default="runs/sublayer_plans", help="calibrated plans' cache")
  p.add_argument("--tag", default="", help="results file suffix")
  p.add_argument("--report", default="", help="only rewrite the table and plot of this json")
  p.add_argument("--bleu", default="", help="decode the test verses with these rows (comma-"
                 "separated, e.g. cal_sublayer,cal_layer_bytes) at --bleu-ratios and add BLEU "
                 "to the tagged results json (its KL rows must exist)")
  p.add_argument("--bleu-ratios", default="1.25,1.5")
  p.add_argument("--bleu-verses", type=int, default=256)
  args = p.parse_args(argv)
  if args.report:
    return report(args.report)
  if args.bleu:
    return run_bleu(args)
  start = time.perf_counter(), time.process_time()
  s = Setup(argparse.Namespace(rows=args.rows, workdir=""))
  L, costs = s.L, layer_bytes(s.model.cfg)
  units = UNITS + (CALIBRATED if args.calibrated else ())
  scores = _calibrated_scores(s, args, costs) if args.calibrated else None
  text = s.text("validation", args.heldout_tokens)
  graphdef, state = nnx.split(s.model)
  chunks = [{k: jnp.asarray(v) for k, v in c.items()} for c in text.chunks]

  def measure(plan):
    kl = nll = 0.0
    for c, ref in zip(chunks, refs):
      lp = _log_probs(graphdef, state, c, plan=plan)
      targets = c["targets"].reshape(-1)[c["scored"]]
      kl += float(jnp.sum(jnp.sum(jnp.exp(ref) * (ref - lp), -1) * c["weight"]))
      nll += float(jnp.sum(-jnp.take_along_axis(lp, targets[:, None], -1)[:, 0] * c["weight"]))
    return kl / text.num_tokens, nll / text.num_tokens

  refs = [_log_probs(graphdef, state, c, plan=SkipPlan.full(L)) for c in chunks]
  full_ppl = math.exp(measure(SkipPlan.full(L))[1])
  rows = {}
  for ratio in (float(r) for r in args.ratios.split(",")):
    for unit in units:
      key = f"{unit}@{ratio:g}"
      try:
        plan = _plan(L, unit, ratio, costs, scores)
      except ValueError as e:
        rows[key] = dict(unreachable=str(e))
        print(f"{key}: {e}", flush=True)
        continue
      kl, nll = measure(plan)
      rows[key] = dict(kl=kl, ppl=math.exp(min(nll, 50.0)), byte_ratio=costs.ratio(plan),
                       skipped=list(plan.skipped), plan=str(plan),
                       **({"mlp_skipped": list(plan.mlp_skipped)} if plan.unit == "sublayer"
                          else {}))
      print(f"{key}: KL {kl:.3f} ppl {rows[key]['ppl']:.4g} bytes {costs.ratio(plan):.3f}x "
            f"skips {plan.skipped}", flush=True)
  meta = dict(command=" ".join(["python -m benchmarks.sublayer_plans"] + (argv or sys.argv[1:])),
              commit=provenance.commit(), machine=provenance.machine(),
              finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              wall_s=round(time.perf_counter() - start[0]),
              cpu_s=round(time.process_time() - start[1]),
              tokens=text.num_tokens, sha256=text.sha256, costs=dataclasses.asdict(costs),
              calibration={u: dict(tokens=v.calibration["tokens"],
                                   sha256=v.calibration["sha256"],
                                   forwards=v.calibration["candidate_forwards"],
                                   wall_s=v.calibration["wall_s"], cpu_s=v.calibration["cpu_s"])
                           for u, v in (scores or {}).items()})
  results = os.path.join(ROOT, "benchmarks", "results", "smollm2")
  name = "sublayer_plans" + (f"_{args.tag}" if args.tag else "")
  with open(os.path.join(results, name + ".json"), "w") as f:
    json.dump(dict(meta=meta, full_ppl=full_ppl, rows=rows), f, indent=1)
  report(os.path.join(results, name + ".json"))


def _results_path(tag: str) -> str:
  return os.path.join(ROOT, "benchmarks", "results", "smollm2",
                      "sublayer_plans" + (f"_{tag}" if tag else "") + ".json")


def run_bleu(args) -> None:
  """Greedy decoding (paper mode, 48 new tokens) of the first --bleu-verses test verses per row
  and ratio, BLEU and chrF against WEB, with full depth and copying the source beside them."""
  import sacrebleu
  from ulskip_jax import batching, decode, engine
  path = _results_path(args.tag)
  with open(path) as f:
    record = json.load(f)
  s = Setup(argparse.Namespace(rows=args.rows, workdir=""))
  L, costs = s.L, layer_bytes(s.model.cfg)
  scores = _calibrated_scores(s, args, costs) if record["meta"].get("calibration") else None
  test = s.pairs["test"][:args.bleu_verses]
  prompts, refs = batching.eval_prompts(s.tok, s.template, test, s.seq_len)
  bleu = record.setdefault("bleu", dict(verses=len(test), copy=sacrebleu.corpus_bleu(
      [p["source"] for p in test], [refs]).score, results={}))
  todo = [("full", 1.0)] + [(u, float(r)) for u in args.bleu.split(",")
                            for r in args.bleu_ratios.split(",")]
  for unit, ratio in todo:
    key = "full" if unit == "full" else f"{unit}@{ratio:g}"
    if key in bleu["results"]:
      continue
    plan = SkipPlan.full(L) if unit == "full" else _plan(L, unit, ratio, costs, scores)
    start = time.perf_counter(), time.process_time()
    ids, _ = engine.in_chunks(
        lambda chunk: decode.generate(s.model, chunk, skip=plan, mode="paper", max_new_tokens=48,
                                      eos_id=s.tok.eos_id, pad_id=s.tok.pad_id),
        prompts, 32, by_length=True)
    hyps = [s.tok.decode(x).strip() for x in ids]
    bleu["results"][key] = dict(bleu=sacrebleu.corpus_bleu(hyps, [refs]).score,
                                chrf=sacrebleu.corpus_chrf(hyps, [refs]).score, example=hyps[0],
                                byte_ratio=costs.ratio(plan), plan=str(plan),
                                wall_s=round(time.perf_counter() - start[0]),
                                cpu_s=round(time.process_time() - start[1]))
    print(f"bleu {key}: {bleu['results'][key]['bleu']:.1f}", flush=True)
    with open(path, "w") as f:
      json.dump(record, f, indent=1)
  report(path)


def report(path: str) -> None:
  """The table (.md) and the plot (.png) of a results json, next to it."""
  with open(path) as f:
    record = json.load(f)
  meta, rows, full_ppl = record["meta"], record["rows"], record["full_ppl"]
  costs = meta["costs"]
  ratios = sorted({k.split("@")[1] for k in rows}, key=float)
  units = [u for u in UNITS + CALIBRATED if f"{u}@{ratios[0]}" in rows]
  lines = ["# Sublayer plans at equal byte ratios (SmolLM2-135M-Instruct, zero-shot, paper mode)",
           "", f"`{meta['command']}`, commit {meta['commit']}, finished {meta['finished']}, on "
           f"{meta['machine']}; {meta['wall_s']} s wall, {meta['cpu_s']} s CPU.", "",
           f"KL to full depth (nats per token) / perplexity on {meta['tokens']} response tokens of "
           f"the validation books (sha256 {meta['sha256'][:12]}, benchmarks/plans.py's held-out "
           f"text). Full depth: perplexity {full_ppl:.2f}. Bytes per token (f32 weights): "
           f"attention block {costs['attention'] / 2**20:.2f} MiB, MLP block "
           f"{costs['mlp'] / 2**20:.2f} MiB, unembedding + final norm "
           f"{costs['fixed'] / 2**20:.2f} MiB.",
           "", "Each cell: KL / perplexity (achieved byte ratio, blocks or layers skipped).", "",
           "| plan | " + " | ".join(f"{r}x" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
  for unit in units:
    cells = []
    for r in ratios:
      v = rows[f"{unit}@{r}"]
      skipped = len(v.get("skipped", [])) + len(v.get("mlp_skipped", []))
      cells.append("unreachable" if "unreachable" in v else
                   f"{v['kl']:.3f} / {v['ppl']:.4g} ({v['byte_ratio']:.3f}x, {skipped})")
    lines.append(f"| {unit} | " + " | ".join(cells) + " |")
  if meta.get("calibration"):
    lines += ["", "Calibration (greedy KL, paper mode, training verses): " + "; ".join(
        f"{u}: {v['forwards']} candidate forwards, {v['wall_s']} s wall, {v['cpu_s']} s CPU on "
        f"{v['tokens']} tokens (sha256 {v['sha256'][:12]})"
        for u, v in meta["calibration"].items()) + "."]
  if record.get("bleu"):
    b = record["bleu"]
    full = b["results"]["full"]["bleu"]
    lines += ["", f"## BLEU / chrF on the first {b['verses']} test verses (greedy, paper mode, 48 "
              f"new tokens; full depth {full:.1f}, copying the source {b['copy']:.1f})", "",
              "| plan | byte ratio | BLEU | chrF | share of full depth | wall / CPU s |",
              "|---|---|---|---|---|---|"]
    for key, v in b["results"].items():
      lines.append(f"| {key} | {v['byte_ratio']:.3f}x | {v['bleu']:.1f} | {v['chrf']:.1f} | "
                   f"{100 * v['bleu'] / full:.0f}% | {v['wall_s']} / {v['cpu_s']} |")
  lines += ["", f"Plot: [{os.path.basename(path)[:-5]}.png]({os.path.basename(path)[:-5]}.png).",
            "", "Plans (ULS rows: even spread, first and last kept):", ""]
  for key, v in rows.items():
    lines.append(f"- {key}: " + (v["unreachable"] if "unreachable" in v
                                 else v.get("plan", str(v["skipped"]))))
  reading = ""  # a hand-written reading below the table survives a rerun
  if os.path.exists(path[:-5] + ".md"):
    with open(path[:-5] + ".md") as f:
      old = f.read()
    reading = old[old.index("\n## Reading"):] if "\n## Reading" in old else ""
  with open(path[:-5] + ".md", "w") as f:
    f.write("\n".join(lines) + "\n" + reading)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for unit in units:
    points = [(v["byte_ratio"], v["kl"]) for r in ratios for v in [rows[f"{unit}@{r}"]]
              if "kl" in v]
    ax.plot(*zip(*points), marker="o", label=unit, linestyle="--" if unit in UNITS else "-")
  ax.set(xlabel="weight bytes per token, full depth / plan", ylabel="KL to full depth (nats/token)",
         yscale="log", title="SmolLM2-135M zero-shot, held-out text, paper mode")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path[:-5] + ".png", dpi=120)


if __name__ == "__main__":
  main()
