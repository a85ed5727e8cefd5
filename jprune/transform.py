"""optax integration: `pruned(tx, ...)` prunes while training; `keep_pruned(masks)` fine-tunes with fixed masks.

Both return updates `u'` with `params + u' == where(mask, params + u, 0)`, so after every `optax.apply_updates`
every pruned entry is exactly 0.0, whatever the inner optimizer does (momentum, Adam moments, weight decay).
The inner optimizer only ever sees masked gradients. Mask updates run under `lax.cond` on the schedule's
`is_update(step)`, so the jitted step compiles once and costs almost nothing between mask updates.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from jprune import _kth, _tree
from jprune import criteria as _criteria
from jprune import masks as _masks
from jprune import schedules as _schedules
from jprune import select as _select
from jprune.granularity import GranularityLike, Unstructured
from jprune.types import PyTree, Where



class PruneState(NamedTuple):
  inner: Any          # the wrapped optimizer's state
  masks: PyTree       # bool masks, broadcastable to params (True = keep)
  criterion: Any      # the criterion's accumulators
  step: jax.Array     # int32 step counter driving the schedule


class KeepPrunedState(NamedTuple):
  masks: PyTree


def init_masks(params: PyTree, where: Where = None, granularity: GranularityLike = None) -> PyTree:
  """All-True masks in the granularity's shape at selected leaves, scalar True elsewhere."""
  g = _masks.parse_granularity(granularity)
  flags = jax.tree.leaves(_select.resolve(where, params))
  out = []
  for (path, p), f in zip(_tree.leaves_with_paths(params), flags):
    if f:
      g.check(path, p.shape)
      out.append(jnp.ones(g.mask_shape(p.shape), jnp.bool_))
    else:
      out.append(jnp.asarray(True))
  return jax.tree.unflatten(jax.tree.structure(params), out)


def _constrain(updates, params, masks):
  """where(mask, u, -p): params + result is exactly 0 at pruned entries. Unselected leaves (scalar masks,
  always True) pass through untouched."""
  return jax.tree.map(lambda u, p, m: u if jnp.ndim(m) == 0 else jnp.where(m, u, -p.astype(u.dtype)),
                      updates, params, masks)


def _mask_grads(grads, masks):
  return jax.tree.map(lambda g, m: g if jnp.ndim(m) == 0 else jnp.where(m, g, jnp.zeros((), g.dtype)),
                      grads, masks)


_DST = ("rigl", "set")


def _drop_grow(w, grad, mask, n_keep, frac, key, kind):
  """One dynamic-sparse-training update of a leaf's mask at constant density (Evci et al. 2020; Mocanu et al.
  2018): drop the `round(frac · n_keep)` active weights of lowest |w|, then grow as many inactive entries with
  the highest |g| (RigL) or at random (SET). Exactly `n_keep` stay active."""
  n = w.size
  n_drop = jnp.round(frac * jnp.asarray(n_keep, jnp.float32)).astype(jnp.int32)
  wabs = jnp.abs(w.astype(jnp.float32))
  # drop: prune every inactive entry plus the n_drop weakest active ones
  after_drop, = _kth.prune_lowest([(wabs, mask)], (n - n_keep) + n_drop, _kth.unit_key)
  grow = jnp.abs(grad.astype(jnp.float32)) if kind == "rigl" else jax.random.uniform(key, w.shape)
  big = jnp.float32(jnp.finfo(jnp.float32).max)
  keep, = _kth.prune_lowest([(jnp.where(after_drop, big, grow), None)], n - n_keep, _kth.unit_key)
  return keep


def pruned(tx: optax.GradientTransformation, *, criterion: Optional[_criteria.Criterion] = None,
           schedule: _schedules.Schedule, where: Where = None, scope: str = "layer",
           granularity: GranularityLike = None, distribution: Optional[Callable] = None,
           regrow: Union[bool, str] = False, drop_fraction: float = 0.3,
           regrow_until: Optional[int] = None, seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """Wraps an optax optimizer so that it prunes by `schedule` while training.

  Args:
    tx: the inner optimizer (any optax transformation, including `MultiSteps` or `inject_hyperparams`).
    criterion: importance criterion (default `magnitude()`); gradient-based criteria are fed the dense
      gradients of every step.
    schedule: a `Schedule` (e.g. `polynomial(final=0.9, begin=1000, end=10000, every=100)`), or
      `thresholds(θ, every)`: prune every entry (unit) scoring below θ at each update instead of a count.
    where: selection of prunable leaves (regex, predicate or bool tree); default: leaves named `kernel`.
    scope: "layer" or "global" (exact counts either way).
    granularity: `unstructured()`, `nm(2, 4)`, `neurons()`, `channels()`, `blocks(bh, bw)` or a string.
    distribution: per-leaf targets from the schedule's value (`uniform()`, `erk()`, `by_path(...)`); layer
      scope only. Default uniform.
    regrow: False (default): an entry once pruned is never revived. True: masks are re-selected freely from
      the scores. "rigl" / "set": dynamic sparse training at the schedule's sparsity (use `constant(s, every)`):
      the first update prunes to the target by the criterion; each later one drops the
      `round(f·active)` weights of lowest |w| and grows as many pruned entries with the highest |∂L/∂w|
      (RigL, Evci et al. 2020) or at random (SET, Mocanu et al. 2018), so every leaf stays at exactly its
      target. Grown weights start at 0. Layer scope, unstructured granularity.
    drop_fraction: f at the start of dynamic sparse training (RigL's α).
    regrow_until: if given, f decays as α/2·(1 + cos(π·t/T)) and reaches 0 at step T (RigL's T_end).
    seed: SET's random regrowth.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `PruneState`; `update` requires `params`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, jprune as jp
    >>> params = {"kernel": jnp.arange(1.0, 9.0).reshape(2, 4)}
    >>> tx = jp.pruned(optax.sgd(0.0), schedule=jp.constant(0.5))
    >>> state = tx.init(params)
    >>> updates, state = jax.jit(tx.update)(params, state, params)
    >>> optax.apply_updates(params, updates)["kernel"].tolist()
    [[0.0, 0.0, 0.0, 0.0], [5.0, 6.0, 7.0, 8.0]]
  """
  criterion = criterion or _criteria.magnitude()
  g = _masks.parse_granularity(granularity)
  if scope not in ("layer", "global"):
    raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}.")
  if distribution is not None and scope == "global":
    raise ValueError("a distribution sets per-layer targets; it needs scope='layer'.")
  fixed = getattr(distribution, "sparsity", None)
  if fixed is not None:   # it would be ignored: the schedule's value is the target at every step
    raise ValueError(f"distribution was built with sparsity {fixed}, but pruned() takes the target from the "
                     f"schedule; pass the distribution without one (e.g. jp.erk()) and put {fixed} in the schedule.")
  dst = regrow if isinstance(regrow, str) else None
  if dst is not None:
    if dst not in _DST:
      raise ValueError(f"regrow must be False, True, 'rigl' or 'set'; got {regrow!r}.")
    if scope != "layer" or not isinstance(g, Unstructured):
      raise ValueError(f"regrow={dst!r} needs scope='layer' and unstructured granularity "
                       f"(got scope={scope!r}, {g.name}).")
    if not 0.0 <= drop_fraction <= 1.0:
      raise ValueError(f"drop_fraction must be in [0, 1], got {drop_fraction}.")
  by_threshold = getattr(schedule, "threshold", None) is not None
  if by_threshold:
    if dst is not None or distribution is not None or g.fixed_pattern:
      what = (f"regrow={dst!r}" if dst is not None else "a distribution" if distribution is not None
              else f"{g.name} granularity")
      raise ValueError(f"a threshold schedule prunes every score below θ and has no sparsity target; it does not "
                       f"take {what} (use a sparsity schedule for that).")
  tx = optax.with_extra_args_support(tx)

  def init_fn(params):
    return PruneState(inner=tx.init(params), masks=init_masks(params, where, g),
                      criterion=criterion.init(params), step=jnp.zeros([], jnp.int32))

  def new_masks(params, crit, masks, step):
    if by_threshold:
      keep = _masks.threshold(criterion.score(crit, params), schedule.threshold(step), where=where, granularity=g)
      return keep if regrow else jax.tree.map(jnp.logical_and, masks, keep)
    s = schedule.sparsity(step)
    target = s if distribution is None else distribution(params, s, where)
    # the scores are recomputed inside each counting pass from (crit, params), never stored as a tree
    return _masks.topk_of(criterion.score, (crit, params), target, where=where, scope=scope, granularity=g,
                          masks=None if regrow else masks)

  def dst_masks(params, grads, crit, masks, step):
    """First update: prune to target by the criterion; later: drop by |w|, grow by |g| or at random."""
    s = schedule.sparsity(step)
    target = s if distribution is None else distribution(params, s, where)
    first = new_masks(params, crit, masks, step)
    frac = jnp.float32(drop_fraction)
    if regrow_until is not None:
      t = jnp.minimum(step.astype(jnp.float32) / jnp.float32(regrow_until), 1.0)
      frac = frac * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    targets = jax.tree.leaves(target) if not _tree.is_number_like(target) else None
    flags = jax.tree.leaves(_select.resolve(where, params))
    out = []
    key = jax.random.fold_in(jax.random.key(seed), step)
    for i, (p, gr, m, f0, sel) in enumerate(zip(jax.tree.leaves(params), jax.tree.leaves(grads),
                                                 jax.tree.leaves(masks), jax.tree.leaves(first), flags)):
      if not sel:
        out.append(m)
        continue
      si = target if targets is None else targets[i]
      n_keep = p.size - _kth.count_k(si, p.size)
      moved = _drop_grow(p, gr, m, n_keep, frac, jax.random.fold_in(key, i), dst)
      initial = jnp.sum(m, dtype=jnp.int32) > n_keep
      out.append(jnp.where(initial, f0, moved))
    return jax.tree.unflatten(jax.tree.structure(params), out)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("pruned(...).update needs params: call tx.update(grads, state, params).")
    crit = criterion.update(state.criterion, params, updates, **extra_args) if criterion.needs_grads \
        else state.criterion
    if dst is None:
      renew = lambda: new_masks(params, crit, state.masks, state.step)
    else:
      renew = lambda: dst_masks(params, updates, crit, state.masks, state.step)
    masks = jax.lax.cond(schedule.is_update(state.step), renew, lambda: state.masks)
    inner_updates, inner = tx.update(_mask_grads(updates, masks), state.inner, params, **extra_args)
    out = _constrain(inner_updates, params, masks)
    return out, PruneState(inner=inner, masks=masks, criterion=crit, step=optax.safe_increment(state.step))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def keep_pruned(masks: PyTree) -> optax.GradientTransformation:
  """Keeps pruned entries at exactly 0.0 with fixed `masks`; put it last in `optax.chain`.

  Examples:
    >>> import jax.numpy as jnp, optax, jprune as jp
    >>> params = {"kernel": jnp.array([0.0, 2.0])}
    >>> tx = optax.chain(optax.sgd(0.1, momentum=0.9), jp.keep_pruned({"kernel": jnp.array([False, True])}))
    >>> u, _ = tx.update({"kernel": jnp.array([1.0, 1.0])}, tx.init(params), params)
    >>> optax.apply_updates(params, u)["kernel"][0].item()
    0.0
  """

  def init_fn(params):
    if not any(isinstance(x, jax.ShapeDtypeStruct) or _tree.is_traced(x) for x in jax.tree.leaves(params)):
      _tree.check_broadcastable(params, masks)
    return KeepPrunedState(masks=jax.tree.map(lambda m: jnp.asarray(m, jnp.bool_), masks))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("keep_pruned(...).update needs params: call tx.update(grads, state, params).")
    return _constrain(updates, params, state.masks), state

  return optax.GradientTransformation(init_fn, update_fn)


def masks_of(opt_state) -> PyTree:
  """Returns the masks held in an optimizer state (searched through chains, MultiSteps, inject_hyperparams).

  An nnx optimizer's state (`nnx.Optimizer.opt_state`) is accepted as it comes; the masks come back as plain
  nested dicts (no `OptVariable` wrappers), ready for `summary`, `apply` and `nnx.update`. Several pruning states
  (nested `pruned(pruned(...))`, as a recipe builds, or `pruned` chained with `keep_pruned`) give one mask tree:
  an entry is kept only where every one of them keeps it."""
  found = _prune_states(opt_state)
  if not found:
    raise ValueError("no PruneState or KeepPrunedState in this optimizer state.")
  masks = _tree.pure(found[0].masks)
  for other in found[1:]:
    masks = jax.tree.map(jnp.logical_and, masks, _tree.pure(other.masks))
  return masks


def _prune_states(opt_state) -> list:
  """Every PruneState / KeepPrunedState in an optimizer state, the ones nested in a PruneState's inner included."""
  is_state = lambda x: isinstance(x, (PruneState, KeepPrunedState))
  out = []
  for x in jax.tree.leaves(opt_state, is_leaf=is_state):
    if is_state(x):
      out.append(x)
      if isinstance(x, PruneState):
        out.extend(_prune_states(x.inner))
  return out
