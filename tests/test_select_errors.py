"""Selection over linen, nnx and plain-dict trees; clear errors at the boundary naming the path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jprune as jp


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8)(x)
    return nn.Dense(4)(nn.relu(h))


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.Dense_0 = nnx.Linear(6, 8, rngs=rngs)
    self.Dense_1 = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    return self.Dense_1(nnx.relu(self.Dense_0(x)))


def _trees():
  linen = LinenMLP().init(jax.random.key(0), jnp.ones((1, 6)))["params"]
  nnx_state = nnx.as_pure(nnx.state(NnxMLP(nnx.Rngs(0)), nnx.Param))
  plain = {"Dense_0": {"kernel": jnp.ones((6, 8)), "bias": jnp.zeros(8)},
           "Dense_1": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
  return {"linen": linen, "nnx": nnx_state, "dict": plain}


@pytest.mark.parametrize("kind", ["linen", "nnx", "dict"])
def test_same_regex_selects_same_layer(kind):
  params = _trees()[kind]
  sel = jp.select.resolve(r"Dense_1/kernel$", params)
  flat = {p: f for p, f in zip(jp._tree.paths(params), jax.tree.leaves(sel))}
  assert flat == {"Dense_0/bias": False, "Dense_0/kernel": False, "Dense_1/bias": False, "Dense_1/kernel": True}
  default = jax.tree.leaves(jp.select.resolve(None, params))
  assert sum(default) == 2
  masks = jp.topk(jp.scores(jp.magnitude(), params), 0.5, where=r"Dense_1/kernel$")
  assert int(jnp.sum(masks["Dense_1"]["kernel"])) == 16
  # and the same masks drive training on that tree type
  tx = jp.pruned(optax.sgd(0.1), schedule=jp.constant(0.5), where=r"Dense_1/kernel$")
  state = tx.init(params)
  u, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
  new = optax.apply_updates(params, u)
  k = np.asarray(new["Dense_1"]["kernel"])
  assert (k == 0).sum() == 16


def test_predicate_and_bool_tree_selection():
  params = _trees()["dict"]
  sel = jp.select.resolve(lambda path, leaf: leaf.ndim == 1, params)
  assert jax.tree.leaves(sel) == [True, False, True, False]
  tree = jax.tree.map(lambda _: False, params)
  tree["Dense_0"]["kernel"] = True
  assert jax.tree.leaves(jp.select.resolve(tree, params)) == [False, True, False, False]


def test_errors_name_the_path():
  params = {"enc": {"kernel": jnp.ones((4, 6)), "step": jnp.zeros((3,), jnp.int32)}}
  scores = jp.scores(jp.magnitude(), {"enc": {"kernel": params["enc"]["kernel"]}})
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
    jp.topk(scores, 1.2)
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
    jp.topk(scores, -0.1)
  with pytest.raises(ValueError, match="enc/kernel.*divisible by 4"):
    jp.topk({"enc": {"kernel": jnp.ones((6, 4))}}, 0.5, granularity=jp.nm(2, 4))
  with pytest.raises(ValueError, match="matched no float leaf"):
    jp.topk(scores, 0.5, where="decoder")
  with pytest.raises(TypeError, match="enc/step"):
    jp.select.resolve({"enc": {"kernel": False, "step": True}}, params)
  with pytest.raises(ValueError, match="enc/kernel.*NaN/inf"):
    jp.topk({"enc": {"kernel": jnp.array([[1.0, jnp.nan]])}}, 0.5)
  with pytest.raises(ValueError, match="first differing path.*enc/kernel"):
    jp.apply({"enc": {"kernel": jnp.ones(2)}}, {"dec": {"kernel": jnp.ones(2, bool)}})
  with pytest.raises(ValueError, match="enc/kernel.*not broadcastable"):
    jp.apply({"enc": {"kernel": jnp.ones((2, 3))}}, {"enc": {"kernel": jnp.ones((2, 2), bool)}})
  with pytest.raises(ValueError, match="first differing path"):
    optax.chain(optax.sgd(0.1), jp.keep_pruned({"x": jnp.ones(2, bool)})).init({"y": jnp.ones(2)})
  with pytest.raises(ValueError, match="0 < n <= m"):
    jp.nm(5, 4)
  with pytest.raises(ValueError, match="needs gradients"):
    jp.scores(jp.taylor(), params)
  # int leaves are never selected by regex: pruned() on a tree with an int counter just works
  tx = jp.pruned(optax.sgd(0.1), schedule=jp.constant(0.5), where=".*")
  assert jp.masks_of(tx.init(params))["enc"]["step"].shape == ()


def test_nonfinite_scores_name_the_first_bad_leaf():
  """All float leaves are checked in one program: the error still names the first leaf with NaN/inf and its
  count, eagerly and for concrete scores closed over inside a trace."""
  bad = {"a": {"kernel": jnp.ones((3, 3))}, "b": {"kernel": jnp.array([[1.0, jnp.nan], [jnp.inf, 2.0]])},
         "c": {"kernel": jnp.array([[jnp.inf, 1.0]])}}
  with pytest.raises(ValueError, match=r"'b/kernel' contain 2 NaN/inf"):
    jp.topk(bad, 0.5)
  with pytest.raises(ValueError, match=r"'b/kernel' contain 2 NaN/inf"):
    jax.jit(lambda: jp.topk(bad, 0.5))()
