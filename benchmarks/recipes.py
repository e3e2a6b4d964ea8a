"""Training recipes for the skipped sub-model at equal training tokens, on SmolLM2-135M-Instruct.

  nice python -m benchmarks.recipes                 # ce, kd_self, sandwich: 20 steps each at 2x
  nice python -m benchmarks.recipes --quick         # 2 steps, 16 verses: a smoke run (~3 min)
  nice python -m benchmarks.recipes --recipes ce,kd_init --steps 40
  nice python -m benchmarks.recipes --recipes ce,kd_self,kd_init,sandwich --steps 4 --no-eval \
      --workdir runs/recipes_timing       # step times only: the teachers' overhead against CE
  nice python -m benchmarks.recipes --recipes sandwich --plan runs/plans/plan_kl_greedy.json
                                    # the same recipes on a calibrated plan (benchmarks/plans.py)

Each recipe is the quick start (`configs/smollm2_quick.py`: KJV -> WEB, chat format, batch 8,
lr 5e-4) at ratio 2, for --steps steps, so every recipe trains on the same batches (equal
training tokens); they differ only in the loss (`RECIPES`, docs/distillation.md):
  ce        today's: cross-entropy on the 2x path (paper mode)
  kd_self   0.5 KL(full depth, same weights, this step) + 0.5 CE on the 2x path
  kd_init   the same against the frozen initial weights
  sandwich  CE at full depth + KL(that same forward) on the 2x path, one step
Each trains with train.py in a child process (its wall and CPU time measured; the step time is
the median of the steps after the second, from log.jsonl), then is decoded greedily (paper mode,
--max-new-tokens) at full depth and at 2x on --verses test verses: a seeded sample of the test
books (`corpora.load_pairs`' test split), the same for every recipe. Scored: BLEU and chrF
(sacrebleu), the 2x model's BLEU as a percent of its own full depth's, and the share of outputs
that loop (some word 4-gram three or more times). Workdirs are kept under --workdir and reused
(delete one to redo it). Writes benchmarks/results/smollm2/recipes{,_quick}.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/smollm2_quick.py"
RATIO = 2.0
RECIPES = {
    "ce": {},
    "kd_self": {"distill.teacher": "self", "distill.alpha": 0.5},
    "kd_init": {"distill.teacher": "init", "distill.alpha": 0.5},
    "sandwich": {"distill.teacher": "self", "distill.alpha": 1.0, "distill.sandwich": True},
}


def loops(text: str, n: int = 4, times: int = 3) -> bool:
  """Whether some word n-gram occurs `times` or more times in `text`."""
  words = text.split()
  grams = collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
  return any(c >= times for c in grams.values())


def train(name: str, workdir: str, steps: int, plan_file: str = "") -> dict:
  """Runs train.py for a recipe (unless its workdir finished); its timing, from the run."""
  timing_file = os.path.join(workdir, "timing.json")
  if os.path.exists(timing_file):
    with open(timing_file) as f:
      return json.load(f)
  flags = [f"--config.{k}={v}" for k, v in {
      "skip.ratio": RATIO, "num_steps": steps, "log_every": 1,
      "eval_every": 0, "checkpoint.every": steps, "progress_bar": False,
      **({"skip.strategy": "calibrated", "skip.plan_file": plan_file} if plan_file else {}),
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


def evaluate(workdir: str, pairs, max_new_tokens: int) -> dict:
  """BLEU, chrF and loop share at full depth and at RATIO, cached in the workdir."""
  out_file = os.path.join(workdir, f"eval_{len(pairs)}.json")
  if os.path.exists(out_file):
    with open(out_file) as f:
      return json.load(f)
  import sacrebleu
  from ulskip_jax import checkpoint, decode
  from ulskip_jax import batching
  from configs import smollm2_quick
  cfg = smollm2_quick.get_config()
  from ulskip_jax import skipping
  model, tok = checkpoint.load_for_inference(workdir)
  # A calibrated run decodes with the plan it trained (its workdir's plan.json), not ULS's.
  calibrated = skipping.workdir_plan(workdir, model.cfg.num_layers)
  prompts, refs = batching.eval_prompts(tok, cfg.data.template, pairs, cfg.data.seq_len)
  out = {}
  for ratio in (1.0, RATIO):
    start = time.monotonic()
    plan = dict(skip=calibrated.plan(ratio).skipped) if calibrated and ratio != 1 else dict(
        ratio=ratio)
    ids, _ = decode.generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=tok.eos_id,
                             pad_id=tok.pad_id, batch_size=32, mode="paper", **plan)
    hyps = [tok.decode(x).strip() for x in ids]
    out[f"r{ratio:g}"] = dict(
        bleu=sacrebleu.corpus_bleu(hyps, [refs]).score,
        chrf=sacrebleu.corpus_chrf(hyps, [refs]).score,
        loops=sum(map(loops, hyps)) / len(hyps), decode_wall_s=time.monotonic() - start,
        first=hyps[:3])
  with open(out_file, "w") as f:
    json.dump(out, f, indent=1)
  return out


def table(results: dict, meta: dict) -> str:
  lines = [f"# Recipes for the 2x sub-model, SmolLM2-135M-Instruct, KJV -> WEB", "",
           f"{meta['date']}, {meta['machine']}, commit {meta['commit']}; "
           f"`{meta['command']}`.", "",
           f"Every recipe: up to {meta['steps']} steps of the quick start's batches (batch 8, "
           f"the same batches in the same order; a run stopped early (SIGTERM: train.py saves "
           f"and stops) trained its first `steps`), ratio 2 (15 of 30 layers; plan: "
           f"{meta.get('plan', 'uls')}), greedy "
           f"decoding of {meta['verses']} test verses (a seeded sample of the test books; "
           f"copying the KJV source scores BLEU {meta['copy_bleu']:.1f}). One seed: read the "
           "direction, not the digit. Step time: median wall time of a step after the second; "
           "train wall / CPU: the whole train.py process (load, compile, steps, save).", "",
           "| recipe | steps | BLEU full | BLEU 2x | 2x / full | chrF full | chrF 2x | loops full / 2x "
           "| step wall | vs CE | train wall / CPU |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  ce_step = results.get("ce", {}).get("step_wall_s")
  for name, r in results.items():
    none = dict(bleu=float("nan"), chrf=float("nan"), loops=float("nan"))
    full, sub = r.get("r1", none), r.get(f"r{RATIO:g}", none)
    vs = f"{r['step_wall_s'] / ce_step:.2f}x" if ce_step and r["step_wall_s"] else "n/a"
    step = f"{r['step_wall_s']:.1f} s" if r["step_wall_s"] else "n/a"
    lines.append(
        f"| {name} | {r['steps']} | {full['bleu']:.1f} | {sub['bleu']:.1f} | "
        f"{100 * sub['bleu'] / max(full['bleu'], 1e-9):.0f}% | {full['chrf']:.1f} | "
        f"{sub['chrf']:.1f} | {100 * full['loops']:.0f}% / {100 * sub['loops']:.0f}% | {step} | "
        f"{vs} | {r['train_wall_s']:.0f} s / {r['train_cpu_s']:.0f} s |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="2 steps, 16 verses, ce and sandwich")
  p.add_argument("--recipes", default="", help=f"comma-separated, of {', '.join(RECIPES)}")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--verses", type=int, default=256)
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--workdir", default="runs/recipes")
  p.add_argument("--no-eval", action="store_true", help="train and time only")
  p.add_argument("--plan", default="", help="a plan.json (benchmarks/plans.py, calibrate): train "
                 "and decode every recipe on its plan instead of ULS's even spread")
  args = p.parse_args(argv)
  if args.plan and not os.path.isfile(args.plan):
    p.error(f"--plan {args.plan!r} is not a file: pass a plan.json written by calibration")
  if args.quick:
    args.steps, args.verses, args.max_new_tokens = 2, 16, 32
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
  results = {}
  for name in names:
    workdir = os.path.join(args.workdir, name)
    results[name] = train(name, workdir, args.steps, os.path.abspath(args.plan) if args.plan else "")
    with open(os.path.join(workdir, "log.jsonl")) as f:
      results[name]["steps"] = sum("loss" in json.loads(line) for line in f)
    if not args.no_eval:
      results[name].update(evaluate(workdir, pairs, args.max_new_tokens))
    print(name, json.dumps({k: v for k, v in results[name].items() if k != "command"}),
          flush=True)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                          capture_output=True).stdout.strip()
  machine = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                  if l.startswith("model name")), platform.processor())
  meta = dict(date=datetime.date.today().isoformat(), machine=f"{machine}, {os.cpu_count()} cores",
              commit=commit, command="python -m benchmarks.recipes " + " ".join(sys.argv[1:]),
              steps=args.steps, verses=args.verses, copy_bleu=copy_bleu,
              plan=os.path.basename(args.plan) or "uls")
  stem = os.path.join(ROOT, "benchmarks", "results", "smollm2",
                      "recipes_quick" if args.quick else
                      "recipes_timing" if args.no_eval else "recipes")
  if args.plan:
    stem += "_" + os.path.splitext(os.path.basename(args.plan))[0]
  with open(stem + ".json", "w") as f:
    json.dump(dict(meta=meta, results=results), f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(table(results, meta))
  print(table(results, meta))


if __name__ == "__main__":
  main()
