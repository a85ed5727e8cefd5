"""Per-leaf sparsity targets from one global target: uniform, ERK (Evci et al. 2020), by path.

A distribution is a callable `dist(params, sparsity=None, where=None) -> tree` giving each selected leaf its
sparsity (jnp scalars; 0 at unselected leaves). Inside `jprune.pruned(...)` it is called with the schedule's
current value, so `erk()` there takes no number; one-shot, `jp.topk(scores, jp.erk(0.9))` works directly.
Everything is jnp arithmetic, so a traced schedule value is fine.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jprune import _tree
from jprune import select as _select


def _fill(params, flags, values):
  leaves = [v if f else jnp.float32(0.0) for f, v in zip(flags, values)]
  return jax.tree.unflatten(jax.tree.structure(params), leaves)


def _target(default, sparsity):
  s = default if sparsity is None else sparsity
  if s is None:
    raise ValueError("this distribution needs a sparsity: pass it to the factory or the call.")
  _tree.check_sparsity(s)
  return jnp.asarray(s, jnp.float32)


def uniform(sparsity: Optional[float] = None):
  """Every selected leaf gets the same sparsity."""

  def dist(params, s=None, where=None):
    flags = jax.tree.leaves(_select.resolve(where, params))
    t = _target(sparsity, s)
    return _fill(params, flags, [t] * len(flags))

  dist.sparsity = sparsity  # type: ignore[attr-defined]  # a fixed target: `pruned` refuses it (its schedule gives the target)
  return dist


def erk(sparsity: Optional[float] = None, scale: float = 1.0):
  """Erdős–Rényi-Kernel: density ∝ (Σ dims)/(Π dims), layers that would exceed density 1 are made dense.

  The kept count over all selected leaves meets the target exactly (up to rounding per leaf).
  `scale` is the power of the raw ERK ratio (1.0 = ERK; 0.0 = uniform).
  """

  def dist(params, s=None, where=None):
    flags = jax.tree.leaves(_select.resolve(where, params))
    t = _target(sparsity, s)
    shapes = [p.shape for p, f in zip(jax.tree.leaves(params), flags) if f]
    n = jnp.asarray([float(np.prod(sh)) for sh in shapes], jnp.float32)
    raw = jnp.asarray([(sum(sh) / max(1.0, float(np.prod(sh)))) ** scale for sh in shapes], jnp.float32)
    keep_total = (1.0 - t) * jnp.sum(n)
    dense = jnp.zeros(len(shapes), jnp.bool_)
    eps = jnp.float32(0.0)
    for _ in range(len(shapes)):  # each round makes at least one more layer dense, or is a fixed point
      eps = (keep_total - jnp.sum(jnp.where(dense, n, 0.0))) / jnp.maximum(
          jnp.sum(jnp.where(dense, 0.0, raw * n)), 1e-30)
      dense = dense | (eps * raw > 1.0)
    density = jnp.where(dense, 1.0, jnp.clip(eps * raw, 0.0, 1.0))
    per = list(jnp.clip(1.0 - density, 0.0, 1.0 - 1e-7))
    it = iter(per)
    return _fill(params, flags, [next(it) if f else None for f in flags])

  dist.sparsity = sparsity  # type: ignore[attr-defined]
  return dist


def by_path(targets: Mapping[str, float], default: float = 0.0):
  """Per-leaf sparsity by regex (`re.search` on '/'-joined paths; first match wins), `default` otherwise.

  Called with a global `s` (as inside `pruned(...)` during a schedule), every leaf's value is rescaled by
  `s / S`, where `S` is the overall sparsity the mapping implies, so at `s == S` the mapping holds exactly.
  """
  for pat, v in targets.items():
    _tree.check_sparsity(v, f"sparsity for {pat!r}")
  compiled = [(re.compile(p), float(v)) for p, v in targets.items()]

  def dist(params, s=None, where=None):
    flags = jax.tree.leaves(_select.resolve(where, params))
    items = _tree.leaves_with_paths(params)
    vals, sizes = [], []
    for (path, p), f in zip(items, flags):
      v = next((v for rx, v in compiled if rx.search(path)), default)
      vals.append(v if f else 0.0)
      sizes.append(float(np.prod(p.shape)) if f else 0.0)
    out = [jnp.float32(v) for v in vals]
    if s is not None:
      implied = sum(v * n for v, n in zip(vals, sizes)) / max(sum(sizes), 1.0)
      factor = jnp.asarray(s, jnp.float32) / max(implied, 1e-12)
      out = [jnp.clip(v * factor, 0.0, 1.0 - 1e-7) for v in out]
    return _fill(params, flags, out)

  return dist
