"""Every criterion against values computed by hand; what `pruned` feeds the criterion and the inner optimizer;
the threshold schedule (`jp.thresholds`) against a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jprune as jp

# Two updates with params w1 then w2 and gradients g1 then g2; the score is taken with params w2.
W1, W2 = np.array([1.0, -2.0, 0.5]), np.array([0.8, -2.5, 0.5])
G1, G2 = np.array([0.5, 1.0, -2.0]), np.array([-1.5, 0.0, 1.0])

# By hand (see each line): mean = (step1 + step2) / 2; EMA(0.5): a1 = 0.5·s1, a2 = 0.5·a1 + 0.5·s2.
HAND = {
    # |g|: s1 = [.5, 1, 2], s2 = [1.5, 0, 1]
    "gradient": [1.0, 0.5, 1.5],
    "gradient_ema": [0.875, 0.25, 1.0],
    # |w·g|: s1 = |w1·g1| = [.5, 2, 1], s2 = |w2·g2| = [1.2, 0, .5]
    "taylor": [0.85, 1.0, 0.75],
    "taylor_ema": [0.725, 0.5, 0.5],
    # 0.5·E[g²]·w2²: E[g²] = [1.25, .5, 2.5] (mean) or [1.1875, .25, 1.5] (EMA); w2² = [.64, 6.25, .25]
    "fisher": [0.4, 1.5625, 0.3125],
    "fisher_ema": [0.38, 0.78125, 0.1875],
    # −Σ w_t·g_t = −([.5, −2, −1] + [−1.2, 0, .5])
    "movement": [0.7, 2.0, 0.5],
    # |w2|
    "magnitude": [0.8, 2.5, 0.5],
}
BUILD = {"gradient": jp.gradient, "taylor": jp.taylor, "fisher": jp.fisher}


def _criterion(name):
  if name.endswith("_ema"):
    return BUILD[name[:-4]](ema=0.5)
  return {"movement": jp.movement, "magnitude": jp.magnitude}.get(name, lambda: BUILD.get(name)())()


@pytest.mark.parametrize("name", sorted(HAND))
def test_criterion_by_hand(name):
  crit = _criterion(name)
  p = lambda w: {"kernel": jnp.asarray(w, jnp.float32)}
  state = crit.init(p(W1))
  state = jax.jit(crit.update)(state, p(W1), p(G1))
  state = jax.jit(crit.update)(state, p(W2), p(G2))
  got = np.asarray(jax.jit(crit.score)(state, p(W2))["kernel"])
  np.testing.assert_allclose(got, HAND[name], rtol=1e-6)
  assert got.dtype == np.float32
  assert crit.needs_grads == (name != "magnitude")


def test_random_criterion_is_seeded_and_uniform():
  p = {"a": jnp.zeros((64, 64)), "b": jnp.zeros((64, 64))}
  s0 = jp.scores(jp.random(0), p)
  again, other = jp.scores(jp.random(0), p), jp.scores(jp.random(1), p)
  np.testing.assert_array_equal(np.asarray(s0["a"]), np.asarray(again["a"]))
  assert not np.array_equal(np.asarray(s0["a"]), np.asarray(other["a"]))
  assert not np.array_equal(np.asarray(s0["a"]), np.asarray(s0["b"]))    # leaves get their own stream
  a = np.asarray(s0["a"])
  assert a.min() >= 0 and a.max() < 1 and abs(a.mean() - 0.5) < 0.02


def test_one_shot_scores_average_the_batches_gradients():
  # loss = Σ batch·w, so ∂L/∂w is the batch itself: mean |g| over the two batches is HAND["gradient"]
  loss = lambda params, batch: jnp.sum(batch * params["kernel"])
  s = jp.scores(jp.gradient(), {"kernel": jnp.asarray(W1, jnp.float32)}, loss_fn=loss,
                batches=[jnp.asarray(G1, jnp.float32), jnp.asarray(G2, jnp.float32)], progress=False)
  np.testing.assert_allclose(np.asarray(s["kernel"]), HAND["gradient"], rtol=1e-6)
  with pytest.raises(ValueError, match="needs gradients"):
    jp.scores(jp.taylor(), {"kernel": jnp.ones(3)})
  with pytest.raises(ValueError, match="empty"):
    jp.scores(jp.taylor(), {"kernel": jnp.ones(3)}, loss_fn=loss, batches=[], progress=False)


def _recording():
  """An inner optimizer whose state is the last gradient it was given (and whose update is that gradient)."""
  return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p), lambda u, s, p=None: (u, u))


def test_inner_optimizer_sees_masked_gradients_and_criterion_dense_ones():
  w = jnp.asarray([[1.0, -2.0, 0.5, 3.0]], jnp.float32)
  params = {"kernel": w}
  tx = jp.pruned(_recording(), criterion=jp.gradient(), schedule=jp.one_shot(at=1, sparsity=0.5))
  state = tx.init(params)
  grads = [jnp.asarray([[4.0, 1.0, 3.0, 2.0]]), jnp.asarray([[2.0, 5.0, 1.0, 2.0]]), jnp.ones((1, 4))]
  step = jax.jit(tx.update)
  seen = []
  for g in grads:
    _, state = step({"kernel": g}, state, params)
    seen.append(np.asarray(state.inner["kernel"]))
  # step 0: no mask yet, the inner optimizer sees the gradient as it is
  np.testing.assert_array_equal(seen[0], [[4.0, 1.0, 3.0, 2.0]])
  # step 1 prunes by mean |g| over steps 0-1 = [3, 3, 2, 2]: the two 2s go (ties: lower index first)
  mask = np.asarray(jp.masks_of(state)["kernel"])
  np.testing.assert_array_equal(mask, [[True, True, False, False]])
  np.testing.assert_array_equal(seen[1], [[2.0, 5.0, 0.0, 0.0]])
  np.testing.assert_array_equal(seen[2], [[1.0, 1.0, 0.0, 0.0]])
  # the criterion keeps receiving the dense gradients, pruned entries included: mean |g| over the 3 steps
  np.testing.assert_allclose(np.asarray(state.criterion.acc["kernel"]), [[7 / 3, 7 / 3, 5 / 3, 5 / 3]], rtol=1e-6)


def test_thresholds_schedule_prunes_below_theta_at_each_update():
  """|w| < θ pruned every 2 steps while training (sgd moves weights): each update's masks equal a numpy
  reference (|w| >= θ at that step, AND the masks so far), pruned entries stay exactly 0."""
  key = jax.random.key(3)
  params = {"Dense_0": {"kernel": 0.2 * jax.random.normal(key, (16, 32)), "bias": jnp.zeros(32)}}
  theta = 0.1
  tx = jp.pruned(optax.sgd(0.05), schedule=jp.thresholds(theta, every=2, end=6))
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  ref = np.ones((16, 32), bool)
  for i in range(9):
    g = {"Dense_0": {"kernel": jax.random.normal(jax.random.fold_in(key, i), (16, 32)), "bias": jnp.ones(32)}}
    before = np.asarray(params["Dense_0"]["kernel"])
    u, state = step(params, state, g)
    params = optax.apply_updates(params, u)
    if i % 2 == 0 and i <= 6:
      ref = ref & (np.abs(before) >= theta)
    got = np.asarray(jp.masks_of(state)["Dense_0"]["kernel"])
    np.testing.assert_array_equal(got, ref, err_msg=f"step {i}")
    assert np.all(np.asarray(params["Dense_0"]["kernel"])[~ref] == 0.0)
  assert 0.2 < 1 - ref.mean() < 0.9


def test_thresholds_one_update_by_gradient_then_retrain():
  """The seeds' one-shot system: prune where mean |∂L/∂w| < θ at step `begin`, masks fixed afterwards."""
  params = {"kernel": jnp.asarray([[1.0, 1.0, 1.0, 1.0]])}
  tx = jp.pruned(optax.sgd(0.1), criterion=jp.gradient(), schedule=jp.thresholds(0.01, begin=1))
  state = tx.init(params)
  for g in ([[0.005, 0.02, 0.0, 1.0]], [[0.005, 0.0, 0.0, 1.0]], [[1.0, 1.0, 1.0, 1.0]]):
    u, state = tx.update({"kernel": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, u)
  # at step 1, mean |g| = [.005, .01, 0, 1]: entries 0 and 2 are below 0.01; step 2's big gradients change nothing
  np.testing.assert_array_equal(np.asarray(jp.masks_of(state)["kernel"]), [[False, True, False, True]])
  np.testing.assert_array_equal(np.asarray(params["kernel"])[0, [0, 2]], [0.0, 0.0])


def test_thresholds_refusals():
  p = {"kernel": jnp.ones((4, 4))}
  with pytest.raises(ValueError, match="does not take 2:4"):
    jp.pruned(optax.sgd(0.1), schedule=jp.thresholds(0.1), granularity="2:4")
  with pytest.raises(ValueError, match="distribution"):
    jp.pruned(optax.sgd(0.1), schedule=jp.thresholds(0.1), distribution=jp.erk())
  with pytest.raises(ValueError, match="regrow='rigl'"):
    jp.pruned(optax.sgd(0.1), schedule=jp.thresholds(0.1), regrow="rigl")
  for bad in (dict(value=float("nan")), dict(value="0.1"), dict(value=0.1, every=0), dict(value=0.1, begin=5, end=2)):
    with pytest.raises(ValueError, match="thresholds"):
      jp.thresholds(**bad)
  with pytest.raises(ValueError, match="no sparsity target"):
    jp.thresholds(0.1).sparsity(0)
  tx = jp.pruned(optax.sgd(0.1), schedule=jp.thresholds(0.5), granularity=jp.neurons())
  _, st = tx.update(p, tx.init(p), {"kernel": jnp.asarray([[1.0, 0.1, 1.0, 0.1]] * 4)})
  np.testing.assert_array_equal(np.asarray(jp.masks_of(st)["kernel"]), [[True, False, True, False]])


def test_eager_update_equals_jitted_update(mlp_params):
  """`tx.update` called without `jit` (the mask update then runs in a cond whose branch closes over concrete
  arrays) gives the jitted result."""
  tx = jp.pruned(optax.sgd(0.01, momentum=0.9), criterion=jp.taylor(),
                 schedule=jp.polynomial(0.8, begin=0, end=4, every=2))
  grads = jax.tree.map(lambda p: jnp.cos(3.0 * p), mlp_params)
  eager_state = jit_state = tx.init(mlp_params)
  for _ in range(3):
    u_e, eager_state = tx.update(grads, eager_state, mlp_params)
    u_j, jit_state = jax.jit(tx.update)(grads, jit_state, mlp_params)
    for a, b in zip(jax.tree.leaves((u_e, eager_state.masks)), jax.tree.leaves((u_j, jit_state.masks))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert 0.3 < float(jp.sparsity(jp.masks_of(eager_state), mlp_params)) < 0.9
