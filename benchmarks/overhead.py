"""Step-time overhead of `pruned(optax.adam)` over plain `optax.adam` on a ~3M-parameter MLP, side by side.

Polynomial schedule with a mask update every 100 steps; each round times 300 jitted steps of each optimizer.
Step time = median step + (excess of the mask-update steps over the median) / 300, i.e. the median with the
mask updates amortised in (a plain mean is dominated by random stalls of a shared 2-core machine; it is
reported too). Rounds alternate the two optimizers; ratios are medians over rounds.
Run: python benchmarks/overhead.py [--rounds 5] [--steps 300]
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

import jprune as jp  # noqa: E402

SIZES = (784, 1536, 1024, 10)  # 2.8M parameters


def init_mlp(key):
  params = {}
  for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
    params[f"Dense_{i}"] = {"kernel": jax.random.normal(jax.random.fold_in(key, i), (a, b)) / np.sqrt(a),
                            "bias": jnp.zeros((b,))}
  return params


def loss_fn(params, x, y):
  h = x
  for i in range(len(SIZES) - 1):
    h = h @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"][None]
    if i < len(SIZES) - 2:
      h = jax.nn.relu(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def make_step(tx):
  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def run(tx, params, batches, steps, is_update=lambda i: False):
  state = tx.init(params)
  step = make_step(tx)
  params, state = step(params, state, *batches[0])  # compile
  jax.block_until_ready(params)
  times = []
  t0 = time.perf_counter()
  for i in range(steps):
    t = time.perf_counter()
    params, state = step(params, state, *batches[i % len(batches)])
    jax.block_until_ready(params)
    times.append(time.perf_counter() - t)
  total = time.perf_counter() - t0
  med = float(np.median(times))
  # step i of this loop is optimizer step i + 1 (one compile step ran before)
  excess = sum(max(0.0, t - med) for i, t in enumerate(times) if is_update(i + 1))
  return med + excess / steps, med, total / steps, params, state


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--batch", type=int, default=128)
  args = ap.parse_args()
  key = jax.random.key(0)
  params = init_mlp(key)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  batches = [(jax.random.normal(jax.random.fold_in(key, 100 + i), (args.batch, SIZES[0])),
              jax.random.randint(jax.random.fold_in(key, 200 + i), (args.batch,), 0, 10)) for i in range(8)]
  plain = optax.adam(1e-3)
  schedule = jp.polynomial(final=0.9, begin=1, end=args.steps, every=100)
  pruned = jp.pruned(optax.adam(1e-3), criterion=jp.magnitude(), schedule=schedule)
  res = {"plain": [], "pruned": []}
  for r in range(args.rounds):
    for name, tx in (("plain", plain), ("pruned", pruned)) if r % 2 == 0 else (("pruned", pruned), ("plain", plain)):
      upd = (lambda i: bool(schedule.is_update(i))) if name == "pruned" else (lambda i: False)
      amort, med, mean, p, s = run(tx, params, batches, args.steps, upd)
      res[name].append((amort, med, mean))
      if name == "pruned":
        sp = float(jp.sparsity(jp.masks_of(s), p))
  ratio = lambda j: float(np.median([a[j] / b[j] for a, b in zip(res["pruned"], res["plain"])]))
  amort_ratio, med_ratio, mean_ratio = ratio(0), ratio(1), ratio(2)
  out = {"params": n_params, "steps": args.steps, "batch": args.batch, "rounds": args.rounds,
         "plain_step_s": float(np.median([x[0] for x in res["plain"]])),
         "pruned_step_s": float(np.median([x[0] for x in res["pruned"]])),
         "amortised_ratio": amort_ratio, "median_step_ratio": med_ratio, "mean_ratio": mean_ratio, "final_sparsity": sp, "target": 1.05}
  path = _common.write("overhead", out)
  print(f"overhead {n_params / 1e6:.1f}M-param MLP: pruned(adam)/adam = {amort_ratio:.3f} amortised over "
        f"{args.steps} steps incl. mask updates ({med_ratio:.3f} median step, {mean_ratio:.3f} plain mean); sparsity {sp:.2f}; wrote {path}")


if __name__ == "__main__":
  main()
