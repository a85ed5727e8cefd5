"""Pruning by an absolute threshold instead of a sparsity target (the seeds' two systems), in one training loop:

A. while training: every 100 steps, every weight with |w| < θ is pruned (the seeds used θ = 1e-3; here 0.03)
   (`jp.thresholds(θ, every=100)` in `jp.pruned`; masks only shrink, pruned weights stay exactly 0);
B. one-shot: after dense training, prune where the mean |∂L/∂w| over 20 batches is < θ, then retrain with the
   masks kept (`jp.threshold(jp.scores(jp.gradient(), ...), θ)` and `jp.keep_pruned`).

The sparsity is whatever the scores give, so print it: a threshold that suits one model prunes nothing or
everything on another (`benchmarks/results/accuracy_threshold.json`: |∂L/∂w| < 0.01 on a LeNet-300-100 trained
20 epochs prunes 100% of it). Here B's θ is the 50th percentile of the gradient scores, shown next to 0.01's.
Run: python examples/07_threshold.py     (35 s on 2 CPU cores, measured: A 72.1% pruned, 0.848; B dense 0.856,
θ = 0.01 would prune 99.7%, the median prunes 50%: 0.873 after retraining)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jprune as jp
from jprune.models import LeNet300

from _data import fashion_mnist_or_synthetic

x_train, y_train, x_test, y_test = fashion_mnist_or_synthetic()
model = LeNet300()
steps_per_epoch = len(x_train) // 128


def loss_fn(p, batch):
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()


def train(params, tx, epochs, seed):
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    updates, state = tx.update(jax.grad(loss_fn)(params, batch), state, params)
    return optax.apply_updates(params, updates), state

  for epoch in range(epochs):
    perm = np.random.default_rng([seed, epoch]).permutation(len(x_train))
    for i in range(steps_per_epoch):
      idx = perm[i * 128:(i + 1) * 128]
      params, state = step(params, state, (x_train[idx], y_train[idx]))
  return params, state


def accuracy(params):
  return float(jnp.mean(jnp.argmax(model.apply({"params": params}, x_test), -1) == y_test))


init = model.init(jax.random.key(0), x_train[:1])["params"]

# A. |w| < 0.03 pruned every 100 steps while training from scratch (3 epochs)
tx = jp.pruned(optax.adam(1e-3), criterion=jp.magnitude(), schedule=jp.thresholds(0.03, every=100))
params_a, state = train(init, tx, epochs=3, seed=0)
masks_a = jp.masks_of(state)
print(f"A. |w| < 0.03 every 100 steps while training: {float(jp.sparsity(masks_a, params_a)):.1%} of the kernels "
      f"pruned, test accuracy {accuracy(params_a):.4f}")

# B. dense training, then one-shot |∂L/∂w| < θ and retraining with the masks kept
dense, _ = train(init, optax.adam(1e-3), epochs=3, seed=0)
calib = [(x_train[i:i + 256], y_train[i:i + 256]) for i in range(0, min(20 * 256, len(x_train)), 256)]
scores = jp.scores(jp.gradient(), dense, loss_fn=loss_fn, batches=calib, progress=False)
kernels = np.concatenate([np.asarray(scores[k]["kernel"]).ravel() for k in scores])
print(f"B. dense test accuracy {accuracy(dense):.4f}; |∂L/∂w| < 0.01 would prune {np.mean(kernels < 0.01):.1%} "
      f"of the kernels")
theta = float(np.quantile(kernels, 0.5))
masks_b = jp.threshold(scores, theta)
retrain = optax.chain(optax.adam(optax.cosine_decay_schedule(1e-3, 2 * steps_per_epoch)), jp.keep_pruned(masks_b))
params_b, _ = train(jp.apply(dense, masks_b), retrain, epochs=2, seed=1)
print(f"B. |∂L/∂w| < {theta:.2e} (the median): {float(jp.sparsity(masks_b, params_b)):.1%} pruned, after 2 epochs "
      f"of retraining test accuracy {accuracy(params_b):.4f}")
