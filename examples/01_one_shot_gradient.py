"""The seeds' workflow: train, score weights by |∂L/∂w| with jax.grad, prune the lowest 90%, fine-tune.

Run: python examples/01_one_shot_gradient.py     (~1 minute on 2 CPU cores)
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
params = model.init(jax.random.key(0), x_train[:1])["params"]


def loss_fn(params, batch):
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y).mean()


def accuracy(params):
  logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x_test)
  return float(jnp.mean(jnp.argmax(logits, -1) == y_test))


def train(params, tx, epochs, seed):
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  for epoch in range(epochs):
    perm = np.random.default_rng([seed, epoch]).permutation(len(x_train))
    for i in range(len(x_train) // 128):
      idx = perm[i * 128:(i + 1) * 128]
      params, state, loss = step(params, state, (x_train[idx], y_train[idx]))
  return params


# 1. train the dense model
params = train(params, optax.adam(1e-3), epochs=3, seed=0)
dense_acc = accuracy(params)

# 2. gradient importance: mean |∂L/∂w| over 50 training batches (jitted once, run per batch)
calib = [(x_train[i:i + 256], y_train[i:i + 256]) for i in range(0, 50 * 256, 256)]
scores = jp.scores(jp.gradient(), params, loss_fn=loss_fn, batches=calib)

# 3. prune the lowest 90% of every kernel, exactly
masks = jp.topk(scores, 0.9, scope="layer")
params = jp.apply(params, masks)
pruned_acc = accuracy(params)

# 4. fine-tune with the masks held fixed: pruned weights stay exactly 0.0
params = train(params, optax.chain(optax.adam(5e-4), jp.keep_pruned(masks)), epochs=2, seed=1)
finetuned_acc = accuracy(params)

print(jp.summary(params, masks))
print(f"accuracy: dense {dense_acc:.4f} | pruned 90% by |grad| {pruned_acc:.4f} | fine-tuned {finetuned_acc:.4f}")
assert all(np.all(np.asarray(p)[~np.broadcast_to(np.asarray(m), p.shape)] == 0)
           for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)))
