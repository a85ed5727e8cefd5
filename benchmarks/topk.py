"""Exact global top-k on 16M and 128M float32 params: time / one jitted abs().sum() pass, side by side.

Also reports `jax.lax.top_k` and `jnp.sort` on the concatenated scores, the approaches that copy the model.
Run: python benchmarks/topk.py [--sizes 16,128] [--sparsity 0.9]
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

import jprune as jp  # noqa: E402


def make_tree(n_million: int):
  """A tree of transformer-ish leaves totalling n_million * 2**20 float32 entries."""
  n = n_million * 2**20
  shapes, left, i = [], n, 0
  while left > 0:
    cols = 1024 if i % 2 == 0 else 4096
    rows = min(left // cols, 4096 if i % 2 == 0 else 1024)
    if rows == 0:
      break
    shapes.append((rows, cols))
    left -= rows * cols
    i += 1
  key = jax.random.key(0)
  return {f"layer{j}": {"kernel": jax.random.normal(jax.random.fold_in(key, j), s)} for j, s in enumerate(shapes)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sizes", default="16,128")
  ap.add_argument("--sparsity", type=float, default=0.9)
  ap.add_argument("--rounds", type=int, default=3)
  args = ap.parse_args()
  rows = []
  for m in [int(s) for s in args.sizes.split(",")]:
    tree = make_tree(m)
    n = sum(x.size for x in jax.tree.leaves(tree))
    k = int(round(args.sparsity * n))
    scores = jax.block_until_ready(jp.scores(jp.magnitude(), tree))  # the scores tree is top-k's input
    one_pass = jax.jit(lambda t: sum(jnp.abs(x).sum() for x in jax.tree.leaves(t)))
    ours = jax.jit(lambda s: jp.topk(s, args.sparsity, scope="global"))
    with_scores = jax.jit(lambda t: jp.topk(jp.scores(jp.magnitude(), t), args.sparsity, scope="global"))
    t = _common.interleaved({"pass": (one_pass, (tree,)), "ours": (ours, (scores,)),
                             "with": (with_scores, (tree,))}, rounds=args.rounds)
    t_pass, t_ours, t_with = t["pass"], t["ours"], t["with"]
    masks = ours(scores)
    from jprune import masks as M
    search = jax.jit(lambda s: M.kth_key(jax.tree.leaves(s), k, M._keys))(scores)
    passes = int(search.it)
    kept = int(sum(int(x.sum()) for x in jax.tree.leaves(masks)))
    assert kept == n - k, (kept, n - k)

    def lax_topk(t):
      flat = jnp.concatenate([jnp.abs(x).reshape(-1) for x in jax.tree.leaves(t)])
      vals, _ = jax.lax.top_k(flat, n - k)
      return vals[-1]

    def sort_all(t):
      flat = jnp.concatenate([jnp.abs(x).reshape(-1) for x in jax.tree.leaves(t)])
      return jnp.sort(flat)[k]

    t_topk = _common.timeit(jax.jit(lax_topk), tree, repeats=1)
    t_sort = _common.timeit(jax.jit(sort_all), tree, repeats=1)
    row = {"params": n, "sparsity": args.sparsity, "one_pass_s": t_pass, "jprune_topk_s": t_ours,
           "jprune_scores_and_topk_s": t_with, "scores_and_topk_over_pass": t_with / t_pass,
           "lax_top_k_s": t_topk, "sort_s": t_sort, "jprune_over_pass": t_ours / t_pass,
           "lax_top_k_over_jprune": t_topk / t_ours, "sort_over_jprune": t_sort / t_ours, "exact": True,
           "counting_passes": passes}
    rows.append(row)
    print(f"topk {n / 2**20:.0f}M params: jprune {t_ours * 1e3:.1f} ms = {t_ours / t_pass:.1f}x one abs().sum() "
          f"pass ({t_pass * 1e3:.1f} ms), {passes} counting passes; with the |w| scores {t_with / t_pass:.1f}x; lax.top_k "
          f"{t_topk / t_ours:.1f}x slower, sort {t_sort / t_ours:.1f}x slower")
    del tree, masks, scores
  path = _common.write("topk", {"rows": rows, "target_over_pass": 10.0})
  print("wrote", path)


if __name__ == "__main__":
  main()
