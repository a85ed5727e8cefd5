"""Importance criteria: `Criterion(init, update, score)`, NamedTuples of pure functions (higher = keep).

`init(params) -> state`, `update(state, params, grads, **extra) -> state`, `score(state, params) -> scores`.
Scores are float32 trees with the params' structure. Criteria that need gradients say so in `needs_grads`, so
`jprune.scores` (one-shot) and `jprune.pruned` (during training) feed them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jprune.types import PyTree



class Criterion(NamedTuple):
  init: Callable[[PyTree], Any]
  update: Callable[..., Any]
  score: Callable[[Any, PyTree], PyTree]
  needs_grads: bool = False


class AccumulatorState(NamedTuple):
  count: jax.Array  # type: ignore[assignment]  # int32 number of updates seen (shadows tuple.count)
  acc: PyTree       # float32 tree with the params' structure


def _f32(x):
  return jnp.asarray(x, jnp.float32) if not isinstance(x, jax.ShapeDtypeStruct) else x


def _zeros_like(params):
  return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)


def _accumulating(per_step: Callable, score: Callable, ema: Optional[float], total: bool = False) -> Criterion:
  """Builds a criterion that averages (or EMAs, or sums) a per-step statistic of (w, g)."""

  def init(params):
    return AccumulatorState(jnp.zeros([], jnp.int32), _zeros_like(params))

  def update(state, params, grads, **extra):
    del extra
    n = state.count + 1
    if total:
      rule = lambda a, s: a + s
    elif ema is None:
      rule = lambda a, s: a + (s - a) / n.astype(jnp.float32)
    else:
      rule = lambda a, s: ema * a + (1.0 - ema) * s
    acc = jax.tree.map(lambda a, w, g: rule(a, per_step(_f32(w), _f32(g))), state.acc, params, grads)
    return AccumulatorState(n, acc)

  return Criterion(init, update, lambda state, params: score(state.acc, params), needs_grads=True)


def magnitude() -> Criterion:
  """|w| (Han et al. 2015)."""
  return Criterion(
      init=lambda params: (),
      update=lambda state, params, grads=None, **extra: state,
      score=lambda state, params: jax.tree.map(lambda w: jnp.abs(_f32(w)), params),
  )


def gradient(ema: Optional[float] = None) -> Criterion:
  """|g|: the mean of |∂L/∂w| over the updates seen, or its EMA with decay `ema`."""
  return _accumulating(lambda w, g: jnp.abs(g), lambda acc, params: acc, ema)


def taylor(ema: Optional[float] = None) -> Criterion:
  """|w·g| (first-order Taylor / saliency; Molchanov et al.), averaged over updates or EMA'd."""
  return _accumulating(lambda w, g: jnp.abs(w * g), lambda acc, params: acc, ema)


def fisher(ema: Optional[float] = None) -> Criterion:
  """0.5 · E[g²] · w² (empirical Fisher / OBD diagonal; Theis et al. 2018), E over updates."""
  return _accumulating(lambda w, g: g * g,
                       lambda acc, params: jax.tree.map(lambda f, w: 0.5 * f * jnp.square(_f32(w)), acc, params),
                       ema)


def movement() -> Criterion:
  """−Σ_t w_t·g_t (Sanh et al. 2020): weights moving away from zero score high."""
  return _accumulating(lambda w, g: -w * g, lambda acc, params: acc, None, total=True)


def random(seed: int = 0) -> Criterion:
  """Uniform random scores (a baseline), deterministic in `seed` and in the leaf's position."""

  def score(state, params):
    leaves, treedef = jax.tree.flatten(params)
    key = jax.random.key(seed)
    out = [jax.random.uniform(jax.random.fold_in(key, i), p.shape, jnp.float32) for i, p in enumerate(leaves)]
    return jax.tree.unflatten(treedef, out)

  return Criterion(init=lambda params: (), update=lambda state, params, grads=None, **extra: state, score=score)


NAMES = ("magnitude", "gradient", "taylor", "fisher", "movement", "random")
WITH_EMA = ("gradient", "taylor", "fisher")


def by_name(name: str, ema: Optional[float] = None) -> Criterion:
  """The criterion called `name` (one of `NAMES`); `ema` for the accumulating ones, `random` seeded with 0."""
  if name not in NAMES:
    raise ValueError(f"unknown criterion {name!r}; choose from {', '.join(NAMES)}.")
  if name in WITH_EMA:
    return {"gradient": gradient, "taylor": taylor, "fisher": fisher}[name](ema=ema)
  return {"magnitude": magnitude, "movement": movement, "random": lambda: random(0)}[name]()


def scores(criterion: Criterion, params: PyTree, *, loss_fn: Optional[Callable] = None,
           batches: Optional[Iterable] = None, progress: bool = True) -> PyTree:
  """Computes importance scores one-shot, running `jax.grad(loss_fn)` over `batches` when needed.

  Args:
    criterion: a `Criterion`.
    params: the parameter tree.
    loss_fn: `loss_fn(params, batch) -> scalar`; required when `criterion.needs_grads`.
    batches: an iterable of batches passed to `loss_fn`.
    progress: show a progress bar.

  Returns:
    float32 scores with the structure of `params` (higher = more important).

  Examples:
    >>> import jax.numpy as jnp, jprune as jp
    >>> p = {"kernel": jnp.array([[1.0, -3.0], [0.5, 2.0]])}
    >>> jp.scores(jp.magnitude(), p)["kernel"].tolist()
    [[1.0, 3.0], [0.5, 2.0]]
  """
  state = criterion.init(params)
  if criterion.needs_grads:
    if loss_fn is None or batches is None:
      raise ValueError("this criterion needs gradients: pass loss_fn=(params, batch) -> loss and batches=...")

    @jax.jit
    def step(state, params, batch):
      return criterion.update(state, params, jax.grad(loss_fn)(params, batch))

    from jprune._progress import progress_bar
    seen = 0
    for batch in progress_bar(batches, desc="scores", disable=not progress):
      state = step(state, params, batch)
      seen += 1
    if seen == 0:
      raise ValueError("batches was empty: gradient-based scores need at least one batch.")
  return jax.jit(criterion.score)(state, params)
