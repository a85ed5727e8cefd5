"""Structured pruning that pays: coupled-axis groups traced from the jaxpr, group scores, compaction.

`groups(apply_fn, params, *args)` traces `apply_fn(params, *args)` with `jax.make_jaxpr` and follows every
array axis through the equations (DepGraph, Fang et al. 2023, for JAX). Each `(variable, axis)` of size > 1 is a
node; a union-find joins nodes that must be pruned together. Links carry a *pattern*: "unit j of the coarser axis
is the block `[j·inner, (j+1)·inner)` repeated `outer` times along the finer axis", which covers plain coupling
(outer = inner = 1), attention heads (`reshape (…, H·D) → (…, H, D)`: the head axis H against the merged axis,
inner = D) and flattening (`(…, H, W, C) → (…, H·W·C)`: channel C against the flattened axis, outer = H·W).

Axes that reach the model's outputs, or an op without a rule, are *blocked*: a group containing one is reported
as not prunable, naming the op and where, instead of guessed. A group lists its parameter members
`(path, axis, outer, inner)` and its number of units; removing unit j slices that pattern out of every member.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jprune import _kth, _tree
from jprune.types import PyTree

try:  # public home of jaxpr classes
  from jax.extend.core import Literal
except ImportError:  # older JAX
  from jax.core import Literal  # type: ignore[attr-defined,no-redef]



class Member(NamedTuple):
  path: str    # '/'-joined leaf path
  axis: int
  outer: int   # the unit pattern repeats `outer` times along the axis
  inner: int   # each unit is `inner` contiguous entries


class Group(NamedTuple):
  members: tuple       # Members (parameter axes) in leaf order
  size: int            # number of prunable units
  prunable: bool
  reason: str = ""     # why not prunable: "<op> at <where>"

  def __repr__(self):
    tag = f"{self.size} units" if self.prunable else f"not prunable: {self.reason}"
    return f"Group({tag}: " + ", ".join(f"{m.path}[{m.axis}]" for m in self.members) + ")"


ELEMENTWISE = {
    "add", "sub", "mul", "div", "max", "min", "neg", "abs", "exp", "exp2", "log", "log1p", "tanh", "logistic",
    "sqrt", "rsqrt", "cbrt", "integer_pow", "pow", "square", "sign", "floor", "ceil", "round", "erf", "erfc",
    "erf_inv", "sin", "cos", "tan", "select_n", "clamp", "convert_element_type", "stop_gradient", "nextafter",
    "rem", "atan2", "and", "or", "not", "xor", "eq", "ne", "lt", "le", "gt", "ge", "is_finite", "expm1",
    "copy", "reduce_precision", "real", "imag", "optimization_barrier", "asinh", "acosh", "atanh",
    "sinh", "cosh", "asin", "acos", "atan", "shift_left", "shift_right_logical", "shift_right_arithmetic",
    "population_count",
}
REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin", "reduce_and",
              "reduce_or", "reduce_xor"}
# call-like primitives; several names are the same primitive in older JAX versions ("pjit" before "jit", …)
CALLS = {"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call", "custom_vjp_call",
         "custom_vjp_call_jaxpr", "remat2", "custom_lin"}


class _UF:
  """Union-find over (var, axis) nodes with unit patterns relative to the parent."""

  def __init__(self):
    self.parent: dict = {}
    self.rel: dict = {}      # node -> (outer, inner) relative to parent
    self.size: dict = {}
    self.blocked: dict = {}  # root -> reason

  def add(self, node, size):
    if node not in self.parent:
      self.parent[node], self.rel[node], self.size[node] = node, (1, 1), size

  def find(self, x):
    p = self.parent[x]
    if p == x:
      return x, 1, 1
    root, o, i = self.find(p)
    po, pi = self.rel[x]
    self.parent[x], self.rel[x] = root, (po * o, i * pi)
    return root, po * o, i * pi

  def block(self, node, reason):
    root, _, _ = self.find(node)
    self.blocked.setdefault(root, reason)

  def union(self, x, y, outer=1, inner=1):
    """Couples x and y where y's axis = outer × x's axis × inner (unit j of x ↔ that pattern of y)."""
    rx, ox, ix = self.find(x)
    ry, oy, iy = self.find(y)
    if rx == ry:
      if (oy, iy) != (ox * outer, ix * inner):
        self.block(rx, "inconsistent coupling")
      return
    # y = (outer·ox) × U_rx × (ix·inner) = oy × U_ry × iy
    a_o, a_i = outer * ox, ix * inner
    reason = self.blocked.pop(rx, None) or self.blocked.pop(ry, None)
    if a_o % oy == 0 and a_i % iy == 0:      # ry is finer: hang it under rx
      self.parent[ry], self.rel[ry] = rx, (a_o // oy, a_i // iy)
      root = rx
    elif oy % a_o == 0 and iy % a_i == 0:    # rx is finer: hang it under ry
      self.parent[rx], self.rel[rx] = ry, (oy // a_o, iy // a_i)
      root = ry
    else:
      self.parent[ry], self.rel[ry] = rx, (1, 1)
      root = rx
      reason = reason or "incompatible reshape coupling"
    if reason:
      self.blocked[root] = reason


def _shape(v):
  return tuple(getattr(v.aval, "shape", ()))


class _Tracer:
  """Walks a jaxpr; every call site of a sub-jaxpr gets its own namespace (jaxprs are cached and shared)."""

  def __init__(self):
    self.uf = _UF()
    self.ctx = 0
    self.n_ctx = 0
    self.keep: list = []  # keeps traced Vars alive so their ids stay unique

  def node(self, v, axis, ctx=None):
    if isinstance(v, Literal):
      return None
    shape = _shape(v)
    if shape[axis] <= 1:
      return None
    key = (self.ctx if ctx is None else ctx, id(v), axis)
    if key not in self.uf.parent:
      self.uf.add(key, shape[axis])
      self.keep.append(v)
    return key

  def is_blocked(self, v, axis):
    n = self.node(v, axis)
    return n is None or self.uf.find(n)[0] in self.uf.blocked

  def link(self, a, ai, b, bi, outer=1, inner=1):
    na, nb = self.node(a, ai), self.node(b, bi)
    if na is not None and nb is not None:
      self.uf.union(na, nb, outer, inner)

  def block_all(self, vars_, reason):
    for v in vars_:
      if isinstance(v, Literal):
        continue
      for ax in range(len(_shape(v))):
        self.block_axis(v, ax, reason)

  # ------------------------------------------------------------------------------------------- rules
  def jaxpr(self, jaxpr, where="model"):
    for i, eqn in enumerate(jaxpr.eqns):
      self.eqn(eqn, f"{where}/{eqn.primitive.name}#{i}")

  def eqn(self, eqn, where):
    """Couples (or blocks) the axes of one equation by its primitive's rule in `_RULES` (as JAX's own
    interpreters dispatch); call-like primitives recurse into their jaxpr; anything unknown blocks every axis."""
    name = eqn.primitive.name
    rule = _RULES.get(name)
    if rule is None and (name in CALLS or any(k in eqn.params for k in ("jaxpr", "call_jaxpr", "fun_jaxpr"))):
      rule = _Tracer.call
    if rule is None:
      self.block_all(list(eqn.invars) + list(eqn.outvars), f"{name} at {where}")
    else:
      rule(self, eqn, where)

  def block_axis(self, v, d, reason):
    """Marks axis `d` of `v` as not prunable (no node: a literal or a size-1 axis, nothing to block)."""
    n = self.node(v, d)
    if n is not None:
      self.uf.block(n, reason)

  def elementwise(self, eqn, where):
    out = eqn.outvars[0]
    for v in eqn.invars:
      if isinstance(v, Literal) or len(_shape(v)) != len(_shape(out)):
        continue
      for d, (a, b) in enumerate(zip(_shape(v), _shape(out))):
        if a == b:
          self.link(out, d, v, d)

  def broadcast_in_dim(self, eqn, where):
    src, out = eqn.invars[0], eqn.outvars[0]
    for i, d in enumerate(eqn.params["broadcast_dimensions"]):
      if _shape(src)[i] == _shape(out)[d]:
        self.link(out, d, src, i)

  def transpose(self, eqn, where):
    for i, src in enumerate(eqn.params["permutation"]):
      self.link(eqn.outvars[0], i, eqn.invars[0], src)

  def reduction(self, eqn, where):
    src, out, name = eqn.invars[0], eqn.outvars[0], eqn.primitive.name
    axes = set(eqn.params.get("axes", ()))
    for d in axes:  # a sum/max over units sees every unit: removing some changes it (LayerNorm, softmax)
      self.block_axis(src, d, f"{name} over the axis at {where}")
    kept = [d for d in range(len(_shape(src))) if d not in axes]
    for o, d in enumerate(kept):
      if o < len(_shape(out)):
        self.link(out, o, src, d)

  def squeeze(self, eqn, where):
    src = eqn.invars[0]
    dims = {d % len(_shape(src)) for d in eqn.params["dimensions"]}
    for o, d in enumerate(d for d in range(len(_shape(src))) if d not in dims):
      self.link(eqn.outvars[0], o, src, d)

  def reshape_eqn(self, eqn, where):
    self.reshape(eqn.invars[0], eqn.outvars[0], where)

  def dot_general_eqn(self, eqn, where):
    self.dot_general(eqn)

  def reduce_window(self, eqn, where):
    src, out, name = eqn.invars[0], eqn.outvars[0], eqn.primitive.name
    for d, w in enumerate(eqn.params["window_dimensions"]):
      if w == 1 and _shape(src)[d] == _shape(out)[d]:
        self.link(out, d, src, d)
      else:
        for v in (src, out):
          self.block_axis(v, d, f"{name} window at {where}")

  def along_axes(self, eqn, where):
    """slice, pad, rev, cumulative ops, sort: the axes they change are blocked, the others pass through."""
    src, out, name, p = eqn.invars[0], eqn.outvars[0], eqn.primitive.name, eqn.params
    if name in ("slice", "dynamic_slice", "pad"):
      changed = {d for d, (a, b) in enumerate(zip(_shape(src), _shape(out))) if a != b}
    elif name == "rev":
      changed = set(p["dimensions"])
    elif name == "sort":
      changed = {p["dimension"]}
    else:   # cumsum, cumprod, cummax, cummin
      changed = {p["axis"]}
    for d in range(len(_shape(src))):
      if d in changed:
        for v in (src, out):
          self.block_axis(v, d, f"{name} at {where}")
      else:
        self.link(out, d, src, d)
    for o in eqn.outvars[1:]:
      self.block_all([o], f"{name} at {where}")

  def concatenate(self, eqn, where):
    dim, out = eqn.params["dimension"], eqn.outvars[0]
    for v in eqn.invars:
      for d in range(len(_shape(v))):
        if d == dim:
          self.block_axis(v, d, f"concatenate at {where}")
        else:
          self.link(out, d, v, d)
    self.block_axis(out, dim, f"concatenate at {where}")

  def call(self, eqn, where):
    """A sub-jaxpr (jit, remat, custom_jvp/vjp, ...): its own namespace, joined at its inputs and outputs."""
    ins, outs, p = eqn.invars, eqn.outvars, eqn.params
    sub = p.get("jaxpr") or p.get("call_jaxpr") or p.get("fun_jaxpr")
    closed = getattr(sub, "jaxpr", sub)
    if closed is None or not hasattr(closed, "eqns"):
      self.block_all(list(ins) + list(outs), f"{eqn.primitive.name} at {where}")
      return
    outer_ctx = self.ctx
    self.n_ctx += 1
    inner_ctx = self.n_ctx
    for a, b in zip(ins, closed.invars):
      for d in range(len(_shape(b))):
        na, nb = self.node(a, d, outer_ctx), self.node(b, d, inner_ctx)
        if na is not None and nb is not None:
          self.uf.union(na, nb)
    self.ctx = inner_ctx
    self.jaxpr(closed, where)
    self.ctx = outer_ctx
    for a, b in zip(outs, closed.outvars):
      for d in range(len(_shape(a))):
        na, nb = self.node(a, d, outer_ctx), self.node(b, d, inner_ctx)
        if na is not None and nb is not None:
          self.uf.union(na, nb)

  def nothing(self, eqn, where):
    """Primitives that create values from no parameter (iota, random bits): no axis to couple."""

  def blocks_everything(self, eqn, where):
    self.block_all(list(eqn.invars) + list(eqn.outvars), f"{eqn.primitive.name} at {where}")

  def reshape(self, src, out, where):
    a, b = _shape(src), _shape(out)
    i = j = 0
    while i < len(a) and j < len(b):
      if a[i] == b[j]:
        self.link(out, j, src, i)
        i, j = i + 1, j + 1
        continue
      # find the smallest runs a[i:i2], b[j:j2] with equal products
      i2, j2, pa, pb = i + 1, j + 1, a[i], b[j]
      while pa != pb:
        if pa < pb:
          pa *= a[i2]
          i2 += 1
        else:
          pb *= b[j2]
          j2 += 1
      if i2 - i == 1:    # one input axis split into several output axes
        parts, mv, pv = list(range(j, j2)), (src, i), out
      elif j2 - j == 1:  # several input axes merged into one output axis
        parts, mv, pv = list(range(i, i2)), (out, j), src
      else:
        for v, rng in ((src, range(i, i2)), (out, range(j, j2))):
          for d in rng:
            self.block_axis(v, d, f"reshape at {where}")
        i, j = i2, j2
        continue
      # The merged axis is a product of the parts; a node holds one coupling, so it is coupled to one part: the
      # first one of size > 1 that is not blocked (heads: (H, D) -> H; flatten after pooling: (H, W, C) -> C,
      # since pooling blocked the spatial axes). Other parts stay uncoupled from it.
      sizes = [_shape(pv)[d] for d in parts]
      for k, d in enumerate(parts):
        if sizes[k] > 1 and not self.is_blocked(pv, d):
          outer = int(np.prod(sizes[:k])) if k else 1
          inner = int(np.prod(sizes[k + 1:])) if k + 1 < len(sizes) else 1
          self.link(pv, d, mv[0], mv[1], outer, inner)
          break
      else:  # every part is blocked: so is the merged axis
        reasons = [self.uf.blocked[self.uf.find(self.node(pv, d))[0]] for d in parts if self.node(pv, d) is not None]
        if reasons:
          self.block_axis(*mv, reasons[0])
      i, j = i2, j2

  def dot_general(self, eqn):
    lhs, rhs = eqn.invars
    out = eqn.outvars[0]
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    for a, b in zip(lc, rc):
      self.link(lhs, a, rhs, b)
      if lb:  # activation x activation (attention q·k): removing entries would change a shape-derived scale
        for v, d in ((lhs, a), (rhs, b)):
          self.block_axis(v, d, "contraction of a batched dot_general (attention scores)")
    for k, (a, b) in enumerate(zip(lb, rb)):
      self.link(out, k, lhs, a)
      self.link(out, k, rhs, b)
    lf = [d for d in range(len(_shape(lhs))) if d not in lc and d not in lb]
    rf = [d for d in range(len(_shape(rhs))) if d not in rc and d not in rb]
    for k, d in enumerate(lf):
      self.link(out, len(lb) + k, lhs, d)
    for k, d in enumerate(rf):
      self.link(out, len(lb) + len(lf) + k, rhs, d)

  def conv(self, eqn, where):
    lhs, rhs = eqn.invars
    out = eqn.outvars[0]
    dn = eqn.params["dimension_numbers"]
    ls, rs, os_ = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    fg = eqn.params["feature_group_count"]
    if eqn.params.get("batch_group_count", 1) != 1:
      self.block_all([lhs, rhs, out], f"conv batch groups at {where}")
      return
    self.link(out, os_[0], lhs, ls[0])
    if fg == 1:
      self.link(lhs, ls[1], rhs, rs[1])
      self.link(out, os_[1], rhs, rs[0])
    elif fg == _shape(lhs)[ls[1]] and _shape(rhs)[rs[0]] == fg:  # depthwise, multiplier 1
      self.link(out, os_[1], rhs, rs[0])
      self.link(out, os_[1], lhs, ls[1])
    else:
      for v, d in ((lhs, ls[1]), (rhs, rs[0]), (rhs, rs[1]), (out, os_[1])):
        self.block_axis(v, d, f"grouped conv at {where}")
    # spatial axes are left uncoupled: they are never parameter axes of Dense/Conv kernels


_RULES = {
    **{name: _Tracer.elementwise for name in ELEMENTWISE},
    **{name: _Tracer.reduction for name in REDUCTIONS},
    **{name: _Tracer.reduce_window for name in ("reduce_window_max", "reduce_window_sum", "reduce_window_min",
                                                  "reduce_window")},
    **{name: _Tracer.along_axes for name in ("slice", "dynamic_slice", "pad", "rev", "cumsum", "cumprod",
                                               "cummax", "cummin", "sort")},
    **{name: _Tracer.nothing for name in ("iota", "rng_bit_generator", "random_bits", "random_seed",
                                            "random_wrap", "random_unwrap", "threefry2x32")},
    "broadcast_in_dim": _Tracer.broadcast_in_dim,
    "transpose": _Tracer.transpose,
    "squeeze": _Tracer.squeeze,
    "expand_dims": _Tracer.blocks_everything,
    "reshape": _Tracer.reshape_eqn,
    "dot_general": _Tracer.dot_general_eqn,
    "conv_general_dilated": _Tracer.conv,
    "concatenate": _Tracer.concatenate,
}
"""The tracer's rule for each primitive (call-like primitives: `_Tracer.call`; any other: every axis blocked)."""


def groups(apply_fn, params: PyTree, *example_args, include_unprunable: bool = True) -> list[Group]:
  """Finds groups of coupled parameter axes by tracing `apply_fn(params, *example_args)`.

  Args:
    apply_fn: e.g. `lambda p, x: model.apply({"params": p}, x)`; extra collections (batch stats) can be passed
      as further example args: their axes join the groups too, and `compact` slices them when given.
    params: the parameter tree whose axes are grouped.
    example_args: example inputs (arrays or `jax.ShapeDtypeStruct`).
    include_unprunable: also return groups that touch a blocked axis (with `prunable=False` and the reason).

  Returns:
    Groups in order of their first member's leaf, each listing every coupled parameter axis.
  """
  closed = jax.make_jaxpr(apply_fn)(params, *example_args)
  jaxpr = closed.jaxpr
  t = _Tracer()
  n_params = len(jax.tree.leaves(params))
  offset = n_params
  for k, a in enumerate(example_args):  # plain-array arguments are data inputs: their axes are not prunable
    n = len(jax.tree.leaves(a))
    if isinstance(a, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
      t.block_all(jaxpr.invars[offset:offset + n], f"model input (argument {k + 1})")
    offset += n
  t.jaxpr(jaxpr)
  for v in jaxpr.outvars:
    if not isinstance(v, Literal):
      t.block_all([v], "model output")
  leaf_paths = _tree.paths(params)
  extra_paths = []
  for k, a in enumerate(example_args):
    extra_paths += [f"arg{k + 1}/{p}" for p in _tree.paths(a)]
  in_paths = leaf_paths + extra_paths
  by_root: dict = {}
  for v, path in zip(jaxpr.invars, in_paths):
    for ax in range(len(_shape(v))):
      key = (0, id(v), ax)
      if key not in t.uf.parent:
        continue
      root, outer, inner = t.uf.find(key)
      by_root.setdefault(root, []).append(Member(path, ax, outer, inner))
  out = []
  for root, members in by_root.items():
    if not any(not m.path.startswith("arg") for m in members):
      continue
    reason = t.uf.blocked.get(root, "")
    size = t.uf.size[root]
    if reason and not include_unprunable:
      continue
    members.sort(key=lambda m: (in_paths.index(m.path), m.axis))
    out.append(Group(tuple(members), size, not reason, reason))
  out.sort(key=lambda g: (in_paths.index(g.members[0].path), g.members[0].axis))
  return out


def _unit_view(x: jax.Array, m: Member, size: int) -> jax.Array:
  """Moves member axis to the end and splits it as (outer, units, inner)."""
  x = jnp.moveaxis(jnp.asarray(x, jnp.float32), m.axis, -1)
  return x.reshape(*x.shape[:-1], m.outer, size, m.inner)


def group_scores(groups_: Sequence[Group], scores: PyTree, reduce: str = "l2") -> list[jax.Array]:
  """One score per unit of every prunable group, aggregating all members' scores.

  reduce: "l2" (sqrt of the sum of squares), "l1" (sum of |s|), "mean" (mean of |s| over all member entries),
  or "taylor": |Σ s| over the unit's entries for *signed* scores s = w·∂L/∂w (Molchanov et al. 2019's group
  Taylor: the first-order loss change of removing the whole unit), e.g.
  `jax.tree.map(lambda w, g: w * g, params, grads)`. Given |w·g| (all ≥ 0) it would equal "l1", so such
  scores are refused.
  """
  if reduce not in ("l2", "l1", "mean", "taylor"):
    raise ValueError(f"reduce must be l2, l1, mean or taylor; got {reduce!r}.")
  flat = dict(_tree.leaves_with_paths(scores))
  if reduce == "taylor":
    concrete = [x for x in flat.values() if not _tree.is_traced(x) and hasattr(x, "dtype") and np.size(x)]
    if concrete and not any(bool(jnp.any(jnp.asarray(x) < 0)) for x in concrete):
      raise ValueError("reduce='taylor' sums signed w·∂L/∂w over each unit, but these scores have no negative "
                       "entry (|w·g|, as jp.taylor() gives?); pass params * grads, or use reduce='l1'.")
  out = []
  for g in groups_:
    total, count = jnp.zeros(g.size, jnp.float32), 0
    for m in g.members:
      if m.path not in flat:
        continue
      u = _unit_view(flat[m.path], m, g.size)
      axes = tuple(d for d in range(u.ndim) if d != u.ndim - 2)
      if reduce == "l2":
        total = total + jnp.sum(jnp.square(u), axis=axes)
      elif reduce == "taylor":
        total = total + jnp.sum(u.astype(jnp.float32), axis=axes)
      else:
        total = total + jnp.sum(jnp.abs(u), axis=axes)
      count += u.size // g.size
    if reduce == "l2":
      total = jnp.sqrt(total)
    elif reduce == "taylor":
      total = jnp.abs(total)
    elif reduce == "mean":
      total = total / max(count, 1)
    out.append(total)
  return out


def group_masks(groups_: Sequence[Group], gscores: Sequence[jax.Array], sparsity: float, *,
                scope: str = "global", round_to: int = 1, max_ratio: float = 0.9) -> list[jax.Array]:
  """Bool keep-masks per group (one entry per unit) from group scores.

  scope "global" ranks units of all prunable groups together (scores normalised by each group's mean so groups
  of different sizes compare); "group" prunes `sparsity` of every group. Each group keeps at least
  `(1 − max_ratio)` of its units and a multiple of `round_to` (hardware-friendly widths).
  """
  _tree.check_sparsity(sparsity)
  if scope not in ("global", "group"):
    raise ValueError(f"scope must be 'global' or 'group', got {scope!r}.")
  if not (isinstance(round_to, int) and round_to >= 1):
    raise ValueError(f"round_to must be a positive int, got {round_to!r}.")
  if not 0.0 <= max_ratio <= 1.0:
    raise ValueError(f"max_ratio must be in [0, 1], got {max_ratio!r}.")
  out = []
  prunable = [i for i, g in enumerate(groups_) if g.prunable]
  if scope == "global":
    normed = [gscores[i] / (jnp.mean(gscores[i]) + 1e-12) for i in prunable]
    n = sum(int(x.size) for x in normed)
    keeps = _kth.prune_lowest([(x, None) for x in normed], int(round(sparsity * n)), _kth.unit_key)
    counts = [int(k.sum()) for k in keeps]
  else:
    counts = [groups_[i].size - int(round(sparsity * groups_[i].size)) for i in prunable]
  result = {}
  for i, c in zip(prunable, counts):
    size = groups_[i].size
    c = max(c, math.ceil((1.0 - max_ratio) * size), 1)
    c = min(size, int(math.ceil(c / round_to) * round_to))
    kp, = _kth.prune_lowest([(gscores[i], None)], size - c, _kth.unit_key)
    result[i] = kp
  for i, g in enumerate(groups_):
    out.append(result.get(i, jnp.ones(g.size, jnp.bool_)))
  return out


def to_param_masks(groups_: Sequence[Group], gmasks: Sequence[jax.Array], params: PyTree) -> PyTree:
  """The core's masks for the params (bool, broadcastable where possible, full shape otherwise)."""
  flat = {p: jnp.ones(x.shape, jnp.bool_) for p, x in _tree.leaves_with_paths(params)}
  touched = set()
  for g, gm in zip(groups_, gmasks):
    if bool(jnp.all(gm)):
      continue
    for m in g.members:
      if m.path not in flat:
        continue
      touched.add(m.path)
      shape = flat[m.path].shape
      unit = jnp.broadcast_to(gm[None, :, None], (m.outer, g.size, m.inner)).reshape(-1)
      view = [1] * len(shape)
      view[m.axis] = shape[m.axis]
      flat[m.path] = flat[m.path] & unit.reshape(view)
  leaves = []
  for p, x in _tree.leaves_with_paths(params):
    m = flat[p]
    if p not in touched:
      leaves.append(jnp.asarray(True))
      continue
    # store a broadcastable shape when the mask varies along one axis only (e.g. (1, out) for a Dense kernel)
    varying = [d for d in range(m.ndim) if m.shape[d] > 1 and not bool(jnp.all(m == jnp.take(m, jnp.array([0]), axis=d)))]
    if len(varying) == 1:
      d = varying[0]
      m = jnp.all(m, axis=tuple(i for i in range(m.ndim) if i != d), keepdims=True)
    leaves.append(m)
  return jax.tree.unflatten(jax.tree.structure(params), leaves)


def _merge_removed(flat: dict, g: Group, keep: np.ndarray) -> None:
  """Folds each removed unit's outgoing weights into its most similar kept unit (in place on `flat`).

  Incoming weights of unit u: its slices of the producing members (a kernel's last axis, a bias); outgoing: its
  slices of the consuming kernels (their axis -2). Unit r is matched to the kept unit k of highest cosine
  similarity of incoming weights; since relu(α·z) = α·relu(z) for α > 0, unit r's activity is about α times
  unit k's with α = ⟨in_r, in_k⟩ / ‖in_k‖², so k's outgoing weights gain α times r's (Srinivas & Babu 2015).
  Groups with residual/strided patterns, or no consumer, are left to plain removal.
  """
  if any(m.outer != 1 or m.inner != 1 or m.path not in flat for m in g.members):
    return
  kernel = lambda m: m.path.endswith("kernel") and flat[m.path].ndim >= 2
  producers = [m for m in g.members if (kernel(m) and m.axis == flat[m.path].ndim - 1) or
               (not kernel(m) and flat[m.path].ndim == 1)]
  consumers = [m for m in g.members if kernel(m) and m.axis == flat[m.path].ndim - 2]
  if not producers or not consumers or len(producers) + len(consumers) != len(g.members):
    return
  inc = jnp.concatenate([jnp.moveaxis(flat[m.path], m.axis, 0).reshape(g.size, -1) for m in producers], axis=1)
  inc = inc.astype(jnp.float32)
  removed = np.setdiff1d(np.arange(g.size), keep)
  kept_in = inc[keep]
  dots = inc[removed] @ kept_in.T                                   # (removed, kept)
  norms_k = jnp.sum(kept_in * kept_in, axis=1)
  cos = dots / (jnp.linalg.norm(inc[removed], axis=1)[:, None] * jnp.sqrt(norms_k)[None, :] + 1e-12)
  best = jnp.argmax(cos, axis=1)
  alpha = jnp.take_along_axis(dots, best[:, None], axis=1)[:, 0] / (norms_k[best] + 1e-12)
  alpha = jnp.where(alpha > 0, alpha, 0.0)
  target = jnp.asarray(keep)[best]
  for m in consumers:
    w = jnp.moveaxis(flat[m.path], m.axis, 0)
    add = w[jnp.asarray(removed)] * alpha.reshape((-1,) + (1,) * (w.ndim - 1)).astype(w.dtype)
    flat[m.path] = jnp.moveaxis(w.at[target].add(add), 0, m.axis)


def compact(params: PyTree, groups_: Sequence[Group], gmasks: Sequence[jax.Array],
            extra: Optional[PyTree] = None, extra_prefix: str = "arg1/", merge: bool = False):
  """Slices the pruned units out of every member; returns (small_params, widths[, small_extra]).

  `widths` maps each prunable group's first member `path[axis]` to the kept number of units. `extra` (e.g. the
  batch stats passed as the second example argument to `groups`) is sliced along the same groups; its member
  paths carry `extra_prefix`. Works on any pytree (linen dicts, `nnx.State`). `merge=True` first folds each
  removed neuron's outgoing weights into its most similar kept neuron (see `_merge_removed`), which keeps more
  of the accuracy before fine-tuning than plain removal.
  """
  flat = dict(_tree.leaves_with_paths(params))
  flat_extra = {extra_prefix + p: x for p, x in _tree.leaves_with_paths(extra)} if extra is not None else {}
  widths = {}
  for g, gm in zip(groups_, gmasks):
    keep = np.flatnonzero(np.asarray(gm))
    if merge and g.prunable and 0 < len(keep) < g.size:
      _merge_removed(flat, g, keep)
    if len(keep) == g.size:
      if g.prunable:
        widths[f"{g.members[0].path}[{g.members[0].axis}]"] = g.size
      continue
    if not g.prunable:
      raise ValueError(f"group {g} is not prunable ({g.reason}) but its mask removes units.")
    widths[f"{g.members[0].path}[{g.members[0].axis}]"] = int(len(keep))
    for m in g.members:
      store = flat if m.path in flat else flat_extra if m.path in flat_extra else None
      if store is None:
        continue
      idx = (np.arange(m.outer)[:, None, None] * g.size * m.inner + keep[None, :, None] * m.inner
             + np.arange(m.inner)[None, None, :]).reshape(-1)
      store[m.path] = jnp.take(store[m.path], jnp.asarray(idx), axis=m.axis)
  small = jax.tree.unflatten(jax.tree.structure(params), [flat[p] for p in _tree.paths(params)])
  if extra is None:
    return small, widths
  small_extra = jax.tree.unflatten(jax.tree.structure(extra),
                                   [flat_extra[extra_prefix + p] for p in _tree.paths(extra)])
  return small, widths, small_extra
