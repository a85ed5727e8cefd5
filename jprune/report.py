"""Reports: per-leaf summary table (shape, kept, sparsity, dense vs sparse bytes), FLOPs and latency."""

from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple, Optional

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
  """`rows` per leaf; `total` over every leaf; `masked` over the leaves that carry a mask (the pruned ones: its
  sparsity is the one a pruning target refers to; `total` also counts biases, norms and other unpruned leaves)."""
  rows: list
  total: Row
  masked: Optional[Row] = None

  def _totals(self) -> list:
    return ([self.masked] if self.masked is not None else []) + [self.total]

  def to_dict(self) -> dict:
    out = {"leaves": [r._asdict() for r in self.rows], "total": self.total._asdict()}
    if self.masked is not None:
      out["masked"] = self.masked._asdict()
    return out

  def markdown(self) -> str:
    head = "| path | shape | kept | sparsity | dense bytes | sparse bytes |\n|---|---|---:|---:|---:|---:|\n"
    body = "".join(f"| {r.path} | {_shape(r)} | {r.kept:,} / {r.size:,} | {r.sparsity:.2%} | {r.dense_bytes:,} | "
                   f"{r.sparse_bytes:,} |\n" for r in self.rows + self._totals())
    return head + body

  def __str__(self) -> str:
    w = max([len(r.path) for r in self.rows + self._totals()] + [5])
    lines = [f"{'path':<{w}}  {'shape':<18} {'kept':>12} {'size':>12} {'sparsity':>9} {'dense B':>12} "
             f"{'sparse B':>12}"]
    for r in self.rows + self._totals():
      lines.append(f"{r.path:<{w}}  {_shape(r):<18} {r.kept:>12,} {r.size:>12,} {r.sparsity:>9.2%} "
                   f"{r.dense_bytes:>12,} {r.sparse_bytes:>12,}")
    return "\n".join(lines)


def _shape(r: Row) -> str:
  return "" if r.path.startswith("total") else str(r.shape)


def summary(params, masks=None) -> Summary:
  """Per-leaf shape, kept entries, sparsity, dense bytes and sparse bytes (kept values + 1 bit per entry).

  Leaves without a mask (scalar True) count as dense in both columns. Returns a `Summary`: print it for a
  table, `.markdown()` for a report, `.to_dict()` for JSON. nnx Modules and States are accepted as they come
  (their `nnx.Param`s).
  """
  params, masks = _tree.pure(params), _tree.pure(masks)
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
  return Summary(rows, _total("total", rows), _total("total (masked leaves)", [r for r, m in zip(rows, m_leaves)
                                                                          if m is not None and np.ndim(m) > 0]))


def _total(name: str, rows: list):
  if not rows:
    return None
  size, kept = sum(r.size for r in rows), sum(r.kept for r in rows)
  return Row(name, (), "", size, kept, 1 - kept / max(size, 1), sum(r.dense_bytes for r in rows),
             sum(r.sparse_bytes for r in rows))


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


def layer_flops(model, variables, x) -> dict:
  """XLA-counted FLOPs of every Dense/Conv call of a linen `model` on input `x`, keyed by kernel path.

  Each layer's call is recorded with `flax.linen.intercept_methods`, then compiled alone on its recorded input
  shape and costed by XLA (`cost_analysis`), so nothing is counted by hand.
  """
  import flax.linen as nn
  records = []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, (nn.Dense, nn.Conv)):
      records.append((tuple(context.module.scope.path), context.module, args[0].shape, args[0].dtype))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  out = {}
  for path, mod, shape, dtype in records:
    sub = mod.clone(parent=None)
    p = variables["params"]
    for k in path:
      p = p[k]
    out["/".join(path) + "/kernel"] = flops(lambda p, x, sub=sub: sub.apply({"params": p}, x), p,
                                            jax.ShapeDtypeStruct(shape, dtype))
  return out


def effective_flops(total: float, per_layer: dict, params, masks) -> float:
  """Dense FLOPs minus each layer's FLOPs times its pruned fraction (what sparse kernels could skip)."""
  density = {r.path: r.kept / max(r.size, 1) for r in summary(params, masks).rows}
  return total - sum(f * (1.0 - density.get(path, 1.0)) for path, f in per_layer.items())


# ------------------------------------------------------------------------------------------------ plots
def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_sparsity(params, masks, path: str) -> str:
  """Bar chart of per-layer sparsity (leaves that carry a mask)."""
  plt = _plt()
  rows = [r for r in summary(params, masks).rows if r.sparsity > 0 or r.path.endswith("kernel")]
  fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(rows) + 2), 3.5))
  ax.bar(range(len(rows)), [100 * r.sparsity for r in rows], color="#4477aa")
  ax.set_xticks(range(len(rows)), [r.path for r in rows], rotation=45, ha="right", fontsize=8)
  ax.set_ylabel("sparsity (%)")
  ax.set_ylim(0, 100)
  ax.set_title("per-layer sparsity")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_curves(histories: dict, path: str) -> str:
  """Training loss and test accuracy per epoch, one line per phase (e.g. dense, fine-tune)."""
  plt = _plt()
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
  offset = 0
  for name, hist in histories.items():
    if not hist:
      continue
    ep = [offset + h["epoch"] for h in hist]
    a1.plot(ep, [h["train_loss"] for h in hist], marker=".", label=name)
    a2.plot(ep, [100 * h["test_top1"] for h in hist], marker=".", label=name)
    offset = ep[-1]
  a1.set_xlabel("epoch")
  a1.set_ylabel("train loss")
  a2.set_xlabel("epoch")
  a2.set_ylabel("test top-1 (%)")
  a1.legend()
  a2.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_score_histograms(scores, masks, path: str, max_layers: int = 12) -> str:
  """Histogram of log10 scores per masked layer, kept vs pruned."""
  plt = _plt()
  items = [(p, s, m) for (p, s), m in zip(_tree.leaves_with_paths(scores), jax.tree.leaves(masks))
           if np.ndim(m) > 0][:max_layers]
  cols = min(3, max(1, len(items)))
  rows = -(-len(items) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
  for ax, (p, s, m) in zip(axes.reshape(-1), items):
    s = np.asarray(s, np.float64)
    keep = np.broadcast_to(np.asarray(m), s.shape)
    v = np.log10(np.abs(s) + 1e-12)
    bins = np.linspace(v.min(), v.max() + 1e-9, 50)
    ax.hist(v[keep], bins=bins, alpha=0.7, label="kept", color="#228833", histtype="stepfilled")   # one patch
    ax.hist(v[~keep], bins=bins, alpha=0.7, label="pruned", color="#cc3311", histtype="stepfilled")
    ax.set_title(p, fontsize=9)
    ax.set_xlabel("log10 |score|", fontsize=8)
  for ax in axes.reshape(-1)[len(items):]:
    ax.axis("off")
  axes.reshape(-1)[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_lines(curves: dict, path: str, *, xlabel: str, ylabel: str, title: str = "", baseline=None) -> str:
  """Generic line plot: curves = {name: (xs, ys)}; optional horizontal baseline (e.g. dense accuracy)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, (xs, ys) in curves.items():
    ax.plot(xs, ys, marker="o", label=name)
  if baseline is not None:
    ax.axhline(baseline, color="gray", linestyle="--", label="dense")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
