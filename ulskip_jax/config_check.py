"""The run config's validation, in one pass, before any data is read or any step runs.

`validate_run(config, workdir)` checks every field's type and range (FIELDS: each key's check in
the run config's schema, `config_schema.KEYS`), the fields that constrain each other (among them
the ModelConfig the run will build), the skip plan of every ratio the run will use (skip.ratio or
skip.ratios, and eval_ratios) at the model's depth (the config's, or that of what model.init_from
names), and the workdir: writable, and, when it holds checkpoints, that resuming them makes sense
(the same model, a step at most num_steps). Each mistake is one ValueError line naming the full
key path, the value and what is allowed.

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
import tempfile
from collections.abc import Mapping
from typing import Any, Callable

import jax

from ulskip_jax import attention, config_schema, lora
from ulskip_jax.config_schema import ARCHITECTURE_FIELDS
from ulskip_jax.model import ModelConfig, layer_bytes
from ulskip_jax.skipping import PLAN_FILE, plan_layers, read_plan


class ConfigError(ValueError):
  """A run config value (or the workdir) is unusable; the message is one line for the user."""


# Each key's check, from the schema (configs/base.py is its defaults).
FIELDS: dict[str, Callable] = {path: key.check for path, key in config_schema.KEYS.items()}
_GROUPS = config_schema.groups()


# ----------------------------------------------------------------------------------------------
# The pass.

def validate_run(config, workdir: str) -> None:
  """Raises ConfigError (one line) for the first problem of `config` run in `workdir`."""
  try:
    _check_fields(config)
    num_layers, max_position, hf_model = _model_shape(config)
    _check_relations(config, max_position)
    model = _run_model(config, hf_model)
    _check_lora_targets(config, model)
    _check_per_ratio(config)
    _check_plans(config, num_layers, model.attention_windows, workdir, layer_bytes(model))
    _check_mesh(config)
    _check_attention(config, model)
    _check_distill(config, hf_model, model)
    _check_targets(config, hf_model, model)
    _check_workdir(config, workdir, hf_model, model)
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


def _run_model(config, hf_model) -> ModelConfig:
  """The ModelConfig the run will build (`config_schema.model_config`); from scratch its
  vocabulary is the tokenizer's, known later (1 here, and never compared)."""
  if hf_model is not None:
    return config_schema.model_config(config, base=hf_model)
  try:
    return config_schema.model_config(config, vocab_size=1)
  except ValueError as e:  # fields that constrain each other, e.g. one window per layer
    raise ValueError(f"model.{e}") from None


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


def _check_lora_targets(config, model: ModelConfig) -> None:
  """LoRA on, the targets name a projection the model has (a plain MLP has no gate)."""
  targets, mlp = config.optim.lora.targets, model.mlp
  if config.optim.lora.rank and mlp == "plain" and set(targets) <= {"gate"}:
    raise ValueError(f"optim.lora.targets={tuple(targets)!r} names no projection of this model: "
                     "its MLP is plain (no gate); add any of 'q', 'k', 'v', 'o', 'up', 'down'")


def _check_per_ratio(config) -> None:
  """Adapters per ratio: LoRA on, a ratio that skips a layer, and nothing that trains the base."""
  lo = config.optim.lora
  if not lo.per_ratio:
    return
  if not lo.rank:
    raise ValueError("optim.lora.per_ratio=True needs optim.lora.rank > 0 (the adapters' rank), "
                     "not 0")
  ratios = tuple(config.skip.ratios)
  if not any(r > 1 for r in ratios):
    raise ValueError(f"optim.lora.per_ratio=True needs skip.ratios with a ratio above 1 (one "
                     f"adapter set each), not skip.ratios={ratios}")
  for key, value in (("optim.lora.train_norms", lo.train_norms),
                     ("distill.sandwich", config.distill.sandwich),
                     ("skip.full_depth_steps", config.skip.full_depth_steps)):
    if value:
      raise ValueError(f"{key}={value!r} trains the base, which optim.lora.per_ratio=True keeps "
                       "frozen: leave it at its default")
  if config.skip.get("unit", "layer") != "layer":
    raise ValueError(f"skip.unit={config.skip.unit!r} with optim.lora.per_ratio=True is not "
                     "supported: adapters per ratio sit on whole kept layers (skip.unit='layer')")


def _check_plans(config, num_layers: int, windows=None, workdir=None, costs=None) -> None:
  """The skip plan of every ratio the run trains or evaluates, at the model's depth (a sublayer
  unit's by the model's weight bytes, `costs`); a calibrated run's plan file (the workdir's
  plan.json, else skip.plan_file) or what calibration needs."""
  s = config.skip
  used = ([(f"skip.ratios[{i}]", r) for i, r in enumerate(s.ratios)] if len(s.ratios)
          else [("skip.ratio", s.ratio)])
  used += [(f"eval_ratios[{i}]", r) for i, r in enumerate(config.eval_ratios)]
  plan = _calibrated_plan(config, num_layers, workdir) if s.strategy == "calibrated" else None
  for key, ratio in used:
    try:
      if plan is not None:
        plan.plan(ratio, s.unit, costs)
      else:
        plan_layers(num_layers, ratio, s.strategy, seed=config.seed, keep=tuple(s.keep),
                    windows=windows, scores=_placeholder_scores(config, num_layers),
                    unit=s.unit, costs=costs)
    except ValueError as e:
      keep = f", skip.keep={tuple(s.keep)}" if len(s.keep) else ""
      keep += f", skip.unit={s.unit!r}" if s.unit != "layer" else ""
      raise ValueError(f"{key}={ratio!r} cannot be planned on the model's {num_layers} layers "
                       f"(skip.strategy={s.strategy!r}{keep}): {e}") from None


def _multi_process(config) -> bool:
  """Whether the run starts jax.distributed: asking JAX for its devices before
  jax.distributed.initialize would break the start, so device checks wait for the run."""
  dist = config.distributed
  return bool(dist.coordinator_address or dist.num_processes > 1
              or config_schema.auto_distributed(dist))


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
  scores = [None if i in ends else 0.0 for i in range(num_layers)]
  return scores * 2 if config.skip.unit == "sublayer" else scores  # attention, then MLP blocks


def _check_mesh(config) -> None:
  """The mesh against the devices, where that is safe (`_multi_process`)."""
  if _multi_process(config):
    return
  from ulskip_jax import sharding
  try:
    sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  except ValueError as e:
    raise ValueError(f"mesh.shape={tuple(config.mesh.shape)} is invalid here: {e}") from None


def _check_distill(config, hf_model, model: ModelConfig) -> None:
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
  _check_teacher_path("distill.teacher", d.teacher, hf_model, model, "'self', 'init', ")


def _check_targets(config, hf_model, model: ModelConfig) -> None:
  """data.targets='teacher' has a model to generate from (data.teacher, else model.init_from), of
  the student's architecture and vocabulary; data.teacher is not set for nothing."""
  d = config.data
  if d.targets != "teacher":
    if d.teacher:
      raise ValueError(f"data.teacher={d.teacher!r} is set but data.targets={d.targets!r} "
                       "ignores it: set data.targets='teacher', or leave data.teacher empty")
    return
  if d.teacher:
    _check_teacher_path("data.teacher", d.teacher, hf_model, model, "")
  elif not config.model.init_from:
    raise ValueError("data.targets='teacher' needs a model to generate the targets: "
                     "data.teacher (e.g. a fine-tuned training workdir) or model.init_from (its "
                     "weights at full depth); a run from scratch has none")


def _check_teacher_path(key: str, path: str, hf_model, model: ModelConfig, choices: str) -> None:
  """The teacher `path` (the value of `key`) exists and is of the student's architecture and
  vocabulary, read from its checkpoint meta, config.json or GGUF header (no weights);
  `choices`: the key's other allowed values, for the message."""
  steps = checkpoint_steps(os.path.join(path, "checkpoints"))
  try:
    if steps:
      meta_file = os.path.join(path, "checkpoints", str(steps[-1]), "meta", "metadata")
      with open(meta_file, encoding="utf-8") as f:
        teacher = json.load(f)["model_config"]
    else:
      from ulskip_jax import hf
      teacher = dataclasses.asdict(hf.config_from_hf(hf.read_config(path)[0]))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{key}={path!r} cannot be used: {e}; give {choices}a training workdir, a "
                     "Hugging Face folder or a .gguf file") from None
  student = dataclasses.asdict(model)
  if hf_model is None:  # trained from scratch: the vocabulary is the run's tokenizer's, known later
    del student["vocab_size"]
  check_teacher(path, student, teacher, key)


def check_teacher(path: str, student: Mapping, teacher: Mapping,
                  key: str = "distill.teacher") -> None:
  """One line naming each field where the teacher's ModelConfig (a dict) differs from the
  student's in architecture or vocabulary (dtypes, remat and adapters may differ); `key` is the
  config key that names the teacher."""
  differ = [n for n in ARCHITECTURE_FIELDS if n in student and n in teacher
            and _plain(student[n]) != _plain(teacher[n])]
  if differ:
    detail = ", ".join(f"{n}={teacher[n]!r} (student: {_plain(student[n])!r})" for n in differ)
    raise ValueError(f"{key}={path!r} is not the student's architecture: {detail}; "
                     "give a teacher of the student's architecture and vocabulary")


# ----------------------------------------------------------------------------------------------
# The workdir.

def _check_attention(config, model: ModelConfig) -> None:
  """An explicit model.attention_impl computes the model's attention (`attention.unfit_reason`),
  and "cudnn" has a GPU, where asking is safe."""
  m = config.model
  reason = attention.unfit_reason(model, m.attention_impl)
  if reason is None and m.attention_impl == "cudnn" and not _multi_process(config):
    if jax.default_backend() != "gpu":
      reason = f"cuDNN's fused attention needs an NVIDIA GPU (the backend is {jax.default_backend()})"
  if reason:
    raise ValueError(f"model.attention_impl={m.attention_impl!r} cannot compute this model's "
                     f"attention: {reason}; use 'einsum' or 'auto'")


def _check_workdir(config, workdir: str, hf_model, model: ModelConfig) -> None:
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
  _check_same_model(config, workdir, step, hf_model, model)


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


def _check_same_model(config, workdir: str, step: int, hf_model, model: ModelConfig) -> None:
  """The model the checkpoint holds is the one the config describes (restoring other shapes
  would fail as an 'unreadable' checkpoint, which it is not)."""
  meta_file = os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")
  try:
    with open(meta_file, encoding="utf-8") as f:
      saved = json.load(f)["model_config"]
  except (OSError, ValueError, KeyError, TypeError):
    return  # unreadable meta: the restore reports it, with the earlier steps to pick from
  _check_same_adapters(config, workdir, step, saved)
  # From scratch, the vocabulary is the tokenizer's, saved in the workdir.
  names = [n for n in ARCHITECTURE_FIELDS if hf_model is not None or n != "vocab_size"]
  source = hf_model and f"model.init_from={config.model.init_from!r}"
  wanted = {n: getattr(model, n) for n in names}
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
