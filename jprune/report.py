"""Reports: per-leaf summary table (shape, kept, sparsity, dense vs sparse bytes), FLOPs and latency."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jprune import _tree


class Row(NamedTuple):
  path: str
  shape: tuple
  dtype: str
  size: int
  kept: int
  sparsity: float
  dense_bytes: int
  sparse_bytes: int


class Summary(NamedTuple):
  rows: list
  total: Row

  def to_dict(self) -> dict:
    return {"leaves": [r._asdict() for r in self.rows], "total": self.total._asdict()}

  def markdown(self) -> str:
    head = "| path | shape | kept | sparsity | dense bytes | sparse bytes |\n|---|---|---:|---:|---:|---:|\n"
    body = "".join(f"| {r.path} | {r.shape} | {r.kept:,} / {r.size:,} | {r.sparsity:.2%} | {r.dense_bytes:,} | "
                   f"{r.sparse_bytes:,} |\n" for r in self.rows + [self.total])
    return head + body

  def __str__(self) -> str:
    w = max([len(r.path) for r in self.rows] + [5])
    lines = [f"{'path':<{w}}  {'shape':<18} {'kept':>12} {'size':>12} {'sparsity':>9} {'dense B':>12} "
             f"{'sparse B':>12}"]
    for r in self.rows + [self.total]:
      lines.append(f"{r.path:<{w}}  {str(r.shape):<18} {r.kept:>12,} {r.size:>12,} {r.sparsity:>9.2%} "
                   f"{r.dense_bytes:>12,} {r.sparse_bytes:>12,}")
    return "\n".join(lines)


def summary(params, masks=None) -> Summary:
  """Per-leaf shape, kept entries, sparsity, dense bytes and sparse bytes (kept values + 1 bit per entry).

  Leaves without a mask (scalar True) count as dense in both columns. Returns a `Summary`: print it for a
  table, `.markdown()` for a report, `.to_dict()` for JSON.
  """
  if masks is not None:
    _tree.check_broadcastable(params, masks)
    m_leaves = jax.tree.leaves(masks)
  else:
    m_leaves = [None] * len(jax.tree.leaves(params))
  rows = []
  for (path, p), m in zip(_tree.leaves_with_paths(params), m_leaves):
    size = int(np.prod(p.shape))
    item = jnp.dtype(p.dtype).itemsize
    dense = size * item
    if m is None or np.ndim(m) == 0 and bool(m):
      kept, sparse = size, dense
    else:
      kept = int(jnp.sum(jnp.broadcast_to(m, p.shape)))
      sparse = kept * item + math.ceil(size / 8)
    rows.append(Row(path, tuple(p.shape), str(jnp.dtype(p.dtype)), size, kept, 1 - kept / max(size, 1), dense,
                    sparse))
  size = sum(r.size for r in rows)
  kept = sum(r.kept for r in rows)
  total = Row("total", (), "", size, kept, 1 - kept / max(size, 1), sum(r.dense_bytes for r in rows),
              sum(r.sparse_bytes for r in rows))
  return Summary(rows, total)


def flops(fn: Callable, *args) -> float:
  """FLOPs of `fn(*args)` from XLA's cost analysis of the compiled computation."""
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def latency(fn: Callable, *args, repeats: int = 30, warmup: int = 3) -> float:
  """Median seconds of a jitted call to `fn(*args)` (compiled once, outputs blocked on)."""
  f = jax.jit(fn)
  for _ in range(warmup):
    jax.block_until_ready(f(*args))
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))
