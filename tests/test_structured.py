"""Coupled-axis groups from the jaxpr and compaction: compacted outputs equal masked outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import flax.linen as nn

import jprune as jp
from jprune import structured as S
from jprune.models import LeNet300, LeNet5, ResNet, TransformerBlock, resize

CASES = {
    "lenet300": (LeNet300(), (3, 28, 28, 1)),
    "lenet5": (LeNet5(), (3, 28, 28, 1)),
    "resnet": (ResNet(), (3, 16, 16, 1)),
    "transformer": (TransformerBlock(), (3, 5, 16)),
}


def _setup(name):
  model, shape = CASES[name]
  x = jax.random.normal(jax.random.key(1), shape)
  variables = model.init(jax.random.key(0), x)
  params = variables["params"]
  # give BatchNorm statistics non-trivial values so slicing them matters
  stats = jax.tree.map(lambda s: s + jax.random.uniform(jax.random.key(2), s.shape), variables.get("batch_stats", {}))
  return model, x, params, stats


def _apply(model, params, stats, x):
  return model.apply({"params": params, **({"batch_stats": stats} if stats else {})}, x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_compacted_equals_masked(name):
  model, x, params, stats = _setup(name)
  if stats:
    groups = S.groups(lambda p, b, x: _apply(model, p, b, x), params, stats, x)
  else:
    groups = S.groups(lambda p, x: _apply(model, p, None, x), params, x)
  prunable = [g for g in groups if g.prunable]
  assert prunable
  scores = jp.scores(jp.random(3), params)
  gscores = S.group_scores(groups, scores, reduce="l2")
  gmasks = S.group_masks(groups, gscores, 0.5, scope="group")
  for g, m in zip(groups, gmasks):
    assert int(m.sum()) == (g.size - round(0.5 * g.size) if g.prunable else g.size)
  masks = S.to_param_masks(groups, gmasks, params)
  masked = jp.apply(params, masks)
  if stats:
    small, widths, small_stats = S.compact(masked, groups, gmasks, extra=stats)
  else:
    small, widths = S.compact(masked, groups, gmasks)
    small_stats = None
  small_model = resize(model, small)
  ref = _apply(model, masked, stats, x)
  out = _apply(small_model, small, small_stats, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
  n_before = sum(p.size for p in jax.tree.leaves(params))
  n_after = sum(p.size for p in jax.tree.leaves(small))
  assert n_after < 0.75 * n_before
  assert all(w == g.size - round(0.5 * g.size) for g in prunable
             for k, w in widths.items() if k == f"{g.members[0].path}[{g.members[0].axis}]")


def test_expected_groups_and_shapes():
  model, x, params, _ = _setup("lenet300")
  groups = S.groups(lambda p, x: model.apply({"params": p}, x), params, x)
  hidden = [g for g in groups if g.prunable]
  assert [(g.size, [(m.path, m.axis) for m in g.members]) for g in hidden] == [
      (300, [("Dense_0/bias", 0), ("Dense_0/kernel", 1), ("Dense_1/kernel", 0)]),
      (100, [("Dense_1/bias", 0), ("Dense_1/kernel", 1), ("Dense_2/kernel", 0)])]
  out = [g for g in groups if not g.prunable and g.members[0].path.startswith("Dense_2")]
  assert out and "model output" in out[0].reason
  gm = S.group_masks(groups, S.group_scores(groups, jp.scores(jp.magnitude(), params)), 0.5, scope="group")
  small, widths = S.compact(params, groups, gm)
  assert small["Dense_0"]["kernel"].shape == (784, 150) and small["Dense_1"]["kernel"].shape == (150, 50)
  assert small["Dense_2"]["kernel"].shape == (50, 10)
  # LeNet-5: conv channels flow into the flattened dense input with a spatial pattern
  model, x, params, _ = _setup("lenet5")
  groups = S.groups(lambda p, x: model.apply({"params": p}, x), params, x)
  conv1 = next(g for g in groups if g.members[0].path == "Conv_1/bias")
  dense_in = next(m for m in conv1.members if m.path == "Dense_0/kernel")
  assert conv1.size == 50 and (dense_in.outer, dense_in.inner) == (25, 1)  # 5x5 positions after pooling


def test_residual_stage_shares_one_group():
  model, x, params, stats = _setup("resnet")
  groups = S.groups(lambda p, b, x: _apply(model, p, b, x), params, stats, x)
  stage0 = [g for g in groups if any(m.path == "Conv_0/kernel" and m.axis == 3 for m in g.members)]
  assert len(stage0) == 1
  paths = {(m.path, m.axis) for m in stage0[0].members}
  # stem conv output, every block's second conv output, every block's first conv input, BN stats
  assert {("ResidualBlock_0/Conv_1/kernel", 3), ("ResidualBlock_1/Conv_1/kernel", 3),
          ("ResidualBlock_0/Conv_0/kernel", 2), ("ResidualBlock_1/Conv_0/kernel", 2),
          ("arg1/BatchNorm_0/mean", 0)} <= paths
  inner = [g for g in groups if any(m.path == "ResidualBlock_0/Conv_0/kernel" and m.axis == 3 for m in g.members)]
  assert len(inner) == 1 and inner[0] is not stage0[0] and inner[0].prunable


def test_attention_heads_form_a_group():
  model, x, params, _ = _setup("transformer")
  groups = S.groups(lambda p, x: model.apply({"params": p}, x), params, x)
  heads = [g for g in groups if g.size == 4 and g.prunable]
  assert len(heads) == 1
  assert {(m.path, m.axis) for m in heads[0].members} >= {("query/kernel", 1), ("key/kernel", 1),
                                                          ("value/kernel", 1), ("out/kernel", 0)}


class _WithFFT(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8)(x)
    h = jnp.fft.fft(h).real
    return nn.Dense(2)(h)


def test_unsupported_op_is_reported_not_guessed():
  model = _WithFFT()
  x = jnp.ones((2, 4))
  params = model.init(jax.random.key(0), x)["params"]
  groups = S.groups(lambda p, x: model.apply({"params": p}, x), params, x)
  g = next(g for g in groups if any(m.path == "Dense_0/kernel" and m.axis == 1 for m in g.members))
  assert not g.prunable and g.reason.startswith("fft at ")
  assert "not prunable: fft at" in repr(g)
  with pytest.raises(ValueError, match="not prunable"):
    S.compact(params, [g], [jnp.array([True] * 4 + [False] * 4)])


def test_masked_training_then_compaction():
  """Structured masks are the core's masks: keep_pruned fine-tuning works before compaction."""
  model, x, params, _ = _setup("lenet300")
  groups = S.groups(lambda p, x: model.apply({"params": p}, x), params, x)
  gm = S.group_masks(groups, S.group_scores(groups, jp.scores(jp.magnitude(), params)), 0.5, scope="global",
                     round_to=8)
  assert all(int(m.sum()) % 8 == 0 for g, m in zip(groups, gm) if g.prunable)
  masks = S.to_param_masks(groups, gm, params)
  assert masks["Dense_0"]["kernel"].shape == (1, 300) and masks["Dense_1"]["kernel"].shape == (300, 100)
  params = jp.apply(params, masks)
  tx = optax.chain(optax.sgd(0.1), jp.keep_pruned(masks))
  state = tx.init(params)
  y = jnp.zeros(3, jnp.int32)
  for _ in range(3):
    g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean())(params)
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
  small, _ = S.compact(params, groups, gm)
  np.testing.assert_allclose(np.asarray(resize(model, small).apply({"params": small}, x)),
                             np.asarray(model.apply({"params": params}, x)), rtol=1e-5, atol=1e-5)


def test_merge_folds_a_duplicate_neuron_exactly():
  from jprune import structured
  from jprune.models import LeNet300, resize
  model = LeNet300(widths=(6, 5), num_classes=3)
  x = jax.random.normal(jax.random.key(1), (16, 4))
  params = model.init(jax.random.key(0), x)["params"]
  k0 = params["Dense_0"]["kernel"]
  b0 = params["Dense_0"]["bias"]
  params["Dense_0"]["kernel"] = k0.at[:, 4].set(2.5 * k0[:, 1])   # unit 4 = 2.5 × unit 1 (before the ReLU)
  params["Dense_0"]["bias"] = b0.at[4].set(2.5 * b0[1])
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  groups = [g for g in structured.groups(apply_fn, params, x) if g.prunable]
  g0 = next(i for i, g in enumerate(groups) if g.members[0].path.startswith("Dense_0"))
  gm = [jnp.ones(g.size, bool) for g in groups]
  gm[g0] = gm[g0].at[4].set(False)
  merged, _ = structured.compact(params, groups, gm, merge=True)
  removed, _ = structured.compact(params, groups, gm)
  small = resize(model, merged)
  np.testing.assert_allclose(small.apply({"params": merged}, x), apply_fn(params, x), rtol=1e-5, atol=1e-5)
  assert not np.allclose(small.apply({"params": removed}, x), apply_fn(params, x), atol=1e-3)


def test_merge_keeps_more_accuracy_than_removal_before_fine_tuning():
  import optax
  from jprune import structured
  from jprune.models import LeNet300, resize
  rng = np.random.default_rng(0)
  protos = rng.random((10, 28, 28, 1)).astype(np.float32)
  y = rng.integers(0, 10, 3000).astype(np.int32)
  x = np.clip(protos[y] + 0.6 * rng.standard_normal((3000, 28, 28, 1)).astype(np.float32), 0, 1)
  xt, yt = x[2000:], y[2000:]
  model = LeNet300()
  params = model.init(jax.random.key(0), x[:1])["params"]
  tx = optax.sgd(0.05, momentum=0.9)
  state = tx.init(params)

  @jax.jit
  def step(p, s, xb, yb):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, xb), yb).mean()
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  for i in range(150):
    idx = rng.integers(0, 2000, 64)
    params, state = step(params, state, x[idx], y[idx])
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  groups = structured.groups(apply_fn, params, x[:2])
  gm = structured.group_masks(groups, structured.group_scores(groups, jp.scores(jp.magnitude(), params)), 0.6)

  def evaluate(p):
    logits = resize(model, p).apply({"params": p}, xt)
    return (float(jnp.mean(jnp.argmax(logits, -1) == yt)),
            float(optax.softmax_cross_entropy_with_integer_labels(logits, yt).mean()))

  dense_acc, _ = evaluate(params)
  acc_removed, loss_removed = evaluate(structured.compact(params, groups, gm)[0])
  acc_merged, loss_merged = evaluate(structured.compact(params, groups, gm, merge=True)[0])
  assert dense_acc > 0.9
  assert loss_merged < loss_removed and acc_merged >= acc_removed, (acc_merged, acc_removed)


def test_reductions_over_a_unit_axis_block_the_group():
  """LayerNorm's statistics and a softmax over the hidden units change when units are removed: not prunable."""
  class Norm(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.relu(nn.LayerNorm()(nn.Dense(4)(x))))

  class Soft(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(jax.nn.softmax(nn.Dense(4)(x)))

  x = jnp.ones((2, 5))
  for m, op in ((Norm(), "reduce_sum"), (Soft(), "reduce_max")):
    p = m.init(jax.random.key(0), x)["params"]
    gs = S.groups(lambda p, x: m.apply({"params": p}, x), p, x)
    hidden = [g for g in gs if any(mm.path == "Dense_1/kernel" for mm in g.members) and g.size == 4]
    assert hidden and not any(g.prunable for g in hidden)
    assert op in hidden[0].reason


def test_group_scores_taylor_and_group_masks_arguments():
  model = LeNet300(widths=(8, 6))
  x = jnp.ones((2, 28, 28, 1))
  params = model.init(jax.random.key(0), x)["params"]
  gs = S.groups(lambda p, x: model.apply({"params": p}, x), params, x)
  signed = jax.tree.map(lambda w: w - jnp.mean(w), params)
  taylor = S.group_scores(gs, signed, reduce="taylor")
  l1 = S.group_scores(gs, signed, reduce="l1")
  g0 = next(i for i, g in enumerate(gs) if g.prunable)
  members = [m for m in gs[g0].members]
  assert not np.allclose(taylor[g0], l1[g0])
  assert np.all(np.asarray(taylor[g0]) <= np.asarray(l1[g0]) + 1e-6)     # |Σ s| ≤ Σ |s|
  assert members
  with pytest.raises(ValueError, match="no negative entry"):
    S.group_scores(gs, jax.tree.map(jnp.abs, params), reduce="taylor")
  with pytest.raises(ValueError, match="scope must be"):
    S.group_masks(gs, l1, 0.5, scope="bogus")
