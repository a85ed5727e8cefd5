"""Learnable masks with a straight-through estimator (Bengio et al. 2013; Zhou et al. 2021).

The dense weights are the trained parameters. Every forward pass uses masked weights, the mask recomputed from
the current dense weights (exact top-k, any granularity); the gradient passes straight through the mask to the
dense weights, so pruned weights keep learning and can come back when they outgrow kept ones. With
`soft_steps`, pruned weights enter the forward scaled by λ, decaying linearly from 1 to 0 over `soft_steps`,
before the mask hardens.

    ste = jp.ste(0.9)
    loss = lambda p: loss_fn(ste.apply(p, step), batch)      # inside your jitted step; optax as usual
    final = ste.finalize(params)                              # pruned params (exact zeros) for deployment
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jprune import _tree
from jprune import criteria as _criteria
from jprune import masks as _masks



class STE(NamedTuple):
  apply: Callable      # (params, step=None) -> the weights the forward pass uses
  masks: Callable      # params -> current hard masks
  finalize: Callable   # params -> params with the current masks applied (exact zeros)


def ste(sparsity, *, where=None, scope: str = "layer", granularity=None, criterion=None,
        soft_steps: int = 0) -> STE:
  """A straight-through-estimator pruner.

  Args:
    sparsity: target in [0, 1) (number, per-leaf tree, or distribution), as in `topk`.
    where, scope, granularity: as in `topk`.
    criterion: scores of the dense weights (default `magnitude()`; must not need gradients).
    soft_steps: if > 0, pruned weights are scaled by λ = max(0, 1 − step / soft_steps) in the forward pass
      instead of zeroed (pass `step` to `apply`); hard masks from then on.
  """
  criterion = criterion or _criteria.magnitude()
  if criterion.needs_grads:
    raise ValueError("ste takes a criterion of the weights alone (e.g. magnitude()); got one that needs grads.")
  if _tree.is_number_like(sparsity) and not _tree.is_traced(sparsity):
    _tree.check_sparsity(sparsity)
  if soft_steps < 0:
    raise ValueError(f"soft_steps must be >= 0, got {soft_steps}.")

  def masks(params):
    frozen = jax.lax.stop_gradient(params)
    return _masks.topk(criterion.score(criterion.init(frozen), frozen), sparsity, where=where, scope=scope,
                       granularity=granularity)

  def apply(params, step=None):
    m = masks(params)
    lam = jnp.float32(0.0)
    if soft_steps:
      if step is None:
        raise ValueError("ste(soft_steps=...).apply needs the step: apply(params, step).")
      lam = jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / soft_steps, 0.0, 1.0)

    def one(w, keep):
      if jnp.ndim(keep) == 0:
        return w
      target = jnp.where(keep, w, w * lam.astype(w.dtype))
      return w + jax.lax.stop_gradient(target - w)   # forward: target; backward: identity to dense w

    return jax.tree.map(one, params, m)

  def finalize(params):
    return _masks.apply(params, masks(params))

  return STE(apply, masks, finalize)
