"""The run config's validation, in one pass, before any data is read or any step runs.

`validate_run(config, workdir)` checks every field's type and range (FIELDS, one entry per key of
configs/base.py), the fields that constrain each other, the skip plan of every ratio the run will
use (skip.ratio or skip.ratios, and eval_ratios) at the model's depth (the config's, or that of
what model.init_from names), and the workdir: writable, and, when it holds checkpoints, that
resuming them makes sense (the same model, a step at most num_steps). Each mistake is one
ValueError line naming the full key path, the value and what is allowed.

train.py calls it before it imports the training stack (so a bad value fails in seconds) and
`train_lib.train_and_evaluate` calls it again (so every caller gets it; a second pass costs
milliseconds). Orbax and optax are not imported here: model.init_from is resolved as
hf.from_pretrained resolves it, reading only its config (config.json or the GGUF metadata), and a
checkpoint's model config is read from the JSON file Orbax wrote for its meta item.
"""

from __future__ import annotations

import dataclasses
import json
import os
import string
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, Callable, get_args

import jax

from ulskip_jax import attention, lora, prompt_buffer
from ulskip_jax.checks import as_choice, as_float, as_int
from ulskip_jax.model import DTYPES, Activation, MLPKind, ModelConfig, NormKind, Positions
from ulskip_jax.skipping import (CALIBRATION_METHODS, PLAN_FILE, STRATEGIES, plan_layers,
                                 read_plan)

# ModelConfig fields that change no saved array: a resumed run may change them.
_RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "attention_impl")


class ConfigError(ValueError):
  """A run config value (or the workdir) is unusable; the message is one line for the user."""


# ----------------------------------------------------------------------------------------------
# Field checks: each takes (key path, value) and raises ValueError naming both.

def _int(min=None, max=None) -> Callable:
  return lambda key, v: as_int(key, v, min, max)


def _float(min=None, max=None, **open_bounds) -> Callable:
  return lambda key, v: as_float(key, v, min, max, **open_bounds)


def _choice(*choices) -> Callable:
  return lambda key, v: as_choice(key, v, choices)


def _bool(key: str, v) -> None:
  if not isinstance(v, bool):
    raise ValueError(f"{key}={v!r} is invalid: it must be True or False")


def _str(key: str, v) -> None:
  if not isinstance(v, str):
    raise ValueError(f"{key}={v!r} is invalid: it must be a string")


def _name(key: str, v) -> None:
  _str(key, v)
  if not v.strip():
    raise ValueError(f"{key}={v!r} is empty: give a field name")


def _layer_indices(key: str, v) -> None:
  if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
    raise ValueError(f"{key}={v!r} is invalid: it must be a tuple of layer indices, e.g. (5, 11)")
  for i, index in enumerate(v):
    as_int(f"{key}[{i}]", index, min=0)


def _optional(check: Callable) -> Callable:
  return lambda key, v: None if v is None else check(key, v)


def _ratios(key: str, v) -> None:
  if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
    raise ValueError(f"{key}={v!r} is invalid: it must be a tuple of numbers >= 1, e.g. (1, 2)")
  for i, r in enumerate(v):
    as_float(f"{key}[{i}]", r, min=1)


def _files(key: str, v) -> None:
  if not isinstance(v, (str, Mapping)):
    raise ValueError(f"{key}={v!r} is invalid: give a path, 'split=path,...' or a dict of them")


def _template(key: str, v) -> None:
  _str(key, v)
  try:
    list(string.Formatter().parse(v))  # an unmatched brace
    from ulskip_jax import data  # its TEMPLATE_FIELDS are the allowed ones
    data.check_template(v)
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


FIELDS: dict[str, Callable] = {
    "seed": _int(0, 2**32 - 1),
    "num_steps": _int(1),
    "batch_size": _int(1),
    "log_every": _int(1),
    "progress_bar": _bool,
    "eval_every": _int(0),
    "eval_batches": _int(1),
    "eval_ratios": _ratios,
    "eval_bleu_examples": _int(0),
    "eval_max_new_tokens": _int(1),
    "model.init_from": _str,
    "model.num_layers": _int(1),
    "model.d_model": _int(1),
    "model.num_heads": _int(1),
    "model.num_kv_heads": _int(1),
    "model.head_dim": _int(1),
    "model.d_ff": _int(1),
    "model.norm": _choice(*get_args(NormKind)),
    "model.norm_eps": _float(0, min_open=True),
    "model.mlp": _choice(*get_args(MLPKind)),
    "model.act": _choice(*get_args(Activation)),
    "model.pos": _choice(*get_args(Positions)),
    "model.max_position": _int(1),
    "model.rope_theta": _float(0, min_open=True),
    "model.tie_embeddings": _bool,
    "model.dtype": _choice(*DTYPES),
    "model.param_dtype": _choice(*DTYPES),
    "model.remat": _bool,
    "model.attention_impl": _choice(*get_args(attention.AttentionImpl)),
    # ModelConfig fields configs/base.py leaves at their defaults; a config may set them.
    "model.qkv_bias": _bool,
    "model.out_bias": _bool,
    "model.mlp_bias": _bool,
    "model.embed_norm": _bool,
    "model.rope_scaling": _rope_scaling,
    "model.rope_layers": _rope_layers,
    "model.qk_norm": _bool,
    "data.source": _choice("bible", "hf", "tfds"),
    "data.cache_dir": _str,
    "data.hf_name": _str,
    "data.hf_config": _str,
    "data.hf_files": _files,
    "data.tfds_name": _str,
    "data.tfds_data_dir": _str,
    "data.source_field": _name,
    "data.target_field": _name,
    "data.max_examples": _int(0),
    "data.template": _template,
    "data.chat": _bool,
    "data.seq_len": _int(2),
    "data.pack": _bool,
    "data.vocab_size": _int(1),
    "skip.ratio": _float(1),
    "skip.ratios": _ratios,
    "skip.strategy": _choice(*STRATEGIES),
    "skip.keep": _layer_indices,
    "skip.plan_file": _str,
    "skip.calibration_method": _choice(*CALIBRATION_METHODS),
    "skip.calibration_tokens": _int(1),
    "skip.calibration_keep_ends": _bool,
    "skip.mode": _choice("paper", "everywhere"),
    "skip.full_depth_steps": _int(0),
    "skip.prompt_capacity": _float(0, 1, min_open=True),
    "skip.prompt_buffer": _choice(*prompt_buffer.MODES),
    "optim.lr": _float(0),
    "optim.final_lr_fraction": _float(0, 1),
    "optim.warmup_steps": _int(0),
    "optim.weight_decay": _float(0),
    "optim.b1": _float(0, 1, max_open=True),
    "optim.b2": _float(0, 1, max_open=True),
    "optim.clip_norm": _float(0, min_open=True),
    "optim.accum_steps": _int(1),
    "optim.freeze_embeddings": _bool,
    "optim.lora.rank": _int(0),
    "optim.lora.alpha": _float(0, min_open=True),
    "optim.lora.dropout": _float(0, 1, max_open=True),
    "optim.lora.targets": lora.check_targets,
    "optim.lora.train_norms": _bool,
    "distill.teacher": _str,
    "distill.alpha": _float(0, 1),
    "distill.temperature": _float(0, min_open=True),
    "distill.sandwich": _bool,
    "checkpoint.every": _int(1),
    "checkpoint.keep": _optional(_int(1)),
    "checkpoint.async_save": _bool,
    "checkpoint.resume": _bool,
    "checkpoint.resume_step": _int(0),
    "mesh.axes": _axes,
    "mesh.shape": _mesh_shape,
    "mesh.rules": _rules,
    "distributed.coordinator_address": _str,
    "distributed.num_processes": _int(1),
    "distributed.process_id": _int(0),
    "distributed.auto": _bool,
}
_GROUPS = {key.rsplit(".", n)[0] for key in FIELDS for n in range(1, key.count(".") + 1)}


# ----------------------------------------------------------------------------------------------
# The pass.

def validate_run(config, workdir: str) -> None:
  """Raises ConfigError (one line) for the first problem of `config` run in `workdir`."""
  try:
    _check_fields(config)
    num_layers, max_position, hf_model = _model_shape(config)
    _check_relations(config, max_position)
    _check_lora_targets(config, hf_model)
    _check_plans(config, num_layers, getattr(hf_model, "attention_windows", None), workdir)
    _check_mesh(config)
    _check_attention(config, hf_model)
    _check_distill(config, hf_model)
    _check_workdir(config, workdir, hf_model)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _leaves(config, prefix: str = ""):
  for key, value in config.items():
    path = prefix + key
    if hasattr(value, "items") and path in _GROUPS:
      yield from _leaves(value, path + ".")
    else:
      yield path, value


def _check_fields(config) -> None:
  if not hasattr(config, "items") or "model" not in config or "skip" not in config:
    raise ValueError("the config is not a train.py run config (it has no model and skip "
                     "fields): see configs/base.py")
  for path, value in _leaves(config):
    if path not in FIELDS:
      raise ValueError(f"config key {path} is unknown: see configs/base.py for the allowed keys")
    FIELDS[path](path, value)


def _model_shape(config) -> tuple[int, int, Any]:
  """(num_layers, max_position, the init_from ModelConfig or None), from the config or from
  what model.init_from names: its config.json or GGUF metadata, no weights read."""
  path = config.model.init_from
  if not path:
    return config.model.num_layers, config.model.max_position, None
  from ulskip_jax import hf
  try:  # hf.from_pretrained's own resolution: a folder, a .gguf, the packaged SmolLM2, a hub id
    hf_config, has_tokenizer = hf.read_config(path)
    if not has_tokenizer:
      raise ValueError("it has no tokenizer files: add the base model's tokenizer")
    model_cfg = hf.config_from_hf(hf_config)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"model.init_from={path!r} cannot be used: {e}") from None
  return model_cfg.num_layers, model_cfg.max_position, model_cfg


def _check_relations(config, max_position: int) -> None:
  m, d = config.model, config.data
  if not m.init_from and m.num_heads % m.num_kv_heads:
    raise ValueError(f"model.num_heads={m.num_heads} is not a multiple of model.num_kv_heads="
                     f"{m.num_kv_heads}")
  if d.seq_len > max_position:
    raise ValueError(f"data.seq_len={d.seq_len} exceeds the model's max_position={max_position}: "
                     "rows must fit the model's positions")
  if config.eval_bleu_examples and config.eval_max_new_tokens >= max_position:
    raise ValueError(f"eval_max_new_tokens={config.eval_max_new_tokens} leaves no room for a "
                     f"prompt in the model's max_position={max_position}")
  if d.source == "hf" and not (d.hf_name or d.hf_files):
    raise ValueError("data.source='hf' needs data.hf_name (a Hub dataset) or data.hf_files "
                     "(local files)")
  if d.source == "tfds" and not d.tfds_name:
    raise ValueError("data.source='tfds' needs data.tfds_name, e.g. wmt14_translate/de-en")
  dist, optim = config.distributed, config.optim
  if dist.process_id >= dist.num_processes:
    raise ValueError(f"distributed.process_id={dist.process_id} is out of range: it must be "
                     f"below distributed.num_processes={dist.num_processes}")
  lora.check(optim.lora.rank, optim.lora.targets, optim.lora.dropout, optim.lora.alpha,
             prefix="optim.lora.")
  if config.batch_size % optim.accum_steps:
    raise ValueError(f"batch_size={config.batch_size} is not divisible by optim.accum_steps="
                     f"{optim.accum_steps}: each micro-batch needs the same rows")
  if dist.coordinator_address and config.batch_size % (dist.num_processes * optim.accum_steps):
    raise ValueError(f"batch_size={config.batch_size} is not divisible by "
                     f"distributed.num_processes={dist.num_processes} x optim.accum_steps="
                     f"{optim.accum_steps}: each host reads the same number of rows")
  if len(config.mesh.shape) != len(config.mesh.axes):
    raise ValueError(f"mesh.shape={tuple(config.mesh.shape)} does not match mesh.axes="
                     f"{tuple(config.mesh.axes)}: give one size per axis")
  unknown = sorted({r[1] for r in config.mesh.rules if r[1] is not None} - set(config.mesh.axes))
  if unknown:
    raise ValueError(f"mesh.rules map to {unknown}, which are not in mesh.axes="
                     f"{tuple(config.mesh.axes)}")


def _check_lora_targets(config, hf_model) -> None:
  """LoRA on, the targets name a projection the model has (a plain MLP has no gate)."""
  targets, mlp = config.optim.lora.targets, (hf_model or config.model).mlp
  if config.optim.lora.rank and mlp == "plain" and set(targets) <= {"gate"}:
    raise ValueError(f"optim.lora.targets={tuple(targets)!r} names no projection of this model: "
                     "its MLP is plain (no gate); add any of 'q', 'k', 'v', 'o', 'up', 'down'")


def _check_plans(config, num_layers: int, windows=None, workdir=None) -> None:
  """The skip plan of every ratio the run trains or evaluates, at the model's depth; a calibrated
  run's plan file (the workdir's plan.json, else skip.plan_file) or what calibration needs."""
  s = config.skip
  used = ([(f"skip.ratios[{i}]", r) for i, r in enumerate(s.ratios)] if len(s.ratios)
          else [("skip.ratio", s.ratio)])
  used += [(f"eval_ratios[{i}]", r) for i, r in enumerate(config.eval_ratios)]
  plan = _calibrated_plan(config, num_layers, workdir) if s.strategy == "calibrated" else None
  for key, ratio in used:
    try:
      if plan is not None:
        plan.plan(ratio)
      else:
        plan_layers(num_layers, ratio, s.strategy, seed=config.seed, keep=tuple(s.keep),
                    windows=windows, scores=_placeholder_scores(config, num_layers))
    except ValueError as e:
      keep = f", skip.keep={tuple(s.keep)}" if len(s.keep) else ""
      raise ValueError(f"{key}={ratio!r} cannot be planned on the model's {num_layers} layers "
                       f"(skip.strategy={s.strategy!r}{keep}): {e}") from None


def _multi_process(config) -> bool:
  """Whether the run starts jax.distributed: asking JAX for its devices before
  jax.distributed.initialize would break the start, so device checks wait for the run."""
  dist = config.distributed
  cluster = ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "JAX_COORDINATOR_ADDRESS")
  return bool(dist.coordinator_address or dist.num_processes > 1 or (
      dist.auto and any(k in os.environ for k in cluster)))


def _calibrated_plan(config, num_layers: int, workdir):
  """The plan file a calibrated run will use, read and checked; None when it will calibrate."""
  s = config.skip
  in_workdir = workdir and os.path.join(str(workdir), PLAN_FILE)
  for key, path in (("the workdir's plan", in_workdir), ("skip.plan_file", s.plan_file)):
    if path and (key == "skip.plan_file" or os.path.isfile(path)):
      try:
        return read_plan(path, num_layers)
      except ValueError as e:
        raise ValueError(f"{key} {path!r} cannot be used: {e}") from None
  if not config.model.init_from:
    raise ValueError("skip.strategy='calibrated' needs model.init_from (a trained model to "
                     "calibrate) or skip.plan_file (a plan.json)")
  return None


def _placeholder_scores(config, num_layers: int):
  """Calibration's never-skipped layers (None), for checking that a ratio can be planned."""
  if config.skip.strategy != "calibrated":
    return None
  ends = {0, num_layers - 1} if config.skip.calibration_keep_ends else set()
  return [None if i in ends else 0.0 for i in range(num_layers)]


def _check_mesh(config) -> None:
  """The mesh against the devices, where that is safe (`_multi_process`)."""
  if _multi_process(config):
    return
  from ulskip_jax import sharding
  try:
    sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  except ValueError as e:
    raise ValueError(f"mesh.shape={tuple(config.mesh.shape)} is invalid here: {e}") from None


def _check_distill(config, hf_model) -> None:
  """The teacher exists and is of the student's architecture and vocabulary (read from its
  config.json, GGUF metadata or checkpoint meta: no weights)."""
  d = config.distill
  if d.sandwich and d.teacher != "self":
    raise ValueError(f"distill.sandwich=True needs distill.teacher='self' (the step's own "
                     f"full-depth forward is the teacher), not {d.teacher!r}")
  if d.teacher in ("", "self"):
    return
  if d.teacher == "init":
    if not config.model.init_from:
      raise ValueError("distill.teacher='init' needs model.init_from (the frozen weights it "
                       "names are the teacher)")
    return
  steps = checkpoint_steps(os.path.join(d.teacher, "checkpoints"))
  try:
    if steps:
      meta_file = os.path.join(d.teacher, "checkpoints", str(steps[-1]), "meta", "metadata")
      with open(meta_file, encoding="utf-8") as f:
        teacher = json.load(f)["model_config"]
    else:
      from ulskip_jax import hf
      teacher = dataclasses.asdict(hf.config_from_hf(hf.read_config(d.teacher)[0]))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"distill.teacher={d.teacher!r} cannot be used: {e}; give 'self', 'init', "
                     "a training workdir, a Hugging Face folder or a .gguf file") from None
  if hf_model is not None:
    student = dataclasses.asdict(hf_model)
  else:  # trained from scratch: the vocabulary is the run's tokenizer's, known later
    student = {k: v for k, v in config.model.items() if k != "init_from"}
  check_teacher(d.teacher, student, teacher)


def check_teacher(path: str, student: Mapping, teacher: Mapping) -> None:
  """One line naming each field where the teacher's ModelConfig (a dict) differs from the
  student's in architecture or vocabulary (dtypes, remat and adapters may differ)."""
  names = [f.name for f in dataclasses.fields(ModelConfig)
           if f.name not in _RUNTIME_FIELDS and not f.name.startswith("lora_")]
  differ = [n for n in names if n in student and n in teacher
            and _plain(student[n]) != _plain(teacher[n])]
  if differ:
    detail = ", ".join(f"{n}={teacher[n]!r} (student: {_plain(student[n])!r})" for n in differ)
    raise ValueError(f"distill.teacher={path!r} is not the student's architecture: {detail}; "
                     "give a teacher of the student's architecture and vocabulary")


# ----------------------------------------------------------------------------------------------
# The workdir.

def _check_attention(config, hf_model) -> None:
  """An explicit model.attention_impl computes the model's attention (`attention.unfit_reason`),
  and "cudnn" has a GPU, where asking is safe."""
  m = config.model
  # A model from the run config has no soft cap: its head width, positions and dtype decide.
  cfg = dataclasses.replace(hf_model, dtype=m.dtype) if hf_model else ModelConfig(
      vocab_size=1, num_layers=1, d_model=1, num_heads=1, num_kv_heads=1,
      head_dim=m.head_dim, d_ff=1, pos=m.pos, dtype=m.dtype)
  reason = attention.unfit_reason(cfg, m.attention_impl)
  if reason is None and m.attention_impl == "cudnn" and not _multi_process(config):
    if jax.default_backend() != "gpu":
      reason = f"cuDNN's fused attention needs an NVIDIA GPU (the backend is {jax.default_backend()})"
  if reason:
    raise ValueError(f"model.attention_impl={m.attention_impl!r} cannot compute this model's "
                     f"attention: {reason}; use 'einsum' or 'auto'")


def _check_workdir(config, workdir: str, hf_model) -> None:
  if not isinstance(workdir, (str, os.PathLike)) or not str(workdir):
    raise ValueError(f"workdir={workdir!r} is invalid: give a folder path")
  workdir = str(workdir)
  _check_writable(workdir)
  steps = checkpoint_steps(os.path.join(workdir, "checkpoints"))
  c = config.checkpoint
  if steps and not c.resume:
    raise ValueError(f"checkpoint.resume=False, but workdir {workdir} holds checkpoints (steps "
                     f"{steps}): a fresh run would mix its steps with theirs; use a new --workdir")
  if c.resume_step and c.resume_step not in steps:
    raise ValueError(f"checkpoint.resume_step={c.resume_step} is not a checkpoint of {workdir}: "
                     f"available steps are {steps or 'none'}")
  if not steps:
    return
  step = c.resume_step or steps[-1]
  if config.num_steps < step:
    raise ValueError(f"num_steps={config.num_steps} is below step {step}, where workdir "
                     f"{workdir} resumes: nothing would be trained; raise num_steps, pick an "
                     "earlier checkpoint with checkpoint.resume_step=N, or use a new --workdir")
  _check_same_model(config, workdir, step, hf_model)


def _check_writable(workdir: str) -> None:
  """The workdir, or the deepest folder of it that exists, takes a new file."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir} is a file: give a folder (it will be created)")
  existing = workdir
  while not os.path.exists(existing):
    existing = os.path.dirname(os.path.abspath(existing))
  if not os.path.isdir(existing):
    raise ValueError(f"workdir {workdir} cannot be created: {existing} is a file")
  try:
    fd, probe = tempfile.mkstemp(dir=existing, prefix=".ulskip_write_probe")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    what = "is not writable" if existing == workdir else f"cannot be created in {existing}"
    raise ValueError(f"workdir {workdir} {what}: {e.strerror}") from None


def checkpoint_steps(directory: str) -> list[int]:
  """The finished checkpoint steps in `directory` (Orbax names a step's folder by its number
  only once the save is complete), without importing Orbax."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def _check_same_model(config, workdir: str, step: int, hf_model) -> None:
  """The model the checkpoint holds is the one the config describes (restoring other shapes
  would fail as an 'unreadable' checkpoint, which it is not)."""
  meta_file = os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")
  try:
    with open(meta_file, encoding="utf-8") as f:
      saved = json.load(f)["model_config"]
  except (OSError, ValueError, KeyError, TypeError):
    return  # unreadable meta: the restore reports it, with the earlier steps to pick from
  _check_same_adapters(config, workdir, step, saved)
  names = [f.name for f in dataclasses.fields(ModelConfig)
           if f.name not in _RUNTIME_FIELDS and not f.name.startswith("lora_")]
  if hf_model is not None:
    source = f"model.init_from={config.model.init_from!r}"
    wanted = {n: getattr(hf_model, n) for n in names}
  else:
    source = None
    wanted = {n: config.model[n] for n in names if n in config.model and n != "vocab_size"}
  differ = [n for n, v in wanted.items() if n in saved and _plain(v) != _plain(saved[n])]
  if not differ:
    return
  where = f"the checkpoint {os.path.join(workdir, 'checkpoints', str(step))}"
  if source:
    detail = ", ".join(f"{n}={_plain(wanted[n])!r} (saved: {saved[n]!r})" for n in differ)
    raise ValueError(f"{source} describes another model than {where}: {detail}; use a new "
                     "--workdir for another base model")
  detail = ", ".join(f"model.{n}={_plain(wanted[n])!r} (saved: {saved[n]!r})" for n in differ)
  raise ValueError(f"{detail} differs from {where}: a resumed run keeps its model; set the saved "
                   "value or use a new --workdir")


def _check_same_adapters(config, workdir: str, step: int, saved: dict) -> None:
  """optim.lora sets the adapters the checkpoint holds (dropout may change: it saves no array)."""
  defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)
              if f.name.startswith("lora_") and f.name != "lora_dropout"}
  wanted = {**defaults, **lora.model_fields(config.optim.lora)}
  differ = [n for n in defaults if _plain(wanted[n]) != _plain(saved.get(n, defaults[n]))]
  if differ:
    detail = ", ".join(f"optim.lora.{n[len('lora_'):]}={_plain(wanted[n])!r} (saved: "
                       f"{saved.get(n, defaults[n])!r})" for n in differ)
    raise ValueError(f"{detail} differs from the checkpoint "
                     f"{os.path.join(workdir, 'checkpoints', str(step))}: a resumed run keeps its "
                     "adapters; set the saved value or use a new --workdir")


def _plain(value):
  """JSON's view of a value (tuples as lists, dicts as sorted pairs), for comparing with meta."""
  if isinstance(value, Mapping):
    value = sorted(dict(value).items())
  return json.loads(json.dumps(value))
