"""pruned(...) and keep_pruned(...) inside jitted optax updates: pruned entries are exactly 0 after every step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jprune as jp


def _loss(params, batch):
  x, y = batch
  h = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"][None])
  out = h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"][None]
  return jnp.mean((out - y) ** 2)


def _batch(i):
  k1, k2 = jax.random.split(jax.random.key(100 + i))
  return jax.random.normal(k1, (8, 16)), jax.random.normal(k2, (8, 8))


OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.05),
    "momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adam": lambda: optax.adam(0.01),
    "adamw": lambda: optax.adamw(0.01, weight_decay=0.1),
    "multisteps": lambda: optax.MultiSteps(optax.adam(0.01), every_k_schedule=2),
    "inject": lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=0.01, weight_decay=0.1),
}
def optax_promotion(opt):
  """optax's Adam bias correction (`decay ** count`, float ** int32) fails under strict dtype promotion; the
  sgd/momentum cases keep jprune itself under strict promotion."""
  return jax.numpy_dtype_promotion("strict" if opt in ("sgd", "momentum") else "standard")


GRANULARITIES = {"unstructured": jp.unstructured(), "2:4": jp.nm(2, 4), "neurons": jp.neurons(),
                 "blocks": jp.blocks(4, 4)}


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("gran", sorted(GRANULARITIES))
def test_pruned_entries_exactly_zero_every_step(mlp_params, opt, gran):
  tx = jp.pruned(OPTIMIZERS[opt](), criterion=jp.taylor(ema=0.5),
                 schedule=jp.polynomial(final=0.75, begin=2, end=10, every=2), granularity=GRANULARITIES[gran])
  params, state = mlp_params, tx.init(mlp_params)
  initial = mlp_params

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(_loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(14):
    with optax_promotion(opt):
      params, state = step(params, state, _batch(i))
    masks = jp.masks_of(state)
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
      pruned_vals = np.asarray(p)[~np.broadcast_to(np.asarray(m), p.shape)]
      assert np.all(pruned_vals == 0.0), (opt, gran, i)
  assert float(jp.sparsity(masks, params)) > 0.4
  # kept entries still train: (almost) every kept kernel entry moved from its initial value (MultiSteps: half the
  # steps, and only a kept entry whose every gradient was exactly 0 could stay put)
  for name in ("Dense_0", "Dense_1"):
    kept = np.broadcast_to(np.asarray(masks[name]["kernel"]), params[name]["kernel"].shape)
    moved = np.asarray(params[name]["kernel"])[kept] != np.asarray(initial[name]["kernel"])[kept]
    assert kept.sum() > 0 and moved.mean() > 0.9, (opt, gran, name, moved.mean())


def test_masks_monotone_unless_regrow(mlp_params):
  def run(regrow):
    tx = jp.pruned(optax.sgd(0.5), criterion=jp.gradient(), regrow=regrow,
                   schedule=jp.polynomial(final=0.8, begin=0, end=20, every=2))
    params, state = mlp_params, tx.init(mlp_params)
    step = jax.jit(lambda p, s, b: tx.update(jax.grad(_loss)(p, b), s, p))
    history = []
    for i in range(22):
      u, state = step(params, state, _batch(i))
      params = optax.apply_updates(params, u)
      history.append(np.asarray(jp.masks_of(state)["Dense_0"]["kernel"]))
    return history

  hist = run(False)
  for a, b in zip(hist, hist[1:]):
    assert not np.any(b & ~a), "an entry was revived"
  assert hist[-1].mean() == pytest.approx(0.2, abs=1 / 512)
  hist = run(True)
  assert any(np.any(b & ~a) for a, b in zip(hist, hist[1:])), "regrow=True never revived anything"


def _log_compiles():
  import logging
  records = []

  class H(logging.Handler):
    def emit(self, record):
      if "Compiling" in record.getMessage():
        records.append(record.getMessage())

  return records, H()


def test_update_does_not_recompile(mlp_params):
  import logging
  tx = jp.pruned(optax.adam(1e-3), schedule=jp.polynomial(final=0.9, begin=0, end=10, every=2))
  state = tx.init(mlp_params)
  step = jax.jit(tx.update)
  grads = jax.tree.map(jnp.ones_like, mlp_params)
  with optax_promotion("adam"):
    step(grads, state, mlp_params)
  records, handler = _log_compiles()
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  with jax.log_compiles(), optax_promotion("adam"):
    for _ in range(3):
      _, state = step(grads, state, mlp_params)
  logger.removeHandler(handler)
  assert records == [], f"update recompiled: {records}"


def test_init_on_abstract_params(mlp_params):
  tx = jp.pruned(optax.adamw(1e-3), criterion=jp.fisher(), schedule=jp.constant(0.5))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), mlp_params)
  shapes = jax.eval_shape(tx.init, abstract)
  real = tx.init(mlp_params)
  assert jax.tree.structure(shapes) == jax.tree.structure(real)
  assert isinstance(shapes, jp.PruneState)
  assert shapes.masks["Dense_0"]["kernel"].dtype == jnp.bool_


def test_keep_pruned_holds_zeros(mlp_params):
  masks = jp.topk(jp.scores(jp.magnitude(), mlp_params), 0.9)
  params = jp.apply(mlp_params, masks)
  tx = optax.chain(optax.sgd(0.05, momentum=0.9), optax.add_decayed_weights(0.1), jp.keep_pruned(masks))
  state = tx.init(params)
  step = jax.jit(lambda p, s, b: tx.update(jax.grad(_loss)(p, b), s, p))
  for i in range(5):
    u, state = step(params, state, _batch(i))
    params = optax.apply_updates(params, u)
  k = np.asarray(params["Dense_0"]["kernel"])
  assert np.all(k[~np.asarray(masks["Dense_0"]["kernel"])] == 0)
  assert np.count_nonzero(k) == np.asarray(masks["Dense_0"]["kernel"]).sum()
  held = jp.masks_of(state)
  for name in ("Dense_0", "Dense_1"):
    np.testing.assert_array_equal(np.asarray(held[name]["kernel"]), np.asarray(masks[name]["kernel"]))


def test_update_without_params_is_clear_error(mlp_params):
  tx = jp.pruned(optax.sgd(0.1), schedule=jp.constant(0.5))
  with pytest.raises(ValueError, match="needs params"):
    tx.update(mlp_params, tx.init(mlp_params))


def test_global_scope_and_erk_in_training(mlp_params):
  for kw in ({"scope": "global"}, {"distribution": jp.erk()}):
    tx = jp.pruned(optax.sgd(0.01), schedule=jp.one_shot(at=1, sparsity=0.8), **kw)
    params, state = mlp_params, tx.init(mlp_params)
    for i in range(3):
      u, state = jax.jit(tx.update)(jax.grad(_loss)(params, _batch(i)), state, params)
      params = optax.apply_updates(params, u)
    m = jp.masks_of(state)
    kept = {k: int(m[k]["kernel"].sum()) for k in ("Dense_0", "Dense_1")}
    if "scope" in kw:   # one global count: 20% of all kernel entries kept, wherever they are
      assert sum(kept.values()) == 16 * 32 + 32 * 8 - round(0.8 * (16 * 32 + 32 * 8))
    else:   # ERK (Evci et al.): density ∝ (fan_in + fan_out) / (fan_in · fan_out), scaled to 20% overall;
      # computed here by hand for the two kernels (16, 32) and (32, 8): ε·(48/512)·512 + ε·(40/256)·256 = 153.6
      eps = 0.2 * (16 * 32 + 32 * 8) / (48 + 40)
      expect = {"Dense_0": 16 * 32 - round(16 * 32 * (1 - eps * 48 / 512)),
                "Dense_1": 32 * 8 - round(32 * 8 * (1 - eps * 40 / 256))}
      assert kept == expect, (kept, expect)


def test_non_finite_params_at_pruned_entries_are_documented_behaviour():
  """Pruned entries become `p + (-p)`: exactly 0 for finite p, NaN for a NaN or ±inf p (IEEE); `jp.apply`
  (a `where`) zeroes them whatever they hold. The README's guarantees say so."""
  params = {"Dense_0": {"kernel": jnp.array([[1.0, jnp.nan, jnp.inf, -jnp.inf, 2.0, 3.0]])}}
  masks = {"Dense_0": {"kernel": jnp.array([[True, False, False, False, False, True]])}}
  tx = jp.keep_pruned(masks)
  u, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  after = np.asarray(optax.apply_updates(params, u)["Dense_0"]["kernel"])[0]
  assert after[0] == 2.0 and after[5] == 4.0 and after[4] == 0.0                # kept entries updated, finite -> 0
  assert np.isnan(after[1:4]).all()                                             # NaN/inf at pruned entries -> NaN
  np.testing.assert_array_equal(np.asarray(jp.apply(params, masks)["Dense_0"]["kernel"])[0],
                                [1.0, 0.0, 0.0, 0.0, 0.0, 3.0])


def test_distribution_with_its_own_sparsity_is_refused_not_ignored():
  # the schedule's value is the target at every step; a sparsity fixed in the distribution would be ignored
  with pytest.raises(ValueError, match=r"built with sparsity 0.9.*put 0.9 in the schedule"):
    jp.pruned(optax.sgd(0.1), schedule=jp.constant(0.5), distribution=jp.erk(0.9))
  with pytest.raises(ValueError, match="built with sparsity 0.7"):
    jp.pruned(optax.sgd(0.1), schedule=jp.constant(0.5), distribution=jp.distribution.uniform(0.7))
  params = {"a": {"kernel": jnp.ones((8, 8))}, "b": {"kernel": jnp.ones((8, 32))}}
  tx = jp.pruned(optax.sgd(0.1), schedule=jp.constant(0.5), distribution=jp.erk())   # the schedule's 0.5
  state = tx.init(params)
  _, state = tx.update(params, state, params)
  assert abs(float(jp.sparsity(jp.masks_of(state), params)) - 0.5) < 0.01


def test_summary_reports_the_masked_leaves_total_apart_from_all_params():
  params = {"a": {"kernel": jnp.arange(100.0).reshape(10, 10), "bias": jnp.ones(10)}, "b": {"kernel": jnp.ones((4, 5))}}
  masks = jp.topk(params, 0.8)                      # kernels only (default selection), exactly 80% of each
  s = jp.summary(params, masks)
  assert (s.masked.size, s.masked.kept) == (120, 24) and s.masked.sparsity == pytest.approx(0.8)
  assert (s.total.size, s.total.kept) == (130, 34)  # the bias counts as kept in the total
  assert "total (masked leaves)" in str(s) and "()" not in str(s).splitlines()[-1]
  assert s.to_dict()["masked"]["kept"] == 24
  assert jp.summary(params).masked is None          # no masks: only the total
