"""Gradual magnitude pruning (Zhu & Gupta 2017) inside the training loop: one optax transformation.

Run: python examples/02_gradual_magnitude.py     (24 s on 2 CPU cores, measured)
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
steps_per_epoch, epochs = len(x_train) // 128, 5
total = steps_per_epoch * epochs

# dense for the first epoch, prune to 90% over the next three (mask update every 100 steps), fine-tune last
tx = jp.pruned(optax.adam(1e-3), criterion=jp.magnitude(),
               schedule=jp.polynomial(final=0.9, begin=steps_per_epoch, end=4 * steps_per_epoch, every=100),
               scope="layer", distribution=jp.erk())
state = tx.init(params)


@jax.jit
def step(params, state, x, y):
  def loss_fn(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state, loss


for epoch in range(epochs):
  perm = np.random.default_rng([0, epoch]).permutation(len(x_train))
  for i in range(steps_per_epoch):
    idx = perm[i * 128:(i + 1) * 128]
    params, state, loss = step(params, state, x_train[idx], y_train[idx])
  masks = jp.masks_of(state)
  acc = float(jnp.mean(jnp.argmax(model.apply({"params": params}, x_test), -1) == y_test))
  print(f"epoch {epoch}: loss {float(loss):.3f}  sparsity {float(jp.sparsity(masks, params)):.3f}  "
        f"test accuracy {acc:.4f}")

print(jp.summary(params, jp.masks_of(state)))
