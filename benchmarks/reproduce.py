"""ULS against early exit, SkipDecode and contiguous / random static skipping, with transformers as
the speed reference: one command, markdown tables and plots in benchmarks/results/.

  python -m benchmarks.reproduce --config configs/reproduce_smollm2.py [--quick] [--stages ...]

Stages: base, zero_shot, ft, quality, speed_trained, speed (see the config's docstring). Each stage's output is
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

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from ulskip_jax import baselines, decode, engine, hf, plan_layers, train_lib  # noqa: E402
from ulskip_jax import checkpoint as ckpt_lib  # noqa: E402
from ulskip_jax import batching, corpora  # noqa: E402
from ulskip_jax.tokenizer import Tokenizer  # noqa: E402

STAGES = ("base", "zero_shot", "ft", "quality_partial", "quality", "speed_trained", "speed",
          "report")


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
  hf.save_pretrained(model, export, tokenizer=tok.hf)
  log(f"ft {name}: {t.num_steps} steps in {time.perf_counter() - start:.0f} s")
  return time.perf_counter() - start


def mean_target_tokens(tok, pairs) -> float:
  """Mean response length (tokens, EOS included): SkipDecode's schedule horizon."""
  return float(np.mean([len(ids) + 1 for ids in tok.encode_batch([tok.target_text(p["target"])
                                                                    for p in pairs])]))


def method_ratios(c, method):
  """The ratios `method` is fine-tuned / evaluated at (config.method_ratios, else all)."""
  return tuple(c.method_ratios.get(method, c.ratios))


def sd_schedule(c, L, ratio, horizon):
  return baselines.skipdecode_schedule(L, ratio, max(int(round(horizon)), c.skipdecode_levels),
                                       c.skipdecode_levels)


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
      functools.partial(baselines.early_exit_loss_sums, exit_every=c.exit_every))
  tok = base_tokenizer(c, base_hf)
  horizon = mean_target_tokens(tok, corpora.load_pairs(c.train.data)["validation"])
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
                     ratio=s.ratio(num_layers) if isinstance(s, baselines.DynamicStats) else None)
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
  before = _compiles("decode", "speculative"), _compiles("baselines")
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
  out["stage_compiles"] = dict(decode=_compiles("decode", "speculative") - before[0],
                               baselines=_compiles("baselines") - before[1])
  return out


# ----------------------------------------------------------------------------------------------
# Reports.

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


def _target(name):
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
  if _target(name) == 1.0:
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
      lines.append(f"| {title} | {name} | {_f(_target(name), 'g')} | "
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
    pts = sorted((_target(n), q[n]["bleu"], q[n]["ppl"]) for n in names
                 if n in q and _target(n) != 1.0)
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
  q = {os.path.splitext(n)[0]: _json_load(os.path.join(q_dir, n))
       for n in sorted(os.listdir(q_dir)) if n.endswith(".json")} if os.path.isdir(q_dir) else None
  if q:
    q["copy"] = dict(corpora.copy_baseline_bleu(
        corpora.load_pairs(c.train.data)["test"][:c.eval.test_examples]),
        ppl=float("nan"), ratio=float("nan"))
  load = lambda name: (_json_load(os.path.join(c.workdir, name))
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
  _json_dump(results, os.path.join(c.results_dir, "results.json"))


def _commit() -> str:
  """The checkout's commit, with "+changes" when tracked files differ from it."""
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True).stdout
  head = run("rev-parse", "--short", "HEAD").strip() or "unknown"
  return head + ("+changes" if run("status", "--porcelain", "--untracked-files=no").strip() else "")


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
      where = os.path.join(c.workdir, "provenance.json")
      prov = _json_load(where) if os.path.exists(where) else {}
      prov[name] = dict(commit=_commit(), command=" ".join(["python"] + sys.argv),
                        finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
      _json_dump(prov, where)
    log(f"stage {name} done ({time.perf_counter() - start:.0f} s)")
    return result

  base_config = os.path.join(c.workdir, "base_hf", "config.json")
  if {"base", "zero_shot", "ft", "quality_partial", "quality", "speed_trained"} & set(stages):
    base_hf = stage("base", lambda: run_base(c))
  if os.path.exists(base_config):  # the depth every plan is made for
    c.train.model.num_layers = hf.config_from_hf(_json_load(base_config)).num_layers
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
