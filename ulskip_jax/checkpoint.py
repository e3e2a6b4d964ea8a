"""Checkpoints: params, optimizer state, JSON meta and the tokenizer, one Orbax step each.

Layout of one step, `<directory>/<step>/`; each item can be restored alone:
  params/     pytree of (possibly sharded) arrays
  opt_state/  optax state; absent in inference-only saves
  meta/       JSON: step, RNG key data, data position, configs, whatever the caller adds
  tokenizer/  the tokenizer files, verbatim: `AutoTokenizer.from_pretrained` loads it

A step directory only gets its final name once every item is written (Orbax writes to
`<step>.orbax-checkpoint-tmp-*` and renames), so a killed save never looks complete.

Train loop:
  ckpt = Checkpointer(workdir / 'ckpt', save_every=500, keep=3, tokenizer_dir=tok_dir)
  with PreemptionGuard() as guard:
    for step in ...:
      ...
      stop = guard.should_stop(step)
      ckpt.save(step, params, opt_state, meta={'rng': key, 'data': it_state}, force=stop)
      if stop:
        break
  ckpt.close()  # waits for the last async save

Resume:
  params, opt_state, meta = ckpt.restore(config.checkpoint.resume_step or None,
                                         params_target=abstract_params,
                                         opt_state_target=abstract_opt_state)
An unreadable step raises CheckpointError naming the earlier steps, and the user picks one
with --config.checkpoint.resume_step=N (infer.py: --step N): silently training on from an older
step is a choice we leave to the caller, who can pass `fallback=True` to walk back to the newest
readable step.

Inference: `load_for_inference(workdir)` is (model, tokenizer) from a workdir, its checkpoints/
folder or one step folder, with LoRA adapters folded in; it needs nothing of the trainer.
"""

from __future__ import annotations

import dataclasses
import json
import logging as std_logging
import os
import signal
import sys
from typing import Any, Callable, NamedTuple

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ulskip_jax.tokenizer import Tokenizer
from ulskip_jax import lora, ratio_adapters
from ulskip_jax.model import ModelConfig

PyTree = Any

# Files never copied with a tokenizer, so pointing `tokenizer_dir` at a Hugging Face
# model directory does not put a copy of the weights into every step.
_WEIGHT_SUFFIXES = ('.safetensors', '.bin', '.pt', '.pth', '.msgpack', '.h5', '.gguf')
_RESUME_HINT = ('resume from one with --config.checkpoint.resume_step=N, or restore with'
                ' fallback=True')
_INFER_HINT = 'load one with --step N'

# Orbax warns on every read-only manager, i.e. on every inference restore; reading is what we
# asked for, so the notice only adds noise to infer.py's output.
std_logging.getLogger('absl').addFilter(
    lambda record: not record.getMessage().startswith('Given directory is read only'))


class CheckpointError(ValueError):
  """A checkpoint is missing or unreadable; the message is one line for the user."""


# ---- the tokenizer item: a directory of files copied verbatim ----


class _FilesHandler(ocp.CheckpointHandler):
  """Copies the files of a directory into the item directory.

  A blocking handler: tokenizers are a few MB, and Orbax runs blocking handlers inside
  the step's temporary directory, so the copy is as atomic as the arrays.
  """

  def save(self, directory: epath.Path, args: _FilesSave):
    if jax.process_index() != 0:
      return
    for src in epath.Path(args.source).iterdir():
      if src.is_file() and not src.name.endswith(_WEIGHT_SUFFIXES):
        (directory / src.name).write_bytes(src.read_bytes())

  def restore(self, directory: epath.Path, args: _FilesRestore | None = None) -> str:
    return str(directory)


@ocp.args.register_with_handler(_FilesHandler, for_save=True)
@dataclasses.dataclass
class _FilesSave(ocp.args.CheckpointArgs):
  source: str


@ocp.args.register_with_handler(_FilesHandler, for_restore=True)
@dataclasses.dataclass
class _FilesRestore(ocp.args.CheckpointArgs):
  pass


def _json_default(x):
  """Makes the usual non-JSON leaves of a meta dict JSON (called by json.dumps)."""
  if dataclasses.is_dataclass(x):
    return dataclasses.asdict(x)
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)  # restore with jax.random.wrap_key_data(np.array(...))
  if isinstance(x, (jax.Array, np.ndarray, np.generic)):
    return np.asarray(x).tolist()
  raise TypeError(f'meta value of type {type(x).__name__} is not JSON serializable')


def _one_line(e: BaseException) -> str:
  # TensorStore errors carry the whole spec over dozens of lines.
  first = (str(e).strip().splitlines() or [''])[0]
  first = first.split(' See full TensorStore details')[0]
  return f'{type(e).__name__}: {first[:300]}'


def _check_shardings(target: PyTree, name: str):
  # Without a sharding Orbax silently uses the saved one: wrong mesh, or a topology error.
  for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    if hasattr(leaf, 'shape') and getattr(leaf, 'sharding', None) is None:
      raise CheckpointError(
          f'{name} leaf {jax.tree_util.keystr(path)} has no sharding; build targets as'
          ' jax.ShapeDtypeStruct(shape, dtype, sharding=...)'
      )


class Checkpointer:
  """Saves and restores training state with Orbax; see the module docstring.

  Args:
    directory: holds one sub-directory per step.
    save_every: `save` writes only at multiples of this (unless forced).
    keep: how many of the latest steps to keep; None keeps all.
    async_: write in a background thread; `save` returns once arrays are on the host,
      so the caller may donate or overwrite its device buffers right away.
    tokenizer_dir: copied into every step, so a step alone is enough for inference.
    read_only: for inference; never creates, writes or cleans anything.
    hint: how the user picks an earlier step, ending the error for an unreadable one.
  """

  def __init__(
      self,
      directory: str | epath.Path,
      *,
      save_every: int = 1,
      keep: int | None = 3,
      async_: bool = True,
      tokenizer_dir: str | None = None,
      read_only: bool = False,
      hint: str = _RESUME_HINT,
  ):
    self.directory = epath.Path(os.path.abspath(directory))  # Orbax rejects relative paths
    self._tokenizer_dir = tokenizer_dir
    self._hint = hint
    if read_only and not self.directory.is_dir():
      raise CheckpointError(f'checkpoint directory {self.directory} does not exist')
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        # Orbax's default policy also saves the first step it sees (InitialSavePolicy);
        # we want exactly the multiples of save_every, plus JAX's multi-host preemption
        # sync step.
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_every),
            policies.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=policies.LatestN(keep),
        enable_async_checkpointing=async_,
        read_only=read_only,
        create=not read_only,
        # A save killed mid-way leaves a tmp dir; a reader must not delete the tmp dir
        # of a trainer still writing, so only writers clean up.
        cleanup_tmp_directories=not read_only,
        save_interval_steps=0 if read_only else 1,  # read_only warns about anything else
    )
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={
            'params': ocp.StandardCheckpointHandler(),
            'opt_state': ocp.StandardCheckpointHandler(),
            'meta': ocp.JsonCheckpointHandler(),
            'tokenizer': _FilesHandler(),
        },
    )

  def save(
      self,
      step: int,
      params: PyTree,
      opt_state: PyTree | None = None,
      meta: dict | None = None,
      *,
      force: bool = False,
  ) -> bool:
    """Starts saving `step` if it is due (or `force`); returns whether it did.

    `meta` is stored as JSON with `step` added; arrays, PRNG keys and dataclasses in it
    become lists and dicts. Steps at or below the latest saved one are skipped.
    """
    if step in self.all_steps():
      return False  # e.g. a forced final save right after the periodic one
    meta_json = json.loads(json.dumps({**(meta or {}), 'step': step}, default=_json_default))
    items = {'params': ocp.args.StandardSave(params), 'meta': ocp.args.JsonSave(meta_json)}
    if opt_state is not None:
      items['opt_state'] = ocp.args.StandardSave(opt_state)
    if self._tokenizer_dir is not None:
      items['tokenizer'] = _FilesSave(str(self._tokenizer_dir))
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def wait(self):
    """Blocks until the pending async save is on disk (raises if it failed)."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def tokenizer_dir(self, step: int) -> str | None:
    """The step's copy of the tokenizer, or None if it was saved without one."""
    path = self.directory / str(step) / 'tokenizer'
    return str(path) if path.is_dir() else None

  def meta(self, step: int | None = None) -> dict:
    """The JSON meta of `step` (default: the latest), without reading any array."""
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    step = steps[-1] if step is None else step
    if step not in steps:
      raise CheckpointError(f'step {step} not in {self.directory}; available steps: {steps}')
    try:
      return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'checkpoint step {step} in {self.directory} has unreadable meta'
                            f' ({_one_line(e)})') from e

  def restore(
      self,
      step: int | None = None,
      *,
      params_target: PyTree | None = None,
      opt_state_target: PyTree | None = None,
      fallback: bool = False,
  ) -> tuple[PyTree, PyTree | None, dict]:
    """Returns `(params, opt_state, meta)` of `step` (default: the latest).

    Targets are abstract pytrees (`jax.ShapeDtypeStruct(..., sharding=...)`) and set the
    structure, dtype and sharding of the result, so any mesh can read any checkpoint.
    Without `params_target`, params come back as a nested dict of arrays on the default
    device, with string keys (Orbax's metadata keeps no key types): restore against the
    model's abstract state whenever the result is merged into a model. `opt_state` is only read with `opt_state_target` (optax's namedtuples cannot
    be rebuilt from disk); otherwise it is None.

    If the step cannot be read, raises CheckpointError naming the earlier steps; with
    `fallback=True` it instead logs a warning and tries the earlier steps, newest first
    (`meta['step']` says which one was restored).
    """
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise CheckpointError(
          f'step {step} not in {self.directory}; available steps: {steps}')
    for name, target in (('params_target', params_target),
                         ('opt_state_target', opt_state_target)):
      if target is not None:
        _check_shardings(target, name)

    candidates = [s for s in reversed(steps) if s <= step] if fallback else [step]
    first_error = None
    for candidate in candidates:
      try:
        return self._restore_step(candidate, params_target, opt_state_target)
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        earlier = [s for s in steps if s < candidate]
        first_error = first_error or CheckpointError(
            f'checkpoint step {candidate} in {self.directory} is unreadable or corrupt'
            f' ({_one_line(e)}); earlier steps: {earlier or "none"}; {self._hint}'
        )
        if fallback:
          logging.warning('skipping unreadable checkpoint step %d: %s',
                          candidate, _one_line(e))
    raise first_error

  def _restore_step(self, step, params_target, opt_state_target):
    if params_target is None:
      params_target = self._params_on_default_device(step)
    items = {
        'params': ocp.args.StandardRestore(params_target),
        'meta': ocp.args.JsonRestore(),
    }
    if opt_state_target is not None:
      if not (self.directory / str(step) / 'opt_state').is_dir():
        raise CheckpointError(
            f'checkpoint step {step} in {self.directory} has no opt_state'
            ' (saved for inference only)')
      items['opt_state'] = ocp.args.StandardRestore(opt_state_target)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored['params'], restored.get('opt_state'), restored['meta']

  def _params_on_default_device(self, step: int) -> PyTree:
    # Orbax would restore onto the saved sharding, which fails ("Topology mismatch")
    # whenever the device count differs; build a target from the saved shapes instead.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    saved = self._manager.item_metadata(step)['params'].tree
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        saved)


class InferenceCheckpoint(NamedTuple):
  params: PyTree
  meta: dict
  tokenizer_dir: str | None  # the step's own copy, None if saved without one


def restore_params(
    directory: str | epath.Path,
    step: int | None = None,
    *,
    params_target: PyTree | Callable[[dict], PyTree] | None = None,
) -> InferenceCheckpoint:
  """Params, meta (model config, step, ...) and tokenizer path of one step, for infer.py.

  params_target: an abstract tree, or a function of the step's meta that builds one (e.g. the
  model's abstract state from `meta['model_config']`), so the params come back in the model's
  own structure. Without a target Orbax rebuilds the tree from its metadata, where every dict
  key is a string: an `nnx.List` of layers then comes back as keys '0', '1', '10', '11', ...,
  which flatten in string order, and merging that into a model shuffles its layers.
  """
  ckpt = Checkpointer(directory, read_only=True, hint=_INFER_HINT)
  try:
    if callable(params_target):
      params_target = params_target(ckpt.meta(step))
    params, _, meta = ckpt.restore(step, params_target=params_target)
    return InferenceCheckpoint(params, meta, ckpt.tokenizer_dir(meta['step']))
  finally:
    ckpt.close()


def checkpoint_location(path: str, step: int | None = None) -> tuple[str, int | None]:
  """(checkpoints folder, step) for a workdir, its `checkpoints/` folder or one step folder."""
  path = os.path.abspath(path)  # Orbax rejects relative paths
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), step
  name = os.path.basename(path)
  if name.isdigit() and os.path.isdir(os.path.join(path, "params")):  # a step folder
    if step is not None and step != int(name):
      raise ValueError(f"step {step} was given with step folder {path}: give one or the other")
    return os.path.dirname(path), int(name)
  return path, step


def model_config_from_meta(meta: dict, dtype: str | None = None) -> ModelConfig:
  """The ModelConfig a checkpoint's meta records (JSON: tuples came back as lists)."""
  fields = dict(meta["model_config"])
  if dtype:
    fields["dtype"] = dtype
  if fields.get("rope_scaling") is not None:
    fields["rope_scaling"] = tuple(tuple(x) for x in fields["rope_scaling"])
  if "lora_targets" in fields:
    fields["lora_targets"] = tuple(fields["lora_targets"])
  return ModelConfig(**fields)


def load_for_inference(workdir: str, step: int | None = None, dtype: str | None = None,
                       with_config: bool = False):
  """(model, tokenizer) from a training workdir's latest (or given) Orbax checkpoint.

  A LoRA run's adapters come back folded into the base weights (`lora.merge`): the model has no
  adapters and runs at the base model's cost. A run with adapters per ratio comes back as a
  `ratio_adapters.RatioAdaptedDecoder` (the base and every ratio's adapters, unmerged).
  `workdir` may also be its `checkpoints/` folder or one step folder. The params are restored
  against the model's own abstract state (built from the config the checkpoint records), so
  the tree keeps its structure and key types: layer i comes back as layer i.
  The tokenizer formats prompts as training did (chat format if the run used it).
  with_config=True adds the run config (a dict) the checkpoint was trained with, e.g. for its
  prompt template.
  """
  directory, step = checkpoint_location(workdir, step)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = {}

  def target(meta):
    abstract["model"] = nnx.eval_shape(lambda: ratio_adapters.new_model(
        model_config_from_meta(meta, dtype), meta, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(abstract["model"], nnx.Param))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), params)

  restored = restore_params(directory, step, params_target=target)
  model = abstract["model"]
  nnx.replace_by_pure_dict(state := nnx.state(model, nnx.Param), restored.params)
  nnx.update(model, state)
  model = lora.merge(model)
  chat = bool(restored.meta.get("config", {}).get("data", {}).get("chat", False))
  tok = Tokenizer.load(restored.tokenizer_dir, chat) if restored.tokenizer_dir else None
  if with_config:
    return model, tok, restored.meta.get("config", {})
  return model, tok


class PreemptionGuard:
  """Turns SIGTERM (the scheduler's preemption notice) and Ctrl-C into a flag the loop polls.

  Single process: Python handlers for SIGTERM and SIGINT set `requested` (and `signal`, the
  name of the first one); the loop saves (force=True) and exits. A second Ctrl-C ends the
  process at once (exit code 130), saving nothing. Multi-host: JAX's preemption sync manager
  (started by `jax.distributed.initialize`) already owns SIGTERM, and hosts must agree on the
  step to save, so `should_stop` asks it for the sync point instead and no handler is
  installed (Ctrl-C then raises KeyboardInterrupt, as by default: one host cannot stop alone).
  Use as a context manager; the previous handlers come back on exit.
  """

  def __init__(self):
    self.requested = False
    self.signal: str | None = None
    self._previous_handlers = {}
    self._multihost = jax.process_count() > 1

  def __enter__(self):
    if not self._multihost:
      for signum, handler in ((signal.SIGTERM, self._on_sigterm),
                              (signal.SIGINT, self._on_sigint)):
        self._previous_handlers[signum] = signal.signal(signum, handler)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous_handlers.items():
      signal.signal(signum, handler)
    self._previous_handlers = {}

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: will save a checkpoint and stop')
    self.requested = True
    self.signal = self.signal or 'SIGTERM'

  def _on_sigint(self, signum, frame):
    del signum, frame
    if self.signal == 'SIGINT':
      _say('error: interrupted twice: stopping now, without saving')
      os._exit(130)  # pylint: disable=protected-access
    _say('interrupted: finishing this step, saving a checkpoint and stopping (Ctrl-C again to'
         ' stop now)')
    self.requested = True
    self.signal = 'SIGINT'

  def should_stop(self, step: int) -> bool:
    """True once the loop should save `step` and exit; call it every step."""
    if self._multihost and not self.requested:
      try:
        self.requested = multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # jax_enable_preemption_service is off: nothing to sync on
        pass
    return self.requested


def _say(message: str) -> None:
  """One line on stderr, on a line of its own even while a progress bar is drawn."""
  from tqdm import tqdm  # already imported by the loop that draws the bar
  tqdm.write(message, file=sys.stderr)
  sys.stderr.flush()
