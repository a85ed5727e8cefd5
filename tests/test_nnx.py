"""Flax nnx: pruned(...) drops into nnx.Optimizer; structured groups and compaction work on nnx state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jprune as jp
from jprune import structured as S


class MLP(nnx.Module):
  def __init__(self, widths, rngs):
    self.l0 = nnx.Linear(8, widths[0], rngs=rngs)
    self.l1 = nnx.Linear(widths[0], widths[1], rngs=rngs)
    self.l2 = nnx.Linear(widths[1], 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(nnx.relu(self.l0(x)))))


def test_pruned_inside_nnx_optimizer():
  model = MLP((16, 12), nnx.Rngs(0))
  opt = nnx.Optimizer(model, jp.pruned(optax.sgd(0.1, momentum=0.9), schedule=jp.constant(0.75)), wrt=nnx.Param)
  x, y = jnp.ones((4, 8)), jnp.zeros((4, 3))

  @nnx.jit
  def step(model, opt):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    opt.update(model, grads)

  for _ in range(4):
    step(model, opt)
  masks = jp.masks_of(opt.opt_state)
  k = np.asarray(model.l0.kernel[...])
  m = np.asarray(masks["l0"]["kernel"])
  assert m.sum() == 32 and np.all(k[~m] == 0) and np.count_nonzero(k) == 32


def test_groups_and_compaction_on_nnx_state():
  model = MLP((16, 12), nnx.Rngs(0))
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.as_pure(state)
  x = jax.random.normal(jax.random.key(1), (5, 8))
  apply = lambda p, x: nnx.merge(graphdef, p)(x)
  groups = S.groups(apply, params, x)
  prunable = [g for g in groups if g.prunable]
  assert [g.size for g in prunable] == [16, 12]
  assert {(m.path, m.axis) for m in prunable[0].members} == {("l0/bias", 0), ("l0/kernel", 1), ("l1/kernel", 0)}
  gm = S.group_masks(groups, S.group_scores(groups, jp.scores(jp.magnitude(), params)), 0.5, scope="group")
  masks = S.to_param_masks(groups, gm, params)
  masked = jp.apply(params, masks)
  small, widths = S.compact(masked, groups, gm)
  assert small["l0"]["kernel"].shape == (8, 8) and small["l1"]["kernel"].shape == (8, 6)
  small_model = MLP((8, 6), nnx.Rngs(0))
  nnx.update(small_model, small)
  np.testing.assert_allclose(np.asarray(small_model(x)), np.asarray(apply(masked, x)), rtol=1e-5, atol=1e-5)
