"""Weight merging vs plain removal of neurons, before any fine-tuning, on a trained LeNet-300-100.

Trains LeNet-300-100 on Fashion-MNIST (AdamW, `--epochs`), removes the lowest-L2 30/50/70/90% of hidden neurons
by structured compaction, once by slicing them out and once folding each removed neuron's outgoing weights into
its most similar kept neuron first (`structured.compact(..., merge=True)`); test accuracy of both, no fine-tuning.
Run: python benchmarks/merge.py [--epochs 10]
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

import jprune as jp  # noqa: E402
from jprune import data, structured  # noqa: E402
from jprune.models import LeNet300, resize  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--epochs", type=int, default=10)
  args = ap.parse_args()
  ds = data.load("fashion_mnist")
  model = LeNet300()
  params = model.init(jax.random.key(0), ds.x_train[:1])["params"]
  steps = args.epochs * (len(ds.x_train) // 128)
  tx = optax.adamw(optax.cosine_decay_schedule(1e-3, steps), weight_decay=1e-4)
  state = tx.init(params)

  @jax.jit
  def step(p, s, x, y):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  for e in range(args.epochs):
    for x, y in data.batches(ds.x_train, ds.y_train, 128, seed=0, epoch=e):
      params, state = step(params, state, x, y)
  acc = lambda m, p: float(jnp.mean(jnp.argmax(m.apply({"params": p}, ds.x_test), -1) == ds.y_test))
  dense = acc(model, params)
  groups = structured.groups(lambda p, x: model.apply({"params": p}, x), params, ds.x_train[:2])
  gscores = structured.group_scores(groups, jp.scores(jp.magnitude(), params), reduce="l2")
  rows = []
  for s in (0.3, 0.5, 0.7, 0.9):
    gm = structured.group_masks(groups, gscores, s, max_ratio=0.95)
    removed, _ = structured.compact(params, groups, gm)
    merged, _ = structured.compact(params, groups, gm, merge=True)
    small = resize(model, removed)
    rows.append({"neurons_removed": s, "widths": list(small.widths), "removal_top1": acc(small, removed),
                 "merge_top1": acc(small, merged)})
    print(f"{s:.0%} of hidden neurons removed {small.widths}: removal {100 * rows[-1]['removal_top1']:.2f}%, "
          f"merge {100 * rows[-1]['merge_top1']:.2f}% (dense {100 * dense:.2f}%), before fine-tuning", flush=True)
  print("wrote", _common.write("merge", {"epochs": args.epochs, "dense_top1": dense, "rows": rows}))


if __name__ == "__main__":
  main()
