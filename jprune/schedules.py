"""Sparsity schedules: `Schedule(sparsity(step), is_update(step))`, plain jnp functions of the step."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax.numpy as jnp

from jprune import _tree


class Schedule(NamedTuple):
  sparsity: Callable  # step -> float32 target sparsity
  is_update: Callable  # step -> bool: recompute masks at this step
  threshold: Optional[Callable] = None   # step -> float32 score threshold (`thresholds`): prune score < θ instead


def _no_target(step):
  raise ValueError("a threshold schedule (jprune.thresholds) prunes scores below a value; it has no sparsity target.")


def thresholds(value: Union[float, Callable], every: Optional[int] = None, begin: int = 0,
               end: Optional[int] = None) -> Schedule:
  """Prune every entry (or unit) whose score is below a threshold, at `begin` and every `every` steps up to `end`.

  The absolute-threshold systems: "|w| < 1e-3 is pruned every 100 steps while training" is
  `pruned(tx, schedule=thresholds(1e-3, every=100))`; "prune where |∂L/∂w| < 0.01 once, then retrain" is
  `pruned(tx, criterion=gradient(), schedule=thresholds(0.01))` (one update at `begin`), or one-shot outside
  training `jp.threshold(jp.scores(jp.gradient(), ...), 0.01)` with `keep_pruned`. The reached sparsity is
  whatever the scores give (read it with `jp.sparsity(jp.masks_of(state), params)`); masks stay monotone unless
  `pruned(..., regrow=True)`.

  Args:
    value: θ (a number, >= 0 for the built-in criteria, which score >= 0), or a function `step -> θ` (jnp).
    every: steps between mask updates; None: once, at `begin`.
    begin, end: first and last step that updates the masks (end None: no last step).
  """
  if not callable(value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
      raise ValueError(f"thresholds(value) needs a finite number or a function of the step, got {value!r}.")
  if every is not None and (not isinstance(every, int) or every < 1):
    raise ValueError(f"thresholds(every=...) needs an integer >= 1 or None, got {every!r}.")
  if not isinstance(begin, int) or begin < 0 or (end is not None and end < begin):
    raise ValueError(f"thresholds needs 0 <= begin <= end, got begin={begin!r}, end={end!r}.")
  theta = value if callable(value) else (lambda step: jnp.float32(value))

  def is_update(step):
    step = jnp.asarray(step)
    if every is None:
      return step == begin
    on = (step >= begin) & ((step - begin) % every == 0)
    return on if end is None else on & (step <= end)

  return Schedule(_no_target, is_update, lambda step: jnp.asarray(theta(step), jnp.float32))


def constant(sparsity: float, every: int | None = None) -> Schedule:
  """Target `sparsity` from step 0; masks computed at step 0 (and every `every` steps if given)."""
  _tree.check_sparsity(sparsity)
  s = jnp.float32(sparsity)
  if every is None:
    return Schedule(lambda step: s, lambda step: jnp.asarray(step) == 0)
  return Schedule(lambda step: s, lambda step: jnp.asarray(step) % every == 0)


def one_shot(at: int = 0, sparsity: float = 0.0) -> Schedule:
  """Dense until step `at`, then prune to `sparsity` once; masks stay fixed afterwards."""
  _tree.check_sparsity(sparsity)
  return Schedule(lambda step: jnp.where(jnp.asarray(step) >= at, jnp.float32(sparsity), jnp.float32(0.0)),
                  lambda step: jnp.asarray(step) == at)


def polynomial(final: float, begin: int, end: int, initial: float = 0.0, power: float = 3.0,
               every: int = 100) -> Schedule:
  """Gradual pruning (Zhu & Gupta 2017): s_t = s_f + (s_i − s_f)(1 − (t − t0)/(end − t0))^power.

  Masks are updated at `begin`, every `every` steps after it, and at `end`; the target is `final` after `end`.
  """
  _tree.check_sparsity(final, "final sparsity")
  _tree.check_sparsity(initial, "initial sparsity")
  if not (0 <= begin < end) or every < 1:
    raise ValueError(f"polynomial needs 0 <= begin < end and every >= 1, got begin={begin}, end={end}, "
                     f"every={every}.")

  def sparsity(step):
    t = jnp.asarray(step, jnp.float32)
    frac = jnp.clip((t - begin) / (end - begin), 0.0, 1.0)
    s = final + (initial - final) * (1.0 - frac) ** power
    return jnp.where(t >= begin, s, 0.0).astype(jnp.float32)

  def is_update(step):
    step = jnp.asarray(step)
    return (step >= begin) & (step <= end) & (((step - begin) % every == 0) | (step == end))

  return Schedule(sparsity, is_update)


def iterative(levels: Sequence[float], every: int, begin: int = 0) -> Schedule:
  """Iterative pruning (Han et al. 2015): prune to levels[i] at step begin + i·every, retrain in between."""
  for v in levels:
    _tree.check_sparsity(v, "iterative level")
  if not levels or every < 1:
    raise ValueError("iterative needs at least one level and every >= 1.")
  lv = jnp.asarray(list(levels), jnp.float32)

  def index(step):
    return jnp.clip((jnp.asarray(step) - begin) // every, 0, len(levels) - 1)

  return Schedule(
      lambda step: jnp.where(jnp.asarray(step) >= begin, lv[index(step)], 0.0),
      lambda step: (jnp.asarray(step) >= begin) & ((jnp.asarray(step) - begin) % every == 0)
      & ((jnp.asarray(step) - begin) // every < len(levels)))
