"""One function per output leaf of a tree-valued function, each tracing only the equations that leaf needs.

`topk_of` recomputes a leaf's scores inside every counting pass. Calling the whole `score_fn` there and keeping
one leaf traces every leaf's scores for every leaf: L² equations for L leaves (211 × 211 for SmolLM2), which XLA
removes again, but only after they cost trace time, compile time and the compiler's memory. `split(f, args)`
traces `f` once, and leaf i's function replays only the equations leaf i depends on (followed back through the
jaxpr), so a criterion that scores leaf by leaf costs L equations in all. A function whose leaves share one
opaque equation (a nested `jit`, a `vmap` over stacked leaves) replays that equation whole: the same program as
calling `f`, never a different result.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.extend import core as jcore


def _cone(jaxpr):
  """`cone(outvar)`: the equations `outvar` depends on, and every effectful one, in program order. It follows
  each variable to the equation that made it, so a leaf costs its own dependencies, not a walk over the whole
  program (a walk per leaf was L² for L leaves)."""
  producer = {v: n for n, e in enumerate(jaxpr.eqns) for v in e.outvars if not isinstance(v, jcore.DropVar)}
  effectful = [n for n, e in enumerate(jaxpr.eqns) if e.effects]

  def cone(outvar) -> list:
    todo = effectful + ([producer[outvar]] if isinstance(outvar, jcore.Var) and outvar in producer else [])
    kept: set = set()
    while todo:
      n = todo.pop()
      if n not in kept:
        kept.add(n)
        todo.extend(producer[v] for v in jaxpr.eqns[n].invars if isinstance(v, jcore.Var) and v in producer)
    return [jaxpr.eqns[n] for n in sorted(kept)]

  return cone


def split(fn: Callable, args: tuple) -> tuple[list[Callable[[], Any]], Any]:
  """Returns (one zero-argument function per leaf of `fn(*args)`, in leaf order; `fn(*args)`'s shapes as a tree
  of `jax.ShapeDtypeStruct`).

  Each function computes its leaf from `args` as `fn` does (same primitives, same order), tracing only the
  equations that leaf needs. Works on concrete arrays and inside `jit` alike.
  """
  flat, in_tree = jax.tree.flatten(args)
  closed, out_shape = jax.make_jaxpr(lambda *xs: fn(*jax.tree.unflatten(in_tree, xs)), return_shape=True)(*flat)
  jaxpr = closed.jaxpr
  cone = _cone(jaxpr)

  def leaf(i: int) -> Callable[[], Any]:
    eqns = cone(jaxpr.outvars[i])
    sub = jcore.ClosedJaxpr(jcore.Jaxpr(jaxpr.constvars, jaxpr.invars, [jaxpr.outvars[i]], eqns, jaxpr.effects),
                            closed.consts)
    return lambda: jcore.jaxpr_as_fun(sub)(*flat)[0]

  return [leaf(i) for i in range(len(jaxpr.outvars))], out_shape
