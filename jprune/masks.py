"""Scores -> masks: threshold, exact top-k (layer or global scope), N:M, blocks, neurons/channels; mask algebra.

Masks are bool trees with the params' structure (True = keep). A leaf's mask is broadcastable to the leaf:
full shape for unstructured, N:M and block sparsity; size-1 axes for neurons/channels (a Dense kernel `(in, out)`
pruned by output neuron has mask shape `(1, out)`); a scalar `True` for leaves that are not selected.

Global selection never sorts or concatenates the model. Scores are mapped to int32 keys that are monotone in the
float value, and the k-th smallest key is found with counting passes (elementwise ops and reductions only): each
pass counts four thresholds at once, placed where interpolation through the counts seen so far expects the
k-th key, with a widening spread and key-space quarters to bound the worst case. Ties at the threshold are
broken by leaf order, then row-major index.
"""

from __future__ import annotations

import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jprune import _kth
from jprune import _leafwise
from jprune import _tree
from jprune import select as _select
from jprune.granularity import Granularity, GranularityLike, Neurons, blocks, channels, neurons, nm, unstructured
from jprune.granularity import parse as parse_granularity
from jprune.types import PyTree, Sparsity, Where

# Older names, kept working: the granularity helpers (now methods of each granularity type) and the search.
prune_lowest, kth_key = _kth.prune_lowest, _kth.kth_key
_keys, _unit_key, _count_k, _SORT_MAX, _PRUNED_KEY = _kth.keys, _kth.unit_key, _kth.count_k, _kth.SORT_MAX, _kth.PRUNED_KEY
__all__ = ["Granularity", "UnmaskedUnitsWarning", "apply", "blocks", "channels", "check_granularity", "expand_units",
           "full_masks", "granularity_name", "intersect", "mask_and", "mask_or", "neurons", "nm",
           "parse_granularity", "sparsity", "threshold", "topk", "union", "unit_mask_of", "unit_scores",
           "unstructured"]


def granularity_name(g: Granularity) -> str:
  """The spelling `parse_granularity` reads back: "unstructured", "2:4", "blocks4x4", "neurons"."""
  return g.name


def check_granularity(g: Granularity, path: str, shape) -> None:
  """Raises a ValueError naming `path` when `g` cannot apply to a leaf of `shape`."""
  g.check(path, shape)


def unit_scores(s: jax.Array, g: Granularity) -> jax.Array:
  """Reduces a leaf's scores to one score per prunable unit (the leaf itself for unstructured)."""
  return g.unit_scores(s)


def expand_units(unit_mask: jax.Array, shape, g: Granularity) -> jax.Array:
  """Turns a per-unit mask back into a mask broadcastable to a leaf of `shape`."""
  return g.expand(unit_mask, shape)


def unit_mask_of(mask: jax.Array, shape, g: Granularity) -> jax.Array:
  """The per-unit view of an existing leaf mask (inverse of `expand_units`)."""
  return g.units_of(mask, shape)


def _nm_mask(s, g, prior):   # older name
  return g.mask(s, prior)


# ----------------------------------------------------------------------------------------------- public
def _selected(scores, where):
  sel = _select.resolve(where, scores)
  return jax.tree.leaves(sel)


def _prepare(scores, where, granularity, prior):
  g = parse_granularity(granularity)
  items = _tree.leaves_with_paths(scores)
  flags = _selected(scores, where)
  if prior is not None:
    _tree.check_same_structure(scores, prior, "scores", "masks")
    prior_leaves = jax.tree.leaves(prior)
  else:
    prior_leaves = [None] * len(items)
  for (path, s), f in zip(items, flags):
    if f:
      g.check(path, s.shape)
  _tree.check_finite(scores)
  return g, items, flags, prior_leaves


def topk(scores: PyTree, sparsity: Sparsity, *, where: Where = None, scope: str = "layer",
         granularity: GranularityLike = None, masks: Optional[PyTree] = None) -> PyTree:
  """Keeps the highest-scoring entries (or units): exact counts, deterministic ties.

  Args:
    scores: float tree with the params' structure (higher = keep). NaN/inf raise `ValueError`.
    sparsity: fraction to prune in [0, 1): a number (every selected leaf), or a tree/dict of per-leaf
      numbers with the scores' structure (as from a distribution). Ignored by N:M, which keeps n of m.
    where: selection (see `jprune.select.resolve`); default: leaves named `kernel`.
    scope: "layer" prunes exactly `round(s·n)` units of each leaf; "global" prunes exactly `round(s·N)` of
      all selected units together.
    granularity: `unstructured()` (default), `nm(n, m)`, `blocks(bh, bw)`, `neurons()`, `channels()`, or a
      string like "2:4".
    masks: optional current masks; entries already pruned score lowest so masks stay monotone.

  Returns:
    A bool mask tree (True = keep) with scalar `True` at unselected leaves.

  Examples:
    >>> import jax.numpy as jnp, jprune as jp
    >>> m = jp.topk({"kernel": jnp.array([[3.0, 1.0], [2.0, 4.0]])}, 0.5)
    >>> m["kernel"].tolist()
    [[True, False], [False, True]]
  """
  if scope not in ("layer", "global"):
    raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}.")
  if callable(sparsity):  # a distribution: per-leaf targets from the scores' shapes
    sparsity = sparsity(scores, None, where)
  g, items, flags, prior_leaves = _prepare(scores, where, granularity, masks)
  treedef = jax.tree.structure(scores)
  per_leaf = _per_leaf_sparsity(sparsity, scores, items, flags)
  if scope == "global" and not g.fixed_pattern:
    _check_global(sparsity)
  if isinstance(g, Neurons):
    _warn_unmasked_unit_leaves(items, flags, g)
  leaves = [s for _, s in items]
  args = (leaves, prior_leaves, per_leaf if scope == "layer" or g.fixed_pattern else sparsity)
  statics = dict(flags=tuple(bool(f) for f in flags), g=g, scope=scope)
  traced = any(_tree.is_traced(x) for x in jax.tree.leaves(args))
  # eager calls go through one jitted program per (structure, shapes, dtypes, settings), compiled once and
  # reused; traced calls inline the same code. Traced and eager sparsities prune the same count (`_count_k`).
  out = (_topk_leaves if traced else _topk_leaves_jit)(*args, **statics)
  return jax.tree.unflatten(treedef, out)


@jax.tree_util.register_pytree_node_class
class _LazyUnit:
  """One selected leaf of scores that are never stored: `key_fn` recomputes them inside each counting pass."""

  def __init__(self, index: int, prior, size: int):
    self.index, self.prior, self.size = index, prior, size

  def tree_flatten(self):
    return (self.prior,), (self.index, self.size)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(aux[0], children[0], aux[1])


def topk_of(score_fn, inputs: tuple, sparsity: Sparsity, *, where: Where = None, scope: str = "layer",
            granularity: GranularityLike = None, masks: Optional[PyTree] = None) -> PyTree:
  """`topk(score_fn(*inputs), ...)` without materializing the scores: every counting pass of the k-th-key
  search (and the mask build after it) recomputes them from `inputs`, fused into the pass, so the program holds
  no score tree (for |w| that is a params-sized float32 tree saved). Same masks as `topk` (tested); meant for
  jitted code such as `pruned`'s mask update. N:M and per-leaf distributions given as functions go through
  `topk`."""
  g = parse_granularity(granularity)
  if g.fixed_pattern or callable(sparsity) or scope not in ("layer", "global"):
    return topk(score_fn(*inputs), sparsity, where=where, scope=scope, granularity=g, masks=masks)
  leaf_fns, shapes = _leafwise.split(score_fn, inputs)   # leaf i's scores, tracing only what leaf i needs
  g, items, flags, prior_leaves = _prepare(shapes, where, g, masks)
  per_leaf = _per_leaf_sparsity(sparsity, shapes, items, flags)
  if scope == "global":
    _check_global(sparsity)
  key_fn = lambda u: _kth.unit_key((g.unit_scores(leaf_fns[u.index]()), u.prior))
  out: list = [jnp.asarray(True)] * len(items)
  units, shapes_of = {}, {}
  for i, ((_, s), f) in enumerate(zip(items, flags)):
    if not f:
      continue
    if s.size == 0:
      out[i] = jnp.ones(s.shape, jnp.bool_)
      continue
    prior = None if prior_leaves[i] is None else g.units_of(prior_leaves[i], s.shape)
    units[i] = _LazyUnit(i, prior, int(np.prod(jax.eval_shape(g.unit_scores, s).shape)))
    shapes_of[i] = s.shape
  sizes = {i: u.size for i, u in units.items()}
  _prune_units(out, units, sizes, shapes_of, sparsity if scope == "global" else per_leaf, g, scope, key_fn)
  return jax.tree.unflatten(jax.tree.structure(shapes), out)


def _check_global(sparsity) -> None:
  if isinstance(sparsity, dict) or not _tree.is_number_like(sparsity):
    raise ValueError("scope='global' takes one sparsity number, not a per-leaf tree.")
  _tree.check_sparsity(sparsity)


class UnmaskedUnitsWarning(UserWarning):
  """Neurons/channels masks leave the unselected leaves that belong to the same units (biases, norms) unmasked."""


def _warn_unmasked_unit_leaves(items, flags, g: Neurons) -> None:
  """Warns when neuron/channel masks leave 1-D leaves of the pruned units' size unmasked (a bias or a BatchNorm
  scale and bias next to a kernel): a pruned unit then still emits its bias or BatchNorm shift, so it is not
  removed from the function, and the model cannot be compacted to the masked one."""
  sizes = {int(s.shape[g.axis]) for (_, s), f in zip(items, flags) if f and s.ndim >= 2 and g.axis in (-1, s.ndim - 1)}
  left = [p for (p, s), f in zip(items, flags) if not f and s.ndim == 1 and int(s.shape[0]) in sizes]
  if left:
    names = ", ".join(left[:6]) + (f" and {len(left) - 6} more" if len(left) > 6 else "")
    warnings.warn(f"neurons/channels masks prune the selected kernels' output units only; {names} have one entry "
                  f"per unit and stay unmasked, so a pruned unit still emits its bias / normalization shift. To "
                  f"mask every coupled leaf together (and compact), use jprune.structured.groups, group_masks and "
                  f"to_param_masks, or select these leaves too.", UnmaskedUnitsWarning, stacklevel=3)


def _topk_leaves(leaves, prior_leaves, sparsity, *, flags, g, scope):
  out = [jnp.asarray(True)] * len(leaves)
  if g.fixed_pattern:
    for i, (s, f) in enumerate(zip(leaves, flags)):
      if f:
        out[i] = jnp.where(jnp.asarray(sparsity[i]) > 0, g.mask(s, prior_leaves[i]), True)
    return out
  units, shapes = {}, {}
  for i, (s, f) in enumerate(zip(leaves, flags)):
    if not f:
      continue
    if s.size == 0:   # nothing to rank: an empty mask of the leaf's shape
      out[i] = jnp.ones(s.shape, jnp.bool_)
      continue
    u = g.unit_scores(s)
    prior = None if prior_leaves[i] is None else g.units_of(prior_leaves[i], s.shape)
    units[i], shapes[i] = (u, prior), s.shape
  sizes = {i: int(u[0].size) for i, u in units.items()}
  return _prune_units(out, units, sizes, shapes, sparsity, g, scope, _kth.unit_key)


def _prune_units(out, units, sizes, shapes, sparsity, g, scope, key_fn):
  """Fills `out[i]` with the keep-mask of each selected leaf's units: one exact count over all of them (global
  scope, `sparsity` one number) or one per leaf (`sparsity[i]`)."""
  if scope == "global":
    idx = sorted(units)
    if idx:
      keeps = _kth.prune_lowest([units[i] for i in idx], _kth.count_k(sparsity, sum(sizes[i] for i in idx)), key_fn)
      for i, kp in zip(idx, keeps):
        out[i] = g.expand(kp, shapes[i])
  else:   # one search for all leaves, each with its own count
    idx = list(units)
    keeps = _kth.prune_lowest_groups([[units[i]] for i in idx], [_kth.count_k(sparsity[i], sizes[i]) for i in idx],
                                     key_fn)
    for i, (kp,) in zip(idx, keeps):
      out[i] = g.expand(kp, shapes[i])
  return out


_topk_leaves_jit = jax.jit(_topk_leaves, static_argnames=("flags", "g", "scope"))


_is_number_like = _tree.is_number_like   # older name


def _per_leaf_sparsity(sparsity, scores, items, flags):
  if _is_number_like(sparsity):
    _tree.check_sparsity(sparsity)
    return [sparsity] * len(items)
  _tree.check_same_structure(scores, sparsity, "scores", "sparsity")
  leaves = jax.tree.leaves(sparsity)
  for (path, _), f, s in zip(items, flags, leaves):
    if f:
      _tree.check_sparsity(s, f"sparsity at {path!r}")
  return leaves


def threshold(scores: PyTree, value, *, where: Where = None, granularity: GranularityLike = None) -> PyTree:
  """Keeps entries (or units) whose score is >= `value`; e.g. prune |g| < θ.

  Examples:
    >>> import jax.numpy as jnp, jprune as jp
    >>> jp.threshold({"kernel": jnp.array([0.1, 0.5, 2.0])}, 0.5)["kernel"].tolist()
    [False, True, True]
  """
  g, items, flags, _ = _prepare(scores, where, granularity, None)
  if g.fixed_pattern:
    raise ValueError(f"threshold() does not take N:M granularity ({g.name}); use topk(..., granularity=nm(n, m)).")
  out = []
  for (path, s), f in zip(items, flags):
    if not f:
      out.append(jnp.asarray(True))
      continue
    out.append(g.expand(g.unit_scores(s) >= value, s.shape))
  return jax.tree.unflatten(jax.tree.structure(scores), out)


def apply(params: PyTree, masks: PyTree) -> PyTree:
  """Zeroes pruned entries: `where(mask, p, 0)` per leaf, dtype preserved.

  Examples:
    >>> import jax.numpy as jnp, jprune as jp
    >>> jp.apply({"k": jnp.array([1.0, 2.0])}, {"k": jnp.array([True, False])})["k"].tolist()
    [1.0, 0.0]

  nnx States are accepted as they come, with masks from `masks_of(nnx_optimizer.opt_state)` or `topk`; an
  nnx State comes back as a State: `nnx.update(model, jp.apply(nnx.state(model, nnx.Param), masks))`.
  """
  if _tree.is_nnx(params) or _tree.is_nnx(masks):
    return _tree.like(params, apply(_tree.pure(params), _tree.pure(masks)))
  if not any(_tree.is_traced(x) for x in jax.tree.leaves(params)):
    _tree.check_broadcastable(params, masks)
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros((), p.dtype)), params, masks)


def full_masks(params: PyTree, where: Where = None) -> PyTree:
  """All-True masks: full-shape bool arrays at selected leaves, scalar True elsewhere."""
  flags = jax.tree.leaves(_select.resolve(where, params))
  leaves = [jnp.ones(p.shape, jnp.bool_) if f else jnp.asarray(True)
            for p, f in zip(jax.tree.leaves(params), flags)]
  return jax.tree.unflatten(jax.tree.structure(params), leaves)


def sparsity(masks: PyTree, params: Optional[PyTree] = None) -> jax.Array:
  """Fraction of pruned entries over the leaves that carry a (non-scalar) mask.

  With `params`, structured masks are counted at the params' full shapes.
  """
  masks, params = _tree.pure(masks), _tree.pure(params)
  m_leaves = jax.tree.leaves(masks)
  shapes = [np.shape(m) for m in m_leaves]
  if params is not None:
    _tree.check_same_structure(params, masks)
    shapes = [p.shape for p in jax.tree.leaves(params)]
  pruned, total = jnp.float32(0), 0
  for m, shape in zip(m_leaves, shapes):
    if np.ndim(m) == 0:
      continue
    n = int(np.prod(shape))
    kept = jnp.sum(m, dtype=jnp.float32) * (n / max(1, int(np.size(m))))
    pruned, total = pruned + (n - kept), total + n
  return pruned / max(total, 1)


def mask_and(a: PyTree, b: PyTree) -> PyTree:
  """Keeps what both masks keep (mask algebra `a & b`)."""
  _tree.check_same_structure(a, b, "first masks", "second masks")
  return jax.tree.map(jnp.logical_and, a, b)


def mask_or(a: PyTree, b: PyTree) -> PyTree:
  """Keeps what either mask keeps (mask algebra `a | b`)."""
  _tree.check_same_structure(a, b, "first masks", "second masks")
  return jax.tree.map(jnp.logical_or, a, b)


intersect = mask_and
union = mask_or
