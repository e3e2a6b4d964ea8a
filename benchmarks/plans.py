"""Which layers to skip on SmolLM2-135M-Instruct, zero-shot: formula plans (ULS, top, bottom)
against calibrated ones (greedy KL removal, block influence), at several speedup ratios.

  nice python -m benchmarks.plans [--stages calibrate,divergence,bleu,report] [--bleu-verses 256]

Stages, each cached as JSON under --workdir (delete a file to redo its part):
  calibrate   the calibrated plans (--methods) on --calibration-tokens response tokens of
              training verses (KJV -> WEB in SmolLM2's chat template, paper mode), written as
              plan.json files;
  divergence  per plan: KL to the full-depth model and perplexity on `--heldout-tokens` response
              tokens of the validation books (never used for calibration), forwards only;
  bleu        per plan at the ratios of --bleu-ratios: greedy decoding (paper mode, 48 new tokens)
              of the first --bleu-verses test verses, BLEU and chrF against WEB.
  report      only the tables, from what the stages cached.
Each stage covers the calibrated plans made so far. Then the table and json under
benchmarks/results/smollm2/ (plans.md, plans.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from absl import logging

from configs import smollm2_2x
from benchmarks import provenance
from ulskip_jax import calibrate, decode, engine, hf, plan_layers
from ulskip_jax import batching, corpora
from ulskip_jax.tokenizer import Tokenizer
from ulskip_jax.skipping import read_plan, write_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RATIOS = (1.25, 1.5, 2.0, 3.0)
FORMULAS = ("uls", "top", "bottom")
CALIBRATED = ("kl_greedy", "block_influence")
STAGES = ("calibrate", "divergence", "bleu", "report")


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _load(path):
  with open(path) as f:
    return json.load(f)


def _dump(obj, path):
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)




class Setup:
  """The model, the chat tokenizer and the three disjoint texts (train, validation, test)."""

  def __init__(self, args):
    self.args = args
    self.model, hf_tok = hf.from_pretrained("smollm2")
    self.L = self.model.cfg.num_layers
    self.train_cfg = smollm2_2x.get_config()
    d = self.train_cfg.data
    d.max_examples = 4000  # tokenizing all 29k training verses would cost more than a stage
    self.tok = Tokenizer(hf_tok, chat=d.chat)
    self.pairs = corpora.load_pairs(d)
    self.template, self.seq_len = d.template, d.seq_len

  def text(self, split: str, num_tokens: int) -> calibrate.CalibrationText:
    batches = batching.Batcher.from_pairs(self.tok, self.template, self.pairs[split],
                                          self.args.rows, self.seq_len, seed=0, repeat=False,
                                          shuffle=split == "train")
    return calibrate.calibration_text(batches, num_tokens)

  def plan_path(self, method: str) -> str:
    return os.path.join(self.args.workdir, f"plan_{method}.json")

  def plans(self) -> dict[str, dict[float, tuple[int, ...]]]:
    """name -> ratio -> skipped layers, for the formulas and every calibrated plan made so far."""
    out = {s: {r: plan_layers(self.L, r, s).skipped for r in RATIOS} for s in FORMULAS}
    for method in CALIBRATED:
      if os.path.exists(self.plan_path(method)):
        scores = read_plan(self.plan_path(method), self.L)
        out[f"calibrated_{method}"] = {r: scores.plan(r).skipped for r in RATIOS}
    return out


def run_calibrate(s: Setup, methods) -> None:
  text = s.text("train", s.args.calibration_tokens)
  for method in methods:
    path = s.plan_path(method)
    if not os.path.exists(path):
      log(f"calibrating {method} on {text.num_tokens} tokens")
      scores = calibrate.calibrate(s.model, text, method, paper=True, max_ratio=max(RATIOS))
      write_plan(path, scores, RATIOS)
      log(f"{method}: {scores.calibration['wall_s']} s wall, {scores.calibration['cpu_s']} s CPU")


def calibration_facts(s: Setup) -> dict:
  return {m: read_plan(s.plan_path(m), s.L).calibration for m in CALIBRATED
          if os.path.exists(s.plan_path(m))}


def run_divergence(s: Setup) -> dict:
  """KL and perplexity of every plan not yet measured (cached per plan)."""
  path = os.path.join(s.args.workdir, f"divergence_{s.args.heldout_tokens}.json")
  out = _load(path) if os.path.exists(path) else {}
  plans = s.plans()
  names = [(n, r) for n in plans for r in RATIOS if f"{n}@{r:g}" not in out]
  if not names and "full" in out:
    return out
  text = s.text("validation", s.args.heldout_tokens)
  start = time.perf_counter(), time.process_time()
  rows = calibrate.evaluate_plan(s.model, text, [()] + [plans[n][r] for n, r in names])
  out.update(tokens=text.num_tokens, sha256=text.sha256,
             full=dict(rows[0], ppl=math.exp(rows[0]["nll"])))
  for (name, r), row in zip(names, rows[1:]):
    out[f"{name}@{r:g}"] = dict(row, ppl=math.exp(min(row["nll"], 50.0)),
                                skipped=list(plans[name][r]))
  timing = (f"{len(names)} plans in {time.perf_counter() - start[0]:.0f} s wall, "
            f"{time.process_time() - start[1]:.0f} s CPU")
  out["timing"] = "; ".join(filter(None, [out.get("timing"), timing]))
  log(f"divergence: {timing}")
  _dump(out, path)
  return out


def run_bleu(s: Setup) -> dict:
  import sacrebleu
  path = os.path.join(s.args.workdir, f"bleu_{s.args.bleu_verses}.json")
  out = _load(path) if os.path.exists(path) else {}
  test = s.pairs["test"][:s.args.bleu_verses]
  prompts, refs = batching.eval_prompts(s.tok, s.template, test, s.seq_len)
  plans = s.plans()
  ratios = [float(r) for r in s.args.bleu_ratios.split(",")]
  names = s.args.bleu_plans.split(",") if s.args.bleu_plans else list(plans)
  todo = [("full", 1.0, ())] + [(n, r, plans[n][r]) for n in names if n in plans for r in ratios]
  for name, r, skip in todo:
    key = "full" if name == "full" else f"{name}@{r:g}"
    if key in out:
      continue
    start = time.perf_counter(), time.process_time()
    ids, _ = engine.in_chunks(
        lambda chunk: decode.generate(s.model, chunk, skip=tuple(skip), mode="paper",
                                      max_new_tokens=48, eos_id=s.tok.eos_id, pad_id=s.tok.pad_id),
        prompts, 32, by_length=True)
    hyps = [s.tok.decode(x).strip() for x in ids]
    out[key] = dict(bleu=sacrebleu.corpus_bleu(hyps, [refs]).score,
                    chrf=sacrebleu.corpus_chrf(hyps, [refs]).score, example=hyps[0],
                    wall_s=time.perf_counter() - start[0], cpu_s=time.process_time() - start[1])
    log(f"bleu {key}: {out[key]['bleu']:.1f} / chrF {out[key]['chrf']:.1f}")
    _dump(out, path)
  return dict(verses=len(test), results=out)


def report(s: Setup, div: dict, bleu: dict | None, meta: dict) -> None:
  cal = calibration_facts(s)
  results = os.path.join(ROOT, "benchmarks", "results", "smollm2")
  _dump(dict(meta=meta, calibration=cal, divergence=div, bleu=bleu),
        os.path.join(results, "plans.json"))
  names = [n for n in s.plans() if all(f"{n}@{r:g}" in div for r in RATIOS)]
  lines = [
      "# Which layers to skip: formula plans against calibrated ones (SmolLM2-135M-Instruct, "
      "zero-shot)", "",
      f"`{meta['command']}`, commit {meta['commit']}, finished {meta['finished']}, on "
      f"{meta['machine']} (2 cores shared by six agents' jobs, load 12-18; this ran at nice 5, "
      "so the times below are contended wall times, with their CPU times beside).", "",
      "Stages ran as separate processes of the same code and arguments (cached under "
      "--workdir); one command does them all: `nice -n 5 python -m benchmarks.plans "
      f"--calibration-tokens {s.args.calibration_tokens} --rows {s.args.rows} --heldout-tokens "
      f"{s.args.heldout_tokens} --bleu-verses {s.args.bleu_verses}`.", "",
      "Paper mode (the prompt at full depth). KL to full depth and perplexity: "
      f"{div['tokens']} response tokens of the validation books (sha256 {div['sha256'][:12]}), "
      "never seen by the calibration. Calibration: "
      + "; ".join(f"{m} on {c['tokens']} response tokens of training verses (sha256 "
                  f"{c['sha256'][:12]})" for m, c in cal.items()) + ".", "",
      "## Calibration time", "",
      "| method | wall s | CPU s | candidate forwards |", "|---|---|---|---|"]
  for m, c in cal.items():
    lines.append(f"| {m} | {c['wall_s']} | {c['cpu_s']} | {c.get('candidate_forwards', 1)} |")
  if "timing" in div:
    lines += ["", f"Held-out KL and perplexity of every plan: {div['timing']}."]
  lines += ["", "## KL to full depth (nats per token) / held-out perplexity", "",
            f"Full depth: perplexity {div['full']['ppl']:.2f}.", "",
            "| plan | " + " | ".join(f"{r:g}x" for r in RATIOS) + " |",
            "|---|" + "---|" * len(RATIOS)]
  for n in names:
    cells = [f"{div[f'{n}@{r:g}']['kl']:.3f} / {div[f'{n}@{r:g}']['ppl']:.4g}" for r in RATIOS]
    lines.append(f"| {n} | " + " | ".join(cells) + " |")
  lines += ["", "Skipped layers:", ""]
  for n in names:
    lines.append(f"- {n}: " + "; ".join(f"{r:g}x {div[f'{n}@{r:g}']['skipped']}"
                                        for r in RATIOS))
  if bleu:
    res = bleu["results"]
    full = res["full"]["bleu"]
    lines += ["", f"## BLEU / chrF on the first {bleu['verses']} test verses (greedy, 48 new "
              "tokens)", "", f"Full depth: BLEU {full:.1f} / chrF {res['full']['chrf']:.1f}.", "",
              "| plan | ratio | BLEU | chrF | share of full-depth BLEU | wall / CPU s |",
              "|---|---|---|---|---|---|"]
    for key, v in sorted(res.items(), key=lambda kv: (kv[0].split("@")[-1], kv[0])):
      if key != "full":
        n, r = key.split("@")
        lines.append(f"| {n} | {r}x | {v['bleu']:.1f} | {v['chrf']:.1f} | "
                     f"{v['bleu'] / full:.0%} | {v['wall_s']:.0f} / {v['cpu_s']:.0f} |")
    lines += ["", "Targets (issue 31, zero-shot): the best plan keeps >= 80% of full-depth BLEU at "
              "1.25x and >= 50% at 1.5x."]
    for r, target in (("1.25", 0.8), ("1.5", 0.5)):
      at = {k: v["bleu"] for k, v in res.items() if k.endswith(f"@{r}")}
      if at:
        best = max(at, key=at.get)
        verdict = "met" if at[best] >= target * full else "missed"
        lines.append(f"- {r}x: best decoded plan {best.split('@')[0]} keeps "
                     f"{at[best] / full:.0%} ({at[best]:.1f} of {full:.1f}): {verdict}.")
  with open(os.path.join(results, "plans.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="runs/plans")
  p.add_argument("--stages", default=",".join(STAGES))
  p.add_argument("--calibration-tokens", type=int, default=256)
  p.add_argument("--heldout-tokens", type=int, default=512)
  p.add_argument("--rows", type=int, default=4, help="rows of 128 tokens per forward")
  p.add_argument("--bleu-verses", type=int, default=256)
  p.add_argument("--bleu-ratios", default="1.25,1.5")
  p.add_argument("--bleu-plans", default="", help="plans to decode (default: all)")
  p.add_argument("--methods", default=",".join(CALIBRATED), help="calibration methods to run")
  args = p.parse_args(argv)
  logging.set_verbosity(logging.INFO)  # calibration's progress, one line per greedy step
  os.makedirs(args.workdir, exist_ok=True)
  stages = args.stages.split(",")
  start = time.perf_counter(), time.process_time()
  s = Setup(args)
  if "calibrate" in stages:
    run_calibrate(s, args.methods.split(","))
  div = run_divergence(s) if {"divergence", "bleu", "report"} & set(stages) else None
  bleu_path = os.path.join(args.workdir, f"bleu_{args.bleu_verses}.json")
  bleu = run_bleu(s) if "bleu" in stages else None
  if bleu is None and os.path.exists(bleu_path):
    bleu = dict(verses=args.bleu_verses, results=_load(bleu_path))
  meta = dict(command=" ".join(["python -m benchmarks.plans"] + (argv or sys.argv[1:])),
              commit=provenance.commit(), machine=provenance.machine(),
              finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              wall_s=time.perf_counter() - start[0], cpu_s=time.process_time() - start[1])
  if div is not None:
    report(s, div, bleu, meta)
  log("done")


if __name__ == "__main__":
  main()
