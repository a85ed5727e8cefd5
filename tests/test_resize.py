"""Compaction for models jprune does not ship: a linen model runs on compacted params through `resized`, an nnx
model is shrunk in place, and both give the masked model's outputs. Models: a CNN with BatchNorm and dropout, an
MLP-Mixer, a small ViT (attention heads removed) in linen; a CNN with BatchNorm, dropout and LayerNorm in nnx."""

import functools
import sys
from pathlib import Path

import jax
import flax.linen as nn
import numpy as np
import pytest
from flax import nnx

import jprune as jp
from jprune import resize as R
from jprune import structured as S


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(16, (3, 3))(x)))
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(24, (3, 3), strides=2)(x)))
    x = nn.Dropout(0.2, deterministic=not train)(x)
    return nn.Dense(10)(nn.relu(nn.Dense(32)(x.mean((1, 2)))))


# the compaction benchmark's MLP-Mixer and ViT, smaller
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from compaction import UserMixer, UserViT  # noqa: E402

Mixer = functools.partial(UserMixer, width=32, token_mlp=64, channel_mlp=128, depth=2)
ViT = functools.partial(UserViT, width=32, heads=4, mlp=96, depth=2)


def _prune_half(apply_fn, params, *args, extra=None):
  groups = S.groups(apply_fn, params, *args)
  gm = S.group_masks(groups, S.group_scores(groups, jp.scores(jp.random(3), params)), 0.5, scope="group")
  masked = jp.apply(params, S.to_param_masks(groups, gm, params))
  return (masked, groups, gm) + S.compact(masked, groups, gm, **({"extra": extra} if extra is not None else {}))


@pytest.mark.parametrize("name", ["cnn", "mixer", "vit"])
def test_linen_model_runs_compacted_through_resized(name):
  model = {"cnn": CNN(), "mixer": Mixer(), "vit": ViT()}[name]
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  v = model.init(jax.random.key(0), x)
  params, stats = v["params"], v.get("batch_stats")
  if stats:
    masked, groups, gm, small, widths, small_stats = _prune_half(
        lambda p, b, x: model.apply({"params": p, "batch_stats": b}, x), params, stats, x, extra=stats)
    vm, vs = {"params": masked, "batch_stats": stats}, {"params": small, "batch_stats": small_stats}
  else:
    masked, groups, gm, small, widths = _prune_half(lambda p, x: model.apply({"params": p}, x), params, x)
    vm, vs = {"params": masked}, {"params": small}
  with pytest.raises(Exception, match="ScopeParamShapeError|expected to generate shape"):
    model.apply(vs, x)                                              # plain Flax refuses the smaller params
  ref = model.apply(vm, x)
  out = R.resized(model).apply(vs, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
  assert sum(a.size for a in jax.tree.leaves(small)) < 0.7 * sum(a.size for a in jax.tree.leaves(params))
  got = R.widths(small)
  kept = {g.members[0].path: int(m.sum()) for g, m in zip(groups, gm) if g.prunable}
  if name == "cnn":   # widths keyed by the layer that owns the channels; half of each prunable group kept
    assert got == {"Conv_0": 8, "Conv_1": 12, "Dense_0": 10, "Dense_1": 16}   # Dense_0 is the outer (output) one
    assert kept == {"BatchNorm_0/bias": 8, "BatchNorm_1/bias": 12, "Dense_0/kernel": 16}   # (the group of Dense_1)
    # training mode works too: dropout rng and the mutable BatchNorm statistics, at the small widths
    y, upd = R.resized(model).apply(vs, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
    assert y.shape == (4, 10) and upd["batch_stats"]["BatchNorm_0"]["mean"].shape == (8,)
  if name == "vit":   # attention heads removed: 4 -> 2 per layer
    assert got["MultiHeadDotProductAttention_0"]["heads"] == 2 and got["MultiHeadDotProductAttention_1"]["heads"] == 2
  if name == "mixer":
    assert got["Dense_1"] == 32 and got["Dense_3"] == 64     # token MLP 64 -> 32, channel MLP 128 -> 64


def test_models_resize_falls_back_to_resized_for_other_models():
  """`jprune.models.resize(model, small_params)` (the README's form) works for any linen model, not only jprune's."""
  from jprune import models
  model = CNN()
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  v = model.init(jax.random.key(0), x)
  small = jax.tree.map(lambda a: a, v)
  small["params"]["Dense_1"] = {k: a[..., :5] for k, a in v["params"]["Dense_1"].items()}   # hidden 32 -> 5
  small["params"]["Dense_0"]["kernel"] = v["params"]["Dense_0"]["kernel"][:5]
  masked = jax.tree.map(lambda a: a, v)
  masked["params"]["Dense_1"] = {k: a.at[..., 5:].set(0) for k, a in v["params"]["Dense_1"].items()}
  out = models.resize(model, small["params"]).apply(small, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(model.apply(masked, x)), rtol=1e-5, atol=1e-6)


class NnxCNN(nnx.Module):
  def __init__(self, rngs):
    self.c0, self.bn0 = nnx.Conv(3, 16, (3, 3), rngs=rngs), nnx.BatchNorm(16, rngs=rngs)
    self.c1, self.bn1 = nnx.Conv(16, 24, (3, 3), strides=2, rngs=rngs), nnx.BatchNorm(24, rngs=rngs)
    self.drop = nnx.Dropout(0.2, rngs=rngs)
    self.l0, self.l1 = nnx.Linear(24, 32, rngs=rngs), nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.c1(nnx.relu(self.bn0(self.c0(x))))))
    return self.l1(nnx.relu(self.l0(self.drop(x).mean((1, 2)))))


def test_nnx_model_is_shrunk_in_place():
  model = NnxCNN(nnx.Rngs(0))
  model.eval()
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  graphdef, pstate, rest = nnx.split(model, nnx.Param, ...)
  params, stats = pstate.to_pure_dict(), nnx.state(model, nnx.BatchStat).to_pure_dict()

  def apply_fn(p, b, x):
    ps, rs = jax.tree.map(lambda a: a, pstate), jax.tree.map(lambda a: a, rest)
    ps.replace_by_pure_dict(p)
    rs.replace_by_pure_dict(b)
    return nnx.merge(graphdef, ps, rs)(x)

  masked, groups, gm, small, widths, small_stats = _prune_half(apply_fn, params, stats, x, extra=stats)
  ref = apply_fn(masked, stats, x)
  R.shrink(model, small)
  R.shrink(model, small_stats)
  np.testing.assert_allclose(np.asarray(model(x)), np.asarray(ref), rtol=1e-5, atol=1e-5)
  assert (model.c0.out_features, model.bn0.num_features, model.c1.in_features, model.l0.out_features) == (8, 8, 8, 16)
  assert R.widths(nnx.state(model, nnx.Param)) == {"c0": 8, "c1": 12, "l0": 16, "l1": 10}
