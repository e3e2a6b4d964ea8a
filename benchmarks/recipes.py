"""Training recipes for the skipped sub-model at equal training tokens, on SmolLM2-135M-Instruct.

  nice python -m benchmarks.recipes                 # ce, kd_self, sandwich: 20 steps each at 2x
  nice python -m benchmarks.recipes --quick         # 2 steps, 16 verses: a smoke run (~3 min)
  nice python -m benchmarks.recipes --recipes ce,kd_init --steps 40 --ratio 3
  nice python -m benchmarks.recipes --recipes ce,kd_self,kd_init,sandwich --steps 4 --no-eval \
      --workdir runs/recipes_timing       # step times only: the teachers' overhead against CE
  nice python -m benchmarks.recipes --recipes sandwich --plan configs/plans/smollm2_kl_greedy.json \
      --steps 16 --curve 8 --seeds 0,1  # on a calibrated plan; two seeds; BLEU at steps 8 and 16

Each recipe is the quick start's data and optimizer (`configs/smollm2_quick.py`: KJV -> WEB, chat
format, batch 8, lr 5e-4) at --ratio, for --steps steps, so every recipe trains on the same
batches for a seed (equal training tokens); they differ only in the loss (`RECIPES`,
docs/distillation.md) and, with --plan, the plan (ULS's even spread otherwise):
  ce        cross-entropy on the skipped path (paper mode), the paper's recipe
  kd_self   0.5 KL(full depth, same weights, this step) + 0.5 CE on the skipped path
  kd_init   the same against the frozen initial weights
  sandwich  CE at full depth + KL(that same forward) on the skipped path, one step
Each trains with train.py in a child process (its wall and CPU time measured; the step time is
the median of the steps after the second, from log.jsonl), then is decoded greedily (paper mode,
--max-new-tokens) at full depth and at --ratio on --verses test verses: a seeded sample of the
test books (`corpora.load_pairs`' test split), the same for every recipe and seed. Scored: BLEU
and chrF (sacrebleu), the sub-model's BLEU as a percent of its own full depth's, and the share of
outputs that loop (some word 4-gram three or more times); --curve N scores every N-th step's
checkpoint too. Workdirs are kept under --workdir and reused (delete one to redo it). Writes
benchmarks/results/smollm2/recipes[_quick][_rR][_PLAN][_TAG].{json,md} (and .png, BLEU against
steps, with --curve).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import random
import resource
import subprocess
import sys
import time

from benchmarks import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/smollm2_quick.py"
# Every recipe sets all the distillation keys, so the quick start's own recipe does not leak in.
_OFF = {"distill.teacher": "", "distill.alpha": 0.5, "distill.sandwich": False}
RECIPES = {
    "ce": _OFF,
    "kd_self": {**_OFF, "distill.teacher": "self"},
    "kd_init": {**_OFF, "distill.teacher": "init"},
    "sandwich": {"distill.teacher": "self", "distill.alpha": 1.0, "distill.sandwich": True},
}


def loops(text: str, n: int = 4, times: int = 3) -> bool:
  """Whether some word n-gram occurs `times` or more times in `text`."""
  words = text.split()
  grams = collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
  return any(c >= times for c in grams.values())


def train(name: str, workdir: str, steps: int, plan_file: str = "", *, ratio: float = 2.0,
          seed: int = 0, every: int = 0) -> dict:
  """Runs train.py for a recipe (unless its workdir finished); its timing, from the run.

  every > 0 keeps a checkpoint each `every` steps (for the BLEU-against-steps curve).
  """
  timing_file = os.path.join(workdir, "timing.json")
  if os.path.exists(timing_file):
    with open(timing_file) as f:
      return json.load(f)
  flags = [f"--config.{k}={v}" for k, v in {
      "skip.ratio": ratio, "num_steps": steps, "log_every": 1, "seed": seed,
      "eval_every": 0, "checkpoint.every": every or steps, "progress_bar": False,
      **({"checkpoint.keep": steps // every + 1} if every else {}),
      "skip.strategy": "calibrated" if plan_file else "uls", "skip.plan_file": plan_file,
      **RECIPES[name]}.items()]
  cmd = [sys.executable, "train.py", "--config", CONFIG, "--workdir", workdir, *flags]
  print(" ".join(cmd), flush=True)
  before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
  subprocess.run(cmd, cwd=ROOT, check=True)
  after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic() - start
  with open(os.path.join(workdir, "log.jsonl")) as f:
    records = [r for r in map(json.loads, f) if "loss" in r]
  times = {r["step"]: r["time"] for r in records}
  step_s = sorted(times[s] - times[s - 1] for s in times if s - 1 in times and s > 2)
  out = dict(train_wall_s=wall, train_cpu_s=(after.ru_utime + after.ru_stime)
             - (before.ru_utime + before.ru_stime),
             step_wall_s=step_s[len(step_s) // 2] if step_s else None,
             final_loss=records[-1]["loss"], tokens=sum(r["tokens"] for r in records),
             command=" ".join(cmd[1:]))
  with open(timing_file, "w") as f:
    json.dump(out, f)
  return out


def evaluate(workdir: str, pairs, max_new_tokens: int, ratio: float = 2.0,
             step: int | None = None) -> dict:
  """BLEU, chrF and loop share at full depth and at `ratio`, cached in the workdir.

  step: a kept checkpoint's step (default: the latest).
  """
  out_file = os.path.join(workdir, f"eval_{len(pairs)}" + (f"_step{step}" if step else "")
                          + ".json")
  if os.path.exists(out_file):
    with open(out_file) as f:
      return json.load(f)
  import sacrebleu
  from ulskip_jax import checkpoint, decode
  from ulskip_jax import batching
  from configs import smollm2_quick
  cfg = smollm2_quick.get_config()
  from ulskip_jax import skipping
  model, tok = checkpoint.load_for_inference(workdir, step)
  # A calibrated run decodes with the plan it trained (its workdir's plan.json), not ULS's.
  calibrated = skipping.workdir_plan(workdir, model.cfg.num_layers)
  prompts, refs = batching.eval_prompts(tok, cfg.data.template, pairs, cfg.data.seq_len)
  out = {}
  for r in (1.0, ratio):
    start = time.monotonic()
    plan = dict(skip=calibrated.plan(r).skipped) if calibrated and r != 1 else dict(ratio=r)
    ids, _ = decode.generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=tok.eos_id,
                             pad_id=tok.pad_id, batch_size=32, mode="paper", **plan)
    hyps = [tok.decode(x).strip() for x in ids]
    out[f"r{r:g}"] = dict(
        bleu=sacrebleu.corpus_bleu(hyps, [refs]).score,
        chrf=sacrebleu.corpus_chrf(hyps, [refs]).score,
        loops=sum(map(loops, hyps)) / len(hyps), decode_wall_s=time.monotonic() - start,
        first=hyps[:3])
  with open(out_file, "w") as f:
    json.dump(out, f, indent=1)
  return out


def table(results: dict, meta: dict) -> str:
  """The markdown report: one row per recipe and seed, then the BLEU-against-steps curves."""
  ratio = meta.get("ratio", 2.0)
  seeds = meta.get("seeds", [0])
  lines = [f"# Recipes for the {ratio:g}x sub-model, SmolLM2-135M-Instruct, KJV -> WEB", "",
           f"{meta['date']}, {meta['machine']}, commit {meta['commit']}; "
           f"`{meta['command']}`.", "",
           f"Every recipe: up to {meta['steps']} steps of the quick start's batches (batch 8, "
           f"the same batches in the same order for one seed; a run stopped early (SIGTERM: "
           f"train.py saves and stops) trained its first `steps`), ratio {ratio:g} (plan: "
           f"{meta.get('plan', 'uls')}), greedy decoding of {meta['verses']} test verses (a "
           f"seeded sample of the test books; copying the KJV source scores BLEU "
           f"{meta['copy_bleu']:.1f}). Seeds (data order and init) {seeds}"
           + ("" if len(seeds) > 1 else ": one seed, read the direction, not the digit")
           + ". Step time: median wall time of a step after the second; train wall / CPU: the "
           "whole train.py process (load, compile, steps, save).", "",
           f"| recipe | seed | steps | BLEU full | BLEU {ratio:g}x | {ratio:g}x / full | chrF full | "
           f"chrF {ratio:g}x | loops full / {ratio:g}x | step wall | train wall / CPU |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  none = dict(bleu=float("nan"), chrf=float("nan"), loops=float("nan"))
  for key, r in results.items():
    full, sub = r.get("r1", none), r.get(f"r{ratio:g}", none)
    step = f"{r['step_wall_s']:.1f} s" if r["step_wall_s"] else "n/a"
    lines.append(
        f"| {r.get('recipe', key)} | {r.get('seed', 0)} | {r['steps']} | {full['bleu']:.1f} | "
        f"{sub['bleu']:.1f} | {100 * sub['bleu'] / max(full['bleu'], 1e-9):.0f}% | "
        f"{full['chrf']:.1f} | {sub['chrf']:.1f} | "
        f"{100 * full['loops']:.0f}% / {100 * sub['loops']:.0f}% | {step} | "
        f"{r['train_wall_s']:.0f} s / {r['train_cpu_s']:.0f} s |")
  curves = {k: r["curve"] for k, r in results.items() if r.get("curve")}
  if curves:
    lines += ["", f"## BLEU against steps (full depth / {ratio:g}x, kept share)", "",
              "| recipe | seed | " + " | ".join(f"step {s}" for s in next(iter(curves.values())))
              + " |", "|---|---|" + "---|" * len(next(iter(curves.values())))]
    for key, curve in curves.items():
      r = results[key]
      cells = [f"{e['r1']['bleu']:.1f} / {e[f'r{ratio:g}']['bleu']:.1f} "
               f"({100 * e[f'r{ratio:g}']['bleu'] / max(e['r1']['bleu'], 1e-9):.0f}%)"
               for e in curve.values()]
      lines.append(f"| {r.get('recipe', key)} | {r.get('seed', 0)} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(results: dict, meta: dict, path: str) -> None:
  """BLEU against steps, full depth dashed and the sub-model solid, one colour per recipe and
  seed, copying the source as a grey line."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ratio = meta.get("ratio", 2.0)
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, (key, r) in enumerate(k_r for k_r in results.items() if k_r[1].get("curve")):
    steps = [int(s) for s in r["curve"]]
    for depth, style in (("r1", "--"), (f"r{ratio:g}", "-")):
      ax.plot(steps, [e[depth]["bleu"] for e in r["curve"].values()], style, marker="o",
              color=f"C{i}", label=f"{key}, {'full depth' if depth == 'r1' else f'{ratio:g}x'}")
  ax.axhline(meta["copy_bleu"], color="grey", lw=1, label="copying the source")
  ax.set(xlabel="training steps (batch 8)", ylabel=f"BLEU, {meta['verses']} test verses",
         title=f"SmolLM2-135M, KJV -> WEB: {ratio:g}x against full depth")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="2 steps, 16 verses, ce and sandwich")
  p.add_argument("--recipes", default="", help=f"comma-separated, of {', '.join(RECIPES)}")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--ratio", type=float, default=2.0, help="the sub-model's speedup ratio")
  p.add_argument("--seeds", default="0", help="comma-separated training seeds (data order, init)")
  p.add_argument("--curve", type=int, default=0, help="also score every N-th step's checkpoint: "
                 "BLEU against steps")
  p.add_argument("--verses", type=int, default=256)
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--workdir", default="runs/recipes")
  p.add_argument("--no-eval", action="store_true", help="train and time only")
  p.add_argument("--tag", default="", help="appended to the results' file names, so that runs "
                 "of other lengths do not overwrite each other")
  p.add_argument("--plan", default="", help="a plan.json (benchmarks/plans.py, calibrate): train "
                 "and decode every recipe on its plan instead of ULS's even spread")
  args = p.parse_args(argv)
  if args.plan and not os.path.isfile(args.plan):
    p.error(f"--plan {args.plan!r} is not a file: pass a plan.json written by calibration")
  if args.ratio <= 1:
    p.error(f"--ratio {args.ratio}: a speedup ratio above 1 is allowed")
  try:
    seeds = [int(x) for x in args.seeds.split(",")]
  except ValueError:
    p.error(f"--seeds {args.seeds!r}: comma-separated integers are allowed")
  if args.curve < 0 or (args.curve and args.steps % args.curve):
    p.error(f"--curve {args.curve}: a positive divisor of --steps {args.steps} is allowed")
  if args.quick:
    args.steps, args.verses, args.max_new_tokens, args.curve = 2, 16, 32, 0
    args.recipes = args.recipes or "ce,sandwich"
    args.workdir += "_quick"
  names = (args.recipes or "ce,kd_self,sandwich").split(",")
  unknown = [n for n in names if n not in RECIPES]
  if unknown:
    p.error(f"--recipes has {unknown}: allowed are {', '.join(RECIPES)}")
  from configs import smollm2_quick
  from ulskip_jax import corpora
  import sacrebleu
  test = corpora.load_pairs(smollm2_quick.get_config().data)["test"]
  pairs = random.Random(0).sample(test, args.verses)
  copy_bleu = sacrebleu.corpus_bleu([x["source"] for x in pairs],
                                    [[x["target"] for x in pairs]]).score
  plan_file = os.path.abspath(args.plan) if args.plan else ""
  results = {}
  for name in names:
    for seed in seeds:
      key = name if seeds == [0] else f"{name}_s{seed}"
      workdir = os.path.join(args.workdir, name + ("" if args.ratio == 2 else f"_r{args.ratio:g}")
                             + ("" if seed == 0 else f"_s{seed}"))
      r = results[key] = dict(recipe=name, seed=seed, **train(
          name, workdir, args.steps, plan_file, ratio=args.ratio, seed=seed, every=args.curve))
      with open(os.path.join(workdir, "log.jsonl")) as f:
        r["steps"] = sum("loss" in json.loads(line) for line in f)
      if not args.no_eval:
        r.update(evaluate(workdir, pairs, args.max_new_tokens, args.ratio))
        if args.curve:
          r["curve"] = {s: evaluate(workdir, pairs, args.max_new_tokens, args.ratio, s)
                        for s in range(args.curve, r["steps"], args.curve)}
          r["curve"][r["steps"]] = {k: r[k] for k in ("r1", f"r{args.ratio:g}")}
      print(key, json.dumps({k: v for k, v in r.items() if k not in ("command", "curve")}),
            flush=True)
  meta = dict(date=datetime.date.today().isoformat(), machine=provenance.machine(),
              commit=provenance.commit(), command="python -m benchmarks.recipes " + " ".join(sys.argv[1:]),
              steps=args.steps, verses=args.verses, copy_bleu=copy_bleu, ratio=args.ratio,
              seeds=seeds, plan=os.path.basename(args.plan) or "uls")
  stem = os.path.join(ROOT, "benchmarks", "results", "smollm2",
                      "recipes_quick" if args.quick else
                      "recipes_timing" if args.no_eval else "recipes")
  if args.ratio != 2:
    stem += f"_r{args.ratio:g}"
  if args.plan:
    stem += "_" + os.path.splitext(os.path.basename(args.plan))[0]
  if args.tag:
    stem += "_" + args.tag
  with open(stem + ".json", "w") as f:
    json.dump(dict(meta=meta, results=results), f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(table(results, meta))
  if any(r.get("curve") for r in results.values()):
    plot(results, meta, stem + ".png")
  print(table(results, meta))


if __name__ == "__main__":
  main()
