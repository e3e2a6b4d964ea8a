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

Shapes: B batch, T row length, C buffer slots per row, D model width, V vocabulary.
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
  # d loss / d logits = (softmax - one-hot) * mask; through the soft cap, times 1 - tanh^2.
  one_hot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == targets[:, None]
  g = (jnp.exp(logits - lse[:, None]) - one_hot) * mask[:, None]
  if softcap is not None:
    g = g * (1 - jnp.square(logits / softcap))
  g = g.astype(x_BTD.dtype)
  dx = (g @ W_DV.T).reshape(x_BTD.shape)
  dw = g.T @ x_ND if tied else x_ND.T @ g
  return sums, (dx, dw.astype(w.dtype))


def _run(x_BTD, w, targets_BT, mask_BT, tied, softcap, capacity, with_grads):
  rows = functools.partial(_rows, tied=tied, softcap=softcap, with_grads=with_grads)
  if capacity is None or capacity >= x_BTD.shape[1]:
    return rows(x_BTD, w, targets_BT, mask_BT)
  buffer = prompt_buffer.select(mask_BT > 0, capacity)

  def compact(x_BTD, w):
    gather = functools.partial(prompt_buffer.gather, buffer=buffer)
    out = rows(gather(x_BTD), w, gather(targets_BT), gather(mask_BT))
    if not with_grads:
      return out
    sums, (dx_BCD, dw) = out
    return sums, (prompt_buffer.scatter(jnp.zeros_like(x_BTD), dx_BCD, buffer), dw)

  return jax.lax.cond(buffer.fits, compact, lambda x, w: rows(x, w, targets_BT, mask_BT),
                      x_BTD, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _xent_sums(x_BTD, w, targets_BT, mask_BT, tied, softcap, capacity):
  return _run(x_BTD, w, targets_BT, mask_BT, tied, softcap, capacity, with_grads=False)


def _fwd(x_BTD, w, targets_BT, mask_BT, tied, softcap, capacity):
  return _run(x_BTD, w, targets_BT, mask_BT, tied, softcap, capacity, with_grads=True)


def _bwd(tied, softcap, capacity, grads, cotangents):
  dx, dw = grads
  g_loss = cotangents[0]  # the count is constant
  return (g_loss.astype(dx.dtype) * dx, g_loss.astype(dw.dtype) * dw, None, None)


_xent_sums.defvjp(_fwd, _bwd)
