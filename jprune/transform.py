"""optax integration: `pruned(tx, ...)` prunes while training; `keep_pruned(masks)` fine-tunes with fixed masks.

Both return updates `u'` with `params + u' == where(mask, params + u, 0)`, so after every `optax.apply_updates`
every pruned entry is exactly 0.0, whatever the inner optimizer does (momentum, Adam moments, weight decay).
The inner optimizer only ever sees masked gradients. Mask updates run under `lax.cond` on the schedule's
`is_update(step)`, so the jitted step compiles once and costs almost nothing between mask updates.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jprune import _tree
from jprune import criteria as _criteria
from jprune import masks as _masks
from jprune import schedules as _schedules
from jprune import select as _select

PyTree = Any


class PruneState(NamedTuple):
  inner: Any          # the wrapped optimizer's state
  masks: PyTree       # bool masks, broadcastable to params (True = keep)
  criterion: Any      # the criterion's accumulators
  step: jax.Array     # int32 step counter driving the schedule


class KeepPrunedState(NamedTuple):
  masks: PyTree


def _mask_shape(shape, g: _masks.Granularity):
  if g.kind == "neurons":
    ax = g.axis % len(shape)
    return tuple(shape[i] if i == ax else 1 for i in range(len(shape)))
  return tuple(shape)


def init_masks(params: PyTree, where=None, granularity=None) -> PyTree:
  """All-True masks in the granularity's shape at selected leaves, scalar True elsewhere."""
  g = _masks.parse_granularity(granularity)
  flags = jax.tree.leaves(_select.resolve(where, params))
  out = []
  for (path, p), f in zip(_tree.leaves_with_paths(params), flags):
    if f:
      _masks.check_granularity(g, path, p.shape)
      out.append(jnp.ones(_mask_shape(p.shape, g), jnp.bool_))
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


def pruned(tx: optax.GradientTransformation, *, criterion: Optional[_criteria.Criterion] = None,
           schedule: _schedules.Schedule, where=None, scope: str = "layer", granularity=None,
           distribution=None, regrow: bool = False) -> optax.GradientTransformationExtraArgs:
  """Wraps an optax optimizer so that it prunes by `schedule` while training.

  Args:
    tx: the inner optimizer (any optax transformation, including `MultiSteps` or `inject_hyperparams`).
    criterion: importance criterion (default `magnitude()`); gradient-based criteria are fed the dense
      gradients of every step.
    schedule: a `Schedule` (e.g. `polynomial(final=0.9, begin=1000, end=10000, every=100)`).
    where: selection of prunable leaves (regex, predicate or bool tree); default: leaves named `kernel`.
    scope: "layer" or "global" (exact counts either way).
    granularity: `unstructured()`, `nm(2, 4)`, `neurons()`, `channels()`, `blocks(bh, bw)` or a string.
    distribution: per-leaf targets from the schedule's value (`uniform()`, `erk()`, `by_path(...)`); layer
      scope only. Default uniform.
    regrow: if False (default) an entry once pruned is never revived; True lets masks change freely.

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
  tx = optax.with_extra_args_support(tx)

  def init_fn(params):
    return PruneState(inner=tx.init(params), masks=init_masks(params, where, g),
                      criterion=criterion.init(params), step=jnp.zeros([], jnp.int32))

  def new_masks(params, crit, masks, step):
    s = schedule.sparsity(step)
    target = s if distribution is None else distribution(params, s, where)
    scores = criterion.score(crit, params)
    return _masks.topk(scores, target, where=where, scope=scope, granularity=g,
                       masks=None if regrow else masks)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("pruned(...).update needs params: call tx.update(grads, state, params).")
    crit = criterion.update(state.criterion, params, updates, **extra_args) if criterion.needs_grads \
        else state.criterion
    masks = jax.lax.cond(schedule.is_update(state.step),
                         lambda: new_masks(params, crit, state.masks, state.step),
                         lambda: state.masks)
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
  """Returns the masks held in an optimizer state (searched through chains, MultiSteps, inject_hyperparams)."""
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, (PruneState, KeepPrunedState)))
           if isinstance(x, (PruneState, KeepPrunedState))]
  if not found:
    raise ValueError("no PruneState or KeepPrunedState in this optimizer state.")
  return found[0].masks
