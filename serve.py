"""Serve a model over HTTP with the OpenAI API, each request choosing its speed.

  python serve.py --checkpoint smollm2 --ratios 1,2 --batch-size 8 --port 8000
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "smollm2@2x", "messages": [{"role": "user", "content": "Hi"}]}'

--checkpoint is what infer.py takes (a Hugging Face folder, a .gguf file, 'smollm2', a training
workdir or a step folder), and its plans are infer.py's (a calibrated workdir's plan.json, its
skip unit, adapters per ratio; else ULS). Each ratio gets its own rows (--batch-size of them) and
its model name:
NAME at ratio 1 (full depth), NAME@2x at ratio 2, ..., and with --speculative NAME@lossless; a
request picks one by `model`, or by the extra body field `skip_ratio` (a ratio or "lossless"). Every executable is built before the server listens. Ctrl-C or
SIGTERM: in-flight requests get --drain-seconds to finish, then the rest are cancelled.
See docs/serving.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import infer


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="as infer.py's --checkpoint")
  p.add_argument("--step", type=int, help="checkpoint step of a training workdir")
  p.add_argument("--ratios", default="1", help="speedup ratios to serve, comma-separated "
                 "(1 = full depth), e.g. 1,2; planned as infer.py plans them: a checkpoint's "
                 "plan.json and skip unit, else ULS")
  p.add_argument("--speculative", help="also serve NAME@lossless: self-speculative decoding, "
                 "the full model verifying the sub-model's drafts (greedy), e.g. "
                 "'draft_ratio=2,k=4' (as infer.py's --speculative)")
  p.add_argument("--batch-size", type=int, default=8, help="rows per plan")
  p.add_argument("--max-seq-len", type=int, help="positions a row holds (prompt + max_tokens - "
                 "1; default the model's, at most 2048)")
  p.add_argument("--steps-per-call", type=int, default=4, help="decode steps between the "
                 "scheduler's looks at new, finished and cancelled requests")
  p.add_argument("--max-tokens", type=int, default=256, help="a request's max_tokens when it "
                 "gives none (capped by --max-seq-len)")
  p.add_argument("--served-model-name", help="the model name clients use (default: the "
                 "checkpoint's folder name)")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--drain-seconds", type=float, default=10.0)
  p.add_argument("--verbose", action="store_true", help="on an error, print its traceback too")
  return p.parse_args(argv)


def plans_of(checkpoint: str, model, ratios, unit: str, speculative: str | None):
  """(ratio -> (the model it decodes with, its plan), the speculative options), planned as
  infer.py plans its runs: a calibrated checkpoint's plan.json (for the draft too), the
  training run's skip unit, an adapters-per-ratio workdir's own plans and sub-models."""
  from ulskip_jax import ratio_adapters, skipping
  from ulskip_jax.model import layer_bytes
  def run_of(**flags):
    args = argparse.Namespace(**dict(dict(skip=None, ratio=None, speculative=None), **flags),
                              checkpoint=checkpoint)
    [(_, kw)] = infer.parse_runs(args, model.cfg.num_layers, unit, layer_bytes(model.cfg))
    return kw
  plans = {}
  for ratio in ratios:
    ratio_model, kw = ratio_adapters.for_run(model, run_of(ratio=f"{ratio!r}"))
    try:
      plans[ratio] = ratio_model, skipping.resolve(
          model.cfg.num_layers, skip=kw.get("skip"), ratio=kw.get("ratio"),
          windows=model.cfg.attention_windows)
    except ValueError as e:
      raise infer.UsageError(f"--ratios: {e}") from None
  if speculative is None:
    return plans, None
  if isinstance(model, ratio_adapters.RatioAdaptedDecoder):
    raise infer.UsageError("--speculative on an adapters-per-ratio workdir is not served: its "
                           "draft runs the adapters (infer.py --speculative decodes it)")
  return plans, run_of(speculative=speculative)["speculative"]


def run(args) -> None:
  from ulskip_jax import server, skipping
  from ulskip_jax import speculative as speculative_lib
  for flag in ("batch_size", "steps_per_call", "max_tokens", "port"):
    if getattr(args, flag) < 1:
      raise infer.UsageError(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be >= 1")
  try:
    ratios = skipping.parse_ratios(args.ratios)
  except ValueError as e:
    raise infer.UsageError(f"--ratios: {e}") from None
  if args.speculative is not None:
    try:
      infer.parse_speculative(args.speculative)
    except ValueError as e:
      raise infer.UsageError(f"--speculative: {e}") from None
  model, tokenizer, _, unit = infer.load_model(args.checkpoint, args.step)
  limit = model.cfg.max_position
  if args.max_seq_len is not None and not 1 <= args.max_seq_len <= limit:
    raise infer.UsageError(f"--max-seq-len={args.max_seq_len} must be in [1, {limit}] (the "
                           "model's positions)")
  plans, speculative = plans_of(args.checkpoint, model, ratios, unit or "layer", args.speculative)
  if speculative is not None:
    try:
      speculative_lib.check(model.cfg, speculative)
    except ValueError as e:
      raise infer.UsageError(f"--speculative: {e}") from None
  name = args.served_model_name or os.path.basename(os.path.normpath(args.checkpoint))
  server.serve(model, tokenizer, model_name=name, plans=plans, speculative=speculative,
               rows=args.batch_size,
               num_slots=args.max_seq_len, steps=args.steps_per_call, host=args.host,
               port=args.port, default_max_tokens=args.max_tokens, drain_s=args.drain_seconds)


def main(argv=None) -> int:
  try:
    args = parse_args(argv)
  except SystemExit as e:
    return e.code
  from ulskip_jax import cli
  return cli.run(lambda: run(args), verbose=args.verbose)


if __name__ == "__main__":
  sys.exit(main())
