"""Types shared across jprune's signatures (for annotations; nothing here is checked at run time)."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import jax
import numpy as np

PyTree = Any
"""A nested structure of arrays (dicts, lists, tuples, NamedTuples, flax States...): params, scores, masks."""

Where = Union[None, str, Callable[[str, Any], bool], PyTree]
"""Which leaves to prune (`jprune.select.resolve`): None (leaves named `kernel`), a regex on the '/'-joined
path, a predicate `(path, leaf) -> bool`, or a bool tree with the params' structure."""

Scalar = Union[float, int, np.floating, np.integer, jax.Array]
"""A number, a NumPy scalar or a 0-d array (traced under `jit`)."""

Sparsity = Union[Scalar, Mapping[str, Any], PyTree, Callable[..., PyTree]]
"""A fraction to prune in [0, 1): one number, a per-leaf tree of numbers with the scores' structure, or a
distribution (`uniform()`, `erk()`, `by_path(...)`) that turns one number into per-leaf targets."""
