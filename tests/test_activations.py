"""Activation statistics recorded through intercept_methods, and the activation / Wanda criteria."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jprune as jp


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(6)(x))
    return nn.Dense(3)(x)


@pytest.fixture
def setup():
  model = MLP()
  params = model.init(jax.random.key(0), jnp.zeros((1, 5)))["params"]
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.standard_normal((8, 5)), jnp.float32) for _ in range(3)]
  return model, params, batches


def test_stats_equal_hand_computed_reference(setup):
  model, params, batches = setup
  stats = jp.activations.record(lambda p, x: model.apply({"params": p}, x), params, batches, progress=False)
  assert set(stats) == {"Dense_0/kernel", "Dense_1/kernel"}
  x = np.concatenate([np.asarray(b) for b in batches])
  w0, b0 = np.asarray(params["Dense_0"]["kernel"]), np.asarray(params["Dense_0"]["bias"])
  y0 = x @ w0 + b0
  h = np.maximum(y0, 0)
  y1 = h @ np.asarray(params["Dense_1"]["kernel"]) + np.asarray(params["Dense_1"]["bias"])
  for path, inp, out in (("Dense_0/kernel", x, y0), ("Dense_1/kernel", h, y1)):
    s = stats[path]
    assert float(s.count) == len(x)
    np.testing.assert_allclose(s.abs_sum, np.abs(out).sum(0), rtol=1e-5)
    np.testing.assert_allclose(s.sq_sum, (out ** 2).sum(0), rtol=1e-5)
    np.testing.assert_allclose(s.pos_sum, np.maximum(out, 0).sum(0), rtol=1e-5)
    np.testing.assert_array_equal(s.nonpos, (out <= 0).sum(0))
    np.testing.assert_allclose(s.in_sq_sum, (inp ** 2).sum(0), rtol=1e-5)
  np.testing.assert_allclose(stats["Dense_0/kernel"].apoz(), (y0 <= 0).mean(0), rtol=1e-6)


def test_apoz_ranks_dead_relu_units_lowest(setup):
  model, params, batches = setup
  dead = [1, 4]
  params = jax.tree.map(lambda x: x, params)
  params["Dense_0"]["bias"] = params["Dense_0"]["bias"].at[jnp.asarray(dead)].set(-100.0)  # never fire
  stats = jp.activations.record(lambda p, x: model.apply({"params": p}, x), params, batches, progress=False)
  np.testing.assert_array_equal(np.asarray(stats["Dense_0/kernel"].apoz())[dead], 1.0)
  for reduce in ("apoz", "mean_relu"):
    scores = jp.scores(jp.activation(stats, reduce=reduce), params)
    masks = jp.topk(scores, 2 / 6, where=r"Dense_0/kernel", granularity=jp.neurons())
    m = np.asarray(masks["Dense_0"]["kernel"])
    assert m.shape == (1, 6)
    assert sorted(np.flatnonzero(~m[0]).tolist()) == dead, reduce
  with pytest.raises(ValueError, match="reduce"):
    jp.activation(stats, reduce="median")


def test_wanda_scores_are_weight_times_input_norm(setup):
  model, params, batches = setup
  stats = jp.activations.record(lambda p, x: model.apply({"params": p}, x), params, batches, progress=False)
  scores = jp.scores(jp.wanda(stats), params)
  x = np.concatenate([np.asarray(b) for b in batches])
  ref = np.abs(np.asarray(params["Dense_0"]["kernel"])) * np.linalg.norm(x, axis=0)[:, None]
  np.testing.assert_allclose(scores["Dense_0"]["kernel"], ref, rtol=1e-5)
  np.testing.assert_allclose(scores["Dense_0"]["bias"], np.abs(params["Dense_0"]["bias"]))
  bad = {"Dense_0/kernel": stats["Dense_1/kernel"]}
  with pytest.raises(ValueError, match="Dense_0/kernel"):
    jp.scores(jp.wanda(bad), params)


def test_conv_channels_from_activity():
  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(4, (3, 3))(x))
      return nn.Dense(2)(x.reshape(x.shape[0], -1))

  model = CNN()
  params = model.init(jax.random.key(1), jnp.zeros((1, 6, 6, 2)))["params"]
  batches = [jax.random.normal(jax.random.key(i), (4, 6, 6, 2)) for i in range(2)]
  stats = jp.activations.record(lambda p, x: model.apply({"params": p}, x), params, batches, progress=False)
  s = stats["Conv_0/kernel"]
  assert float(s.count) == 2 * 4 * 6 * 6 and s.abs_sum.shape == (4,) and s.in_sq_sum.shape == (2,)
  scores = jp.scores(jp.activation(stats), params)
  masks = jp.topk(scores, 0.5, where=r"Conv_0/kernel", granularity=jp.channels())
  assert masks["Conv_0"]["kernel"].shape == (1, 1, 1, 4) and int(masks["Conv_0"]["kernel"].sum()) == 2
  w = jp.scores(jp.wanda(stats), params)["Conv_0"]["kernel"]
  np.testing.assert_allclose(w, np.abs(params["Conv_0"]["kernel"]) * np.sqrt(np.asarray(s.in_sq_sum))[:, None],
                             rtol=1e-5)


def test_nnx_statistics_match_linen_style_reference():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l0 = nnx.Linear(5, 6, rngs=rngs)
      self.l1 = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
      return self.l1(nnx.relu(self.l0(x)))

  model = Net(nnx.Rngs(0))
  rng = np.random.default_rng(1)
  batches = [jnp.asarray(rng.standard_normal((8, 5)), jnp.float32) for _ in range(2)]
  original = nnx.Linear.__call__
  stats = jp.activations.record_nnx(model, batches, progress=False)
  assert nnx.Linear.__call__ is original  # the hook is gone after recording
  assert set(stats) == {"l0/kernel", "l1/kernel"}
  x = np.concatenate([np.asarray(b) for b in batches])
  y0 = x @ np.asarray(model.l0.kernel[...]) + np.asarray(model.l0.bias[...])
  np.testing.assert_allclose(stats["l0/kernel"].abs_sum, np.abs(y0).sum(0), rtol=1e-5)
  np.testing.assert_array_equal(stats["l0/kernel"].nonpos, (y0 <= 0).sum(0))
  np.testing.assert_allclose(stats["l1/kernel"].in_sq_sum, (np.maximum(y0, 0) ** 2).sum(0), rtol=1e-5)
  params = nnx.state(model, nnx.Param)
  scores = jp.scores(jp.activation(stats, reduce="apoz"), params)
  assert scores["l0"]["kernel"].shape == (5, 6)
  np.testing.assert_allclose(np.asarray(scores["l0"]["kernel"])[0], 1 - (y0 <= 0).mean(0), rtol=1e-6)
