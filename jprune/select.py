"""Which leaves a method may prune: `where=` as a regex, a predicate or a bool tree.

A *selection* says which parameter leaves may be pruned; a *mask* says which entries of those leaves are kept.
Paths are '/'-joined key paths (`Dense_0/kernel`, `layers/0/kernel`), with nnx's trailing `value` stripped, so
one regex selects the same layer in Flax linen params, nnx state and plain dicts.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Union

import jax

from jprune import _tree

Where = Union[None, str, Callable[[str, Any], bool], Any]


def kernels(path: str, leaf) -> bool:
  """Selects leaves named `kernel` (linen Dense/Conv, nnx Linear/Conv): the default selection."""
  del leaf
  return path.rsplit("/", 1)[-1] == "kernel"


def everything(path: str, leaf) -> bool:
  """Selects every float leaf."""
  del path, leaf
  return True


def regex(pattern: str) -> Callable[[str, Any], bool]:
  """Returns a predicate selecting leaves whose path matches `pattern` (`re.search`)."""
  compiled = re.compile(pattern)
  return lambda path, leaf: compiled.search(path) is not None


def resolve(where: Where, params) -> Any:
  """Returns a tree of Python bools (same structure as `params`) saying which leaves are selected.

  Args:
    where: None (= `kernels`), a regex string matched with `re.search` against each '/'-joined path, a
      predicate `(path, leaf) -> bool`, or a tree of bools with the structure of `params`.
    params: the parameter tree (arrays or `jax.ShapeDtypeStruct`).

  Returns:
    A tree of Python bools. Non-float leaves are never selected by a regex or predicate; a bool tree that
    selects one raises `TypeError`. A selection matching nothing raises `ValueError`.
  """
  items = _tree.leaves_with_paths(params)
  treedef = jax.tree.structure(params)
  given = where
  if where is None:
    where = kernels
  if isinstance(where, str):
    where = regex(where)
  if callable(where):
    flags = [bool(where(path, leaf)) and _tree.is_float(leaf) for path, leaf in items]
  else:
    _tree.check_same_structure(params, where, "params", "selection")
    flags = [bool(f) for f in jax.tree.leaves(where)]
    for (path, leaf), f in zip(items, flags):
      if f and not _tree.is_float(leaf):
        raise TypeError(f"selection includes {path!r} with dtype {leaf.dtype}; only float leaves can be pruned.")
  if not any(flags):
    raise ValueError(f"selection {given!r} matched no float leaf; paths are: "
                     f"{[p for p, _ in items][:12]}{' ...' if len(items) > 12 else ''}")
  return jax.tree.unflatten(treedef, flags)
