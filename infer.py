"""Generate with ULS layer skipping from a checkpoint, at one or more speedup ratios.

  python infer.py --checkpoint DIR --input prompts.txt --output out.txt --ratio 1,2,5 \
      --batch-size 16 --max-new-tokens 64 [--references refs.txt] [--metrics-out m.json]
  python infer.py ... --speculative draft_ratio=2,k=4   # full-model output, ULS sub-model drafts

DIR is a Hugging Face folder (config.json + safetensors + tokenizer files), a training workdir
(whose training prompt template is the default --template; --step N picks a checkpoint) or one
of its step folders (`WORKDIR/checkpoints/N`, self-contained).
Input is text (one prompt a line) or JSONL (`.jsonl`/`.json`, one object a line, prompt in
`--input-field`); `--template` formats each prompt from `{source}` (the line, or the field) and,
for JSONL, any other field of the record. Output has one line per input line, in input order;
newlines inside a generation are replaced by spaces and each line is stripped. With several
ratios (or skip lists) each gets its own file: out.txt -> out.r2.txt, out.r5.txt.

Per ratio it prints the plan the decoder ran (strategy, kept layers; a speculative run's
drafting plan too), generated tokens/s, (prompt + generated) tokens/s (what the ULS paper
reports), wall and compile time, KV cache bytes, and BLEU + chrF (sacrebleu; `--metric rouge`
for ROUGE-1/2/L F1) when references are given. Greedy and sampled decoding batch continuously
(a row that finishes takes the next prompt; `--static-batches` decodes fixed, length-sorted
batches instead). Bad input is reported in one line on stderr with
exit code 2. A prompt longer than the model's positions minus --max-new-tokens is an error (it
is never truncated silently). Every option, file and folder is checked before any decoding (the
output folders too), and every error is one line (exit code 2 for bad input, 1 for an internal
error, whose traceback --verbose prints).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import string
import sys
from typing import Any


class UsageError(ValueError):
  """Bad input: reported in one line on stderr, exit code 2."""


def load_model(path: str, step: int | None = None):
  """(model, tokenizer, template, unit) from a Hugging Face folder (config.json), a .gguf file, the
  packaged SmolLM2 ("smollm2"), a hub id, a training workdir or one of its step folders (`step` picks a checkpoint of a workdir; default the latest).

  The template is the training run's prompt template and unit its skip.unit (None for a Hugging
  Face folder).
  """
  from ulskip_jax import hf
  workdir = os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")) and (
      os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isdir(os.path.join(path, "params"))
      or any(name.isdigit() for name in os.listdir(path)))
  try:
    if not workdir:  # an HF folder, a .gguf file (or a folder of one), smollm2, a hub id
      if step is not None:
        raise UsageError(f"--step {step} is for a training workdir, but {path} is a model")
      model, tokenizer = hf.from_pretrained(path)
      template = unit = None
    else:
      from ulskip_jax import checkpoint
      model, tokenizer, config = checkpoint.load_for_inference(path, step, with_config=True)
      template = config.get("data", {}).get("template")
      unit = config.get("skip", {}).get("unit")
  except UsageError:
    raise
  except ValueError as e:  # our own one-line messages (missing path, bad GGUF, bad config.json)
    raise UsageError(f"checkpoint {path}: {str(e).strip().splitlines()[0]}") from e
  except Exception as e:  # a broken checkpoint: say what failed, in one line
    raise UsageError(f"cannot load checkpoint {path}: {type(e).__name__}: "
                     f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
  if tokenizer is None:
    raise UsageError(f"checkpoint {path} has no tokenizer: add the tokenizer files to it")
  return model, tokenizer, template, unit


def _read_lines(path: str, what: str) -> list[str]:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise UsageError(f"cannot read {what} {path}: {e.strerror if isinstance(e, OSError) else e}")


def read_prompts(path: str, field: str, template: str | None) -> list[str]:
  """The prompt texts of a text or JSONL file, with the template applied."""
  lines = _read_lines(path, "input")
  if not lines:
    raise UsageError(f"input {path} is empty: give one prompt a line")
  if path.endswith((".jsonl", ".json")):
    records = []
    for n, line in enumerate(lines, 1):
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{n} is not valid JSON: {e.msg}")
      if not isinstance(record, dict) or field not in record:
        raise UsageError(f"{path}:{n} has no field {field!r}: set --input-field")
      records.append({**record, "source": str(record[field])})
  else:
    records = [{"source": line} for line in lines]
  if template is None:
    return [r["source"] for r in records]
  template = template.replace("\\n", "\n")  # a shell argument's "\n" is a newline here
  names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
  for name in names:
    if name not in records[0]:
      raise UsageError(f"template field {{{name}}} is unknown: available are "
                       + ", ".join(f"{{{k}}}" for k in records[0]))
  try:
    return [template.format_map(r) for r in records]
  except (KeyError, IndexError, ValueError) as e:
    raise UsageError(f"template {template!r} cannot be applied: {e}")


def parse_speculative(text: str) -> dict[str, Any]:
  """'draft_ratio=2,k=4' -> dict(draft_ratio=2.0, num_draft_tokens=4), for command lines. Keys:
  draft_ratio, draft_skip (layers joined by '-', e.g. 1-3-5), k or num_draft_tokens, draft_cache
  (separate | shared). One-line ValueError for anything else."""
  parsers = dict(draft_ratio=float, num_draft_tokens=int, k=int, draft_cache=str.strip,
                 draft_skip=lambda v: tuple(int(i) for i in v.split("-") if i.strip()))
  out: dict[str, Any] = {}
  for item in (t.strip() for t in text.split(",") if t.strip()):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in parsers:
      raise ValueError(f"speculative option {key!r} is unknown: allowed are draft_ratio, "
                       "draft_skip, k (num_draft_tokens), draft_cache")
    try:
      if not sep:
        raise ValueError
      out["num_draft_tokens" if key == "k" else key] = parsers[key](value)
    except ValueError:
      raise ValueError(f"speculative option {item!r} is invalid: write e.g. 'draft_ratio=2,k=4' "
                       "or 'draft_skip=1-2,k=4,draft_cache=shared'") from None
  return out


def parse_runs(args, num_layers: int, unit: str = "layer", costs=None) -> list[tuple[str, dict]]:
  """[(label, generate keyword arguments)] per ratio or skip list (a calibrated workdir's: its
  plan, for --speculative's draft_ratio too), the lists checked here, the rest with every option
  in `run` before any run. unit: what --ratio / --skip skip (--skip-unit); a sublayer unit plans
  its ratio by `costs` (`model.layer_bytes`)."""
  from ulskip_jax import skipping
  runs = []
  if args.skip is not None and args.ratio is not None:
    raise UsageError("--ratio and --skip both given: pass one or the other")
  if args.speculative is not None:
    if args.skip is not None or args.ratio is not None:
      raise UsageError("--speculative with --ratio/--skip: the full model verifies; give the "
                       "draft's layers in --speculative, e.g. draft_ratio=2,k=4")
    try:
      options = parse_speculative(args.speculative)
    except ValueError as e:
      raise UsageError(f"--speculative: {e}")
    try:
      calibrated = skipping.workdir_plan(args.checkpoint, num_layers)
      if calibrated and options.get("draft_ratio") is not None and "draft_skip" not in options:
        options["draft_skip"] = calibrated.plan(options.pop("draft_ratio"))  # its sub-model drafts
    except ValueError as e:
      raise UsageError(str(e))
    return [("spec", dict(speculative=options))]
  try:
    if args.skip is not None:
      for text in args.skip.split(";"):
        if not all(i.strip().isdigit() for i in text.split(",")):
          raise ValueError(f"--skip {args.skip!r} is invalid: give comma-separated layer indices, "
                           "e.g. 1,3,5 (several lists separated by ';')")
        skip = tuple(int(i) for i in text.split(","))
        runs.append(("skip" + "-".join(map(str, skip)),
                     dict(skip=skipping.plan_layers(num_layers, strategy=skip, unit=unit))))
    else:
      calibrated = skipping.workdir_plan(args.checkpoint, num_layers)  # the run's plan.json
      for ratio in skipping.parse_ratios(args.ratio or "1"):
        if calibrated:
          run = dict(skip=calibrated.plan(ratio, unit, costs))
        elif unit != "layer":
          run = dict(skip=skipping.plan_layers(num_layers, ratio, unit=unit, costs=costs))
        else:
          run = dict(ratio=ratio)
        runs.append((f"r{ratio:g}", run))
  except ValueError as e:
    raise UsageError(str(e))
  return runs


def resolve_chat(tokenizer, chat: bool | None) -> bool:
  """Whether prompts go through the chat template; a training tokenizer carries its run's setting."""
  has_template = (tokenizer.has_chat_template if hasattr(tokenizer, "has_chat_template")
                  else bool(getattr(tokenizer, "chat_template", None)))
  if chat and not has_template:
    raise UsageError("--chat: the checkpoint's tokenizer has no chat template; use --no-chat")
  if hasattr(tokenizer, "set_chat"):  # a training workdir's tokenizer: its run's format
    if chat is not None:
      tokenizer.set_chat(chat)
    return tokenizer.chat
  return has_template if chat is None else chat


def output_path(output: str, label: str, several: bool) -> str:
  if not several:
    return output
  root, ext = os.path.splitext(output)
  return f"{root}.{label}{ext}"


def score(hyps: list[str], refs: list[str], metric: str) -> dict[str, float]:
  if metric == "rouge":
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, h) for h, r in zip(hyps, refs)]
    return {k: 100 * sum(s[k].fmeasure for s in scores) / len(scores)
            for k in ("rouge1", "rouge2", "rougeL")}
  import sacrebleu
  return dict(bleu=sacrebleu.corpus_bleu(hyps, [refs]).score,
              chrf=sacrebleu.corpus_chrf(hyps, [refs]).score)


def check_args(args) -> None:
  """The checks that need no model, before it is loaded: counts, files to read, folders to write
  (so a missing output folder fails now, not after decoding)."""
  for flag in ("batch_size", "max_new_tokens", "num_beams"):
    if getattr(args, flag) < 1:
      raise UsageError(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be >= 1")
  if args.step is not None and args.step < 0:
    raise UsageError(f"--step {args.step} is invalid: give a checkpoint step >= 0")
  for what, path in (("input", args.input), ("references", args.references)):
    if path is not None and not os.path.isfile(path):
      raise UsageError(f"cannot read {what} {path}: "
                       + ("it is a directory" if os.path.isdir(path) else "no such file"))
  for flag, path in (("--output", args.output), ("--metrics-out", args.metrics_out)):
    if path is not None:
      _check_writable(flag, path)


def _check_writable(flag: str, path: str) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise UsageError(f"{flag} {path} is a directory: give a file path")
  if not os.path.isdir(folder):
    raise UsageError(f"{flag} {path}: folder {os.path.dirname(path) or folder} does not exist "
                     "(create it first)")
  if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
    raise UsageError(f"{flag} {path} is not writable")


class _Parser(argparse.ArgumentParser):
  """argparse, with its errors in one line (the usage text is one --help away)."""

  def error(self, message):
    print(f"error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
  p = _Parser(description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="Hugging Face folder, .gguf file, 'smollm2', "
                 "hub id, training workdir or step folder")
  p.add_argument("--step", type=int, help="checkpoint step of a training workdir (default: the "
                 "latest)")
  p.add_argument("--input", required=True, help="prompts: text (one a line) or .jsonl")
  p.add_argument("--output", required=True, help="generations, one a line (.rX per ratio)")
  p.add_argument("--ratio", help="speedup ratios, comma-separated (ULS plans); default 1")
  p.add_argument("--skip", help="explicit skipped layers instead of --ratio: '1,3,5' "
                 "(several lists separated by ';')")
  p.add_argument("--skip-unit", choices=("layer", "mlp", "attention", "sublayer"),
                 help="what --ratio / --skip skip: whole layers, or only their MLP or attention "
                 "blocks (a sublayer plan's ratio is weight bytes read per token; 'sublayer', "
                 "both kinds apart, needs a calibrated workdir's plan); default: a training "
                 "workdir's skip.unit, else layer")
  p.add_argument("--speculative", help="lossless self-speculative decoding: the full model "
                 "verifies drafts of the ULS sub-model, e.g. 'draft_ratio=2,k=4' (keys "
                 "draft_ratio, draft_skip=1-3-5, k, draft_cache=separate|shared)")
  p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                 help="wrap each prompt as a user turn of the tokenizer's chat template (default: "
                 "as the training run did for a workdir, else on when the tokenizer has one)")
  p.add_argument("--mode", choices=("paper", "everywhere"), default="paper",
                 help="paper: prompt at full depth; everywhere: prompt skips too")
  p.add_argument("--attention-impl", choices=("einsum", "xla", "cudnn", "auto"),
                 help="how attention is computed (model.attention_impl, ulskip_jax/attention.py; "
                      "default: the checkpoint's): auto = cuDNN's fused kernel on an NVIDIA GPU "
                      "where it fits the model, else einsum")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--static-batches", action="store_true",
                 help="decode fixed batches of --batch-size prompts sorted by length, each until "
                      "its slowest row is done (default: continuous batching, where a finished "
                      "row takes the next prompt; beam search always runs static batches)")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--num-beams", type=int, default=1)
  p.add_argument("--no-repeat-ngram-size", type=int, default=0)
  p.add_argument("--length-penalty", type=float, default=1.0)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-k", type=int)
  p.add_argument("--top-p", type=float)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--references", help="reference outputs, one a line, for BLEU/chrF or ROUGE")
  p.add_argument("--metric", choices=("bleu", "rouge"), default="bleu",
                 help="bleu: BLEU + chrF (sacrebleu); rouge: ROUGE-1/2/L F1")
  p.add_argument("--template", help="prompt template with {source} (and, for JSONL, any field); "
                 "\\n is a newline, e.g. 'KJV: {source}\\nWEB:'")
  p.add_argument("--input-field", default="source", help="JSONL field holding the prompt")
  p.add_argument("--metrics-out", help="write a JSON summary of every run here")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--verbose", action="store_true", help="on an error, print its traceback too")
  return p.parse_args(argv)


def run(args) -> dict:
  check_args(args)
  from ulskip_jax import decode, ratio_adapters
  from ulskip_jax.model import layer_bytes
  model, tokenizer, train_template, train_unit = load_model(args.checkpoint, args.step)
  adapted = isinstance(model, ratio_adapters.RatioAdaptedDecoder)
  if args.attention_impl:
    from ulskip_jax import attention
    if adapted and args.speculative:
      raise UsageError(f"--attention-impl {args.attention_impl} with --speculative: an "
                       "adapters-per-ratio workdir drafts with its adapters in the default "
                       "attention only; leave one of them out")
    try:  # an adapters-per-ratio model gets it per run, on the plain Decoder each run decodes
      impl_model = attention.with_impl(model.base if adapted else model, args.attention_impl)
    except ValueError as e:
      raise UsageError(f"--attention-impl {args.attention_impl}: {e}") from None
    model = model if adapted else impl_model
  runs = parse_runs(args, model.cfg.num_layers, args.skip_unit or train_unit or "layer",
                    layer_bytes(model.cfg))
  kw = dict(mode=args.mode, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
            no_repeat_ngram_size=args.no_repeat_ngram_size, length_penalty=args.length_penalty,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
  for _, plan in runs:  # every option of every run, before any input is read or decoded
    try:
      decode.check_generate(model, **plan, **kw)
    except ValueError as e:  # named as the flag: "top_k=0 ..." -> "--top-k=0 ..."
      raise UsageError(re.sub(r"^(\w+)=", lambda m: f"--{m[1].replace('_', '-')}="
                              if m[1] in kw else m[0], str(e))) from None
  texts = read_prompts(args.input, args.input_field, args.template or train_template)
  refs = None
  if args.references:
    refs = _read_lines(args.references, "references")
    if len(refs) != len(texts):
      raise UsageError(f"references {args.references} has {len(refs)} lines but input "
                       f"{args.input} has {len(texts)}: they must match line for line")
  chat = resolve_chat(tokenizer, args.chat)
  summary = dict(checkpoint=args.checkpoint, input=args.input, num_prompts=len(texts), chat=chat,
                 num_layers=model.cfg.num_layers, batch_size=args.batch_size, settings=kw, runs=[])
  for label, plan in runs:
    run_model, plan = ratio_adapters.for_run(model, plan)  # adapters per ratio: the plan's own
    if adapted and args.attention_impl:
      run_model = attention.with_impl(run_model, args.attention_impl)
    try:
      hyps, stats = decode.generate_text(run_model, tokenizer, texts, batch_size=args.batch_size,
                                         progress=not args.no_progress, chat=chat,
                                         static_batches=args.static_batches, **plan, **kw)
    except ValueError as e:  # a prompt (numbered from 0): too long, or ids the model lacks
      raise UsageError(f"{args.input}: {e}") from None
    hyps = [" ".join(h.splitlines()).strip() for h in hyps]
    path = output_path(args.output, label, len(runs) > 1)
    _write(path, "".join(h + "\n" for h in hyps))
    ran = stats.plan  # what the decoder ran, not the flags re-resolved
    result = dict(label=label, output=path, skip=list(ran.skipped), kept_layers=len(ran.kept),
                  **({"mlp_skipped": list(ran.mlp_skipped)} if ran.unit == "sublayer" else {}),
                  **stats.as_dict())
    if refs is not None:
      result.update(score(hyps, refs, args.metric))
    summary["runs"].append(result)
    metrics = "".join(f", {k} {result[k]:.2f}" for k in ("bleu", "chrf", "rouge1", "rouge2",
                                                          "rougeL") if k in result)
    print(f"{label}: {ran}, "
          f"{stats.generated_tokens_per_s:.1f} generated tok/s, "
          f"{stats.total_tokens_per_s:.1f} (prompt + generated) tok/s, wall {stats.wall_s:.2f} s, "
          f"compile {stats.compile_s:.2f} s, KV cache {stats.cache_bytes / 2**20:.2f} MiB"
          f"{metrics}{_speculation(stats)} -> {path}", flush=True)
  if args.metrics_out:
    _write(args.metrics_out, json.dumps(summary, indent=2) + "\n")
  return summary


def _speculation(stats) -> str:
  if not hasattr(stats, "acceptance_rate"):
    return ""
  return (f", drafted by {stats.draft_plan}, drafts accepted {stats.acceptance_rate:.1%} "
          f"({stats.accepted_tokens}/{stats.drafted_tokens}), {stats.verify_passes} verify passes")


def _write(path: str, text: str) -> None:
  try:
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
  except OSError as e:
    raise UsageError(f"cannot write {path}: {e.strerror}")


def main(argv=None) -> int:
  try:
    args = parse_args(argv)
  except SystemExit as e:  # --help (0) or a bad flag (2, reported in one line)
    return e.code
  from ulskip_jax import cli
  return cli.run(lambda: run(args), verbose=args.verbose)


if __name__ == "__main__":
  code = main()
  sys.stdout.flush()
  sys.stderr.flush()
  if code:  # no interpreter teardown: abandoned TensorStore reads would report into it
    os._exit(code)
