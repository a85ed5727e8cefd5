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


class BNNet(nnx.Module):
  def __init__(self, rngs):
    self.l0 = nnx.Linear(8, 16, rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.l1 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.l1(nnx.relu(self.bn(self.l0(x))))


def test_masks_summary_and_apply_take_nnx_states_as_they_come():
  """The issue's case: masks from an nnx.Optimizer's state go straight into summary and apply, next to the model's
  own state (BatchNorm statistics included); counts against numpy; apply keeps the nnx State container."""
  model = BNNet(nnx.Rngs(0))
  opt = nnx.Optimizer(model, jp.pruned(optax.sgd(0.05, momentum=0.9), schedule=jp.constant(0.75)), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (16, 8))

  @nnx.jit
  def step(model, opt):
    opt.update(model, nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model))

  step(model, opt)
  masks = jp.masks_of(opt.opt_state)
  assert type(masks) is dict and type(masks["l0"]["kernel"]) is not nnx.OptVariable
  k0, k1 = np.asarray(masks["l0"]["kernel"]), np.asarray(masks["l1"]["kernel"])
  assert k0.sum() == 32 and k1.sum() == 12                                # 75% of 128 and of 48 pruned
  for params in (nnx.state(model, nnx.Param), nnx.state(model)):        # with BatchStats too
    rows = {r["path"]: r for r in jp.summary(params, masks).to_dict()["leaves"]}
    assert "bn/mean" not in rows and rows["l0/kernel"]["kept"] == 32 and rows["l1/kernel"]["kept"] == 12
    assert rows["bn/scale"]["kept"] == 16
  assert abs(float(jp.sparsity(masks, nnx.state(model, nnx.Param))) - 0.75) < 1e-6
  fresh = BNNet(nnx.Rngs(1))                                              # dense weights: apply must zero
  state = nnx.state(fresh, nnx.Param)
  out = jp.apply(state, masks)
  assert isinstance(out, nnx.State)
  want = np.where(k0, np.asarray(fresh.l0.kernel[...]), 0)
  np.testing.assert_array_equal(np.asarray(out["l0"]["kernel"][...]), want)
  nnx.update(fresh, out)
  np.testing.assert_array_equal(np.asarray(fresh.l0.kernel[...]), want)
