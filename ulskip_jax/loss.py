"""The training loss: unembedding and cross-entropy fused, on the loss tokens only.

`xent_sums` returns the summed cross-entropy of the logits x @ W over the loss-masked tokens and
their count, as `optax.softmax_cross_entropy_with_integer_labels(unembed(x), targets)` summed
under the mask would, with two differences in cost:
  * Its gradient is computed in the forward pass (a `jax.custom_vjp`): softmax - one-hot, times
    W for x and times x for W. The [tokens, vocab] logits are never kept for the backward pass,
    where autodiff keeps them and their softmax (twice the size of the model's largest activation
    at a 49k vocabulary).
  * Only the loss tokens are unembedded. Each row's loss tokens are gathered, in row order, into a
    buffer of `capacity` slots (static: one executable), and the gradient for x is scattered back.
    A batch with a row of more loss tokens runs whole rows instead (a `lax.cond` in the forward
    pass, which autodiff never sees), so the result never depends on the capacity.

`distill_sums` is the same machinery for knowledge distillation: per loss token,
alpha * T^2 * KL(teacher || student) at temperature T plus (1 - alpha) * cross-entropy, with the
teacher's logits made from its own hidden states and unembedding in the same buffer and given no
gradient. `model_xent_sums` and `model_distill_sums` take a `Decoder` (final norm, tied or
untied unembedding, soft cap), so the model never imports its training loss.

Shapes: B batch, T row length, C buffer slots per row, D model width, V vocabulary, N tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ulskip_jax import ops, prompt_buffer

Array = jax.Array
CAPACITY = 0.5  # default buffer slots per row, as a fraction of the row length


def xent_sums(x_BTD: Array, w: Array, targets_BT: Array, mask_BT: Array, *, tied: bool,
              softcap: float | None = None, capacity: int | None = None) -> tuple[Array, Array]:
  """(summed cross-entropy over the masked tokens, their count), both f32.

  x_BTD: final hidden states (after the final norm), in the compute dtype. w: the embedding
  [V, D] when `tied`, else the output projection [D, V]; logits are x @ W in x's dtype, then f32,
  then soft-capped at `softcap` (None = not). capacity: buffer slots per row (static); None or
  >= T = whole rows.
  """
  return _xent_sums(x_BTD, w, targets_BT, jnp.asarray(mask_BT, jnp.float32), tied, softcap,
                    capacity)


def _rows(x_BTD, w, targets_BT, mask_BT, tied, softcap, with_grads):
  """Loss sum, count and (with_grads) the gradients for x and w, over whole rows."""
  W_DV = (w.T if tied else w).astype(x_BTD.dtype)
  x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
  z = (x_ND @ W_DV).astype(jnp.float32)
  logits = ops.softcap(z, softcap)
  targets, mask = targets_BT.reshape(-1), mask_BT.reshape(-1)
  lse = jax.nn.logsumexp(logits, -1)
  target_logit = jnp.take_along_axis(logits, targets[:, None], -1)[:, 0]
  sums = jnp.sum((lse - target_logit) * mask), jnp.sum(mask)
  if not with_grads:
    return sums
  # d loss / d logits = (softmax - one-hot) * mask.
  one_hot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == targets[:, None]
  g = (jnp.exp(logits - lse[:, None]) - one_hot) * mask[:, None]
  return sums, _input_grads(g, logits, softcap, x_BTD, x_ND, w, W_DV, tied)


def _input_grads(g, logits, softcap, x_BTD, x_ND, w, W_DV, tied):
  """(dx, dw) from g = d loss / d (soft-capped) logits, through the soft cap (1 - tanh^2)."""
  if softcap is not None:
    g = g * (1 - jnp.square(logits / softcap))
  g = g.astype(x_BTD.dtype)
  dx = (g @ W_DV.T).reshape(x_BTD.shape)
  dw = g.T @ x_ND if tied else x_ND.T @ g
  return dx, dw.astype(w.dtype)


def _run(rows, x_BTD, w, per_token, mask_BT, capacity, with_grads):
  """rows(x, w, *per_token, mask) over the buffer of loss tokens, or whole rows when it does not
  fit; with_grads: rows returns (sums, (dx, dw)) and dx is scattered back to [B, T, D]."""
  if capacity is None or capacity >= x_BTD.shape[1]:
    return rows(x_BTD, w, *per_token, mask_BT)
  buffer = prompt_buffer.select(mask_BT > 0, capacity)

  def compact(x_BTD, w, per_token):
    gather = functools.partial(prompt_buffer.gather, buffer=buffer)
    out = rows(gather(x_BTD), w, *map(gather, per_token), gather(mask_BT))
    if not with_grads:
      return out
    sums, (dx_BCD, dw) = out
    return sums, (prompt_buffer.scatter(jnp.zeros_like(x_BTD), dx_BCD, buffer), dw)

  return jax.lax.cond(buffer.fits, compact, lambda x, w, a: rows(x, w, *a, mask_BT),
                      x_BTD, w, per_token)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _xent_sums(x_BTD, w, targets_BT, mask_BT, tied, softcap, capacity):
  rows = functools.partial(_rows, tied=tied, softcap=softcap, with_grads=False)
  return _run(rows, x_BTD, w, (targets_BT,), mask_BT, capacity, with_grads=False)


def _fwd(x_BTD, w, targets_BT, mask_BT, tied, softcap, capacity):
  rows = functools.partial(_rows, tied=tied, softcap=softcap, with_grads=True)
  return _run(rows, x_BTD, w, (targets_BT,), mask_BT, capacity, with_grads=True)


def _bwd(tied, softcap, capacity, grads, cotangents):
  dx, dw = grads
  g_loss = cotangents[0]  # the count is constant
  return (g_loss.astype(dx.dtype) * dx, g_loss.astype(dw.dtype) * dw, None, None)


_xent_sums.defvjp(_fwd, _bwd)


def distill_sums(x_BTD: Array, w: Array, teacher_x_BTD: Array, teacher_w: Array,
                 targets_BT: Array, mask_BT: Array, *, tied: bool, alpha: float,
                 temperature: float, softcap: float | None = None,
                 capacity: int | None = None) -> tuple[Array, Array]:
  """(summed distillation loss over the masked tokens, their count), both f32.

  Per token: alpha * temperature^2 * KL(softmax(t / temperature) || softmax(s / temperature))
  + (1 - alpha) * cross-entropy(s, target), where s = unembed(x) are the student's logits and
  t = unembed(teacher_x) with `teacher_w` the teacher's (the temperature^2 keeps the KL's
  gradient on the cross-entropy's scale, as in Hinton et al.). The teacher's inputs get no
  gradient. Other arguments as `xent_sums`'; alpha and temperature are static.
  """
  return _distill_sums(x_BTD, w, jax.lax.stop_gradient(teacher_x_BTD),
                       jax.lax.stop_gradient(teacher_w), targets_BT,
                       jnp.asarray(mask_BT, jnp.float32), tied, softcap, capacity, float(alpha),
                       float(temperature))


def _distill_rows(x_BTD, w, teacher_x_BTD, targets_BT, mask_BT, *, teacher_w, tied, softcap,
                  alpha, temperature, with_grads):
  """Distillation loss sum, count and (with_grads) the student's gradients, over whole rows."""
  def logits_of(x_BTD, w):
    W_DV = (w.T if tied else w).astype(x_BTD.dtype)
    x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
    return x_ND, W_DV, ops.softcap((x_ND @ W_DV).astype(jnp.float32), softcap)

  x_ND, W_DV, logits = logits_of(x_BTD, w)
  _, _, teacher_logits = logits_of(teacher_x_BTD, teacher_w)
  mask = mask_BT.reshape(-1)
  log_q = jax.nn.log_softmax(logits / temperature)
  log_p = jax.nn.log_softmax(teacher_logits / temperature)
  p = jnp.exp(log_p)
  per_token = alpha * temperature**2 * jnp.sum(p * (log_p - log_q), -1)
  # d loss / d logits: alpha * T * (q_T - p_T) + (1 - alpha) * (softmax - one-hot).
  g = alpha * temperature * (jnp.exp(log_q) - p)
  if alpha < 1:
    targets = targets_BT.reshape(-1)
    lse = jax.nn.logsumexp(logits, -1)
    target_logit = jnp.take_along_axis(logits, targets[:, None], -1)[:, 0]
    per_token = per_token + (1 - alpha) * (lse - target_logit)
    one_hot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == targets[:, None]
    g = g + (1 - alpha) * (jnp.exp(logits - lse[:, None]) - one_hot)
  sums = jnp.sum(per_token * mask), jnp.sum(mask)
  if not with_grads:
    return sums
  return sums, _input_grads(g * mask[:, None], logits, softcap, x_BTD, x_ND, w, W_DV, tied)


def _distill_run(x_BTD, w, teacher_x_BTD, teacher_w, targets_BT, mask_BT, tied, softcap,
                 capacity, alpha, temperature, with_grads):
  rows = functools.partial(_distill_rows, teacher_w=teacher_w, tied=tied, softcap=softcap,
                           alpha=alpha, temperature=temperature, with_grads=with_grads)
  return _run(rows, x_BTD, w, (teacher_x_BTD, targets_BT), mask_BT, capacity, with_grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _distill_sums(x_BTD, w, teacher_x_BTD, teacher_w, targets_BT, mask_BT, tied, softcap,
                  capacity, alpha, temperature):
  return _distill_run(x_BTD, w, teacher_x_BTD, teacher_w, targets_BT, mask_BT, tied, softcap,
                      capacity, alpha, temperature, with_grads=False)


def _distill_fwd(x_BTD, w, teacher_x_BTD, teacher_w, targets_BT, mask_BT, tied, softcap,
                 capacity, alpha, temperature):
  return _distill_run(x_BTD, w, teacher_x_BTD, teacher_w, targets_BT, mask_BT, tied, softcap,
                      capacity, alpha, temperature, with_grads=True)


def _distill_bwd(tied, softcap, capacity, alpha, temperature, grads, cotangents):
  dx, dw = grads
  g_loss = cotangents[0]
  return (g_loss.astype(dx.dtype) * dx, g_loss.astype(dw.dtype) * dw, None, None, None, None)


_distill_sums.defvjp(_distill_fwd, _distill_bwd)


# ----------------------------------------------------------------------------------------------
# On a Decoder's outputs.

def unembedding(model) -> tuple[Array, bool]:
  """(w, tied) of a `Decoder`: its embedding [V, D] when tied, else its lm_head [D, V]."""
  tied = model.cfg.tie_embeddings
  return (model.embed[...] if tied else model.lm_head[...]), tied


def model_xent_sums(model, x_BTD: Array, targets_BT: Array, mask_BT: Array,
                    capacity: int | None = None) -> tuple[Array, Array]:
  """`xent_sums` of `model.unembed(x_BTD)`: x_BTD is `Decoder.hidden`'s output (before the final
  norm); capacity as `xent_sums`'."""
  w, tied = unembedding(model)
  return xent_sums(model.final_norm(x_BTD), w, targets_BT, mask_BT, tied=tied,
                   softcap=model.cfg.final_softcap, capacity=capacity)


def model_distill_sums(model, x_BTD: Array, teacher, teacher_x_BTD: Array, targets_BT: Array,
                       mask_BT: Array, *, alpha: float, temperature: float,
                       capacity: int | None = None) -> tuple[Array, Array]:
  """`distill_sums` of a student `Decoder`'s hidden states against a teacher `Decoder`'s (of the
  same architecture; the same model for self-distillation), both before the final norm."""
  w, tied = unembedding(model)
  teacher_w, _ = unembedding(teacher)
  return distill_sums(model.final_norm(x_BTD), w, teacher.final_norm(teacher_x_BTD), teacher_w,
                      targets_BT, mask_BT, tied=tied, alpha=alpha, temperature=temperature,
                      softcap=model.cfg.final_softcap, capacity=capacity)
