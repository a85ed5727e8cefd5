"""Structured pruning that pays: find coupled axes from the jaxpr, prune half the hidden neurons, fine-tune
with the masks kept, then physically remove them and check the smaller model gives the same outputs.

Run: python examples/03_structured_compaction.py     (31 s on 2 CPU cores, measured)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jprune as jp
from jprune import report, structured
from jprune.models import LeNet300, resize

from _data import fashion_mnist_or_synthetic

x_train, y_train, x_test, y_test = fashion_mnist_or_synthetic()
model = LeNet300()
params = model.init(jax.random.key(0), x_train[:1])["params"]


def train(params, tx, epochs, seed):
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
    return optax.apply_updates(params, updates), state

  for epoch in range(epochs):
    perm = np.random.default_rng([seed, epoch]).permutation(len(x_train))
    for i in range(len(x_train) // 128):
      idx = perm[i * 128:(i + 1) * 128]
      params, state = step(params, state, x_train[idx], y_train[idx])
  return params


def accuracy(m, p):
  return float(jnp.mean(jnp.argmax(m.apply({"params": p}, x_test), -1) == y_test))


params = train(params, optax.adam(1e-3), epochs=5, seed=0)
print(f"dense: {accuracy(model, params):.4f}")

# 1. groups of coupled axes, traced from the model's own jaxpr (no per-architecture table)
groups = structured.groups(lambda p, x: model.apply({"params": p}, x), params, x_test[:2])
for g in groups:
  print(" ", g)

# 2. group importance (L2 of the members' magnitudes), remove 50% of every prunable group, widths a multiple of 8
gscores = structured.group_scores(groups, jp.scores(jp.magnitude(), params), reduce="l2")
gmasks = structured.group_masks(groups, gscores, 0.5, scope="group", round_to=8)
masks = structured.to_param_masks(groups, gmasks, params)        # the core's broadcastable masks
params = jp.apply(params, masks)
print(f"masked, before fine-tuning: {accuracy(model, params):.4f}")

# 3. fine-tune with the masks kept, exactly as for unstructured sparsity
params = train(params, optax.chain(optax.adam(5e-4), jp.keep_pruned(masks)), epochs=3, seed=1)
print(f"masked, fine-tuned: {accuracy(model, params):.4f}")

# 4. compact: slice the pruned units out of every member, rebuild the smaller model
small, widths = structured.compact(params, groups, gmasks)
small_model = resize(model, small)
print("widths:", widths, "->", small_model)
np.testing.assert_allclose(small_model.apply({"params": small}, x_test[:256]),
                           model.apply({"params": params}, x_test[:256]), rtol=1e-5, atol=1e-5)
x = jnp.asarray(x_test[:256])
t_dense = report.latency(lambda p, x: model.apply({"params": p}, x), params, x)
t_small = report.latency(lambda p, x: small_model.apply({"params": p}, x), small, x)
n = lambda t: sum(a.size for a in jax.tree.leaves(t))
print(f"compacted: accuracy {accuracy(small_model, small):.4f}, params {n(small):,} / {n(params):,}, "
      f"latency {1e3 * t_small:.3f} ms vs {1e3 * t_dense:.3f} ms dense ({t_dense / t_small:.2f}x)")
