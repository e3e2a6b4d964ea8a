"""ULS against early exit, SkipDecode and contiguous / random static skipping, with transformers as
the speed reference: one command, markdown tables and plots in benchmarks/results/.

  python -m benchmarks.reproduce --config configs/reproduce_smollm2.py [--quick] [--stages ...]

This module is the runner. Stages: base, zero_shot, ft, quality, speed_trained, speed (see the
config's docstring). Each stage's output is cached under the config's workdir (checkpoints, HF
exports, JSON), so a re-run redoes only what is missing; delete a file to redo its part. Speed is
timed over whole calls (prefill + decode loop, compile excluded: every shape is warmed up first),
the best of `speed.repeats`, methods taken in turn each round so that load from other processes
hits them alike. Every run ends with the report (benchmarks/reproduce_report.py), which rewrites
the tables, verdicts and plots from every cached stage output; `--stages report` runs it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from benchmarks import provenance
from benchmarks.reproduce_report import (json_dump, json_load, load_config, method_ratios, report,
                                         use_base_depth)
from ulskip_jax import (baseline_decode, baseline_losses, baseline_schedules, decode, engine,
                        early_exit_tuning, hf, plan_layers, train_lib)
from ulskip_jax import checkpoint as ckpt_lib
from ulskip_jax import batching, corpora
from ulskip_jax.tokenizer import Tokenizer

STAGES = ("base", "zero_shot", "ft", "quality_partial", "quality", "speed_trained", "speed",
          "report")


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cached(path, make):
  """make() once; its JSON result is kept at `path`."""
  if os.path.exists(path):
    return json_load(path)
  out = make()
  json_dump(out, path)
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
  """The base model as a Hugging Face folder (+ tokenizer): `base_init` exported (pruned to the
  ULS plan of `base_layers_ratio` if set), or a model trained at full depth from scratch."""
  workdir, export = os.path.join(c.workdir, "base"), os.path.join(c.workdir, "base_hf")
  if os.path.exists(os.path.join(export, "config.json")):
    return export
  if c.base_init:
    model, hf_tok = hf.from_pretrained(c.base_init)
    skip = (plan_layers(model.cfg.num_layers, c.base_layers_ratio).skipped
            if c.base_layers_ratio else ())
    hf.save_pretrained(model, export, skip=skip, tokenizer=hf_tok)
    return export
  t = c.train.copy_and_resolve_references()
  t.num_steps = t.skip.full_depth_steps = c.base_steps
  t.optim.lr = c.base_lr
  t.checkpoint.every = max(c.base_steps // 3, 1)
  start = time.perf_counter()
  train_lib.train_and_evaluate(t, workdir)
  log(f"base: {c.base_steps} steps in {time.perf_counter() - start:.0f} s")
  model, tok = ckpt_lib.load_for_inference(workdir)
  hf.save_pretrained(model, export, tokenizer=tok.hf)
  return export


def base_tokenizer(c, base_hf):
  return Tokenizer.from_pretrained(base_hf, chat=c.train.data.chat)


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
  tok = base_tokenizer(c, base_hf)
  pairs = corpora.load_pairs(t.data)
  batcher = batching.Batcher.from_pairs(tok, t.data.template, pairs["train"], t.batch_size,
                                        t.data.seq_len, pack=t.data.pack, seed=t.seed)
  optimizer = train_lib.make_optimizer(t.optim, t.num_steps)
  graphdef, _ = nnx.split(model)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  state = dict(params=params, opt_state=optimizer.init(params))
  step = jax.jit(functools.partial(baseline_losses.train_step, graphdef=graphdef,
                                   optimizer=optimizer, loss_fn=loss_fn), donate_argnums=0)
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
  hf.save_pretrained(model, export, tokenizer=tok.hf)
  log(f"ft {name}: {t.num_steps} steps in {time.perf_counter() - start:.0f} s")
  return time.perf_counter() - start


def mean_target_tokens(tok, pairs) -> float:
  """Mean response length (tokens, EOS included): SkipDecode's schedule horizon."""
  return float(np.mean([len(ids) + 1 for ids in tok.encode_batch([tok.target_text(p["target"])
                                                                    for p in pairs])]))


def sd_schedule(c, L, ratio, horizon):
  return baseline_schedules.skipdecode_schedule(
      L, ratio, max(int(round(horizon)), c.skipdecode_levels), c.skipdecode_levels)


def static_runs(c):
  """[(run name, quality row name, strategy, ratio, seed)] of the static-plan fine-tunings: full
  depth, each strategy at its ratios, then the replicates (another data seed)."""
  runs = [("full", "full_ft", "uls", 1.0, c.train.seed)] if c.ft_full else []
  runs += [(f"{s}_r{r:g}", f"{s}_ft_r{r:g}", s, r, c.train.seed)
           for s in c.ft_strategies for r in method_ratios(c, s)]
  return runs + [(f"{s}_s{seed}_r{r:g}", f"{s}_s{seed}_ft_r{r:g}", s, r, seed)
                 for seed in c.replicate_seeds for s in c.replicate_strategies
                 for r in (c.replicate_ratios or method_ratios(c, s))]


def run_ft(c, base_hf) -> dict:
  times = dict(multi=run_static_ft(c, base_hf, "multi", c.multi_workdir, ratios=c.multi_ratios))
  for name, _, strategy, r, seed in static_runs(c):
    times[name] = run_static_ft(c, base_hf, name, os.path.join(c.workdir, f"ft_{name}"),
                                strategy=strategy, ratio=r, seed=seed)
  times["early_exit"] = run_dynamic_ft(
      c, base_hf, "early_exit", os.path.join(c.workdir, "ft_early_exit"),
      functools.partial(baseline_losses.early_exit_loss_sums, exit_every=c.exit_every))
  tok = base_tokenizer(c, base_hf)
  horizon = mean_target_tokens(tok, corpora.load_pairs(c.train.data)["validation"])
  L = c.train.model.num_layers
  for r in method_ratios(c, "skipdecode"):
    sched = sd_schedule(c, L, r, horizon)
    times[f"skipdecode_r{r:g}"] = run_dynamic_ft(
        c, base_hf, f"skipdecode_r{r:g}", os.path.join(c.workdir, f"ft_skipdecode_r{r:g}"),
        functools.partial(baseline_losses.skipdecode_loss_sums, schedule=sched))
  return times


# ----------------------------------------------------------------------------------------------
# Quality.

def load_workdir_model(workdir):
  model, _ = ckpt_lib.load_for_inference(workdir)
  return model


class Evaluator:
  """BLEU / chrF on test verses, perplexity on validation batches, for any method."""

  def __init__(self, c, base_hf):
    self.c = c
    self.tok = base_tokenizer(c, base_hf)
    t = c.train
    pairs = corpora.load_pairs(t.data)
    self.test_pairs = pairs["test"][:c.eval.test_examples]
    self.prompts, self.refs = batching.eval_prompts(self.tok, t.data.template, self.test_pairs,
                                                    t.data.seq_len)
    self.tune_prompts, _ = batching.eval_prompts(self.tok, t.data.template,
                                                 pairs["validation"][:c.eval.tune_examples],
                                                 t.data.seq_len)
    batches = batching.Batcher.from_pairs(self.tok, t.data.template, pairs["validation"],
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
    ids, stats = engine.in_chunks(lambda chunk: fn(model, chunk, **self.gen_kw, **kw),
                                  self.prompts, self.c.eval.batch_size, by_length=True)
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
    threshold, tuned = early_exit_tuning.tune_threshold(
        model, self.tune_prompts, target, batch_size=self.c.eval.batch_size,
        exit_every=self.c.exit_every, iterations=self.c.eval.tune_iterations, **self.gen_kw)
    out, stats = self.decode(model, baseline_decode.early_exit_generate, threshold=threshold,
                             exit_every=self.c.exit_every)
    sums = functools.partial(baseline_losses.early_exit_teacher_forced_loss_sums,
                             exit_every=self.c.exit_every, threshold=threshold)
    return dict(out, ppl=self.ppl(model, sums), ratio=stats.ratio(L), tuned_ratio=tuned,
                threshold=threshold)

  def skipdecode(self, model, ratio):
    L = model.cfg.num_layers
    sched = sd_schedule(self.c, L, ratio, self.horizon)
    out, stats = self.decode(model, baseline_decode.skipdecode_generate, schedule=sched)
    ppl = self.ppl(model, functools.partial(baseline_losses.skipdecode_loss_sums, schedule=sched))
    return dict(out, ppl=ppl, ratio=stats.ratio(L), schedule=dataclasses.asdict(sched))


class Rows:
  """Quality rows, one cached JSON file each under <workdir>/quality."""

  def __init__(self, c, partial: bool = False):
    self.dir, self.partial, self.rows = os.path.join(c.workdir, "quality"), partial, {}

  def add(self, name, make, needs=None):
    """make() -> row, unless cached. needs: a path that must exist first (another process may
    still be fine-tuning it: wait, or with partial=True leave the row for a later run)."""
    if needs is not None and not os.path.exists(needs):
      if self.partial:
        log(f"quality {name}: skipped ({needs} is not there yet)")
        return
      log(f"quality {name}: waiting for {needs} (another process is fine-tuning it)")
      deadline = time.time() + 3600
      while not os.path.exists(needs):
        if time.time() > deadline:
          raise FileNotFoundError(f"{needs} is missing: run the ft stage first")
        time.sleep(10)
    start = time.perf_counter()
    row = self.rows[name] = _cached(os.path.join(self.dir, name + ".json"), make)
    log(f"quality {name}: BLEU {row['bleu']:.1f} chrF {row['chrf']:.1f} ppl {row['ppl']:.2f} "
        f"ratio {row['ratio']:.2f} ({time.perf_counter() - start:.0f} s)")


def zero_shot_static(c):
  """[(row name, strategy, ratio, seed)] of the zero-shot static plans that exist at this depth
  (uls_reference is undefined where its stride runs past the last layer)."""
  L = c.train.model.num_layers
  out = []
  for s in c.zero_shot.strategies:
    for r in c.zero_shot.ratios:
      for seed in (c.zero_shot.random_seeds if s == "random" else (None,)):
        try:
          plan_layers(L, r, s, seed=seed)
        except ValueError:
          continue
        name = f"random_s{seed}_noft_r{r:g}" if s == "random" else f"{s}_noft_r{r:g}"
        out.append((name, s, r, seed))
  return out


def run_zero_shot(c, base_hf) -> dict:
  """The pretrained model with layers skipped and no fine-tuning: every static strategy, early
  exit and SkipDecode."""
  ev, rows = Evaluator(c, base_hf), Rows(c)
  base, _ = hf.from_pretrained(base_hf)
  L = base.cfg.num_layers
  rows.add("full", lambda: ev.static(base, ()))
  for name, strategy, r, seed in zero_shot_static(c):
    rows.add(name, lambda: ev.static(base, plan_layers(L, r, strategy, seed=seed).skipped))
  if c.zero_shot.dynamic:
    for r in c.zero_shot.ratios:
      rows.add(f"early_exit_noft_r{r:g}", lambda: ev.early_exit(base, r))
      rows.add(f"skipdecode_noft_r{r:g}", lambda: ev.skipdecode(base, r))
  return rows.rows


def run_quality(c, base_hf, partial: bool = False) -> dict:
  """The fine-tuned models: one cached JSON row per (method, ratio). partial: skip rows whose
  fine-tuned model is not there yet (a second process can evaluate while the first fine-tunes)."""
  ev, rows = Evaluator(c, base_hf), Rows(c, partial)
  L = c.train.model.num_layers

  def finished(workdir):
    return os.path.join(workdir, "checkpoints", str(c.ft_steps))

  for name, row_name, strategy, r, seed in static_runs(c):
    workdir = os.path.join(c.workdir, f"ft_{name}")
    rows.add(row_name, lambda: ev.static(load_workdir_model(workdir),
                                         plan_layers(L, r, strategy, seed=seed).skipped),
             finished(workdir))
  for r in c.multi_ratios:
    rows.add(f"multi_r{r:g}", lambda: ev.static(load_workdir_model(c.multi_workdir),
                                                plan_layers(L, r).skipped if r > 1 else ()),
             finished(c.multi_workdir))
  ee_dir = os.path.join(c.workdir, "ft_early_exit")
  for r in c.ratios:
    rows.add(f"early_exit_r{r:g}", lambda: ev.early_exit(hf.from_pretrained(ee_dir)[0], r),
             os.path.join(ee_dir, "config.json"))
  for r in method_ratios(c, "skipdecode"):
    sd_dir = os.path.join(c.workdir, f"ft_skipdecode_r{r:g}")
    rows.add(f"skipdecode_r{r:g}", lambda: ev.skipdecode(hf.from_pretrained(sd_dir)[0], r),
             os.path.join(sd_dir, "config.json"))
  return rows.rows


# ----------------------------------------------------------------------------------------------
# Speed.

def _compiles(*modules: str) -> int:
  return engine.num_compiles(*(f"ulskip_jax.{m}" for m in modules))


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
                     ratio=(s.ratio(num_layers) if isinstance(s, baseline_decode.DynamicStats)
                            else None))
          for name, (tps, s) in best.items()}


def run_speed_trained(c, base_hf, quality) -> dict:
  """Every method with real test prompts at each batch size, in the same decode loop: full depth
  and ULS on the multi-ratio checkpoint, early exit with the thresholds tuned for quality (at the
  quality batch size), SkipDecode on its checkpoints. EOS is off, so every method writes
  max_new_tokens per row: with it on, a model that ends its rows early (a damaged sub-model often
  does) would be timed mostly on its prefill."""
  ev = Evaluator(c, base_hf)
  L = c.train.model.num_layers
  multi = load_workdir_model(c.multi_workdir)
  ee, _ = hf.from_pretrained(os.path.join(c.workdir, "ft_early_exit"))
  sd = {r: hf.from_pretrained(os.path.join(c.workdir, f"ft_skipdecode_r{r:g}"))[0]
        for r in method_ratios(c, "skipdecode")}
  out = {}
  for batch in c.speed.batches:
    prompts = ev.prompts[:max(batch, c.speed.min_prompts)]

    def gen(fn, model, **kw):
      return lambda: engine.in_chunks(
          lambda chunk: fn(model, chunk, **{**ev.gen_kw, "eos_id": None}, **kw), prompts, batch,
          by_length=True)
    cases = {"full": gen(decode.generate, multi)}
    for r in c.ratios:
      cases[f"uls_r{r:g}"] = gen(decode.generate, multi, ratio=r)
      if r in sd:
        cases[f"skipdecode_r{r:g}"] = gen(baseline_decode.skipdecode_generate, sd[r],
                                          schedule=sd_schedule(c, L, r, ev.horizon))
      cases[f"early_exit_r{r:g}"] = gen(baseline_decode.early_exit_generate, ee,
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
  before = _compiles("decode", "speculative"), _compiles("baseline_decode")
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
          sched = baseline_schedules.skipdecode_schedule(L, r, s.new_tokens)
          cases[f"skipdecode_r{r:g}"] = case(baseline_decode.skipdecode_generate, schedule=sched)
          if batch == s.static_batch and r in s.static_ratios:
            for strategy in ("top", "bottom", "middle", "every_other", "random"):
              cases[f"{strategy}_r{r:g}"] = case(
                  decode.generate, skip=plan_layers(L, r, strategy, seed=0).skipped)
            # The prompt through the kept layers too: the decode loop's speedup without the
            # full-depth prefill (paper mode, the default, runs the prompt at full depth).
            cases[f"uls_everywhere_r{r:g}"] = case(decode.generate, ratio=r, mode="everywhere")
      cases["early_exit_first_exit"] = case(baseline_decode.early_exit_generate, threshold=0.0,
                                            exit_every=c.exit_every)
      cases["early_exit_never"] = case(baseline_decode.early_exit_generate, threshold=2.0,
                                       exit_every=c.exit_every)
      start = time.perf_counter()
      res = _time_cases(cases, s.repeats, L)
      for r in s.ratios:
        tps, threads = time_torch(full_dir if r == 1 else pruned[r], prompts, s)
        res[f"transformers_r{r:g}"] = dict(tok_s=tps, threads=threads)
      out["batches"][str(batch)] = res
      log(f"speed batch {batch}: {time.perf_counter() - start:.0f} s")
  out["stage_compiles"] = dict(decode=_compiles("decode", "speculative") - before[0],
                               baselines=_compiles("baseline_decode") - before[1])
  return out


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
    timings = json_load(path) if os.path.exists(path) else {}
    if time.perf_counter() - start > 1:  # not merely read from the cache
      timings[name] = time.perf_counter() - start
      json_dump(timings, path)
      where = os.path.join(c.workdir, "provenance.json")
      prov = json_load(where) if os.path.exists(where) else {}
      prov[name] = dict(commit=provenance.commit(), command=" ".join(["python"] + sys.argv),
                        finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
      json_dump(prov, where)
    log(f"stage {name} done ({time.perf_counter() - start:.0f} s)")
    return result

  if {"base", "zero_shot", "ft", "quality_partial", "quality", "speed_trained"} & set(stages):
    base_hf = stage("base", lambda: run_base(c))
  use_base_depth(c)
  if "zero_shot" in stages:
    stage("zero_shot", lambda: run_zero_shot(c, base_hf))
  if "ft" in stages:
    stage("ft", lambda: run_ft(c, base_hf))
  if "quality_partial" in stages:
    stage("quality_partial", lambda: run_quality(c, base_hf, partial=True))
  if "quality" in stages or "speed_trained" in stages:
    q = stage("quality", lambda: run_quality(c, base_hf))
  if "speed_trained" in stages:
    stage("speed_trained", lambda: _cached(os.path.join(c.workdir, "speed_trained.json"),
                                           lambda: run_speed_trained(c, base_hf, q)))
  if "speed" in stages and c.speed.random_model:
    stage("speed", lambda: _cached(os.path.join(c.workdir, "speed.json"), lambda: run_speed(c)))
  report(c)
  log(f"results in {c.results_dir}")


if __name__ == "__main__":
  main()
