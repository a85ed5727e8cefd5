"""Bytes on disk of `export_sparse` / raw dense bytes, next to orbax's own checkpoint of the same pruned params
and the bound for kept values plus an entropy-coded mask; save and load times for both.

~3M-parameter MLP (784-1536-1024-10), unstructured magnitude masks at 50%, 90%, 95%.
Run: python benchmarks/export_size.py
"""

import math
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402
from overhead import init_mlp  # noqa: E402

import jprune as jp  # noqa: E402


def dir_bytes(path):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def entropy_bound(density, itemsize=4):
  h = 0.0 if density in (0, 1) else -(density * math.log2(density) + (1 - density) * math.log2(1 - density))
  return density + h / (8 * itemsize)


def main():
  params = init_mlp(jax.random.key(0))
  raw = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  n = sum(x.size for x in jax.tree.leaves(params))
  rows = []
  for s in (0.5, 0.9, 0.95):
    masks = jp.topk(jp.scores(jp.magnitude(), params), s)
    pruned = jax.block_until_ready(jp.apply(params, masks))
    density = float(sum(int(np.asarray(m).sum()) if np.ndim(m) else x.size
                        for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)))) / n
    tmp = tempfile.mkdtemp()
    try:
      t = time.perf_counter()
      size = jp.export_sparse(os.path.join(tmp, "m.jps"), pruned, masks)
      t_save = time.perf_counter() - t
      t = time.perf_counter()
      p2, m2 = jp.load_sparse(os.path.join(tmp, "m.jps"), like=params)
      jax.block_until_ready(p2)
      t_load = time.perf_counter() - t
      assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(pruned)))
      t = time.perf_counter()
      with jp.checkpoint.Manager(os.path.join(tmp, "orbax")) as mngr:
        mngr.save(0, pruned)
      t_osave = time.perf_counter() - t
      orbax_size = dir_bytes(os.path.join(tmp, "orbax", "0"))
      t = time.perf_counter()
      with jp.checkpoint.Manager(os.path.join(tmp, "orbax")) as mngr:
        jax.block_until_ready(mngr.restore(0, like=pruned))
      t_oload = time.perf_counter() - t
    finally:
      shutil.rmtree(tmp)
    row = {"sparsity": s, "density": density, "raw_bytes": raw, "export_bytes": size,
           "export_over_raw": size / raw, "orbax_bytes": orbax_size, "orbax_over_raw": orbax_size / raw,
           "entropy_bound_over_raw": entropy_bound(density), "export_save_s": t_save, "export_load_s": t_load,
           "orbax_save_s": t_osave, "orbax_load_s": t_oload}
    rows.append(row)
    print(f"export {s:.0%}: {size / raw:.4f} of raw ({size:,} B) vs orbax {orbax_size / raw:.4f}, bound "
          f"{entropy_bound(density):.4f}; save {t_save:.2f}s / load {t_load:.2f}s (orbax {t_osave:.2f}s / "
          f"{t_oload:.2f}s)")
  path = _common.write("export_size", {"params": n, "rows": rows, "target_at_90": 0.12})
  print("wrote", path)


if __name__ == "__main__":
  main()
