"""The reproduction's report: the tables (the paper's Table 4 beside ours, every quality row, speed),
a verdict per claim of the paper and the plots, from the JSON that benchmarks/reproduce.py's stages
cache under the config's workdir, with no model loaded and nothing trained. It also holds what the
runner and the report share: the config, the cached files' reading and writing, the run's depth.

  python -m benchmarks.reproduce_report --config configs/reproduce_smollm2.py [--quick]

(the same as `python -m benchmarks.reproduce --config ... --stages report`). It reads any subset of
the stages' outputs and writes what they allow under the config's results_dir: quality.md,
paper_table.md, claims.md, speed_trained.md, speed.md, the plots and results.json (every cached
stage output in one file).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os

import numpy as np

from ulskip_jax import corpora, hf, plan_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# The config and the cached stage outputs, as the runner writes them.

def load_config(path: str, quick: bool):
  spec = importlib.util.spec_from_file_location("repro_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c = module.quick(c) if quick else c
  for key in ("workdir", "multi_workdir", "results_dir"):  # Orbax wants absolute paths
    c[key] = os.path.join(ROOT, c[key])
  return c


def json_load(path):
  with open(path) as f:
    return json.load(f)


def json_dump(obj, path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def method_ratios(c, method):
  """The ratios `method` is fine-tuned / evaluated at (config.method_ratios, else all)."""
  return tuple(c.method_ratios.get(method, c.ratios))


def use_base_depth(c) -> None:
  """Sets the run's depth to the base model's once the base stage has exported it: the depth every
  plan is made for (a base_init may be pruned, or have another depth than the config's model)."""
  base_config = os.path.join(c.workdir, "base_hf", "config.json")
  if os.path.exists(base_config):
    c.train.model.num_layers = hf.config_from_hf(json_load(base_config)).num_layers


# ----------------------------------------------------------------------------------------------
# Tables, verdicts and plots.

def _f(x, fmt=".1f"):
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _runs(c, prefix, method=None, ratios=None):
  """Quality-table row names of a method: prefix + ratio, over its ratios (default: all)."""
  ratios = ratios or (method_ratios(c, method) if method else c.ratios)
  return [f"{prefix}_r{r:g}" for r in ratios]


# The paper's Table 4 (BLOOMZ-7b1 fine-tuned per method, WMT22; tokens/s at batch 8).
PAPER = {"full": dict(bleu=23.81, tok_s=303.0),
         "early_exit_r2": dict(bleu=17.82), "skipdecode_r2": dict(bleu=20.70),
         "uls_ft_r2": dict(bleu=21.23, tok_s=503.0),
         "early_exit_r5": dict(bleu=10.02), "skipdecode_r5": dict(bleu=11.52),
         "uls_ft_r5": dict(bleu=14.87, tok_s=1004.0)}


def quality_groups(c):
  """[(title, row names, fine-tuned?)] in table order; each replicate after its method."""
  zr = c.zero_shot.ratios
  groups = [("pretrained, full depth", ["full"], False)]
  for s in c.zero_shot.strategies:
    if s == "random":
      groups += [(f"random (seed {seed}), zero-shot", _runs(c, f"random_s{seed}_noft", ratios=zr),
                  False) for seed in c.zero_shot.random_seeds]
    else:
      groups.append((f"{s}, zero-shot", _runs(c, f"{s}_noft", ratios=zr), False))
  if c.zero_shot.dynamic:
    groups += [("early exit, zero-shot", _runs(c, "early_exit_noft", ratios=zr), False),
               ("SkipDecode, zero-shot", _runs(c, "skipdecode_noft", ratios=zr), False)]
  if c.ft_full:
    groups.append(("full depth, fine-tuned", ["full_ft"], True))
  titles = dict(uls="ULS, fine-tuned per ratio", top="top (keep first n), fine-tuned",
                bottom="bottom (keep last n), fine-tuned", random="random, fine-tuned")
  for s in c.ft_strategies:
    groups.append((titles.get(s, f"{s}, fine-tuned"), _runs(c, f"{s}_ft", s), True))
    if s in c.replicate_strategies:
      groups += [(f"{titles.get(s, s)}, data seed {seed}",
                  _runs(c, f"{s}_s{seed}_ft", s, c.replicate_ratios or None), True)
                 for seed in c.replicate_seeds]
    if s == "uls":
      groups.append(("ULS, one multi-ratio checkpoint",
                     [f"multi_r{r:g}" for r in c.multi_ratios], True))
  return groups + [("early exit (CALM), fine-tuned", _runs(c, "early_exit"), True),
                   ("SkipDecode, fine-tuned", _runs(c, "skipdecode", "skipdecode"), True),
                   ("copy source", ["copy"], False)]


def target_ratio(name):
  return 1.0 if name in ("full", "full_ft") else (
      float(name.rsplit("_r", 1)[1]) if "_r" in name else None)


def measured_speedup(c, name, st, batch=None):
  """tok/s of `name`'s decode over full depth at `batch` (default speed.plot_batch), from the
  speed_trained stage. Static plans of equal depth cost the same (same layer count, same
  cache), so every static plan uses ULS's measurement at its ratio."""
  batch = str(batch or c.speed.plot_batch)
  if not st or batch not in st:
    return None
  res = st[batch]
  if target_ratio(name) == 1.0:
    return 1.0
  if "noft" in name and name.startswith(("early_exit", "skipdecode")):
    return None  # zero-shot dynamic methods: their depths differ from the fine-tuned ones'
  ratio = name.rsplit("_r", 1)[1]
  key = name if name.startswith(("early_exit", "skipdecode")) else f"uls_r{ratio}"
  return res[key]["tok_s"] / res["full"]["tok_s"] if key in res else None


def quality_table(c, q, st=None) -> str:
  lines = ["| method | run | target ratio | measured ratio | BLEU | chrF | val ppl | "
           f"speedup (tok/s, batch {c.speed.plot_batch}) |", "|---|---|---|---|---|---|---|---|"]
  for title, names, _ in quality_groups(c):
    for name in names:
      if name not in q:
        continue
      r = q[name]
      speedup = None if name == "copy" else measured_speedup(c, name, st)
      lines.append(f"| {title} | {name} | {_f(target_ratio(name), 'g')} | "
                   f"{_f(r.get('ratio'), '.2f')} | {_f(r['bleu'])} | {_f(r['chrf'])} | "
                   f"{_f(r.get('ppl'), '.2f')} | {_f(speedup, '.2f')} |")
  return "\n".join(lines)


def paper_table(c, q, st) -> str:
  """The paper's Table 4 layout, ours beside theirs."""
  full = "full_ft" if "full_ft" in q else "full"
  rows = [("full depth", full, "full")]
  for r in (2, 5):
    rows += [(f"early exit {r}x", f"early_exit_r{r}", f"early_exit_r{r}"),
             (f"SkipDecode {r}x", f"skipdecode_r{r}", f"skipdecode_r{r}"),
             (f"ULS {r}x", f"uls_ft_r{r}", f"uls_ft_r{r}")]
  b1, b8 = str(c.speed.batches[0]), str(c.speed.plot_batch)
  lines = [f"| row | BLEU | rel. BLEU | measured ratio | tok/s batch {b1} | tok/s batch {b8} | "
           f"speedup batch {b8} | paper BLEU | paper rel. BLEU | paper tok/s batch 8 | "
           "paper speedup |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  full_bleu = q.get(full, {}).get("bleu") or None
  for label, name, paper_key in rows:
    ours = q.get(name)
    speed_key = "full" if name == full else (name.replace("uls_ft", "uls"))
    tps = {b: (st or {}).get(b, {}).get(speed_key, {}).get("tok_s") for b in (b1, b8)}
    p = PAPER.get(paper_key, {})
    p_speed = p.get("tok_s") and p["tok_s"] / PAPER["full"]["tok_s"]
    lines.append(
        f"| {label} | {_f(ours and ours['bleu'])} | "
        f"{_f(ours and full_bleu and ours['bleu'] / full_bleu, '.0%')} | "
        f"{_f(ours and ours.get('ratio'), '.2f')} | {_f(tps[b1])} | {_f(tps[b8])} | "
        f"{_f(tps[b8] and measured_speedup(c, name, st), '.2f')} | {_f(p.get('bleu'), '.2f')} | "
        f"{_f(p.get('bleu') and p['bleu'] / PAPER['full']['bleu'], '.0%')} | "
        f"{_f(p.get('tok_s'), '.0f')} | {_f(p_speed, '.2f')} |")
  return "\n".join(lines)


def claims(c, q, st) -> str:
  """A reading per claim of the paper, each with its evidence and the seed-to-seed noise."""
  def bleu(name):
    return q[name]["bleu"] if name in q else None

  def noise(strategy, r):
    pairs = [(bleu(f"{strategy}_ft_r{r}"), bleu(f"{strategy}_s{seed}_ft_r{r}"))
             for seed in c.replicate_seeds]
    gaps = [abs(a - b) for a, b in pairs if a is not None and b is not None]
    return max(gaps) if gaps else None

  def verdict(ok, gap, tol):
    if ok is None:
      return "not measured"
    if tol is not None and abs(gap) <= tol:
      return "within seed noise"
    return "holds" if ok else "does not hold"

  out = ["Verdicts compare BLEU on the test verses; 'seed noise' is the largest BLEU gap between "
         "two data seeds of the same method at 2x (ULS and top), the least a gap must exceed to "
         "count.", ""]
  tol = max([n for n in (noise("uls", 2), noise("top", 2)) if n is not None], default=None)
  out.append(f"Seed noise at 2x: ULS {_f(noise('uls', 2))}, top {_f(noise('top', 2))} BLEU.")
  out.append("")
  out.append("**(a) Balanced middle skipping beats contiguous top / bottom at equal ratio.**")
  for r in c.zero_shot.ratios:
    u, t, b = (bleu(f"{s}_noft_r{r:g}") for s in ("uls", "top", "bottom"))
    ppl = lambda s: q.get(f"{s}_noft_r{r:g}", {}).get("ppl")
    if u is not None and t is not None and b is not None:
      out.append(f"- zero-shot {r:g}x: BLEU ULS {u:.1f}, top {t:.1f}, bottom {b:.1f}; perplexity "
                 f"ULS {_f(ppl('uls'), '.0f')}, top {_f(ppl('top'), '.0f')}, bottom "
                 f"{_f(ppl('bottom'), '.0f')} -> "
                 f"{verdict(ppl('uls') < min(ppl('top'), ppl('bottom')), 1.0, None)} by perplexity")
  u, t, b = bleu("uls_ft_r2"), bleu("top_ft_r2"), bleu("bottom_ft_r2")
  if None not in (u, t, b):
    out.append(f"- fine-tuned 2x: BLEU ULS {u:.1f}, top {t:.1f}, bottom {b:.1f} -> "
               f"{verdict(u > max(t, b), u - max(t, b), tol)}")
  out.append("")
  out.append("**(b) ULS beats early exit and SkipDecode in quality at equal ratio "
             "(fine-tuned).**")
  for r in (2, 3, 5):
    u = bleu(f"uls_ft_r{r}") or bleu(f"multi_r{r}")
    src = "per-ratio" if bleu(f"uls_ft_r{r}") is not None else "multi-ratio"
    e, d = bleu(f"early_exit_r{r}"), bleu(f"skipdecode_r{r}")
    others = [x for x in (e, d) if x is not None]
    if u is not None and others:
      er = q.get(f"early_exit_r{r}", {}).get("ratio")
      dr = q.get(f"skipdecode_r{r}", {}).get("ratio")
      out.append(f"- {r}x: ULS ({src}) {u:.1f}, early exit {_f(e)} (measured ratio "
                 f"{_f(er, '.2f')}), SkipDecode {_f(d)} (measured {_f(dr, '.2f')}) -> "
                 f"{verdict(u > max(others), u - max(others), tol)}")
  out.append("")
  out.append(f"**(c) ULS's measured speedup beats theirs at batch {c.speed.plot_batch}.**")
  for r in (2, 3, 5):
    sp = {m: measured_speedup(c, f"{m}_r{r}", st) for m in ("uls", "early_exit", "skipdecode")}
    others = [x for k, x in sp.items() if k != "uls" and x is not None]
    if sp["uls"] is not None and others:
      out.append(f"- {r}x: ULS {sp['uls']:.2f}x, early exit {_f(sp['early_exit'], '.2f')}x, "
                 f"SkipDecode {_f(sp['skipdecode'], '.2f')}x -> "
                 f"{verdict(sp['uls'] > max(others), 1.0, None)}")
  out.append("")
  out.append("**(d) One multi-ratio checkpoint is as good as per-ratio ones.**")
  for r in c.ratios:
    m, u = bleu(f"multi_r{r:g}"), bleu(f"uls_ft_r{r:g}")
    if m is not None and u is not None:
      ok = m >= u - (tol or 0.0)
      out.append(f"- {r:g}x: multi {m:.1f} vs per-ratio {u:.1f} -> "
                 f"{'holds (within seed noise or better)' if ok else 'does not hold'}")
  out.append("")
  full = bleu("full_ft")
  out.append("**(e) How much of full-depth BLEU ULS keeps (paper: 89% at 2x, 62% at 5x).**")
  for r in (2, 5):
    u = bleu(f"uls_ft_r{r}")
    if u is not None and full:
      out.append(f"- {r}x: {u:.1f} of {full:.1f} = {u / full:.0%}")
  return "\n".join(out)


def speed_trained_table(c, st) -> str:
  lines = ["| method | " + " | ".join(f"batch {b}: tok/s (ratio)" for b in c.speed.batches) + " |",
           "|---|" + "---|" * len(c.speed.batches)]
  for name in st[str(c.speed.batches[0])]:
    cells = []
    for b in c.speed.batches:
      r = st[str(b)][name]
      L = c.train.model.num_layers
      ratio = r["ratio"] if r["ratio"] is not None else (
          1.0 if name == "full" else L / len(plan_layers(L, float(name.rsplit("_r", 1)[1])).kept))
      speedup = r["tok_s"] / st[str(b)]["full"]["tok_s"]
      cells.append(f"{r['tok_s']:.0f} ({ratio:.2f}x, {speedup:.2f}x speed)")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def speed_table(c, sp) -> str:
  s = c.speed
  lines = [f"Random-weight Llama, {s.layers} layers, d_model {s.d_model}, d_ff {s.d_ff}, heads "
           f"{s.heads}/{s.kv_heads}, vocab {s.vocab}, f32; {s.prompt_len}-token prompts, "
           f"{s.new_tokens} new tokens (no EOS); generated tokens/s, best of {s.repeats}.", "",
           "| batch | method | layers / step | tok/s | speedup vs ULS r1 | compile s | "
           "KV cache MB |",
           "|---|---|---|---|---|---|---|"]
  for b, res in sp["batches"].items():
    base = res["uls_r1"]["tok_s"]
    for name, r in res.items():
      if name.startswith("transformers"):
        depth = s.layers / float(name.rsplit("_r", 1)[1])
        extra = f"{r['threads']} thr"
        label = "full depth" if depth == s.layers else "skipped layers deleted"
        lines.append(f"| {b} | {name} ({label}) | {int(depth)} | {r['tok_s']:.1f} | "
                     f"{r['tok_s'] / base:.2f}x | {extra} | – |")
        continue
      if r["ratio"] is not None:
        depth = s.layers / r["ratio"]
      else:
        depth = len(plan_layers(s.layers, float(name.rsplit("_r", 1)[1])).kept)
      lines.append(f"| {b} | {name} | {depth:.1f} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x | "
                   f"{r['compile_s']:.1f} | {r['cache_bytes'] / 2**20:.1f} |")
  lines.append("")
  if "stage_compiles" in sp:
    lines.append(f"Executables built in this stage (one per method x bucket): "
                 f"{sp['stage_compiles']}")
  else:  # written before the stage counted its own
    lines.append(f"Executables built by the process, earlier stages included: {sp['num_compiles']}")
  return "\n".join(lines)


def plots(c, q, st) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  groups = quality_groups(c)
  fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
  metrics = ("bleu", "chrf", "ppl")
  full = "full_ft" if "full_ft" in q else "full"
  for i, (title, names, tuned) in enumerate(g for g in groups if g[2]):
    pts = [(measured_speedup(c, n, st), *(q[n][m] for m in metrics)) for n in names if n in q]
    pts = [(1.0, *(q[full][m] for m in metrics))] + [p for p in pts if p[0] is not None]
    pts.sort()
    style = dict(color=plt.cm.tab20(i % 20), ls="--" if "data seed" in title else "-",
                 marker="o")
    for ax, k in zip(axes, (1, 2, 3)):
      ax.plot([p[0] for p in pts], [p[k] for p in pts], label=title, **style)
  for ax, metric in zip(axes, ("BLEU", "chrF", "validation perplexity")):
    if metric in ("BLEU", "chrF"):
      ax.axhline(q["copy"][metric.lower()], color="gray", ls=":", label="copy source")
    else:
      ax.set_yscale("log")
    ax.set_xlabel(f"measured speedup (tok/s vs full, batch {c.speed.plot_batch})")
    ax.set_ylabel(f"test {metric}" if metric != "validation perplexity" else metric)
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  fig.suptitle("fine-tuned methods: quality against measured speedup")
  fig.tight_layout()
  fig.savefig(os.path.join(c.results_dir, "quality_vs_speedup.png"), dpi=120)
  plt.close(fig)

  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  for i, (title, names, tuned) in enumerate(g for g in groups if g[0] != "copy source"):
    pts = sorted((target_ratio(n), q[n]["bleu"], q[n]["ppl"]) for n in names
                 if n in q and target_ratio(n) != 1.0)
    if not pts:
      continue
    style = dict(color=plt.cm.tab20(i % 20), ls="-" if tuned else ":",
                 marker="o" if tuned else "x")
    for ax, k in zip(axes, (1, 2)):
      ax.plot([p[0] for p in pts], [p[k] for p in pts], label=title, **style)
  for ax, name in zip(axes, ("test BLEU", "validation perplexity (target tokens)")):
    ax.axhline(q["full"]["bleu" if "BLEU" in name else "ppl"], color="k", lw=0.8,
               label="pretrained, full depth")
    ax.set_xlabel("ratio (target; measured for early exit / SkipDecode is in the table)")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
  axes[1].set_yscale("log")
  axes[0].legend(fontsize=6, ncol=2)
  fig.suptitle("zero-shot (dotted) and fine-tuned (solid), per strategy")
  fig.tight_layout()
  fig.savefig(os.path.join(c.results_dir, "quality_vs_ratio.png"), dpi=120)
  plt.close(fig)


def speed_plot(c, sp) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(sp["batches"]), figsize=(5 * len(sp["batches"]), 4))
  axes = np.atleast_1d(axes)
  for ax, (b, res) in zip(axes, sp["batches"].items()):
    base = res["uls_r1"]["tok_s"]
    for prefix in ("uls", "skipdecode", "transformers"):
      pts = sorted((float(n.rsplit("_r", 1)[1]), r["tok_s"] / base) for n, r in res.items()
                   if n.startswith(prefix + "_r"))
      if prefix == "skipdecode":
        pts = [(1.0, 1.0)] + pts
      ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=prefix)
    for n in ("early_exit_first_exit", "early_exit_never"):
      r = res[n]
      ax.plot([r["ratio"]], [r["tok_s"] / base], "x", ms=9, label=n)
    ax.plot([1, max(c.speed.ratios)], [1, max(c.speed.ratios)], "k:", lw=0.8, label="ideal")
    ax.set_title(f"batch {b}")
    ax.set_xlabel("nominal ratio (L / layers per step)")
    ax.set_ylabel("tok/s relative to ULS r1 (full depth)")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(c.results_dir, "speed_vs_ratio.png"), dpi=120)
  plt.close(fig)


def report(c) -> None:
  """Tables, plots, the claims' reading and results.json from whatever stage outputs are cached
  (any subset)."""
  q_dir = os.path.join(c.workdir, "quality")
  q = {os.path.splitext(n)[0]: json_load(os.path.join(q_dir, n))
       for n in sorted(os.listdir(q_dir)) if n.endswith(".json")} if os.path.isdir(q_dir) else None
  if q:
    q["copy"] = dict(corpora.copy_baseline_bleu(
        corpora.load_pairs(c.train.data)["test"][:c.eval.test_examples]),
        ppl=float("nan"), ratio=float("nan"))
  load = lambda name: (json_load(os.path.join(c.workdir, name))
                       if os.path.exists(os.path.join(c.workdir, name)) else None)
  st, sp = load("speed_trained.json"), load("speed.json")
  results = dict(stage_seconds=load("stage_seconds.json"), provenance=load("provenance.json"),
                 quality=q, speed_trained=st, speed=sp)
  for name, text in (("quality", q and quality_table(c, q, st)),
                     ("paper_table", q and paper_table(c, q, st)),
                     ("claims", q and claims(c, q, st)),
                     ("speed_trained", st and speed_trained_table(c, st)),
                     ("speed", sp and speed_table(c, sp))):
    if text:
      with open(os.path.join(c.results_dir, name + ".md"), "w") as f:
        f.write(text + "\n")
  if q and "full" in q:
    plots(c, q, st)
  if sp:
    speed_plot(c, sp)
  json_dump(results, os.path.join(c.results_dir, "results.json"))



def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/reproduce.py")
  p.add_argument("--quick", action="store_true", help="the config's quick() smoke settings")
  args = p.parse_args(argv)
  c = load_config(args.config, args.quick)
  use_base_depth(c)
  os.makedirs(c.results_dir, exist_ok=True)
  report(c)
  print(f"results in {c.results_dir}")


if __name__ == "__main__":
  main()
