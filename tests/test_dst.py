"""Dynamic sparse training: pruned(..., regrow="rigl" | "set") keeps exact per-leaf sparsity and moves masks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jprune as jp
from jprune import transform


def _problem():
  rng = np.random.default_rng(0)
  params = {"Dense_0": {"kernel": jnp.asarray(rng.standard_normal((16, 32)), jnp.float32), "bias": jnp.zeros(32)},
            "Dense_1": {"kernel": jnp.asarray(rng.standard_normal((32, 4)), jnp.float32), "bias": jnp.zeros(4)}}
  x = jnp.asarray(rng.standard_normal((256, 16)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((256, 4)), jnp.float32)

  def loss(p):
    h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"][None])
    return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"][None] - y) ** 2)

  return params, loss


@pytest.mark.parametrize("kind", ["rigl", "set"])
def test_exact_sparsity_every_step_and_masks_move(kind):
  params, loss = _problem()
  tx = jp.pruned(optax.sgd(0.05), schedule=jp.constant(0.8, every=10), regrow=kind, distribution=jp.erk(),
                 regrow_until=150, drop_fraction=0.3)
  targets = jp.erk()(params, 0.8, None)
  keep = {p: x.size - round(float(s) * x.size) for (p, x), s in
          zip(jp._tree.leaves_with_paths(params), jax.tree.leaves(targets)) if p.endswith("kernel")}

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  state, p, prev = tx.init(params), params, None
  regrown_before, regrown_after, losses = 0, 0, []
  for t in range(200):
    p, state = step(p, state)
    masks = jp.masks_of(state)
    for path, m in jp._tree.leaves_with_paths(masks):
      if path in keep:
        assert int(m.sum()) == keep[path], (t, path)
    for (path, w), (_, m) in zip(jp._tree.leaves_with_paths(p), jp._tree.leaves_with_paths(masks)):
      if path in keep:
        assert np.all(np.asarray(w)[~np.asarray(m)] == 0.0), (t, path)
    if prev is not None:
      grown = sum(int((np.asarray(a) & ~np.asarray(b)).sum()) for a, b in
                  zip(jax.tree.leaves(masks), jax.tree.leaves(prev)) if np.ndim(a))
      if t <= 150:
        regrown_before += grown
      else:
        regrown_after += grown
    prev = masks
    losses.append(float(loss(p)))
  assert regrown_before > 50          # connections were regrown while the drop fraction was positive
  assert regrown_after == 0           # cosine decay reached 0 at regrow_until
  assert losses[-1] < losses[10]


def test_rigl_drops_weakest_and_grows_largest_gradients():
  w = jnp.asarray([[0.0, 5.0, 0.1, 3.0], [0.0, 0.2, 4.0, 0.0]], jnp.float32)
  mask = jnp.asarray([[False, True, True, True], [False, True, True, False]])
  grad = jnp.asarray([[9.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 8.0]], jnp.float32)
  keep = transform._drop_grow(w, grad, mask, 5, 0.4, jax.random.key(0), "rigl")  # drop 2: 0.1 and 0.2
  expected = np.asarray([[True, True, False, True], [False, False, True, True]])
  np.testing.assert_array_equal(keep, expected)


def test_dst_argument_errors():
  with pytest.raises(ValueError, match="regrow"):
    jp.pruned(optax.sgd(0.1), schedule=jp.constant(0.5), regrow="grow")
  with pytest.raises(ValueError, match="scope='layer'"):
    jp.pruned(optax.sgd(0.1), schedule=jp.constant(0.5), regrow="rigl", scope="global")
  with pytest.raises(ValueError, match="unstructured"):
    jp.pruned(optax.sgd(0.1), schedule=jp.constant(0.5), regrow="set", granularity="2:4")
