"""loss.xent_sums: the fused unembedding + cross-entropy equals autodiff of the plain one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tolerance
from ulskip_jax import loss

B, T, D, V = 3, 16, 8, 50
# Loss tokens per row: 12, 7 and 4, each row's last ones (a response after its prompt), and one
# packed row with two responses.
STARTS = np.array([[4], [9], [12]])


def inputs(seed=0, dtype=jnp.float32):
  k = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k[0], (B, T, D), dtype)
  E = (jax.random.normal(k[1], (V, D)) * 0.5).astype(dtype)
  targets = jax.random.randint(k[2], (B, T), 0, V)
  mask = np.arange(T)[None] >= STARTS
  mask[1, 2:5] = True  # row 1: a second segment's response, earlier in the row
  return x, E, targets, jnp.asarray(mask, jnp.float32)


def reference(x, w, targets, mask, tied, softcap):
  logits = jnp.einsum("btd,dv->btv", x, (w.T if tied else w)).astype(jnp.float32)
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return (xent * mask).sum()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("capacity", [None, 12, 13, 8])  # whole rows, fits (edge, +1), overflows
def test_loss_and_gradients_equal_autodiff_of_the_plain_loss(tied, softcap, capacity):
  x, E, targets, mask = inputs()
  w = E if tied else E.T
  sums = lambda x, w: loss.xent_sums(x, w, targets, mask, tied=tied, softcap=softcap,
                                     capacity=capacity)
  fused = lambda x, w: sums(x, w)[0]
  (l1, (dx1, dw1)) = jax.jit(jax.value_and_grad(fused, (0, 1)))(x, w)
  (l0, (dx0, dw0)) = jax.value_and_grad(
      lambda x, w: reference(x, w, targets, mask, tied, softcap), (0, 1))(x, w)
  np.testing.assert_allclose(l1, l0, **tolerance.close(rtol=1e-6))
  # The primal alone, and the count, from one compiled call (op by op, it took seconds a case).
  primal, count = jax.jit(sums)(x, w)
  np.testing.assert_allclose(primal, l0, **tolerance.close(rtol=1e-6))
  np.testing.assert_allclose(dx1, dx0, **tolerance.close(1e-6))
  np.testing.assert_allclose(dw1, dw0, **tolerance.close(1e-6))
  assert count == mask.sum()
  assert np.all(np.asarray(dx1)[np.asarray(mask) == 0] == 0)  # no gradient off the loss tokens


def test_bfloat16_matches_the_plain_loss():
  x, E, targets, mask = inputs(dtype=jnp.bfloat16)
  fused = lambda x, w: loss.xent_sums(x, w, targets, mask, tied=True, capacity=13)[0]
  (l1, g1) = jax.value_and_grad(fused, (0, 1))(x, E)
  (l0, g0) = jax.value_and_grad(lambda x, w: reference(x, w, targets, mask, True, None),
                                (0, 1))(x, E)
  assert g1[0].dtype == g1[1].dtype == jnp.bfloat16
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=2e-2)


def test_no_logits_are_kept_for_the_backward_pass():
  x, E, targets, mask = inputs()
  fused = lambda x, w: loss.xent_sums(x, w, targets, mask, tied=True, capacity=13)[0]
  plain = lambda x, w: reference(x, w, targets, mask, True, None)
  residual_shapes = lambda f: [a.shape for a in jax.tree.leaves(jax.vjp(f, x, E)[1])]
  assert any(s[-1] == V for s in residual_shapes(plain))  # autodiff keeps [B, T, V] arrays
  assert all(s in ((B, T, D), (V, D), ()) for s in residual_shapes(fused)), residual_shapes(fused)
