"""The run config's schema: every key of a train.py run config, its default, what it allows and
what it means, in one table (`KEYS`).

Its readers: configs/base.py is `default_config()`; `config_check` validates each key with its
check and compares checkpoints and teachers on `ARCHITECTURE_FIELDS`; docs/training.md's reference
tables are generated from it (`write_docs`; tests/test_config_schema.py fails when they differ);
train_lib builds the run's ModelConfig with `model_config`; hf.py reads `RUNTIME_FIELDS`.

The model group is derived from `ModelConfig`: each field's default, its command-line type and, for
Literal fields, its allowed values are the dataclass's own; `MODEL_FIELDS` lists every field with
where a run takes its value from (`Source`), its check and its meaning, so a new ModelConfig field
without a row fails the tests. With `model.init_from` set, the architecture fields come from that
checkpoint's config and the run config's values are ignored, as they always were; the runtime
fields (dtypes, remat, attention_impl) apply over it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import string
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Callable, get_args

import ml_collections

from ulskip_jax import attention, lora, prompt_buffer
from ulskip_jax.checks import as_choice, as_float, as_int
from ulskip_jax.model import DTYPES, Activation, MLPKind, ModelConfig, NormKind, Positions
from ulskip_jax.sharding import DEFAULT_RULES, MESH_AXES
from ulskip_jax.skipping import CALIBRATION_METHODS, STRATEGIES, UNITS

# What distributed.auto looks for: jax.distributed.initialize() reads the rest from them.
CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "JAX_COORDINATOR_ADDRESS")


def auto_distributed(dist) -> bool:
  """Whether `distributed.auto` starts jax.distributed here: a TPU pod or SLURM environment."""
  return bool(dist.auto) and any(name in os.environ for name in CLUSTER_ENV)


# ----------------------------------------------------------------------------------------------
# Checks: each takes (key path, value), raises a one-line ValueError naming both, and says what
# it allows in words for the docs.

@dataclasses.dataclass(frozen=True)
class Check:
  fn: Callable[[str, Any], Any]
  allowed: str  # for the docs' "allowed" column

  def __call__(self, key: str, value) -> None:
    self.fn(key, value)


def _int(min: int, max: int | None = None) -> Check:
  bounds = f"[{min}, {max}]" if max is not None else f">= {min}"
  return Check(lambda key, v: as_int(key, v, min, max), f"int {bounds}")


def _float(min: float, max: float | None = None, *, min_open=False, max_open=False) -> Check:
  if max is None:
    bounds = f"{'>' if min_open else '>='} {min:g}"
  else:
    bounds = f"{'(' if min_open else '['}{min:g}, {max:g}{')' if max_open else ']'}"
  return Check(lambda key, v: as_float(key, v, min, max, min_open=min_open, max_open=max_open),
               f"number {bounds}")


def _choice(*choices) -> Check:
  return Check(lambda key, v: as_choice(key, v, choices), ", ".join(f"`{c}`" for c in choices))


def _is_bool(key: str, v) -> None:
  if not isinstance(v, bool):
    raise ValueError(f"{key}={v!r} is invalid: it must be True or False")


def _is_str(key: str, v) -> None:
  if not isinstance(v, str):
    raise ValueError(f"{key}={v!r} is invalid: it must be a string")


_BOOL = Check(_is_bool, "True, False")
_STR = Check(_is_str, "string")


def _optional(check: Check) -> Check:
  return Check(lambda key, v: None if v is None else check(key, v), f"None or {check.allowed}")


def _name(key: str, v) -> None:
  _is_str(key, v)
  if not v.strip():
    raise ValueError(f"{key}={v!r} is empty: give a field name")


def _layer_indices(key: str, v) -> None:
  if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
    raise ValueError(f"{key}={v!r} is invalid: it must be a tuple of layer indices, e.g. (5, 11)")
  for i, index in enumerate(v):
    as_int(f"{key}[{i}]", index, min=0)


def _ratios(key: str, v) -> None:
  if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
    raise ValueError(f"{key}={v!r} is invalid: it must be a tuple of numbers >= 1, e.g. (1, 2)")
  for i, r in enumerate(v):
    as_float(f"{key}[{i}]", r, min=1)


def _files(key: str, v) -> None:
  if not isinstance(v, (str, Mapping)):
    raise ValueError(f"{key}={v!r} is invalid: give a path, 'split=path,...' or a dict of them")


def _template(key: str, v) -> None:
  _is_str(key, v)
  try:
    list(string.Formatter().parse(v))  # an unmatched brace
    from ulskip_jax import batching  # its TEMPLATE_FIELDS are the allowed ones
    batching.check_template(v)
  except ValueError as e:
    raise ValueError(f"{key}={v!r} is invalid: {e}") from None


def _rope_scaling(key: str, v) -> None:
  if v is not None and not isinstance(v, Mapping):
    raise ValueError(f"{key}={v!r} is invalid: give None or a dict, e.g. "
                     "dict(rope_type='llama3', factor=8.0, ...)")


def _rope_layers(key: str, v) -> None:
  if v is not None and (isinstance(v, (str, bytes)) or not isinstance(v, Sequence)
                        or not all(isinstance(x, (bool, int)) and x in (0, 1) for x in v)):
    raise ValueError(f"{key}={v!r} is invalid: give None or one bool per layer (True = RoPE)")


def _windows(key: str, v) -> None:
  if v is None:
    return
  if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
    raise ValueError(f"{key}={v!r} is invalid: give None or one entry per layer, each a window "
                     ">= 1 or None (global), e.g. (4096, None)")
  for i, w in enumerate(v):
    if w is not None:
      as_int(f"{key}[{i}]", w, min=1)


def _mesh_shape(key: str, v) -> None:
  if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
    raise ValueError(f"{key}={v!r} is invalid: it must be a tuple of ints, e.g. (-1, 1, 1)")
  for i, s in enumerate(v):
    if as_int(f"{key}[{i}]", s) < 1 and s != -1:
      raise ValueError(f"{key}={tuple(v)} is invalid: each size is >= 1, or -1 (the remaining "
                       "devices)")
  if list(v).count(-1) > 1:
    raise ValueError(f"{key}={tuple(v)} has more than one -1: at most one axis takes the "
                     "remaining devices")


def _axes(key: str, v) -> None:
  if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or not all(
      isinstance(a, str) for a in v):
    raise ValueError(f"{key}={v!r} is invalid: it must be a tuple of axis names")


def _rules(key: str, v) -> None:
  ok = not isinstance(v, (str, bytes)) and isinstance(v, Sequence) and all(
      isinstance(r, Sequence) and len(r) == 2 and isinstance(r[0], str)
      and (r[1] is None or isinstance(r[1], str)) for r in v)
  if not ok:
    raise ValueError(f"{key}={v!r} is invalid: it must be a tuple of (logical axis, mesh axis or "
                     "None) pairs")


# ----------------------------------------------------------------------------------------------
# The model group, from ModelConfig.

class Source(enum.Enum):
  """Where a run takes a ModelConfig field's value from."""
  ARCHITECTURE = "model.<field>; from model.init_from's config when that is set"
  RUNTIME = "model.<field>, also over model.init_from (it changes no saved array)"
  TOKENIZER = "the tokenizer: model.init_from's, or a BPE of data.vocab_size from the corpus"
  ADAPTERS = "optim.lora.<field without lora_>"


@dataclasses.dataclass(frozen=True)
class ModelField:
  source: Source
  check: Check | None  # None: no key sets it (Source.TOKENIZER)
  doc: str
  default: Any = None  # the run config's, where ModelConfig has none or another (never None)


_A, _R = Source.ARCHITECTURE, Source.RUNTIME

MODEL_FIELDS: dict[str, ModelField] = {
    "vocab_size": ModelField(Source.TOKENIZER, None, "vocabulary size"),
    "num_layers": ModelField(_A, _int(1), "decoder layers L", 12),
    "d_model": ModelField(_A, _int(1), "residual width", 256),
    "num_heads": ModelField(_A, _int(1), "query heads (a multiple of `num_kv_heads`)", 4),
    "num_kv_heads": ModelField(_A, _int(1), "key / value heads (fewer than `num_heads` = "
                               "grouped-query attention)", 4),
    "head_dim": ModelField(_A, _int(1), "width of one head", 64),
    "d_ff": ModelField(_A, _int(1), "MLP hidden width", 1024),
    "norm": ModelField(_A, _choice(*get_args(NormKind)), "`rms` (RMSNorm), `rms_plus_one` "
                       "(Gemma's (1 + w) scale), `layer` (LayerNorm)"),
    "norm_eps": ModelField(_A, _float(0, min_open=True), "the norms' epsilon"),
    "mlp": ModelField(_A, _choice(*get_args(MLPKind)), "`gated`: down(act(gate x) * up x); "
                      "`plain`: down(act(up x))"),
    "act": ModelField(_A, _choice(*get_args(Activation)), "MLP activation; `gelu` is the erf "
                      "one"),
    "pos": ModelField(_A, _choice(*get_args(Positions)), "`rope`, `learned` (a position table, "
                      "GPT-2), `alibi` (BLOOM)"),
    "max_position": ModelField(_A, _int(1), "positions the model accepts (and the learned "
                               "table's size); `data.seq_len` must fit"),
    "rope_theta": ModelField(_A, _float(0, min_open=True), "RoPE base"),
    "rope_scaling": ModelField(_A, Check(_rope_scaling, "None or a dict"), "Llama 3's RoPE "
                               "scaling, e.g. `dict(rope_type=\"llama3\", factor=8.0, ...)`"),
    "rope_layers": ModelField(_A, Check(_rope_layers, "None or one bool per layer"),
                              "per layer, whether it applies RoPE (SmolLM3); None = every layer"),
    "qk_norm": ModelField(_A, _BOOL, "Qwen3's per-head RMSNorm on q and k, before RoPE"),
    "attention_windows": ModelField(_A, Check(_windows, "None or per layer an int >= 1 or None"),
                                    "per layer its sliding window W (a query at p sees keys "
                                    "p-W < pos <= p) or None (global); None = every layer global "
                                    "(Mistral, Qwen2, Gemma 2/3)"),
    "local_rope_theta": ModelField(_A, _optional(_float(0, min_open=True)), "Gemma 3: the RoPE "
                                   "base of the windowed layers; None = `rope_theta` everywhere"),
    "post_norms": ModelField(_A, _BOOL, "Gemma 2/3: norm the attention and MLP outputs before "
                             "each residual add"),
    "embed_scale": ModelField(_A, _BOOL, "Gemma: embeddings times sqrt(d_model)"),
    "query_pre_attn_scalar": ModelField(_A, _optional(_int(1)), "Gemma: attention logits scaled "
                                        "by this ** -0.5; None = `head_dim`"),
    "attn_softcap": ModelField(_A, _optional(_float(0, min_open=True)), "Gemma 2: attention "
                               "logits -> c tanh(logits / c); None = off"),
    "final_softcap": ModelField(_A, _optional(_float(0, min_open=True)), "Gemma 2: output "
                                "logits -> c tanh(logits / c); None = off"),
    "qkv_bias": ModelField(_A, _BOOL, "biases on the q, k and v projections (Qwen2)"),
    "out_bias": ModelField(_A, _BOOL, "a bias on the attention output projection"),
    "mlp_bias": ModelField(_A, _BOOL, "biases on the MLP projections"),
    "embed_norm": ModelField(_A, _BOOL, "BLOOM's LayerNorm right after the embedding"),
    "tie_embeddings": ModelField(_A, _BOOL, "the unembedding is the embedding's transpose", True),
    "dtype": ModelField(_R, _choice(*DTYPES), "compute dtype; the loss is always f32"),
    "param_dtype": ModelField(_R, _choice(*DTYPES), "parameter storage dtype (model.init_from's "
                              "weights are cast to it)"),
    "remat": ModelField(_R, _BOOL, "rematerialise each layer in the backward pass (less memory, "
                        "more compute)"),
    "attention_impl": ModelField(_R, _choice(*get_args(attention.AttentionImpl)), "how attention "
                                 "is computed, never its result: `cudnn` on NVIDIA GPUs in "
                                 "bf16/f16, `auto` picks it where it fits, else einsum "
                                 "([accelerators.md](accelerators.md))"),
    "lora_rank": ModelField(Source.ADAPTERS, _int(0), "LoRA adapter rank; 0 = off (full "
                            "fine-tuning, no adapters)"),
    "lora_alpha": ModelField(Source.ADAPTERS, _float(0, min_open=True), "the adapters' output is "
                             "scaled by alpha / rank"),
    "lora_dropout": ModelField(Source.ADAPTERS, _float(0, 1, max_open=True), "dropout on each "
                               "adapter's input while training"),
    "lora_targets": ModelField(Source.ADAPTERS, Check(lora.check_targets, "any of " + ", ".join(
        f"`{t}`" for t in lora.TARGETS)), "projections with adapters (`gate`: gated MLPs only)",
        lora.TARGETS),
}

# ModelConfig fields that change no saved array: a resumed run may change them, a config.json
# never records them, and they apply over model.init_from.
RUNTIME_FIELDS = tuple(name for name, f in MODEL_FIELDS.items() if f.source is Source.RUNTIME)
# What a checkpoint fixes: the architecture and the vocabulary (a teacher must match them too).
ARCHITECTURE_FIELDS = tuple(name for name, f in MODEL_FIELDS.items()
                            if f.source in (_A, Source.TOKENIZER))
# The fields a run config sets as model.<name> (the others come from elsewhere: `Source`).
MODEL_KEYS = tuple(name for name, f in MODEL_FIELDS.items() if f.source in (_A, _R))


def _command_line_type(name: str) -> type:
  """The type ml_collections parses a command-line value of a None-default model field as."""
  if name == "rope_scaling":
    return object  # a dict in the run config, sorted pairs in ModelConfig
  hint = typing.get_type_hints(ModelConfig)[name]
  inner = [t for t in get_args(hint) if t is not type(None)][0]
  return typing.get_origin(inner) or inner


# ----------------------------------------------------------------------------------------------
# Every key.

@dataclasses.dataclass(frozen=True)
class Key:
  default: Any
  check: Check
  doc: str
  shown: str | None = None  # the default as the docs show it, where the value is too long
  field_type: type | None = None  # for a None default: what a command line may set it to


def _model_key(name: str) -> Key:
  field, spec = ModelConfig.__dataclass_fields__[name], MODEL_FIELDS[name]
  default = field.default if spec.default is None else spec.default
  doc = spec.doc if spec.source is _A else spec.doc + "; runtime: applies over `model.init_from`"
  return Key(default, spec.check, doc,
             field_type=_command_line_type(name) if default is None else None)


def _lora_key(name: str) -> Key:
  field, spec = ModelConfig.__dataclass_fields__["lora_" + name], MODEL_FIELDS["lora_" + name]
  return Key(field.default if spec.default is None else spec.default, spec.check, spec.doc)


KEYS: dict[str, Key] = {
    "seed": Key(0, _int(0, 2**32 - 1), "seeds parameter init, data order and dropout"),
    "num_steps": Key(1000, _int(1), "optimizer updates in the whole run (a resumed run continues "
                     "to it)"),
    "batch_size": Key(32, _int(1), "global rows per update, split over hosts and "
                      "`optim.accum_steps` micro-batches (must divide evenly)"),
    "log_every": Key(10, _int(1), "steps between `log.jsonl` / TensorBoard points (step 0 is "
                     "always logged)"),
    "progress_bar": Key(True, _BOOL, "a tqdm bar on the lead host (step, loss, tokens/s, ETA)"),
    "eval_every": Key(500, _int(0), "steps between evaluations, and one at the end; 0 = no "
                      "evaluation"),
    "eval_batches": Key(8, _int(1), "validation batches per ratio for the loss and perplexity"),
    "eval_ratios": Key((), Check(_ratios, "tuple of numbers >= 1"), "ratios evaluated; () = the "
                       "training ratio(s)"),
    "eval_bleu_examples": Key(64, _int(0), "validation examples decoded greedily for BLEU / chrF "
                              "at each evaluation; 0 = off"),
    "eval_max_new_tokens": Key(96, _int(1), "decode budget per BLEU example, tokens (below the "
                               "model's `max_position`)"),

    "model.init_from": Key("", _STR, "the base model: a Hugging Face folder, a `.gguf` file, "
                           "`\"smollm2\"` or a hub id; \"\" = from scratch"),
    **{f"model.{name}": _model_key(name) for name in MODEL_KEYS},

    "data.source": Key("bible", _choice("bible", "hf", "tfds"), "`bible` (offline KJV -> WEB "
                       "pairs, whole books held out), `hf` (HF `datasets`), `tfds`"),
    "data.cache_dir": Key("~/.cache/ulskip_jax", _STR, "cache folder for prepared data"),
    "data.hf_name": Key("", _STR, "HF dataset name (e.g. `wmt14`) for `source=\"hf\"`"),
    "data.hf_config": Key("", _STR, "its configuration (e.g. `de-en`)"),
    "data.hf_files": Key("", Check(_files, "path, \"split=path,...\" or a dict"), "local json / "
                         "jsonl / csv / parquet file(s) instead of a hub name"),
    "data.tfds_name": Key("", _STR, "TFDS builder (e.g. `wmt14_translate/de-en`) for "
                          "`source=\"tfds\"` (`pip install -e \".[tfds]\"`)"),
    "data.tfds_data_dir": Key("", _STR, "prepared TFDS data folder"),
    "data.source_field": Key("source", Check(_name, "field name"), "dotted path to the source "
                             "text in an example, e.g. `translation.de`"),
    "data.target_field": Key("target", Check(_name, "field name"), "dotted path to the target "
                             "text"),
    "data.max_examples": Key(0, _int(0), "examples per split; 0 = all"),
    "data.template": Key("KJV: {source}\nWEB:", Check(_template, "a string with `{source}` once"),
                         "the prompt built from `{source}`; `infer.py` reuses it for a workdir"),
    "data.chat": Key(False, _BOOL, "the prompt is the user turn of the tokenizer's chat template "
                     "holding the template, then the opening of the assistant turn; the target "
                     "ends with the tokenizer's end-of-turn token"),
    "data.seq_len": Key(128, _int(2), "tokens per packed row (at most `model.max_position`)"),
    "data.pack": Key(True, _BOOL, "pack several examples per row (segment ids keep them apart)"),
    "data.vocab_size": Key(4096, _int(1), "BPE vocabulary size when training from scratch"),
    "data.targets": Key("reference", _choice("reference", "teacher"), "the train split's "
                        "targets: the dataset's own, or `teacher`: a full-depth model's greedy "
                        "output for each training prompt (sequence-level distillation), "
                        "generated once and cached under `data.cache_dir`; validation and test "
                        "keep the references"),
    "data.teacher": Key("", _STR, "`data.targets=\"teacher\"`'s model, at full depth: \"\" = "
                        "`model.init_from`; or a workdir, HF folder or `.gguf` of the student's "
                        "architecture and tokenizer"),

    "skip.ratio": Key(2.0, _float(1), "target speedup r: keep n = int(L / r) layers"),
    "skip.ratios": Key((), Check(_ratios, "tuple of numbers >= 1"), "if set, one ratio drawn per "
                       "step from these (one checkpoint for several ratios)"),
    "skip.strategy": Key("uls", _choice(*STRATEGIES), "which layers to keep (below)"),
    "skip.unit": Key("layer", _choice(*UNITS), "what a skipped index removes: the whole layer, "
                     "its MLP block (attention and the whole KV cache stay) or its attention "
                     "block; a sublayer unit skips the fewest blocks whose weight bytes per token "
                     "reach the ratio, chosen by the strategy (`uls` or `calibrated` scores); "
                     "'sublayer' picks attention and MLP blocks separately (calibrated only)"),
    "skip.keep": Key((), Check(_layer_indices, "tuple of layer indices"), "layers every plan "
                     "keeps (strategies `uls` and `calibrated`), e.g. a model's global-attention "
                     "layers"),
    "skip.plan_file": Key("", _STR, "strategy `calibrated`: a plan.json to use; \"\" = calibrate "
                          "on the first start (the plan is kept in the workdir as plan.json)"),
    "skip.calibration_method": Key("kl_greedy", _choice(*CALIBRATION_METHODS), "how calibration "
                                   "scores layers: greedy KL removal or block influence"),
    "skip.calibration_tokens": Key(1024, _int(1), "response tokens of training text the "
                                   "calibration scores"),
    "skip.calibration_keep_ends": Key(True, _BOOL, "calibrated plans never skip the first and "
                                      "last layers"),
    "skip.mode": Key("paper", _choice("paper", "everywhere"), "`paper`: prompt tokens at full "
                     "depth, response tokens through the kept layers; `everywhere`: every token "
                     "through the kept layers"),
    "skip.full_depth_steps": Key(0, _int(0), "the first steps train at full depth (a base model "
                                 "from scratch)"),
    "skip.prompt_capacity": Key(0.75, _float(0, 1, min_open=True), "paper mode: skipped layers "
                                "run on a buffer of this fraction of `seq_len` prompt tokens per "
                                "row, rounded up to 8; a micro-batch with a longer prompt share "
                                "runs them on whole rows (same result, full-depth cost); 1.0 = "
                                "always whole rows"),
    "skip.prompt_buffer": Key("auto", _choice(*prompt_buffer.MODES), "the buffer or whole rows "
                              "(same losses and gradients): `auto` = the buffer where its saved "
                              "work outweighs its gathers and scatters on this platform "
                              "(`prompt_buffer.choose`, decided at startup from the shapes; a "
                              "small model on a GPU takes whole rows)"),

    "optim.lr": Key(3e-4, _float(0), "peak learning rate (AdamW), after linear warmup, then "
                    "cosine decay"),
    "optim.final_lr_fraction": Key(0.1, _float(0, 1), "the cosine ends at lr x this"),
    "optim.warmup_steps": Key(100, _int(0), "linear warmup steps"),
    "optim.weight_decay": Key(0.01, _float(0), "AdamW decoupled weight decay"),
    "optim.b1": Key(0.9, _float(0, 1, max_open=True), "Adam first-moment decay rate"),
    "optim.b2": Key(0.95, _float(0, 1, max_open=True), "Adam second-moment decay rate"),
    "optim.clip_norm": Key(1.0, _float(0, min_open=True), "global gradient-norm clipping"),
    "optim.accum_steps": Key(1, _int(1), "micro-batches per update, scanned inside the step "
                             "(divides `batch_size`)"),
    "optim.freeze_embeddings": Key(False, _BOOL, "do not train the embeddings (the ULS authors "
                                   "freeze them)"),
    **{f"optim.lora.{name}": _lora_key(name) for name in ("rank", "alpha", "dropout", "targets")},
    "optim.lora.train_norms": Key(False, _BOOL, "also train the norm scales (and LayerNorm "
                                  "biases)"),
    "optim.lora.per_ratio": Key(False, _BOOL, "adapters per ratio on a frozen base: one adapter "
                                "set per ratio of `skip.ratios` above 1, each step trains every "
                                "set on its ratio's loss; full depth is the base "
                                "(docs/adapters.md)"),

    "distill.teacher": Key("", _STR, "\"\" = off (cross-entropy); `\"self\"` (these weights at "
                           "full depth, this step); `\"init\"` (the frozen `model.init_from` "
                           "weights); or a workdir, HF folder or `.gguf` of the student's "
                           "architecture"),
    "distill.alpha": Key(0.5, _float(0, 1), "weight of the KL term; 1 - alpha goes to the "
                         "cross-entropy"),
    "distill.temperature": Key(1.0, _float(0, min_open=True), "softmax temperature of the KL; "
                               "the KL is scaled by T^2"),
    "distill.sandwich": Key(False, _BOOL, "teacher `\"self\"`: CE at full depth + KD of the "
                            "smallest sub-model (largest ratio) and one other drawn ratio, one "
                            "step"),

    "checkpoint.every": Key(500, _int(1), "steps between checkpoints; one is also written at the "
                            "end"),
    "checkpoint.keep": Key(3, _optional(_int(1)), "checkpoints kept (None = all)"),
    "checkpoint.async_save": Key(True, _BOOL, "write in the background while training continues"),
    "checkpoint.resume": Key(True, _BOOL, "continue from the latest checkpoint in the workdir"),
    "checkpoint.resume_step": Key(0, _int(0), "0 = the latest; N = that step (e.g. when the "
                                  "latest is corrupt)"),

    "mesh.axes": Key(MESH_AXES, Check(_axes, "tuple of axis names"), "mesh axis names"),
    "mesh.shape": Key((-1, 1, 1), Check(_mesh_shape, "tuple of ints >= 1, at most one -1"),
                      "devices per axis; -1 takes the remaining devices"),
    "mesh.rules": Key(DEFAULT_RULES, Check(_rules, "tuple of (logical axis, mesh axis or None)"),
                      "`vocab`, `heads`, `kv_heads`, `mlp` over `tensor`, `embed` over `fsdp`; "
                      "a dimension the mesh axis does not divide is replicated",
                      shown="`sharding.DEFAULT_RULES`"),

    "distributed.coordinator_address": Key("", _STR, "host:port of process 0; \"\" = one host, "
                                           "or automatic"),
    "distributed.num_processes": Key(1, _int(1), "hosts"),
    "distributed.process_id": Key(0, _int(0), "this host's index, below `num_processes`"),
    "distributed.auto": Key(True, _BOOL, "call `jax.distributed.initialize()` when a TPU pod or "
                            "SLURM environment is detected (" + ", ".join(
                                f"`{name}`" for name in CLUSTER_ENV) + " set)"),
}


def default_config() -> ml_collections.ConfigDict:
  """The run config with every key at its default (configs/base.py)."""
  config = ml_collections.ConfigDict()
  for path, key in KEYS.items():
    *groups, name = path.split(".")
    node = config
    for group in groups:
      if group not in node:
        node[group] = ml_collections.ConfigDict()
      node = node[group]
    # A typed reference: ml_collections cannot set a plain None field from the command line.
    node[name] = (key.default if key.default is not None
                  else ml_collections.FieldReference(None, field_type=key.field_type))
  return config


def groups() -> set[str]:
  """Every key path prefix that names a group (`model`, `optim`, `optim.lora`, ...)."""
  return {path.rsplit(".", n)[0] for path in KEYS for n in range(1, path.count(".") + 1)}


def model_config(config, vocab_size: int | None = None,
                 base: ModelConfig | None = None) -> ModelConfig:
  """The run's ModelConfig. From scratch: the run config's model keys and `vocab_size`; with
  model.init_from: `base` (that model's config) with the run config's RUNTIME_FIELDS, its
  architecture keys ignored. Adapters from optim.lora (none when its rank is 0)."""
  adapters = lora.model_fields(config.optim.lora)
  if base is not None:
    return dataclasses.replace(base, **{n: config.model[n] for n in RUNTIME_FIELDS}, **adapters)
  kw = {n: config.model[n] for n in MODEL_KEYS if n in config.model}
  if kw.get("rope_scaling") is not None:
    kw["rope_scaling"] = tuple(sorted(dict(kw["rope_scaling"]).items()))
  return ModelConfig(vocab_size=vocab_size, **kw, **adapters)


# ----------------------------------------------------------------------------------------------
# The docs: docs/training.md holds one table per group between markers this rewrites.

_REGION = re.compile(r"(<!-- keys: ([\w ]+) -->\n)(.*?)(<!-- /keys -->)", re.S)


def group_of(path: str) -> str:
  return path.split(".")[0] if "." in path else "run"


def _shown(key: Key) -> str:
  if key.shown:
    return key.shown
  value = key.default
  if isinstance(value, str):
    return f"`{json.dumps(value)}`"
  if isinstance(value, float):
    return "`" + re.sub(r"e-0*(\d)", r"e-\1", repr(value)) + "`"
  return f"`{value!r}`"


def table(group_names: Sequence[str]) -> str:
  """The markdown table of the keys of `group_names` ("run" = the top-level keys)."""
  rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
  rows += [f"| `{path}` | {_shown(key)} | {key.check.allowed} | {key.doc} |"
           for path, key in KEYS.items() if group_of(path) in group_names]
  return "\n".join(rows) + "\n"


def docs_with_tables(text: str) -> str:
  """`text` with each `<!-- keys: GROUP ... -->` region's table generated from KEYS."""
  return _REGION.sub(lambda m: m[1] + table(m[2].split()) + m[4], text)


def documented_groups(text: str) -> list[str]:
  """The groups the regions of `text` list, in order (a group twice is listed twice)."""
  return [g for m in _REGION.finditer(text) for g in m[2].split()]


def write_docs(path: str = os.path.join(os.path.dirname(__file__), os.pardir, "docs",
                                        "training.md")) -> None:
  """Regenerates the reference tables of docs/training.md (after a change to KEYS)."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  with open(path, "w", encoding="utf-8") as f:
    f.write(docs_with_tables(text))
