"""Sensitivity analysis and sweeps for any model: functions of params, scores and your own `evaluate`.

`layer_sensitivity` prunes one selected leaf at a time (one-shot, no fine-tuning) at each sparsity of a grid and
evaluates the model; `allocate` turns that into per-layer sparsities that reach an overall target while losing
the least (ready for `jp.by_path` or `topk`'s per-leaf sparsity); `sweep` compares criteria across sparsities from
one set of params (one-shot, or with your fine-tuning). `plot_sensitivity` / `plot_sweep` draw them as PNGs.
Nothing here knows the model: it sees params, scores and `evaluate(params) -> float` (or a dict of floats, with
`metric=` naming the one to compare). `jprune sensitivity` and `jprune sweep` are these functions on the
reference models.

  >>> import jax.numpy as jnp, jprune as jp
  >>> params = {"a": {"kernel": jnp.arange(1.0, 9.0)}, "b": {"kernel": jnp.arange(1.0, 5.0)}}
  >>> kept = lambda p: float(sum(jnp.sum(p[k]["kernel"]) for k in p))     # a stand-in for accuracy
  >>> sens = jp.analysis.layer_sensitivity(params, jp.scores(jp.magnitude(), params), kept, grid=(0.5,))
  >>> sens.metric          # 46 unpruned; half of a loses 1+2+3+4, half of b loses 1+2
  {'a/kernel': [36.0], 'b/kernel': [43.0]}
  >>> jp.analysis.allocate(sens, 0.15)   # b's half costs 1.5 per pruned weight, a's 2.5: b first
  {'^a/kernel$': 0.0, '^b/kernel$': 0.5}
"""

from __future__ import annotations

import math
import re
from typing import Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import numpy as np

from jprune import _tree
from jprune import criteria as _criteria
from jprune import masks as _masks
from jprune import select as _select
from jprune.types import PyTree

Evaluate = Callable[[PyTree], Union[float, Mapping[str, float]]]


class Sensitivity(NamedTuple):
  """Per-layer sensitivity: `metric[path][i]` is the metric with only `path` pruned to `grid[i]`."""
  baseline: float            # the metric of the unpruned params
  grid: tuple
  metric: dict               # path -> [metric at each grid sparsity]
  sizes: dict                # path -> number of entries of the leaf
  higher_is_better: bool


class Sweep(NamedTuple):
  """A criteria × sparsities grid: `cells[(criterion, sparsity)]` holds the metric, what `evaluate` returned
  and the sparsity reached over the selected leaves."""
  baseline: float
  criteria: tuple
  sparsities: tuple
  cells: dict                # (criterion, sparsity) -> {"metric": float, "eval": ..., "reached": float}
  higher_is_better: bool


def _metric(value, metric: Optional[str], what: str) -> float:
  if isinstance(value, Mapping):
    if metric is None or metric not in value:
      raise ValueError(f"{what} returned a dict with keys {sorted(value)}; pass metric= naming the one to compare.")
    value = value[metric]
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise TypeError(f"{what} must return a number or a dict of numbers, got {type(value).__name__}.") from None
  if math.isnan(v):
    raise ValueError(f"{what} returned NaN.")
  return v


def _check_grid(grid, name: str) -> tuple:
  grid = tuple(float(s) for s in grid)
  if not grid:
    raise ValueError(f"{name} is empty; give at least one sparsity in [0, 1).")
  for s in grid:
    _tree.check_sparsity(s, name)
  return grid


def layer_sensitivity(params: PyTree, scores: PyTree, evaluate: Evaluate,
                      grid: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98), *, where=None, granularity=None,
                      metric: Optional[str] = None, higher_is_better: bool = True,
                      progress: bool = False) -> Sensitivity:
  """Prunes each selected leaf alone to each sparsity of `grid` (top-k of `scores` in that leaf) and evaluates.

  Args:
    params: the trained params (any pytree; nnx states as they come).
    scores: a score tree with the params' structure (e.g. `jp.scores(jp.taylor(), params, ...)`).
    evaluate: `params -> float` (or a dict of floats with `metric=`), e.g. validation accuracy. Called
      `1 + layers × len(grid)` times; jit it for speed.
    grid: sparsities in [0, 1).
    where: which leaves to analyse (see `jprune.select.resolve`; default: kernels).
    granularity: unstructured (default), blocks or neurons/channels (N:M has no sparsity to vary).
    metric: the key of `evaluate`'s dict to compare.
    higher_is_better: False for a loss or a perplexity.
    progress: a progress bar over the layers.

  Returns:
    `Sensitivity(baseline, grid, metric={path: [...]}, sizes={path: n}, higher_is_better)`.
  """
  grid = _check_grid(grid, "grid")
  g = _masks.parse_granularity(granularity)
  if g.fixed_pattern:
    raise ValueError("layer_sensitivity varies the sparsity, which N:M fixes; use unstructured, blocks or neurons.")
  given, params, scores = params, _tree.pure(params), _tree.pure(scores)
  _tree.check_same_structure(params, scores, "params", "scores")
  flags = jax.tree.leaves(_select.resolve(where, params))
  items = _tree.leaves_with_paths(params)
  score_leaves = jax.tree.leaves(scores)
  treedef = jax.tree.structure(params)
  baseline = _metric(evaluate(given), metric, "evaluate")
  layers = [i for i, f in enumerate(flags) if f]
  from jprune._progress import progress_bar
  out: dict = {}
  for i in progress_bar(layers, desc="sensitivity", unit="layer", disable=not progress):
    path, leaf = items[i]
    out[path] = []
    for s in grid:
      # the leaf alone (a one-leaf tree): equal-shaped layers share one compiled top-k, the sparsity is an argument
      m = _masks.topk({"leaf": score_leaves[i]}, s, where=_select.everything, granularity=g)["leaf"]
      pruned = [x if j != i else _masks.apply(x, m) for j, (_, x) in enumerate(items)]
      out[path].append(_metric(evaluate(_as_given(given, jax.tree.unflatten(treedef, pruned))), metric, "evaluate"))
  sizes = {items[i][0]: int(np.prod(items[i][1].shape)) for i in layers}
  return Sensitivity(baseline, grid, out, sizes, higher_is_better)


def allocate(sens: Sensitivity, target: float) -> dict:
  """Per-layer sparsities from the grid whose weighted mean over the analysed leaves reaches `target`.

  Greedy: starting from nothing pruned, repeatedly raise to its next grid value the layer that loses the least
  metric per newly pruned weight, until the overall sparsity reaches `target` (or every layer is at the grid's
  top: then the result falls short, which `sum(s · size) / sum(size)` shows). Returns `{"^path$": sparsity}`
  for `jp.by_path` (or `jprune run --allocation` once saved as JSON).
  """
  _tree.check_sparsity(target, "target")
  layers, grid, sizes = list(sens.metric), sens.grid, sens.sizes
  sign = 1.0 if sens.higher_is_better else -1.0
  alloc = {l: 0.0 for l in layers}
  level = {l: -1 for l in layers}
  total = sum(sizes[l] for l in layers)
  reached = lambda: sum(alloc[l] * sizes[l] for l in layers) / total
  while reached() < target - 1e-9:
    best, best_cost = None, math.inf
    for l in layers:
      if level[l] + 1 >= len(grid) or grid[level[l] + 1] <= alloc[l]:
        continue
      before = sens.baseline if level[l] < 0 else sens.metric[l][level[l]]
      loss = max(sign * (before - sens.metric[l][level[l] + 1]), 0.0)
      cost = loss / ((grid[level[l] + 1] - alloc[l]) * sizes[l])
      if cost < best_cost:
        best, best_cost = l, cost
    if best is None:
      break
    level[best] += 1
    alloc[best] = grid[level[best]]
  return {"^" + re.escape(l) + "$": alloc[l] for l in layers}


def _as_given(given, tree):
  """`tree` in the form the caller gave its params (an nnx State stays a State)."""
  return _tree.like(given, tree) if _tree.is_nnx(given) else tree


def _criterion(c) -> tuple:
  if isinstance(c, _criteria.Criterion):
    raise TypeError("give Criterion objects as a dict {name: Criterion}, so each row of the sweep has a name.")
  names = [n for n in _criteria.NAMES if n != "movement"]   # movement scores a training run, not one set of params
  if c not in names:
    raise ValueError(f"unknown criterion {c!r}; use one of {', '.join(names)} or pass a dict {{name: Criterion}}.")
  return c, _criteria.by_name(c)


def sweep(params: PyTree, evaluate: Evaluate, criteria, sparsities: Sequence[float], *,
          loss_fn: Optional[Callable] = None, batches=None, finetune: Optional[Callable] = None,
          scope: str = "global", granularity=None, where=None, prune: Optional[Callable] = None,
          metric: Optional[str] = None, higher_is_better: bool = True, done: Optional[Mapping] = None,
          on_cell: Optional[Callable] = None, progress: bool = False) -> Sweep:
  """Compares pruning criteria across sparsities from one set of params.

  Each cell scores the params with the criterion (once per criterion; gradient criteria need `loss_fn` and
  `batches`, as `jp.scores`), keeps the top `1 - sparsity` (`scope`, `granularity`, `where` as `jp.topk`),
  optionally fine-tunes with `finetune(pruned_params, masks) -> params` (keep the masks, e.g. with
  `jp.keep_pruned`), and evaluates.

  Args:
    params: the trained params.
    evaluate: `params -> float` (or a dict of floats with `metric=`).
    criteria: names ("magnitude", "gradient", "taylor", "fisher", "random") or a dict {name: Criterion}
      (with `prune=`, the names are passed to it and the values are not used).
    sparsities: fractions in [0, 1).
    prune: replaces the cell's pruning: `(criterion_name, sparsity) -> (params, masks)` (a scheduled
      fine-tune, as `jprune sweep` does).
    done: results of cells computed before, {(criterion, sparsity): cell}: reused, not recomputed (the
      caller decides when a stored cell still holds).
    on_cell: called as `on_cell((criterion, sparsity), cell)` after each computed cell (to store it).

  Returns:
    `Sweep(baseline, criteria, sparsities, cells, higher_is_better)`.
  """
  sparsities = _check_grid(sparsities, "sparsities")
  named = dict(criteria) if isinstance(criteria, Mapping) else dict(_criterion(c) for c in criteria)
  if not named:
    raise ValueError("criteria is empty; give at least one.")
  given, params = params, _tree.pure(params)
  baseline = _metric(evaluate(given), metric, "evaluate")
  cells, scores = {}, {}
  grid = [(c, s) for c in named for s in sparsities]
  from jprune._progress import progress_bar
  for c, s in progress_bar(grid, desc="sweep", unit="cell", disable=not progress):
    if done is not None and (c, s) in done:
      cells[c, s] = done[c, s]
      continue
    if prune is not None:
      pruned, masks = prune(c, s)
    else:
      if c not in scores:
        scores[c] = _criteria.scores(named[c], params, loss_fn=loss_fn, batches=batches)
      masks = _masks.topk(scores[c], s, scope=scope, granularity=granularity, where=where)
      pruned = _as_given(given, _masks.apply(params, masks))
      if finetune is not None:
        pruned = finetune(pruned, masks)
    value = evaluate(pruned)
    cells[c, s] = {"metric": _metric(value, metric, "evaluate"), "eval": value,
                   "reached": float(_masks.sparsity(masks, pruned))}
    if on_cell is not None:
      on_cell((c, s), cells[c, s])
  return Sweep(baseline, tuple(named), sparsities, cells, higher_is_better)


def plot_sensitivity(sens: Sensitivity, path: str, *, ylabel: str = "metric", title: str = "") -> str:
  """One line per layer: the metric against that layer's sparsity; the unpruned metric dashed. Returns `path`."""
  from jprune import report
  return report.plot_lines({l: (list(sens.grid), ys) for l, ys in sens.metric.items()}, path,
                           xlabel="sparsity of this layer only", ylabel=ylabel, title=title or "per-layer sensitivity",
                           baseline=sens.baseline)


def plot_sweep(result: Sweep, path: str, *, ylabel: str = "metric", title: str = "") -> str:
  """One line per criterion: the metric against the sparsity; the unpruned metric dashed. Returns `path`."""
  from jprune import report
  curves = {c: (list(result.sparsities), [result.cells[c, s]["metric"] for s in result.sparsities])
            for c in result.criteria}
  return report.plot_lines(curves, path, xlabel="sparsity", ylabel=ylabel, title=title or "metric vs sparsity",
                           baseline=result.baseline)


def table(result: Union[Sweep, Sensitivity], fmt: str = "{:.4g}") -> str:
  """A markdown table: criteria (sweep) or layers (sensitivity) × sparsities."""
  if isinstance(result, Sweep):
    rows = {c: [result.cells[c, s]["metric"] for s in result.sparsities] for c in result.criteria}
    head, cols = "criterion", result.sparsities
  else:
    rows, head, cols = result.metric, "layer", result.grid
  out = f"| {head} | " + " | ".join(f"{s:.0%}" if s * 100 == int(s * 100) else f"{s:.1%}" for s in cols)
  out += " |\n|---|" + "---:|" * len(cols) + "\n"
  for name, ys in rows.items():
    out += f"| {name} | " + " | ".join(fmt.format(y) for y in ys) + " |\n"
  return out
