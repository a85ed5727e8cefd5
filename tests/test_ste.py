"""Straight-through-estimator masks: exact sparsity in every forward, gradients to the dense weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jprune as jp


def _problem():
  rng = np.random.default_rng(0)
  params = {"Dense_0": {"kernel": jnp.asarray(rng.standard_normal((12, 24)) * 0.3, jnp.float32),
                        "bias": jnp.zeros(24)},
            "Dense_1": {"kernel": jnp.asarray(rng.standard_normal((24, 3)) * 0.3, jnp.float32),
                        "bias": jnp.zeros(3)}}
  x = jnp.asarray(rng.standard_normal((256, 12)), jnp.float32)
  teacher = jnp.asarray(rng.standard_normal((12, 3)), jnp.float32)
  y = jnp.tanh(x @ teacher)

  def loss(p):
    h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"][None])
    return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"][None] - y) ** 2)

  return params, loss


@pytest.mark.parametrize("soft_steps", [0, 100])
def test_ste_exact_sparsity_each_step_and_loss_decreases(soft_steps):
  params, loss = _problem()
  pruner = jp.ste(0.8, soft_steps=soft_steps)
  tx = optax.sgd(0.1, momentum=0.9)
  state = tx.init(params)

  @jax.jit
  def step(p, s, t):
    l, g = jax.value_and_grad(lambda p: loss(pruner.apply(p, t)))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, l

  apply_fn, masks_fn = jax.jit(pruner.apply), jax.jit(pruner.masks)
  losses, changed = [], 0
  prev = masks_fn(params)
  for t in range(300):
    eff = apply_fn(params, jnp.int32(t))
    for path, w in jp._tree.leaves_with_paths(eff):
      if path.endswith("kernel"):
        zeros = int(np.sum(np.asarray(w) == 0.0))
        if t >= soft_steps:
          assert zeros == round(0.8 * w.size), (t, path, zeros)   # exact target in every hard forward
    params, state, l = step(params, state, jnp.int32(t))
    losses.append(float(l))
    m = masks_fn(params)
    changed += sum(int((np.asarray(a) != np.asarray(b)).sum()) for a, b in zip(jax.tree.leaves(m),
                                                                                jax.tree.leaves(prev)) if np.ndim(a))
    prev = m
  assert losses[-1] < (0.8 if soft_steps else 0.5) * losses[soft_steps + 5 if soft_steps else 0]
  assert changed > 0                     # masks are learned: recomputed from the dense weights as they move
  final = pruner.finalize(params)
  assert float(loss(final)) == pytest.approx(float(loss(apply_fn(params, jnp.int32(10**6)))), rel=1e-6)
  assert float(jp.sparsity(pruner.masks(params), params)) == pytest.approx(0.8, abs=1e-6)


def test_ste_gradient_reaches_pruned_weights():
  params, loss = _problem()
  pruner = jp.ste(0.5)
  g = jax.grad(lambda p: loss(pruner.apply(p)))(params)
  eff_grad = jax.grad(loss)(pruner.apply(params))
  np.testing.assert_allclose(g["Dense_0"]["kernel"], eff_grad["Dense_0"]["kernel"], rtol=1e-6)
  pruned = ~np.asarray(pruner.masks(params)["Dense_0"]["kernel"])
  assert np.abs(np.asarray(g["Dense_0"]["kernel"])[pruned]).sum() > 0


def test_ste_errors():
  with pytest.raises(ValueError, match="sparsity"):
    jp.ste(1.2)
  with pytest.raises(ValueError, match="needs grads"):
    jp.ste(0.5, criterion=jp.gradient())
  with pytest.raises(ValueError, match="step"):
    jp.ste(0.5, soft_steps=10).apply(_problem()[0])
