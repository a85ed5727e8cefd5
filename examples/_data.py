"""Example data: real Fashion-MNIST when the Debian files are present, else a small generated task.

`JPRUNE_EXAMPLE_SMOKE=1` (set by `tests/test_examples.py`) runs every example in a smoke mode: at most 2,560
examples per split (20 steps an epoch), so CI runs them all and they cannot rot.
"""

import os

import numpy as np

SMOKE = bool(os.environ.get("JPRUNE_EXAMPLE_SMOKE"))


def fashion_mnist_or_synthetic(limit=None, seed=0):
  if SMOKE:
    limit = 2560 if limit is None else min(limit, 2560)
  try:
    from jprune import data
    data.find_manual_dir()   # offline without the files: say so at once (tfds would retry a download for minutes)
    ds = data.load("fashion_mnist", limit=limit)
    print(f"data: Fashion-MNIST ({len(ds.x_train)} train / {len(ds.x_test)} test)")
    return ds.x_train, ds.y_train, ds.x_test, ds.y_test
  except Exception as e:  # offline without the Debian package: a learnable synthetic task of the same shape
    print(f"data: synthetic 28x28 10-class task ({type(e).__name__}: Fashion-MNIST not available)")
    rng = np.random.default_rng(seed)
    protos = rng.random((10, 28, 28, 1)).astype(np.float32)
    def make(n):
      y = rng.integers(0, 10, n).astype(np.int32)
      x = np.clip(protos[y] + 0.35 * rng.standard_normal((n, 28, 28, 1)).astype(np.float32), 0, 1)
      return x, y
    return (*make(2560), *make(1000)) if SMOKE else (*make(12000), *make(2000))
