"""Skip-aware fine-tuning: pure train/eval steps and the loop around them.

The step is a module-level pure function (state, batch) -> (state, metrics) over the model's split
state (a pure dict of arrays), jitted once per skip tuple with explicit shardings and the state
donated. The skip tuple is a static argument, so a run that samples ratios from a set builds one
executable per ratio and reuses it (`Trainer.num_compiles`).

Paper mode (the default): the prompt runs every layer and response tokens only the kept layers;
the loss is on response tokens only. "everywhere" mode skips on every token. Skipped layers run
on a buffer of `skip.prompt_capacity` x seq_len prompt tokens per row (`prompt_buffer.py`); a
micro-batch with a row over it runs them on whole rows instead (same result, full cost), and the
step counts such rows (`prompt_overflow_rows`). Where the buffer cannot pay (`skip.prompt_buffer`,
`prompt_buffer.choose`, decided at startup), every micro-batch runs them on whole rows.

Distillation (`distill.teacher` set, docs/distillation.md): the skipped path's loss on response
tokens is alpha * KL(teacher || student) + (1 - alpha) * CE (`loss.distill_sums`), the teacher a
full-depth forward under stop-gradient: of the same weights ("self"), of the frozen
`model.init_from` weights ("init") or of another model of the same architecture (a path). The
sandwich step (`distill.sandwich`) trains full depth on CE and, against that same forward, the
smallest sub-model and one drawn ratio on the distillation loss. Sequence-level distillation
(`data.targets = "teacher"`, `teacher_targets.py`) replaces the train split's targets by a
full-depth teacher's greedy outputs before anything reads them.

With LoRA (`optim.lora.rank` > 0) the step differentiates and updates only the trainable subset
(`lora.split`: adapters, and norms with `optim.lora.train_norms`); the optimizer state is built
for that subset alone, and the frozen weights pass through the step untouched. Adapters per ratio
(`optim.lora.per_ratio`, `ratio_adapters.py`): the model is a frozen base plus one adapter set
per ratio, and each step trains every set on its own ratio's loss (CE, or the distillation loss
against the base at full depth, computed once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from ulskip_jax import calibrate
from ulskip_jax import checkpoint as ckpt_lib
from ulskip_jax import config_check, config_schema
from ulskip_jax import batching, corpora
from ulskip_jax.tokenizer import Tokenizer
from ulskip_jax import lora
from ulskip_jax import memory as memory_lib
from ulskip_jax import loss as loss_lib
from ulskip_jax import prompt_buffer
from ulskip_jax import ratio_adapters
from ulskip_jax import run_log
from ulskip_jax import teacher_targets
from ulskip_jax import sharding as shd
from ulskip_jax.model import Decoder, ModelConfig, layer_bytes
from ulskip_jax.skipping import SkipPlan, plan_for

PyTree = Any


# ----------------------------------------------------------------------------------------------
# Pure functions.

def param_split(optim: ml_collections.ConfigDict):
  """params -> (trainable, frozen) for the run: everything trainable unless LoRA is on."""
  return functools.partial(lora.split, enabled=bool(optim.lora.rank),
                           train_norms=optim.lora.train_norms)


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warmup + cosine decay, global-norm clipping, optional frozen embeddings."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, optim.lr, max(optim.warmup_steps, 1), max(num_steps, optim.warmup_steps + 1),
      end_value=optim.lr * optim.final_lr_fraction)
  # No weight decay on norms and biases (vectors), as in most LLM recipes.
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm),
                   optax.adamw(schedule, optim.b1, optim.b2, weight_decay=optim.weight_decay,
                               mask=decay_mask))
  if optim.freeze_embeddings:  # the ULS authors freeze the embeddings while fine-tuning
    def labels(params):
      return {k: jax.tree.map(lambda _: "frozen" if k in ("embed", "pos_embed") else "train", v)
              for k, v in params.items()}
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx


@dataclasses.dataclass(frozen=True)
class Distill:
  """The distillation loss of a run (static: part of the step's executable)."""
  alpha: float         # weight of the KL term; 1 - alpha on the task's cross-entropy
  temperature: float   # softmax temperature of both distributions in the KL
  sandwich: bool = False  # skip is a tuple of sub-model skips distilled from the step's full depth
  teacher_graphdef: Any = None  # the teacher's graphdef; None = the student's own weights


def distill_spec(config: ml_collections.ConfigDict, teacher_graphdef=None) -> Distill | None:
  """The run's Distill (None when `distill.teacher` is empty: cross-entropy only)."""
  d = config.distill
  if not d.teacher:
    return None
  return Distill(alpha=float(d.alpha), temperature=float(d.temperature), sandwich=d.sandwich,
                 teacher_graphdef=teacher_graphdef)


def _hidden(model, batch, skip, paper, prompt_capacity, prompt_fits, dropout_key):
  x, _ = model.hidden(batch["tokens"], skip=skip, positions_BT=batch["positions"],
                      segment_ids_BT=batch["segment_ids"],
                      full_depth_BT=batch["full_depth"] if paper else None,
                      full_depth_capacity=prompt_capacity, full_depth_fits=prompt_fits,
                      dropout_key=dropout_key)
  return x


def loss_sums(params, graphdef, batch, skip: tuple, paper: bool, *, frozen=None,
              dropout_key=None, prompt_capacity: int | None = None, prompt_fits: bool = False,
              distill: Distill | None = None, teacher_params=None, per_ratio: bool = False):
  """Summed token loss over response tokens, and their count (f32 whatever the dtype).

  params: the whole model's, or with `frozen` the trainable part (`lora.split`).
  prompt_capacity: paper mode's buffer slots per row (`Decoder.hidden`); None = whole rows.
  prompt_fits: the batch is known to fit that buffer (`Decoder.hidden`'s full_depth_fits).
  distill: None = cross-entropy. Else the distillation loss against a full-depth teacher: the
  same weights (teacher_params None), or `teacher_params` of `distill.teacher_graphdef`. With
  `distill.sandwich`, skip is a tuple of skip tuples: cross-entropy at full depth plus the
  distillation loss of each of those sub-models against that full-depth forward.
  per_ratio: skip is a tuple of skip tuples, each one's loss (CE, or with `distill` the
  distillation loss against one full-depth teacher forward) summed: adapters per ratio, where
  each sub-model has its own adapters and the full depth is the frozen base.
  The logits are those of the response tokens only (`loss.model_xent_sums`, a buffer of
  `loss.CAPACITY` of each row).
  """
  model = nnx.merge(graphdef, lora.combine(params, frozen or {}))
  capacity = prompt_buffer.capacity_for(loss_lib.CAPACITY, batch["tokens"].shape[1])
  targets, mask = batch["targets"], batch["loss_mask"]
  if per_ratio:
    teacher, teacher_x = model, None
    if distill is not None:  # the frozen base (or the teacher) at full depth: one forward
      if teacher_params is not None:
        teacher = nnx.merge(distill.teacher_graphdef, teacher_params)
      teacher_x = jax.lax.stop_gradient(_hidden(teacher, batch, (), False, None, False, None))
    total = count = 0.0
    for sub_skip in skip:
      x = _hidden(model, batch, sub_skip, paper, prompt_capacity, prompt_fits, dropout_key)
      if distill is None:
        loss, count = loss_lib.model_xent_sums(model, x, targets, mask, capacity)
      else:
        loss, count = loss_lib.model_distill_sums(
            model, x, teacher, teacher_x, targets, mask, alpha=distill.alpha,
            temperature=distill.temperature, capacity=capacity)
      total += loss
    return total, count
  if distill is not None and distill.sandwich:
    x_full = _hidden(model, batch, (), paper, None, False, dropout_key)
    total, count = loss_lib.model_xent_sums(model, x_full, targets, mask, capacity)
    for sub_skip in skip:
      x = _hidden(model, batch, sub_skip, paper, prompt_capacity, prompt_fits, dropout_key)
      total += loss_lib.model_distill_sums(model, x, model, x_full, targets, mask,
                                           alpha=distill.alpha, temperature=distill.temperature,
                                           capacity=capacity)[0]
    return total, count
  x = _hidden(model, batch, skip, paper, prompt_capacity, prompt_fits, dropout_key)
  if distill is None:
    return loss_lib.model_xent_sums(model, x, targets, mask, capacity)
  if teacher_params is None:  # in-place: no gradient enters the teacher's forward
    teacher = nnx.merge(graphdef, jax.lax.stop_gradient(lora.combine(params, frozen or {})))
  else:
    teacher = nnx.merge(distill.teacher_graphdef, teacher_params)
  teacher_x = _hidden(teacher, batch, (), False, None, False, None)
  return loss_lib.model_distill_sums(model, x, teacher, teacher_x, targets, mask,
                                     alpha=distill.alpha, temperature=distill.temperature,
                                     capacity=capacity)


def train_step(state: dict, batch: dict, skip: tuple, teacher_params=None, *, graphdef,
               optimizer, paper: bool, accum_steps: int, split_params=lora.split_none,
               dropout_seed: int | None = None, prompt_capacity: int | None = None,
               distill: Distill | None = None, per_ratio: bool = False):
  """One optimizer update from `accum_steps` micro-batches; loss normalised by all their tokens.

  split_params: params -> (trainable, frozen); only the trainable part gets gradients and
  updates, and `state["opt_state"]` is the optimizer's state for it. dropout_seed: LoRA dropout
  on, with keys from (seed, step, micro-batch), so a resumed run draws the same masks.
  prompt_capacity, distill, teacher_params, per_ratio: see `loss_sums` (skip is a tuple of skip
  tuples with `distill.sandwich` or `per_ratio`).
  """
  trainable, frozen = split_params(state["params"])

  def micro(carry, xs):
    grad_sum, loss_sum, count = carry
    mb, i = xs
    key = None
    if dropout_seed is not None:
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(dropout_seed), state["step"]), i)
    value_and_grads = lambda capacity, fits: jax.value_and_grad(loss_sums, has_aux=True)(
        trainable, graphdef, mb, skip, paper, frozen=frozen, dropout_key=key,
        prompt_capacity=capacity, prompt_fits=fits, distill=distill,
        teacher_params=teacher_params, per_ratio=per_ratio)
    if paper and skip and prompt_capacity is not None and prompt_capacity < mb["tokens"].shape[1]:
      # One cond around the whole gradient, outside autodiff: the model's cond per skipped layer
      # inside it would cost each layer's zero cotangents and operand copies.
      fits = prompt_buffer.plan(mb["full_depth"], mb["segment_ids"], prompt_capacity).fits
      (l, c), g = jax.lax.cond(fits, lambda: value_and_grads(prompt_capacity, True),
                               lambda: value_and_grads(None, False))
    else:
      (l, c), g = value_and_grads(prompt_capacity, False)
    return (jax.tree.map(jnp.add, grad_sum, g), loss_sum + l, count + c), None

  zeros = jax.tree.map(jnp.zeros_like, trainable)
  if accum_steps == 1:  # no loop: a scan of one costs a pass over the gradients
    (grad_sum, loss_sum, count), _ = micro((zeros, 0.0, 0.0), (batch, 0))
  else:
    micro_batches = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)
    (grad_sum, loss_sum, count), _ = jax.lax.scan(
        micro, (zeros, 0.0, 0.0), (micro_batches, jnp.arange(accum_steps)))
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grad_sum)
  updates, opt_state = optimizer.update(grads, state["opt_state"], trainable)
  params = lora.combine(optax.apply_updates(trainable, updates), frozen)
  metrics = dict(loss=loss_sum / denom, tokens=count, grad_norm=optax.tree.norm(grads))
  if paper and prompt_capacity is not None:
    metrics["prompt_overflow_rows"] = prompt_buffer.overflow_rows(batch["full_depth"],
                                                                  prompt_capacity)
  return dict(params=params, opt_state=opt_state, step=state["step"] + 1), metrics


def eval_step(params, batch, *, graphdef, skip: tuple[int, ...], paper: bool,
              prompt_capacity: int | None = None):
  loss, count = loss_sums(params, graphdef, batch, skip, paper, prompt_capacity=prompt_capacity)
  return dict(loss_sum=loss, tokens=count)


def static_skip(plan: SkipPlan):
  """A plan as the steps' static skip: a layer plan's skipped tuple, a sublayer plan itself (its
  unit changes the graph), () for one that skips nothing."""
  return plan if plan.unit != "layer" else plan.skipped  # a full plan's unit is "layer"


def skip_for_step(config, num_layers: int, step: int, windows=None, costs=None) -> tuple:
  """The static skip tuple of a step: full depth first, then the ratio (or one drawn per step).
  windows: the model's attention_windows (a local/global model keeps its global layers).
  costs: the model's `layer_bytes`, which a sublayer unit (skip.unit) plans by.

  With `distill.sandwich`, a tuple of skip tuples: the smallest sub-model's (the largest ratio),
  then, when there are other ratios, one drawn from them (ratio-1 plans skip nothing and are left
  out). The draw depends only on (seed, step), so a resumed run repeats the same sequence.
  With `optim.lora.per_ratio`, the skip tuples of every ratio that has adapters.
  """
  ratios = tuple(config.skip.ratios) or (config.skip.ratio,)
  plan = lambda ratio: static_skip(plan_for(config, num_layers, ratio, windows, costs))
  rng = np.random.default_rng([config.seed, step])
  if config.optim.lora.per_ratio:  # every ratio's adapters, every step
    return tuple(p.skipped for _, p in ratio_adapters.run_plans(config, num_layers, windows))
  if config.distill.sandwich:
    if step < config.skip.full_depth_steps:
      return ()
    others = [r for r in ratios if r != max(ratios)]
    drawn = (others[rng.integers(len(others))],) if others else ()
    return tuple(s for s in dict.fromkeys(map(plan, (max(ratios),) + drawn)) if s)
  if step < config.skip.full_depth_steps:
    return ()
  return plan(ratios[rng.integers(len(ratios))])


# ----------------------------------------------------------------------------------------------
# Setup helpers.

def maybe_initialize_distributed(dist: ml_collections.ConfigDict) -> None:
  """jax.distributed from explicit flags, or from the environment on TPU pods / SLURM."""
  if dist.coordinator_address:
    jax.distributed.initialize(dist.coordinator_address, dist.num_processes, dist.process_id)
  elif config_schema.auto_distributed(dist):
    jax.distributed.initialize()


def load_tokenizer(config, workdir: str, train_pairs, base_tokenizer=None) -> Tokenizer:
  """The one saved in the workdir, the base model's (`base_tokenizer`, a Hugging Face
  tokenizer), or a BPE trained on the corpus; in chat format when `data.chat`."""
  saved = os.path.join(workdir, "tokenizer")
  if os.path.exists(os.path.join(saved, "tokenizer_config.json")):
    return Tokenizer.load(saved, chat=config.data.chat)
  if base_tokenizer is not None:
    tok = Tokenizer(base_tokenizer, chat=config.data.chat)
  elif config.model.init_from:
    raise ValueError(f"model.init_from={config.model.init_from!r} has no tokenizer: add its "
                     "tokenizer files")
  else:
    texts = [t for p in train_pairs for t in (p["source"], p["target"])]
    tok = Tokenizer.train_bpe(texts, config.data.vocab_size)
    tok.set_chat(config.data.chat)
  if jax.process_index() == 0:
    tmp = saved + f".tmp{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, saved)  # atomic: a resumed run never sees half a tokenizer
  return tok


def init_params(model_cfg: ModelConfig, seed: int, shardings, base_params=None, new_model=None):
  """Parameters as a pure dict, created directly with their shardings (or the base model's,
  plus fresh adapters when `model_cfg` has LoRA and `base_params` none). new_model: rngs -> the
  model (default a `model_cfg` Decoder); base_params are then its frozen part's."""
  new_model = new_model or functools.partial(Decoder, model_cfg)
  make = lambda: nnx.to_pure_dict(nnx.state(new_model(rngs=nnx.Rngs(seed)), nnx.Param))
  if base_params is None:
    return jax.jit(make, out_shardings=shardings)()
  if not model_cfg.lora_rank:
    return jax.device_put(base_params, shardings)
  # Only the adapters are outputs, so XLA drops the random base weights `make` would draw.
  adapter_sh, base_sh = lora.split(shardings, enabled=True)
  adapters = jax.jit(lambda: lora.split(make(), enabled=True)[0], out_shardings=adapter_sh)()
  return lora.combine(adapters, jax.device_put(base_params, base_sh))


def load_teacher(config: ml_collections.ConfigDict, student: ModelConfig, base=None):
  """(graphdef, params) of the run's distillation teacher, or None for "self" (or off).

  "init": `base`, the (graphdef, params) of the model.init_from weights. Otherwise a training
  workdir (its latest checkpoint, adapters merged) or what `hf.from_pretrained` reads. Raises a
  one-line ValueError when its architecture or vocabulary differs from the student's.
  """
  path = config.distill.teacher
  if path in ("", "self"):
    return None
  if path == "init":
    return base
  model = load_model(path, config, student)
  return nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))


def load_model(path: str, config: ml_collections.ConfigDict, student: ModelConfig,
               key: str = "distill.teacher"):
  """The model a teacher path names, in the run's dtypes: a training workdir's latest checkpoint
  (adapters merged) or what `hf.from_pretrained` reads. Raises a one-line ValueError naming `key`
  when its architecture or vocabulary differs from the student's."""
  if os.path.isdir(os.path.join(path, "checkpoints")):
    model, _ = ckpt_lib.load_for_inference(path, dtype=config.model.dtype)
  else:
    from ulskip_jax import hf
    model, _ = hf.from_pretrained(path, dtype=config.model.dtype,
                                  param_dtype=config.model.param_dtype)
  config_check.check_teacher(path, dataclasses.asdict(student), dataclasses.asdict(model.cfg), key)
  return model


def with_shardings(abstract_tree, shardings):
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                      abstract_tree, shardings)


# ----------------------------------------------------------------------------------------------
# The loop.

class Trainer:
  """Holds what the loop needs: mesh, jitted steps (one per skip tuple), data and checkpoints."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config, self.workdir = config, workdir
    os.makedirs(workdir, exist_ok=True)
    self.pairs = corpora.load_pairs(config.data)
    self.base_params, base_tokenizer, base = None, None, None
    if config.model.init_from:
      from ulskip_jax import hf
      base, base_tokenizer = hf.from_pretrained(config.model.init_from, dtype=config.model.dtype,
                                                param_dtype=config.model.param_dtype)
      self.model_cfg = config_schema.model_config(config, base=base.cfg)
      self.base_params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
      base = nnx.graphdef(base), self.base_params
    self.tok = load_tokenizer(config, workdir, self.pairs["train"], base_tokenizer)
    if not config.model.init_from:
      self.model_cfg = config_schema.model_config(config, self.tok.vocab_size)
    if config.data.targets == "teacher":  # sequence-level distillation, before anything reads them
      load = (functools.partial(load_model, config.data.teacher, config, self.model_cfg,
                                "data.teacher") if config.data.teacher
              else lambda: nnx.merge(*base))  # model.init_from's weights, at full depth
      self.pairs = teacher_targets.rewrite(config, self.pairs, self.tok,
                                           self.model_cfg.max_position, load)
    # A calibrated run plans from its workdir's plan.json (calibrated here on the first start).
    self.config = calibrate.resolve_plan(config, workdir, self.model_cfg, self.base_params,
                                         self.tok, self.pairs["train"])
    # The run's plan at a ratio, from its config in one place: evaluation, BLEU and the log.
    self.costs = layer_bytes(self.model_cfg)  # what a sublayer unit (skip.unit) plans by
    self.plan = functools.partial(plan_for, self.config, self.model_cfg.num_layers,
                                  windows=self.model_cfg.attention_windows, costs=self.costs)
    self.mesh = shd.make_mesh(config.mesh.shape, config.mesh.axes)
    self.per_ratio = bool(config.optim.lora.per_ratio)
    self.new_model = functools.partial(Decoder, self.model_cfg)
    if self.per_ratio:  # the plans resolved once: the adapters sit on their kept layers
      ratios, plans = zip(*ratio_adapters.run_plans(self.config, self.model_cfg.num_layers,
                                                    self.model_cfg.attention_windows))
      self.new_model = functools.partial(ratio_adapters.RatioAdaptedDecoder, self.model_cfg,
                                         ratios, plans)
    abstract = nnx.eval_shape(lambda: self.new_model(rngs=nnx.Rngs(0)))
    self.abstract_model = abstract
    self.graphdef = nnx.graphdef(abstract)
    self.param_sh = shd.param_shardings(nnx.state(abstract, nnx.Param), self.mesh,
                                        tuple(tuple(r) for r in config.mesh.rules))
    self.abstract_params = with_shardings(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)),
                                          self.param_sh)
    self.batch_sh = shd.batch_sharding(self.mesh)
    self.optimizer = make_optimizer(config.optim, config.num_steps)
    self.split_params = param_split(config.optim)
    self.paper = config.skip.mode == "paper"  # config_check.validate_run checked the values
    # Adapters per ratio: the frozen base at full depth is the "init" teacher too, in place.
    per_ratio_init = self.per_ratio and config.distill.teacher == "init"
    teacher = None if per_ratio_init else load_teacher(config, self.model_cfg, base)
    self.teacher_params, self.teacher_sh = None, None
    if teacher is not None:
      self.teacher_sh = shd.param_shardings(nnx.state(nnx.merge(*teacher), nnx.Param), self.mesh,
                                            tuple(tuple(r) for r in config.mesh.rules))
      # A copy: the student starts from these same arrays, and the step donates its state.
      self.teacher_params = jax.device_put(teacher[1], self.teacher_sh, may_alias=False)
    self.distill = distill_spec(config, teacher and teacher[0])
    # Decided from one device's micro-batch: the buffer's saving and its fixed cost are per device.
    batch_shards = math.prod(self.mesh.shape.get(a, 1) for a in shd.BATCH_AXES)
    self.prompt_choice = prompt_buffer.choose(
        config.skip.prompt_buffer,
        prompt_buffer.capacity_for(config.skip.prompt_capacity, config.data.seq_len),
        self.model_cfg, rows=max(1, config.batch_size // config.optim.accum_steps // batch_shards),
        seq_len=config.data.seq_len, platform=jax.default_backend())
    if config.skip.unit != "layer":  # a sublayer plan's skipped blocks run on whole rows
      self.prompt_choice = dataclasses.replace(self.prompt_choice, capacity=None)
    self.prompt_capacity = self.prompt_choice.capacity
    n_proc = jax.process_count()
    if config.batch_size % (n_proc * config.optim.accum_steps):
      raise ValueError(f"batch_size={config.batch_size} must be divisible by process count "
                       f"{n_proc} x accum_steps {config.optim.accum_steps}")
    self.batcher = batching.Batcher.from_pairs(
        self.tok, config.data.template, self.pairs["train"], config.batch_size // n_proc,
        config.data.seq_len, pack=config.data.pack, seed=config.seed,
        process_index=jax.process_index(), process_count=n_proc)
    self.ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                      save_every=config.checkpoint.every,
                                      keep=config.checkpoint.keep,
                                      async_=config.checkpoint.async_save,
                                      tokenizer_dir=os.path.join(workdir, "tokenizer"))
    self._train_step = None  # jitted once the state's shardings are known (init_state)
    self.num_compiles = 0     # train-step executables built (one per skip tuple)
    self._eval_step = jax.jit(functools.partial(eval_step, graphdef=self.graphdef,
                                                paper=self.paper,
                                                prompt_capacity=self.prompt_capacity),
                              static_argnames=("skip",))

  def init_state(self) -> dict:
    base_params = self.base_params
    if self.per_ratio and base_params is not None:
      base_params = dict(base=base_params)
    params = init_params(self.model_cfg, self.config.seed, self.param_sh, base_params,
                         self.new_model)
    trainable, _ = self.split_params(params)
    opt_state = jax.jit(self.optimizer.init,
                        out_shardings=self._opt_shardings(trainable))(trainable)
    step = jax.device_put(jnp.zeros((), jnp.int32), shd.replicated(self.mesh))
    return self._jit_step_for(dict(params=params, opt_state=opt_state, step=step))

  def memory(self) -> dict:
    """Bytes of params, gradients and optimizer state of this run, from shapes."""
    return memory_lib.memory_bytes(self.abstract_params, self.optimizer, self.split_params,
                        self.teacher_params)

  def _opt_shardings(self, params):
    """Shardings of the optimizer state for (trainable) `params`."""
    # Explicit shardings: left to jit, scalars such as Adam's count land on device 0 alone and
    # the step then rejects a state spread over two device sets (any mesh of more than 1 device).
    return shd.shardings_like_params(jax.eval_shape(self.optimizer.init, params), params,
                                     shd.replicated(self.mesh))

  def _jit_step_for(self, state: dict) -> dict:
    """Jits the train step for `state`'s shardings (traced once per skip tuple); returns state."""
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    step_fn = functools.partial(
        train_step, graphdef=self.graphdef, optimizer=self.optimizer, paper=self.paper,
        accum_steps=self.config.optim.accum_steps, split_params=self.split_params,
        dropout_seed=self.config.seed if self.model_cfg.lora_dropout else None,
        prompt_capacity=self.prompt_capacity, distill=self.distill, per_ratio=self.per_ratio)

    def counted(*args):  # runs only when jit traces, i.e. once per compiled executable
      self.num_compiles += 1
      return step_fn(*args)

    self._train_step = jax.jit(
        counted,
        static_argnums=2, in_shardings=(state_sh, self.batch_sh, self.teacher_sh),
        out_shardings=(state_sh, shd.replicated(self.mesh)), donate_argnums=0)
    return state

  def restore_or_init(self) -> dict:
    cfg = self.config
    if not (cfg.checkpoint.resume and self.ckpt.latest_step() is not None):
      return self.init_state()
    # Restore into abstract targets: a random init first would hold two states in memory at once
    # (and compile an init that is thrown away).
    params = self.abstract_params
    trainable, _ = self.split_params(params)
    opt_state = with_shardings(jax.eval_shape(self.optimizer.init, trainable),
                               self._opt_shardings(trainable))
    params, opt_state, meta = self.ckpt.restore(
        cfg.checkpoint.resume_step or None, params_target=params, opt_state_target=opt_state)
    self.batcher.restore(meta["data"])
    step = jax.device_put(jnp.asarray(meta["step"], jnp.int32), shd.replicated(self.mesh))
    logging.info("resumed from step %d", meta["step"])
    return self._jit_step_for(dict(params=params, opt_state=opt_state, step=step))

  def global_batch(self, local: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(self.batch_sh, v) for k, v in local.items()}

  def step(self, state, local_batch, step: int):
    skip = skip_for_step(self.config, self.model_cfg.num_layers, step,
                         self.model_cfg.attention_windows, self.costs)
    return self._train_step(state, self.global_batch(local_batch), skip, self.teacher_params)

  def evaluate(self, params, ratios) -> dict:
    """Validation loss (per response token) and perplexity per ratio."""
    cfg = self.config
    out = {}
    for ratio in ratios:
      skip = static_skip(self.plan(ratio))
      batches = batching.Batcher.from_pairs(
          self.tok, cfg.data.template, self.pairs["validation"],
          cfg.batch_size // jax.process_count(), cfg.data.seq_len, pack=cfg.data.pack,
          shuffle=False, repeat=False, process_index=jax.process_index(),
          process_count=jax.process_count())
      loss, tokens = 0.0, 0.0
      for i, b in enumerate(batches):
        if i >= cfg.eval_batches:
          break
        m = self._eval_step(params, self.global_batch(b), skip=skip)
        loss, tokens = loss + float(m["loss_sum"]), tokens + float(m["tokens"])
      out[f"val_loss/r{ratio:g}"] = loss / max(tokens, 1.0)
      out[f"val_ppl/r{ratio:g}"] = math.exp(min(out[f"val_loss/r{ratio:g}"], 50.0))
    if cfg.eval_bleu_examples and jax.process_count() == 1:
      out.update(self.bleu(params, ratios))
    return out

  def bleu(self, params, ratios) -> dict:
    """BLEU / chrF per ratio on the first validation examples (greedy, skip as in training)."""
    import sacrebleu
    from ulskip_jax import decode
    cfg = self.config
    pairs = self.pairs["validation"][:cfg.eval_bleu_examples]
    prompts, refs = batching.eval_prompts(self.tok, cfg.data.template, pairs, cfg.data.seq_len)
    model = lora.merge(nnx.merge(self.graphdef, jax.device_get(params)))  # decodes at base cost
    out = {}
    for ratio in ratios:
      ids, _ = decode.generate(model, prompts, skip=self.plan(ratio),
                               max_new_tokens=cfg.eval_max_new_tokens,
                               eos_id=self.tok.eos_id, pad_id=self.tok.pad_id,
                               mode=cfg.skip.mode)
      hyps = [self.tok.decode(x).strip() for x in ids]
      out[f"bleu/r{ratio:g}"] = sacrebleu.corpus_bleu(hyps, [refs]).score
      out[f"chrf/r{ratio:g}"] = sacrebleu.corpus_chrf(hyps, [refs]).score
    return out

  def save(self, state, step: int, force: bool = False) -> None:
    meta = dict(data=self.batcher.state(), config=self.config.to_dict(),
                model_config=dataclasses.asdict(self.model_cfg))
    if self.per_ratio:
      meta[ratio_adapters.META_KEY] = ratio_adapters.meta(self.abstract_model)
    self.ckpt.save(step, state["params"], state["opt_state"], meta, force=force)

  def close(self) -> None:
    """Waits for a pending async save, then stops Orbax's threads."""
    try:
      self.ckpt.wait()
    finally:
      self.ckpt.close()


class Interrupted(KeyboardInterrupt):
  """Ctrl-C stopped training once a checkpoint was saved; the message names the step."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) training; returns the last metrics. Logs JSONL + TensorBoard in workdir.

  The config and the workdir are validated first (`config_check.validate_run`), before any data
  is read or any process group formed. SIGTERM or Ctrl-C (SIGINT, single process): the current
  step finishes, a checkpoint is saved and the loop stops; after Ctrl-C this then raises
  Interrupted, and a second Ctrl-C ends the process at once (exit code 130), saving nothing.
  """
  config_check.validate_run(config, workdir)
  maybe_initialize_distributed(config.distributed)
  trainer = Trainer(config, workdir)
  with ckpt_lib.PreemptionGuard() as guard:
    try:
      last, stopped_at = _train(trainer, guard)
    except BaseException:
      with contextlib.suppress(Exception):  # the error in flight is the one to report
        trainer.close()
      raise
    trainer.close()
  if stopped_at is not None and guard.signal == "SIGINT":
    raise Interrupted(f"interrupted: saved step {stopped_at}; run the same command to resume")
  return last


def _train(trainer: Trainer, guard) -> tuple[dict, int | None]:
  """The loop: (last metrics, the step saved when a signal stopped it, else None)."""
  config, workdir = trainer.config, trainer.workdir
  state = trainer.restore_or_init()
  start = int(state["step"])
  lead = jax.process_index() == 0
  log = run_log.RunLog(workdir, enabled=lead, start_step=start)
  eval_ratios = tuple(config.eval_ratios) or tuple(config.skip.ratios) or (config.skip.ratio,)
  if lead:
    log.text(f"model {trainer.model_cfg.num_layers} layers, "
             f"{sum(x.size for x in jax.tree.leaves(state['params'])) / 1e6:.2f}M params; "
             f"mesh {dict(trainer.mesh.shape)}; steps {start}..{config.num_steps}")
    log.text(memory_lib.memory_line(trainer.memory(), memory_lib.peak_bytes()))
    if trainer.per_ratio:
      log.text(ratio_adapters.params_line(trainer.abstract_model))
    for ratio in dict.fromkeys((tuple(config.skip.ratios) or (config.skip.ratio,)) + eval_ratios):
      log.text(f"plan r{ratio:g}: {trainer.plan(ratio)}")
    if trainer.paper:
      log.text(trainer.prompt_choice.line())
    if start == config.num_steps:
      log.text(f"nothing to train: {workdir} is at step {start} = num_steps")
  from tqdm import tqdm
  bar = tqdm(total=config.num_steps, initial=start, disable=not (lead and config.progress_bar),
             dynamic_ncols=True)
  pending, last, stopped_at = None, {}, None
  t0 = [time.perf_counter()]  # time of the last logged step, for tokens/s
  try:
    for step in range(start, config.num_steps):
      state, metrics = trainer.step(state, next(trainer.batcher), step)
      if pending is not None:  # read step t-1's metrics after dispatching step t
        last = _log_metrics(pending, log, bar, config, t0)
      pending = (step, metrics)
      stop = guard.should_stop(step + 1)
      evaluate = config.eval_every and (step + 1) % config.eval_every == 0
      saves = stop or (step + 1) % config.checkpoint.every == 0 or step + 1 == config.num_steps
      if saves or evaluate:
        # A save or an evaluation waits for this step: read its metrics first, or the step's
        # own time would be left out of its tokens/s as a pause.
        last = _log_metrics(pending, log, bar, config, t0)
        pending = None
      with run_log.paused(bar, t0):
        trainer.save(state, step + 1, force=stop)
      if stop:
        stopped_at = step + 1
        how = "interrupted (Ctrl-C)" if guard.signal == "SIGINT" else "preempted"
        log.text(f"{how}: saved step {step + 1} and stopping")
        break
      if evaluate:
        with run_log.paused(bar, t0, "evaluating"):
          last.update(_eval_and_log(trainer, state, step + 1, eval_ratios, log))
    if pending is not None:
      last.update(_log_metrics(pending, log, bar, config, t0))
    final = int(state["step"])
    if final == config.num_steps:
      trainer.save(state, final, force=True)
      if config.eval_every and final % config.eval_every:
        with run_log.paused(bar, t0, "evaluating"):
          last.update(_eval_and_log(trainer, state, final, eval_ratios, log))
  finally:
    bar.close()  # ends the bar's line, so whatever follows starts on its own
    log.close()
  last["num_compiles"] = trainer.num_compiles
  return last, stopped_at


def _log_metrics(pending, log, bar, config, t0) -> dict:
  step, metrics = pending
  m = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not math.isfinite(m["loss"]):
    raise FloatingPointError(f"loss is {m['loss']} at step {step + 1}: lower optim.lr or check data")
  bar.update(1)
  now = time.perf_counter()
  seconds = max(now - t0[0], 1e-9)
  m["tokens_per_s"] = config.batch_size * config.data.seq_len / seconds  # every row's tokens
  m["response_tokens_per_s"] = m["tokens"] / seconds  # the loss tokens
  t0[0] = now
  if (step + 1) % config.log_every == 0 or step == 0:
    bar.set_postfix({"loss": f"{m['loss']:.3f}", "tok/s": f"{m['tokens_per_s']:.0f}",
                     "response tok/s": f"{m['response_tokens_per_s']:.0f}"})
    log.scalars(step + 1, m)
  return {"train_loss": m["loss"], "step": step + 1}


def _eval_and_log(trainer, state, step, ratios, log) -> dict:
  metrics = trainer.evaluate(state["params"], ratios)
  log.scalars(step, metrics)
  log.text(f"eval @ {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items())))
  return metrics
