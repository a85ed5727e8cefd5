"""RigL (Evci et al. 2020): sparse from the first step, at a constant 90% with ERK per-layer densities;
every 100 steps the weakest 30% (cosine-decayed) of the active weights are dropped and as many pruned
weights with the largest gradients are regrown. `regrow="set"` regrows at random instead (SET).

Run: python examples/06_rigl.py     (41 s on 2 CPU cores, measured)
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
steps_per_epoch, epochs = len(x_train) // 128, 4
tx = jp.pruned(optax.adam(1e-3), schedule=jp.constant(0.9, every=100), distribution=jp.erk(),
               regrow="rigl", drop_fraction=0.3, regrow_until=3 * steps_per_epoch)
state = tx.init(params)


@jax.jit
def step(params, state, x, y):
  def loss_fn(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state, loss


first = None
for epoch in range(epochs):
  perm = np.random.default_rng([0, epoch]).permutation(len(x_train))
  for i in range(steps_per_epoch):
    idx = perm[i * 128:(i + 1) * 128]
    params, state, loss = step(params, state, x_train[idx], y_train[idx])
    if first is None:
      first = jp.masks_of(state)
  masks = jp.masks_of(state)
  moved = sum(int((a & ~b).sum()) for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(first)) if a.ndim)
  acc = float(jnp.mean(jnp.argmax(model.apply({"params": params}, x_test), -1) == y_test))
  print(f"epoch {epoch}: loss {float(loss):.3f}  sparsity {float(jp.sparsity(masks, params)):.4f}  "
        f"weights active now that were pruned at step 0: {moved:,}  test accuracy {acc:.4f}")
