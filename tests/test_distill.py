"""Distillation: the fused KL loss equals autodiff of the plain formula, no gradient reaches the
teacher, the sandwich step is the sum of its parts, and a run builds one step per drawn plan."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ulskip_jax import testing as tiny
from tests.test_loss import B, D, T, V, inputs
from ulskip_jax import loss, train_lib
from ulskip_jax.skipping import plan_layers


def reference(x, w, teacher_x, teacher_w, targets, mask, tied, softcap, alpha, temperature):
  """alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE on full logits, teacher constant."""
  def logits_of(x, w):
    logits = jnp.einsum("btd,dv->btv", x, (w.T if tied else w)).astype(jnp.float32)
    return logits if softcap is None else softcap * jnp.tanh(logits / softcap)

  s = logits_of(x, w)
  t = jax.lax.stop_gradient(logits_of(teacher_x, teacher_w))
  p = jax.nn.softmax(t / temperature)
  kl = jnp.sum(p * (jax.nn.log_softmax(t / temperature) - jax.nn.log_softmax(s / temperature)),
               -1)
  xent = optax.softmax_cross_entropy_with_integer_labels(s, targets)
  return ((alpha * temperature**2 * kl + (1 - alpha) * xent) * mask).sum()


def teacher_inputs(tied):
  """A teacher that disagrees with the student: other hidden states and another unembedding."""
  k = jax.random.split(jax.random.key(7), 2)
  teacher_x = jax.random.normal(k[0], (B, T, D))
  teacher_E = jax.random.normal(k[1], (V, D)) * 0.5
  return teacher_x, teacher_E if tied else teacher_E.T


# tied or not, soft cap or not, buffer: whole rows, fits, overflows; then KL only and CE only.
CASES = [(tied, softcap, capacity, 0.5, 2.0) for tied in (True, False) for softcap in (None, 3.0)
         for capacity in (None, 12, 8)] + [(True, 3.0, 12, 1.0, 1.5), (False, None, 8, 0.0, 1.0)]


@pytest.mark.parametrize("tied,softcap,capacity,alpha,temperature", CASES)
def test_loss_and_gradients_equal_autodiff_of_the_plain_formula(tied, softcap, capacity, alpha,
                                                                temperature):
  x, E, targets, mask = inputs()
  w = E if tied else E.T
  teacher_x, teacher_w = teacher_inputs(tied)
  sums = lambda x, w, tx, tw: loss.distill_sums(
      x, w, tx, tw, targets, mask, tied=tied, softcap=softcap, capacity=capacity, alpha=alpha,
      temperature=temperature)
  fused = lambda *args: sums(*args)[0]
  plain = lambda x, w, tx, tw: reference(x, w, tx, tw, targets, mask, tied, softcap, alpha,
                                         temperature)
  args = (x, w, teacher_x, teacher_w)
  l1, g1 = jax.jit(jax.value_and_grad(fused, (0, 1, 2, 3)))(*args)
  l0, g0 = jax.value_and_grad(plain, (0, 1, 2, 3))(*args)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  # The primal alone, and the count, from one compiled call (op by op, it took seconds a case).
  primal, count = jax.jit(sums)(*args)
  np.testing.assert_allclose(primal, l0, rtol=1e-6)
  for name, a, b in zip(("x", "w"), g1, g0):
    np.testing.assert_allclose(a, b, atol=1e-6, err_msg=name)
  assert float(jnp.abs(g1[0]).max()) > 1e-3, "vacuous: the student gets no gradient"
  for name, g in zip(("teacher_x", "teacher_w"), g1[2:]):
    assert not np.any(np.asarray(g)), f"a gradient reached the teacher's {name}"
  assert count == mask.sum()


def test_the_kl_of_a_teacher_equal_to_the_student_is_zero():
  x, E, targets, mask = inputs()
  value, (dx,) = jax.value_and_grad(
      lambda x: loss.distill_sums(x, E, x, E, targets, mask, tied=True, alpha=1.0,
                                  temperature=2.0, capacity=12)[0], (0,))(x)
  assert abs(float(value)) < 1e-4 and float(jnp.abs(dx).max()) < 1e-5


def test_no_logits_are_kept_for_the_backward_pass():
  x, E, targets, mask = inputs()
  teacher_x, teacher_E = teacher_inputs(True)
  fused = lambda x, w: loss.distill_sums(x, w, teacher_x, teacher_E, targets, mask, tied=True,
                                         alpha=0.5, temperature=2.0, capacity=13)[0]
  shapes = [a.shape for a in jax.tree.leaves(jax.vjp(fused, x, E)[1])]
  assert all(s in ((B, T, D), (V, D), ()) for s in shapes), shapes


# ----------------------------------------------------------------------------------------------
# The step's losses on a tiny model.

SKIP_2X = plan_layers(4, 2, "top").skipped
SKIP_4X = plan_layers(4, 4, "top").skipped


@functools.lru_cache(maxsize=1)
def _model_and_batch():
  model = tiny.tiny_model(seed=3, max_position=64)
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)
  rng = np.random.default_rng(0)
  Bm, Tm = 3, 24
  tokens = rng.integers(3, model.cfg.vocab_size, (Bm, Tm)).astype(np.int32)
  full_depth = np.arange(Tm)[None] < np.array([[10], [14], [8]])  # each row's prompt first
  batch = dict(tokens=tokens, targets=np.roll(tokens, -1, 1),
               loss_mask=(~full_depth).astype(np.float32),
               positions=np.broadcast_to(np.arange(Tm, dtype=np.int32), (Bm, Tm)).copy(),
               segment_ids=np.ones((Bm, Tm), np.int32), full_depth=full_depth)
  batch["loss_mask"][:, -1] = 0
  return params, graphdef, batch


@functools.lru_cache(maxsize=None)
def _sums_and_grads(skip, distill=None, frozen_teacher=False):
  """((loss sum, count), gradient) of `train_lib.loss_sums` in paper mode; frozen_teacher: the
  teacher is a copy of the weights passed in as a constant."""
  params, graphdef, batch = _model_and_batch()
  if frozen_teacher:
    distill = dataclasses.replace(distill, teacher_graphdef=graphdef)
  fn = lambda p, t: train_lib.loss_sums(p, graphdef, batch, skip, True, distill=distill,
                                        teacher_params=t)
  teacher = jax.tree.map(jnp.array, params) if frozen_teacher else None
  return jax.jit(jax.value_and_grad(fn, has_aux=True))(params, teacher)


def _assert_trees_close(a, b, atol):
  for path, x in jax.tree_util.tree_leaves_with_path(a):
    y = functools.reduce(lambda t, k: t[k.key], path, b)
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


DISTILL = train_lib.Distill(alpha=0.5, temperature=2.0)


def test_the_self_teacher_is_a_constant_copy_of_the_weights():
  """Distilling from the same weights ("self") gives the gradient of distilling from a frozen
  copy of them: nothing flows back through the teacher's forward."""
  (l_self, _), g_self = _sums_and_grads(SKIP_2X, DISTILL)
  (l_copy, _), g_copy = _sums_and_grads(SKIP_2X, DISTILL, frozen_teacher=True)
  np.testing.assert_allclose(l_self, l_copy, rtol=1e-6)
  # Two graphs: the embedding's scatter-adds may sum in another f32 order (XLA:CPU's older
  # emitters do), as in the sandwich test below.
  _assert_trees_close(g_self, g_copy, atol=1e-5)


def test_the_sandwich_is_the_sum_of_its_separate_losses():
  """CE at full depth + KD(4x vs that full depth) + KD(2x vs it): loss and gradient."""
  (l_sw, c_sw), g_sw = _sums_and_grads((SKIP_4X, SKIP_2X),
                                       dataclasses.replace(DISTILL, sandwich=True))
  (l_ce, c_ce), g_ce = _sums_and_grads(())
  (l_4, _), g_4 = _sums_and_grads(SKIP_4X, DISTILL, frozen_teacher=True)
  (l_2, _), g_2 = _sums_and_grads(SKIP_2X, DISTILL, frozen_teacher=True)
  assert c_sw == c_ce
  np.testing.assert_allclose(l_sw, l_ce + l_4 + l_2, rtol=1e-6)
  # One backward pass adds the three paths' cotangents in another order than three separate
  # gradients summed afterwards: the embedding's scatter-adds differ in the f32 rounding.
  _assert_trees_close(g_sw, jax.tree.map(lambda a, b, c: a + b + c, g_ce, g_4, g_2), atol=3e-5)
  assert min(float(l_4), float(l_2)) > 1e-3, "vacuous: a sub-model already equals full depth"


def test_the_sandwich_step_builds_one_executable_per_drawn_plan(tmp_path):
  """Ratios (1, 2, 4) on 4 layers: every step trains the 4x plan, and draws 2x or 1x (which
  skips nothing, so it adds no path): two plans, two executables, each built once."""
  from configs import tiny as tiny_config
  cfg = tiny_config.get_config()
  cfg.skip.ratios = (1.0, 2.0, 4.0)
  cfg.skip.strategy = "top"
  cfg.distill.teacher = "self"
  cfg.distill.sandwich = True
  cfg.skip.prompt_capacity = 1.0  # whole rows: no buffer branch to compile
  trainer = train_lib.Trainer(cfg, str(tmp_path))
  state = trainer.init_state()
  seen, losses = [], []
  for step in range(5):  # the draws of seed 0: 2x, 2x, 2x, 2x, 1x
    skips = train_lib.skip_for_step(cfg, 4, step)
    assert skips in ((SKIP_4X,), (SKIP_4X, SKIP_2X)), skips
    before = trainer.num_compiles
    state, metrics = trainer.step(state, next(trainer.batcher), step)
    assert trainer.num_compiles - before == (skips not in seen)
    seen.append(skips)
    losses.append(float(metrics["loss"]))
  trainer.ckpt.close()
  assert len(set(seen)) == 2, seen
  assert all(np.isfinite(losses))


@pytest.fixture(scope="module")
def tiny_hf_folder(tmp_path_factory):
  from ulskip_jax import hf
  path = tmp_path_factory.mktemp("teacher")
  hf.save_pretrained(tiny.tiny_model(seed=5, max_position=128), path)
  tiny.save_tiny_tokenizer(path)
  return path


def test_every_teacher_of_the_initial_weights_gives_the_same_first_step(tmp_path,
                                                                         tiny_hf_folder):
  """At step 0 the student's own weights ("self"), the kept initial weights ("init") and the
  same model read from its folder are one teacher: the same first-step loss. Only the last two
  are kept beside the student (the memory line counts them)."""
  from configs import tiny as tiny_config
  losses, memory = {}, {}
  for teacher in ("self", "init", str(tiny_hf_folder)):
    cfg = tiny_config.get_config()
    cfg.model.init_from = str(tiny_hf_folder)
    cfg.skip.prompt_capacity = 1.0
    cfg.distill.teacher = teacher
    trainer = train_lib.Trainer(cfg, str(tmp_path / str(len(losses))))
    state = trainer.init_state()
    _, metrics = trainer.step(state, next(trainer.batcher), 0)
    losses[teacher], memory[teacher] = float(metrics["loss"]), trainer.memory()
    trainer.ckpt.close()
  assert len(set(losses.values())) == 1, losses
  assert "teacher" not in memory["self"]
  assert memory["init"]["teacher"] == memory[str(tiny_hf_folder)]["teacher"] == (
      memory["init"]["params"])
