"""ULS against early exit, SkipDecode and contiguous / random static skipping, with transformers as
the speed reference: one command, markdown tables and plots in benchmarks/results/.

  python benchmarks/reproduce.py --config configs/reproduce.py [--quick] [--stages base,ft,...]

Stages: base, ft, quality, speed_trained, speed (see configs/reproduce.py). Each stage's output is
cached under the config's workdir (checkpoints, HF exports, JSON), so a re-run redoes only what is
missing; delete a file to redo its part. Speed is timed over whole calls (prefill + decode loop,
compile excluded: every shape is warmed up first), the best of `speed.repeats`, methods taken in
turn each round so that load from other processes hits them alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from ulskip_jax import baselines, decode, hf, plan_layers, train_lib  # noqa: E402
from ulskip_jax import checkpoint as ckpt_lib  # noqa: E402
from ulskip_jax import data as data_lib  # noqa: E402

STAGES = ("base", "ft", "quality_partial", "quality", "speed_trained", "speed", "report")


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_config(path: str, quick: bool):
  spec = importlib.util.spec_from_file_location("repro_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c = module.quick(c) if quick else c
  for key in ("workdir", "multi_workdir", "results_dir"):  # Orbax wants absolute paths
    c[key] = os.path.join(ROOT, c[key])
  return c


def _json_load(path):
  with open(path) as f:
    return json.load(f)


def _json_dump(obj, path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def _cached(path, make):
  """make() once; its JSON result is kept at `path`."""
  if os.path.exists(path):
    return _json_load(path)
  out = make()
  _json_dump(out, path)
  return out


# ----------------------------------------------------------------------------------------------
# Training.

def _finished(workdir: str, steps: int) -> bool:
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and ckpt_lib.Checkpointer(d).latest_step() == steps


def _claim(workdir: str) -> bool:
  """True if this process may train `workdir`: the first to create `<workdir>.claim` does, so two
  processes running the ft stage share the runs. A claim whose process is gone (a crash, a kill)
  is taken over, and the run resumes from its last checkpoint."""
  path = workdir.rstrip("/") + ".claim"
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  except FileExistsError:
    with open(path) as f:
      owner = f.read().strip()
    if owner.isdigit() and os.path.exists(f"/proc/{owner}"):
      return False
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
  os.write(fd, str(os.getpid()).encode())
  os.close(fd)
  return True


def run_base(c) -> str:
  """Train the base model at full depth; export it as a Hugging Face folder (+ tokenizer)."""
  workdir, export = os.path.join(c.workdir, "base"), os.path.join(c.workdir, "base_hf")
  if os.path.exists(os.path.join(export, "config.json")):
    return export
  t = c.train.copy_and_resolve_references()
  t.num_steps = t.skip.full_depth_steps = c.base_steps
  t.optim.lr = c.base_lr
  t.checkpoint.every = max(c.base_steps // 3, 1)
  start = time.perf_counter()
  train_lib.train_and_evaluate(t, workdir)
  log(f"base: {c.base_steps} steps in {time.perf_counter() - start:.0f} s")
  model, tok = train_lib.load_for_inference(workdir)
  hf.save_pretrained(model, export, tokenizer=tok._hf)
  return export


def ft_config(c, base_hf: str, strategy: str = "uls", ratio: float = 2.0, ratios=(), seed=None):
  t = c.train.copy_and_resolve_references()
  t.model.init_from = base_hf
  t.seed = t.seed if seed is None else seed  # the data order (and a random plan)
  t.num_steps = c.ft_steps
  t.skip.full_depth_steps = 0
  t.skip.strategy, t.skip.ratio, t.skip.ratios = strategy, ratio, tuple(ratios)
  t.optim.lr, t.optim.warmup_steps = c.ft_lr, c.ft_warmup_steps
  t.checkpoint.every = c.ft_steps
  return t


def run_static_ft(c, base_hf, name, workdir, **kw) -> float:
  if _finished(workdir, c.ft_steps) or not _claim(workdir):
    return 0.0
  start = time.perf_counter()
  train_lib.train_and_evaluate(ft_config(c, base_hf, **kw), workdir)
  log(f"ft {name}: {c.ft_steps} steps in {time.perf_counter() - start:.0f} s")
  return time.perf_counter() - start


def run_dynamic_ft(c, base_hf, name, export, loss_fn) -> float:
  """Fine-tune with a baselines loss, the same data order, optimizer and steps as ULS; export HF."""
  if os.path.exists(os.path.join(export, "config.json")) or not _claim(export):
    return 0.0
  start = time.perf_counter()
  t = ft_config(c, base_hf)
  model, _ = hf.from_pretrained(base_hf)
  tok = data_lib.Tokenizer.from_pretrained(base_hf)
  pairs = data_lib.load_pairs(t.data)
  batcher = data_lib.Batcher.from_pairs(tok, t.data.template, pairs["train"], t.batch_size,
                                        t.data.seq_len, pack=t.data.pack, seed=t.seed)
  optimizer = train_lib.make_optimizer(t.optim, t.num_steps)
  graphdef, _ = nnx.split(model)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  state = dict(params=params, opt_state=optimizer.init(params))
  step = jax.jit(functools.partial(baselines.train_step, graphdef=graphdef, optimizer=optimizer,
                                   loss_fn=loss_fn), donate_argnums=0)
  for i in range(t.num_steps):
    state, metrics = step(state, next(batcher))
    if (i + 1) % t.log_every == 0 or i + 1 == t.num_steps:
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        raise FloatingPointError(f"{name}: loss {loss} at step {i + 1}")
      log(f"ft {name}: step {i + 1} loss {loss:.3f}")
  params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params, jax.device_get(state["params"]))
  nnx.update(model, params)
  hf.save_pretrained(model, export, tokenizer=tok._hf)
  log(f"ft {name}: {t.num_steps} steps in {time.perf_counter() - start:.0f} s")
  return time.perf_counter() - start


def mean_target_tokens(tok, pairs) -> float:
  """Mean response length (tokens, EOS included): SkipDecode's schedule horizon."""
  return float(np.mean([len(ids) + 1 for ids in tok.encode_batch([" " + p["target"]
                                                                    for p in pairs])]))


def method_ratios(c, method):
  """The ratios `method` is fine-tuned / evaluated at (config.method_ratios, else all)."""
  return tuple(c.method_ratios.get(method, c.ratios))


def sd_schedule(c, L, ratio, horizon):
  return baselines.skipdecode_schedule(L, ratio, max(int(round(horizon)), c.skipdecode_levels),
                                       c.skipdecode_levels)


def static_runs(c):
  """[(run name, quality row name, strategy, ratio, seed)] of the static-plan fine-tunings: each
  strategy at its ratios, then the replicates (another data seed)."""
  runs = [(f"{s}_r{r:g}", f"{s}_ft_r{r:g}", s, r, c.train.seed)
          for s in c.ft_strategies for r in method_ratios(c, s)]
  return runs + [(f"{s}_s{seed}_r{r:g}", f"{s}_s{seed}_ft_r{r:g}", s, r, seed)
                 for seed in c.replicate_seeds for s in c.replicate_strategies
                 for r in method_ratios(c, s)]


def run_ft(c, base_hf) -> dict:
  times = {}
  for name, _, strategy, r, seed in static_runs(c):
    times[name] = run_static_ft(c, base_hf, name, os.path.join(c.workdir, f"ft_{name}"),
                                strategy=strategy, ratio=r, seed=seed)
  times["multi"] = run_static_ft(c, base_hf, "multi", c.multi_workdir, ratios=c.multi_ratios)
  times["early_exit"] = run_dynamic_ft(
      c, base_hf, "early_exit", os.path.join(c.workdir, "ft_early_exit"),
      functools.partial(baselines.early_exit_loss_sums, exit_every=c.exit_every))
  tok = data_lib.Tokenizer.from_pretrained(base_hf)
  horizon = mean_target_tokens(tok, data_lib.load_pairs(c.train.data)["validation"])
  L = c.train.model.num_layers
  for r in method_ratios(c, "skipdecode"):
    sched = sd_schedule(c, L, r, horizon)
    times[f"skipdecode_r{r:g}"] = run_dynamic_ft(
        c, base_hf, f"skipdecode_r{r:g}", os.path.join(c.workdir, f"ft_skipdecode_r{r:g}"),
        functools.partial(baselines.skipdecode_loss_sums, schedule=sched))
  return times


# ----------------------------------------------------------------------------------------------
# Quality.

def load_workdir_model(workdir):
  model, _ = train_lib.load_for_inference(workdir)
  return model


class Evaluator:
  """BLEU / chrF on test verses, perplexity on validation batches, for any method."""

  def __init__(self, c, base_hf):
    self.c = c
    self.tok = data_lib.Tokenizer.from_pretrained(base_hf)
    t = c.train
    pairs = data_lib.load_pairs(t.data)
    self.test_pairs = pairs["test"][:c.eval.test_examples]
    self.prompts, self.refs = data_lib.eval_prompts(self.tok, t.data.template, self.test_pairs,
                                                    t.data.seq_len)
    self.tune_prompts, _ = data_lib.eval_prompts(self.tok, t.data.template,
                                                 pairs["validation"][:c.eval.tune_examples],
                                                 t.data.seq_len)
    batches = data_lib.Batcher.from_pairs(self.tok, t.data.template, pairs["validation"],
                                          t.batch_size, t.data.seq_len, pack=t.data.pack,
                                          shuffle=False, repeat=False)
    self.val_batches = [b for _, b in zip(range(c.eval.ppl_batches), batches)]
    self.horizon = mean_target_tokens(self.tok, pairs["validation"])
    self.gen_kw = dict(max_new_tokens=c.eval.max_new_tokens, eos_id=self.tok.eos_id,
                       pad_id=self.tok.pad_id)

  def ppl(self, model, loss_fn) -> float:
    graphdef, _ = nnx.split(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    fn = jax.jit(lambda p, b: loss_fn(p, graphdef, b)[:2])
    loss = tokens = 0.0
    for b in self.val_batches:
      l, n = fn(params, b)
      loss, tokens = loss + float(l), tokens + float(n)
    return math.exp(min(loss / max(tokens, 1.0), 50.0))

  def decode(self, model, fn, **kw):
    ids, stats = baselines.generate_batched(fn, model, self.prompts,
                                            batch_size=self.c.eval.batch_size, **self.gen_kw, **kw)
    hyps = [self.tok.decode(x).strip() for x in ids]
    import sacrebleu
    return dict(bleu=sacrebleu.corpus_bleu(hyps, [self.refs]).score,
                chrf=sacrebleu.corpus_chrf(hyps, [self.refs]).score,
                tok_s=stats.generated_tokens_per_s, wall_s=stats.wall_s,
                compile_s=stats.compile_s, example=hyps[0]), stats

  def static(self, model, skip):
    ppl = self.ppl(model, functools.partial(train_lib.loss_sums, skip=tuple(skip), paper=True))
    out, _ = self.decode(model, decode.generate, skip=tuple(skip), mode="paper")
    return dict(out, ppl=ppl, ratio=model.cfg.num_layers / (model.cfg.num_layers - len(skip)))

  def early_exit(self, model, target):
    L = model.cfg.num_layers
    threshold, tuned = baselines.tune_threshold(
        model, self.tune_prompts, target, batch_size=self.c.eval.batch_size,
        exit_every=self.c.exit_every, iterations=self.c.eval.tune_iterations, **self.gen_kw)
    out, stats = self.decode(model, baselines.early_exit_generate, threshold=threshold,
                             exit_every=self.c.exit_every)
    sums = functools.partial(baselines.early_exit_teacher_forced_loss_sums,
                             exit_every=self.c.exit_every, threshold=threshold)
    return dict(out, ppl=self.ppl(model, sums), ratio=stats.ratio(L), tuned_ratio=tuned,
                threshold=threshold)

  def skipdecode(self, model, ratio):
    L = model.cfg.num_layers
    sched = sd_schedule(self.c, L, ratio, self.horizon)
    out, stats = self.decode(model, baselines.skipdecode_generate, schedule=sched)
    ppl = self.ppl(model, functools.partial(baselines.skipdecode_loss_sums, schedule=sched))
    return dict(out, ppl=ppl, ratio=stats.ratio(L), schedule=dataclasses.asdict(sched))


def run_quality(c, base_hf, partial: bool = False) -> dict:
  """One cached JSON row per (method, ratio). partial: skip rows whose fine-tuned model is not
  there yet (a second process can evaluate while the first still fine-tunes)."""
  ev = Evaluator(c, base_hf)
  cache_dir = os.path.join(c.workdir, "quality")
  L = c.train.model.num_layers
  base, _ = hf.from_pretrained(base_hf)
  rows = {}

  def row(name, make, needs=None):
    if needs is not None and not os.path.exists(needs):
      if partial:
        log(f"quality {name}: skipped ({needs} is not there yet)")
        return
      log(f"quality {name}: waiting for {needs} (another process is fine-tuning it)")
      deadline = time.time() + 3600
      while not os.path.exists(needs):
        if time.time() > deadline:
          raise FileNotFoundError(f"{needs} is missing: run the ft stage first")
        time.sleep(10)
    start = time.perf_counter()
    rows[name] = _cached(os.path.join(cache_dir, name + ".json"), make)
    log(f"quality {name}: BLEU {rows[name]['bleu']:.1f} chrF {rows[name]['chrf']:.1f} "
        f"ppl {rows[name]['ppl']:.2f} ratio {rows[name]['ratio']:.2f} "
        f"({time.perf_counter() - start:.0f} s)")

  def finished(workdir):
    return os.path.join(workdir, "checkpoints", str(c.ft_steps))

  row("full", lambda: ev.static(base, ()))
  for r in c.ratios:
    row(f"uls_noft_r{r:g}", lambda: ev.static(base, plan_layers(L, r).skipped))
  for name, row_name, strategy, r, seed in static_runs(c):
    workdir = os.path.join(c.workdir, f"ft_{name}")
    row(row_name, lambda: ev.static(load_workdir_model(workdir),
                                    plan_layers(L, r, strategy, seed=seed).skipped),
        finished(workdir))
  for r in c.multi_ratios:
    row(f"multi_r{r:g}", lambda: ev.static(load_workdir_model(c.multi_workdir),
                                           plan_layers(L, r).skipped if r > 1 else ()),
        finished(c.multi_workdir))
  ee_dir = os.path.join(c.workdir, "ft_early_exit")
  for r in c.ratios:
    row(f"early_exit_r{r:g}", lambda: ev.early_exit(hf.from_pretrained(ee_dir)[0], r),
        os.path.join(ee_dir, "config.json"))
  for r in method_ratios(c, "skipdecode"):
    sd_dir = os.path.join(c.workdir, f"ft_skipdecode_r{r:g}")
    row(f"skipdecode_r{r:g}", lambda: ev.skipdecode(hf.from_pretrained(sd_dir)[0], r),
        os.path.join(sd_dir, "config.json"))
  return rows


# ----------------------------------------------------------------------------------------------
# Speed.

def _time_cases(cases, repeats, num_layers):
  """{name: tok/s, compile s, cache bytes, measured ratio (dynamic methods)}: every case warmed
  up, then `repeats` rounds taking the cases in turn; the best call counts."""
  warm = {name: fn() for name, fn in cases.items()}
  best = {name: (s.generated_tokens_per_s, s) for name, (_, s) in warm.items()}
  compile_s = {name: s.compile_s for name, (_, s) in warm.items()}
  for _ in range(repeats):
    for name, fn in cases.items():
      _, s = fn()
      if s.generated_tokens_per_s > best[name][0]:
        best[name] = (s.generated_tokens_per_s, s)
  return {name: dict(tok_s=tps, compile_s=compile_s[name], cache_bytes=s.cache_bytes,
                     ratio=s.ratio(num_layers) if isinstance(s, baselines.DynamicStats) else None)
          for name, (tps, s) in best.items()}


def run_speed_trained(c, base_hf, quality) -> dict:
  """Every method on the trained 12-layer model with real test prompts, at each batch size;
  thresholds as tuned for quality (at the quality batch size)."""
  ev = Evaluator(c, base_hf)
  L = c.train.model.num_layers
  prompts = ev.prompts[:c.speed.trained_examples]
  base, _ = hf.from_pretrained(base_hf)
  ee, _ = hf.from_pretrained(os.path.join(c.workdir, "ft_early_exit"))
  sd = {r: hf.from_pretrained(os.path.join(c.workdir, f"ft_skipdecode_r{r:g}"))[0]
        for r in method_ratios(c, "skipdecode")}
  out = {}
  for batch in c.speed.batches:
    def gen(fn, model, **kw):
      return lambda: baselines.generate_batched(fn, model, prompts, batch_size=batch,
                                                **ev.gen_kw, **kw)
    cases = {"full": gen(decode.generate, base)}
    for r in c.ratios:
      cases[f"uls_r{r:g}"] = gen(decode.generate, base, ratio=r)
      if r in sd:
        cases[f"skipdecode_r{r:g}"] = gen(baselines.skipdecode_generate, sd[r],
                                          schedule=sd_schedule(c, L, r, ev.horizon))
      cases[f"early_exit_r{r:g}"] = gen(baselines.early_exit_generate, ee,
                                        threshold=quality[f"early_exit_r{r:g}"]["threshold"],
                                        exit_every=c.exit_every)
    start = time.perf_counter()
    out[str(batch)] = _time_cases(cases, c.speed.repeats, L)
    log(f"speed_trained batch {batch}: {time.perf_counter() - start:.0f} s")
  return out


def speed_torch_model(s):
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=s.vocab, hidden_size=s.d_model, intermediate_size=s.d_ff,
      num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
      max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  return transformers.LlamaForCausalLM(cfg).eval()


def time_torch(path, prompts, s) -> tuple[float, int]:
  """(best generated tok/s, threads) of transformers' greedy generate on the folder's model."""
  import torch
  import transformers
  tmodel = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  ids = torch.tensor(prompts)
  kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
  best = (0.0, 0)
  with torch.inference_mode():
    for threads in s.torch_threads:
      torch.set_num_threads(threads)
      tmodel.generate(ids, max_new_tokens=2, **kw)
      for _ in range(max(1, s.repeats - 1)):
        start = time.perf_counter()
        tmodel.generate(ids, max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens, **kw)
        best = max(best, (len(prompts) * s.new_tokens / (time.perf_counter() - start), threads))
  return best


def run_speed(c) -> dict:
  """Random-weight 24-layer model: ULS, static plans, SkipDecode, early exit at its two ends
  (threshold 0: always the first exit point; > 1: never exits), transformers full and pruned."""
  s = c.speed
  L = s.layers
  rng = np.random.default_rng(0)
  compiles_before = dict(decode=decode.num_compiles(), baselines=baselines.num_compiles())
  out = dict(config=s.to_dict(), batches={})
  with tempfile.TemporaryDirectory() as tmp:
    full_dir = os.path.join(tmp, "full")
    speed_torch_model(s).save_pretrained(full_dir)
    model, _ = hf.from_pretrained(full_dir)
    pruned = {}
    for r in s.ratios:
      if r > 1:
        pruned[r] = os.path.join(tmp, f"r{r:g}")
        hf.save_pretrained(model, pruned[r], skip=plan_layers(L, r).skipped)
    for batch in s.batches:
      prompts = rng.integers(3, s.vocab, (batch, s.prompt_len)).tolist()
      kw = dict(max_new_tokens=s.new_tokens, eos_id=None)

      def case(fn, **extra):
        return lambda: fn(model, prompts, **kw, **extra)
      cases = {}
      for r in s.ratios:
        cases[f"uls_r{r:g}"] = case(decode.generate, ratio=r)
        if r > 1:
          sched = baselines.skipdecode_schedule(L, r, s.new_tokens)
          cases[f"skipdecode_r{r:g}"] = case(baselines.skipdecode_generate, schedule=sched)
          if batch == s.static_batch and r in s.static_ratios:
            for strategy in ("top", "bottom", "middle", "every_other", "random"):
              cases[f"{strategy}_r{r:g}"] = case(
                  decode.generate, skip=plan_layers(L, r, strategy, seed=0).skipped)
            # The prompt through the kept layers too: the decode loop's speedup without the
            # full-depth prefill (paper mode, the default, runs the prompt at full depth).
            cases[f"uls_everywhere_r{r:g}"] = case(decode.generate, ratio=r, mode="everywhere")
      cases["early_exit_first_exit"] = case(baselines.early_exit_generate, threshold=0.0,
                                            exit_every=c.exit_every)
      cases["early_exit_never"] = case(baselines.early_exit_generate, threshold=2.0,
                                        exit_every=c.exit_every)
      start = time.perf_counter()
      res = _time_cases(cases, s.repeats, L)
      for r in s.ratios:
        tps, threads = time_torch(full_dir if r == 1 else pruned[r], prompts, s)
        res[f"transformers_r{r:g}"] = dict(tok_s=tps, threads=threads)
      out["batches"][str(batch)] = res
      log(f"speed batch {batch}: {time.perf_counter() - start:.0f} s")
  out["stage_compiles"] = dict(decode=decode.num_compiles() - compiles_before["decode"],
                               baselines=baselines.num_compiles() - compiles_before["baselines"])
  return out


# ----------------------------------------------------------------------------------------------
# Reports.

def _f(x, fmt=".1f"):
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _runs(c, prefix, method=None):
  """Quality-table row names of a method: prefix + ratio, over its ratios (default: all)."""
  return [f"{prefix}_r{r:g}" for r in (method_ratios(c, method) if method else c.ratios)]


def quality_groups(c):
  """[(title, row names)] in table order; each replicate (another data seed) after its method."""
  static = [("uls", "ULS, fine-tuned per ratio"), ("top", "top (keep first n), fine-tuned"),
            ("bottom", "bottom (keep last n), fine-tuned"), ("random", "random, fine-tuned")]
  groups = [("full model", ["full"]), ("ULS, no fine-tuning", _runs(c, "uls_noft"))]
  for strategy, title in static:
    if strategy in c.ft_strategies:
      groups.append((title, _runs(c, f"{strategy}_ft", strategy)))
    if strategy in c.replicate_strategies:
      groups += [(f"{title}, data seed {seed}" + (" (and plan)" if strategy == "random" else ""),
                  _runs(c, f"{strategy}_s{seed}_ft", strategy)) for seed in c.replicate_seeds]
    if strategy == "uls":
      groups.append(("ULS, one multi-ratio checkpoint", [f"multi_r{r:g}" for r in c.multi_ratios]))
  return groups + [("early exit (CALM), fine-tuned", _runs(c, "early_exit")),
                   ("SkipDecode, fine-tuned", _runs(c, "skipdecode", "skipdecode")),
                   ("copy source", ["copy"])]


def measured_speedup(c, name, st):
  """tok/s of `name`'s decode over full depth, from the speed_trained stage at speed.plot_batch
  (best of repeats). Static plans of equal depth cost the same (same layers count, same cache),
  so top / bottom / random / multi / ULS-without-fine-tuning use ULS's measurement."""
  if not st or str(c.speed.plot_batch) not in st:
    return None
  res = st[str(c.speed.plot_batch)]
  if name == "full" or name == "multi_r1":
    return 1.0
  ratio = name.rsplit("_r", 1)[1]
  key = name if name.startswith(("early_exit", "skipdecode")) else f"uls_r{ratio}"
  return res[key]["tok_s"] / res["full"]["tok_s"] if key in res else None


def quality_table(c, q, st=None) -> str:
  lines = ["| method | run | target ratio | measured ratio | BLEU | chrF | val ppl | "
           f"speedup (tok/s, batch {c.speed.plot_batch}) |", "|---|---|---|---|---|---|---|---|"]
  for title, names in quality_groups(c):
    for name in names:
      if name not in q:
        continue
      r = q[name]
      target = name.rsplit("_r", 1)[1] if "_r" in name else ("1" if name == "full" else "–")
      speedup = None if name == "copy" else measured_speedup(c, name, st)
      lines.append(f"| {title} | {name} | {target} | {_f(r.get('ratio'), '.2f')} | "
                   f"{_f(r['bleu'])} | {_f(r['chrf'])} | {_f(r.get('ppl'), '.2f')} | "
                   f"{_f(speedup, '.2f')} |")
  return "\n".join(lines)


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


def plots(c, q, st, sp) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
  metrics = ("bleu", "chrf", "ppl")
  for i, (title, names) in enumerate(quality_groups(c)[1:-1]):
    pts = [(measured_speedup(c, n, st), *(q[n][m] for m in metrics)) for n in names if n in q]
    pts = [(1.0, *(q["full"][m] for m in metrics))] + [p for p in pts if p[0] is not None]
    pts.sort()
    style = dict(color=plt.cm.tab20(i % 20), ls="--" if "data seed" in title else "-")
    for ax, k in zip(axes, (1, 2, 3)):
      ax.plot([p[0] for p in pts], [p[k] for p in pts], "o", label=title, **style)
  for ax, metric in zip(axes, ("BLEU", "chrF", "validation perplexity")):
    if metric in ("BLEU", "chrF"):
      ax.axhline(q["copy"][metric.lower()], color="gray", ls=":", label="copy source")
    else:
      ax.set_yscale("log")
    ax.set_xlabel(f"measured speedup (tok/s vs full, batch {c.speed.plot_batch}, trained model)")
    ax.set_ylabel(f"test {metric}" if metric != "validation perplexity" else metric)
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(c.results_dir, "quality_vs_speedup.png"), dpi=120)
  if sp is None:
    return
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


def report(c) -> None:
  """Tables, plots and results.json from whatever stage outputs are cached (any subset)."""
  q_dir = os.path.join(c.workdir, "quality")
  q = {os.path.splitext(n)[0]: _json_load(os.path.join(q_dir, n))
       for n in sorted(os.listdir(q_dir)) if n.endswith(".json")} if os.path.isdir(q_dir) else None
  if q:
    q["copy"] = dict(data_lib.copy_baseline_bleu(
        data_lib.load_pairs(c.train.data)["test"][:c.eval.test_examples]),
        ppl=float("nan"), ratio=float("nan"))
  load = lambda name: (_json_load(os.path.join(c.workdir, name))
                       if os.path.exists(os.path.join(c.workdir, name)) else None)
  st, sp = load("speed_trained.json"), load("speed.json")
  results = dict(stage_seconds=load("stage_seconds.json"), quality=q, speed_trained=st, speed=sp)
  for name, text in (("quality", q and quality_table(c, q, st)),
                     ("speed_trained", st and speed_trained_table(c, st)),
                     ("speed", sp and speed_table(c, sp))):
    if text:
      with open(os.path.join(c.results_dir, name + ".md"), "w") as f:
        f.write(text + "\n")
  if q and "full" in q:
    plots(c, q, st, sp)
  _json_dump(results, os.path.join(c.results_dir, "results.json"))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/reproduce.py")
  p.add_argument("--quick", action="store_true", help="the config's quick() smoke settings")
  p.add_argument("--stages", default=",".join(STAGES),
                 help=f"a subset of {','.join(STAGES)} (each process may run a different subset: "
                      "speed does not need the trained models); tables are always rewritten from "
                      "every cached stage")
  args = p.parse_args(argv)
  c = load_config(args.config, args.quick)
  stages = args.stages.split(",")
  unknown = set(stages) - set(STAGES)
  if unknown:
    raise SystemExit(f"--stages has unknown {sorted(unknown)}: allowed are {', '.join(STAGES)}")
  os.makedirs(c.results_dir, exist_ok=True)
  os.makedirs(c.workdir, exist_ok=True)
  log(f"devices {jax.devices()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")

  def stage(name, fn):
    start = time.perf_counter()
    result = fn()
    path = os.path.join(c.workdir, "stage_seconds.json")
    timings = _json_load(path) if os.path.exists(path) else {}
    if time.perf_counter() - start > 1:  # not merely read from the cache
      timings[name] = time.perf_counter() - start
      _json_dump(timings, path)
    log(f"stage {name} done ({time.perf_counter() - start:.0f} s)")
    return result

  if {"base", "ft", "quality_partial", "quality", "speed_trained"} & set(stages):
    base_hf = stage("base", lambda: run_base(c))
  if "ft" in stages:
    stage("ft", lambda: run_ft(c, base_hf))
  if "quality_partial" in stages:
    stage("quality_partial", lambda: run_quality(c, base_hf, partial=True))
  if "quality" in stages or "speed_trained" in stages:
    q = stage("quality", lambda: run_quality(c, base_hf))
  if "speed_trained" in stages:
    stage("speed_trained", lambda: _cached(os.path.join(c.workdir, "speed_trained.json"),
                                           lambda: run_speed_trained(c, base_hf, q)))
  if "speed" in stages:
    stage("speed", lambda: _cached(os.path.join(c.workdir, "speed.json"), lambda: run_speed(c)))
  report(c)
  log(f"results in {c.results_dir}")


if __name__ == "__main__":
  main()
