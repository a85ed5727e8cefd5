"""The seeds' workflow: train, score weights by |∂L/∂w| with jax.grad, prune the lowest 90%, fine-tune — next to
the same steps with magnitude |w| scores.

Run: python examples/01_one_shot_gradient.py     (34 s on 2 CPU cores, measured; real Fashion-MNIST)

Measured (LeNet-300-100, 3 dense epochs, 90% of every kernel, 3 fine-tuning epochs with the masks kept):
dense 0.856; by |grad| 0.120 right after pruning, 0.527 fine-tuned; by |w| 0.365, then 0.865. The gradient
alone is a poor one-shot criterion here: near a trained minimum a weight's gradient says little about how much the
loss needs that weight, and the fine-tuning does not make up for it; magnitude recovers fully (above dense).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jprune as jp
from jprune.models import LeNet300

from _data import fashion_mnist_or_synthetic

DENSE_EPOCHS, FINETUNE_EPOCHS = 3, 3

x_train, y_train, x_test, y_test = fashion_mnist_or_synthetic()
model = LeNet300()
STEPS = len(x_train) // 128   # per epoch
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
params = train(params, optax.adam(1e-3), epochs=DENSE_EPOCHS, seed=0)
dense_acc = accuracy(params)

# 2. gradient importance: mean |∂L/∂w| over 50 training batches (jitted once, run per batch); magnitude |w| to compare
calib = [(x_train[i:i + 256], y_train[i:i + 256]) for i in range(0, min(50 * 256, len(x_train)), 256)]
criteria = {"|grad|": jp.scores(jp.gradient(), params, loss_fn=loss_fn, batches=calib),
            "|w|": jp.scores(jp.magnitude(), params)}

results = {}
for name, scores in criteria.items():
  # 3. prune the lowest 90% of every kernel, exactly
  masks = jp.topk(scores, 0.9, scope="layer")
  pruned = jp.apply(params, masks)
  pruned_acc = accuracy(pruned)
  # 4. fine-tune as long as the dense training, with the masks held fixed: pruned weights stay exactly 0.0
  finetune_tx = optax.chain(optax.adam(optax.cosine_decay_schedule(1e-3, FINETUNE_EPOCHS * STEPS)),
                            jp.keep_pruned(masks))
  tuned = train(pruned, finetune_tx, epochs=FINETUNE_EPOCHS, seed=1)
  results[name] = (pruned_acc, accuracy(tuned))
  assert all(np.all(np.asarray(p)[~np.broadcast_to(np.asarray(m), p.shape)] == 0)
             for p, m in zip(jax.tree.leaves(tuned), jax.tree.leaves(masks)))

print(jp.summary(tuned, masks))
print(f"dense accuracy {dense_acc:.4f}; 90% of every kernel pruned in one shot, then {FINETUNE_EPOCHS} epochs of "
      f"fine-tuning:")
for name, (pruned_acc, tuned_acc) in results.items():
  print(f"  by {name:6s}: right after pruning {pruned_acc:.4f} | fine-tuned {tuned_acc:.4f}")
