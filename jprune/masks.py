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
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jprune import _tree
from jprune import select as _select

PyTree = Any
_INT_MIN = np.iinfo(np.int32).min
_INT_MAX = np.iinfo(np.int32).max
_PRUNED_KEY = _INT_MIN + 1   # key of already-pruned entries: below every real score
_UNROLLED = 5                # passes after the first, each skipped once the search has converged
_SAMPLE = 1 << 15            # size of the strided sample that seeds the search
_SORT_MAX = 1 << 14          # up to this many entries in one top-k, one sort finds the k-th key


# ----------------------------------------------------------------------------------------------- granularity
class Granularity(NamedTuple):
  """How scores become masks: `kind` in {unstructured, nm, blocks, neurons}; static config only."""
  kind: str = "unstructured"
  n: int = 0
  m: int = 0
  axis: Optional[int] = None
  block: tuple = ()
  reduce: str = "mean"


def granularity_name(g: Granularity) -> str:
  """The spelling `parse_granularity` reads back: "unstructured", "2:4", "blocks4x4", "neurons"."""
  if g.kind == "nm":
    return f"{g.n}:{g.m}"
  if g.kind == "blocks" and g.block:
    return f"blocks{g.block[0]}x{g.block[1]}"
  return g.kind


def unstructured() -> Granularity:
  """Prune individual entries."""
  return Granularity("unstructured")


def nm(n: int, m: int, axis: Optional[int] = None) -> Granularity:
  """Keep exactly `n` of every `m` consecutive entries along `axis` (default: the input axis, -2, of kernels).

  For a Flax Dense kernel `(in, out)` the default groups along `in`, which is the 2:4 pattern sparse tensor cores
  use for `x @ kernel`.
  """
  if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
    raise ValueError(f"nm(n, m) needs integers 0 < n <= m, got n={n!r}, m={m!r}.")
  return Granularity("nm", n=n, m=m, axis=axis)


def blocks(bh: int, bw: int) -> Granularity:
  """Prune `(bh, bw)` blocks of the last two axes together (block score = mean of its scores)."""
  if bh < 1 or bw < 1:
    raise ValueError(f"blocks(bh, bw) needs positive sizes, got ({bh}, {bw}).")
  return Granularity("blocks", block=(int(bh), int(bw)))


def neurons(axis: int = -1, reduce: str = "mean") -> Granularity:
  """Prune whole slices along `axis` (default: output units); unit score = `reduce` over the other axes."""
  if reduce not in ("mean", "sum", "l2", "max"):
    raise ValueError(f"reduce must be one of mean, sum, l2, max; got {reduce!r}.")
  return Granularity("neurons", axis=axis, reduce=reduce)


def channels(axis: int = -1, reduce: str = "mean") -> Granularity:
  """Prune conv filters / output channels (axis -1 of `(h, w, in, out)`); `axis=-2` prunes input channels."""
  return neurons(axis=axis, reduce=reduce)


def parse_granularity(spec) -> Granularity:
  """Accepts a Granularity or a string: 'unstructured', 'neurons', 'channels', '2:4', 'blocks4x4'."""
  if isinstance(spec, Granularity):
    return spec
  if spec in (None, "unstructured"):
    return unstructured()
  if spec in ("neurons", "channels", "filters"):
    return neurons()
  if isinstance(spec, str) and ":" in spec:
    n, m = spec.split(":")
    return nm(int(n), int(m))
  if isinstance(spec, str) and spec.startswith("blocks"):
    bh, bw = spec[len("blocks"):].split("x")
    return blocks(int(bh), int(bw))
  raise ValueError(f"unknown granularity {spec!r}; expected unstructured, neurons, channels, N:M or blocksHxW.")


def _norm_axis(axis, ndim, path, what):
  if axis is None:
    axis = -2 if ndim >= 2 else 0
  if not -ndim <= axis < ndim:
    raise ValueError(f"{what} axis {axis} is out of range for {path!r} with {ndim} dims.")
  return axis % ndim


def check_granularity(g: Granularity, path: str, shape: Sequence[int]) -> None:
  """Raises a ValueError naming `path` when `g` cannot apply to a leaf of `shape`."""
  ndim = len(shape)
  if g.kind == "nm":
    ax = _norm_axis(g.axis, ndim, path, "N:M")
    if shape[ax] % g.m:
      raise ValueError(f"N:M {g.n}:{g.m} needs axis {ax} of {path!r} (size {shape[ax]}) to be divisible by {g.m}.")
  elif g.kind == "blocks":
    if ndim < 2:
      raise ValueError(f"blocks{g.block} needs a leaf with at least 2 dims; {path!r} has shape {tuple(shape)}.")
    if shape[-2] % g.block[0] or shape[-1] % g.block[1]:
      raise ValueError(f"blocks{g.block} do not divide the last two axes of {path!r} (shape {tuple(shape)}).")
  elif g.kind == "neurons":
    if ndim == 0:
      raise ValueError(f"neuron/channel pruning needs a leaf with at least 1 dim; {path!r} is a scalar.")
    _norm_axis(g.axis, ndim, path, "neuron")


def unit_scores(s: jax.Array, g: Granularity) -> jax.Array:
  """Reduces a leaf's scores to one score per prunable unit (the leaf itself for unstructured)."""
  s = s.astype(jnp.float32)
  if g.kind == "neurons":
    ax = g.axis % s.ndim
    other = tuple(i for i in range(s.ndim) if i != ax)
    if g.reduce == "mean":
      return jnp.mean(s, axis=other, keepdims=True)
    if g.reduce == "sum":
      return jnp.sum(s, axis=other, keepdims=True)
    if g.reduce == "max":
      return jnp.max(s, axis=other, keepdims=True)
    return jnp.sqrt(jnp.sum(jnp.square(s), axis=other, keepdims=True))
  if g.kind == "blocks":
    bh, bw = g.block
    *lead, h, w = s.shape
    return s.reshape(*lead, h // bh, bh, w // bw, bw).mean(axis=(-3, -1))
  return s


def expand_units(unit_mask: jax.Array, shape, g: Granularity) -> jax.Array:
  """Turns a per-unit mask back into a mask broadcastable to a leaf of `shape`."""
  if g.kind == "blocks":
    bh, bw = g.block
    return jnp.repeat(jnp.repeat(unit_mask, bh, axis=-2), bw, axis=-1)
  return unit_mask


def unit_mask_of(mask: jax.Array, shape, g: Granularity) -> jax.Array:
  """The per-unit view of an existing leaf mask (inverse of `expand_units`)."""
  mask = jnp.asarray(mask, jnp.bool_)
  if g.kind == "neurons":
    ax = g.axis % len(shape)
    target = tuple(shape[i] if i == ax else 1 for i in range(len(shape)))
    if mask.shape != target:
      other = tuple(i for i in range(len(shape)) if i != ax)
      mask = jnp.all(jnp.broadcast_to(mask, shape), axis=other, keepdims=True)
    return mask
  mask = jnp.broadcast_to(mask, shape)
  if g.kind == "blocks":
    bh, bw = g.block
    return mask[..., ::bh, ::bw]
  return mask


# ----------------------------------------------------------------------------------------------- keys
def _keys(s: jax.Array) -> jax.Array:
  """Maps float32 scores to int32 keys with the same order (total order; -0.0 < +0.0). NaN (of either sign)
  ranks lowest, below -inf, so a NaN score is pruned first; eager calls raise on NaN before getting here."""
  b = jax.lax.bitcast_convert_type(s.astype(jnp.float32), jnp.int32)
  # Integer ops only (this is fused into every counting pass): NaN iff the magnitude bits exceed +inf's.
  nan = (b & jnp.int32(0x7FFFFFFF)) > jnp.int32(0x7F800000)
  k = jnp.maximum(b ^ ((b >> 31) & jnp.int32(0x7FFFFFFF)), jnp.int32(_PRUNED_KEY + 1))
  return jnp.where(nan, jnp.int32(_PRUNED_KEY + 1), k)


def _unit_key(unit):
  """Keys of (unit scores, prior unit mask or None): already-pruned units get the lowest key."""
  s, prior = unit
  k = _keys(s)
  return k if prior is None else jnp.where(prior, k, jnp.int32(_PRUNED_KEY))


def _u32(x):
  return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _i32(x):
  return jax.lax.bitcast_convert_type(x, jnp.int32)


def _chunk(d: int, limit: int = 255) -> int:
  """Largest divisor of `d` that is <= `limit` (narrow partial counts cannot overflow)."""
  for c in range(min(d, limit), 0, -1):
    if d % c == 0:
      return c
  return 1


def _count_le(key: jax.Array, xs: jax.Array) -> jax.Array:
  """#(key <= x) for each threshold in `xs`, for one leaf, in one pass: int32 `(len(xs),)`.

  On XLA:CPU a reduction over a fused compare-and-convert to int32 is an order of magnitude slower than a
  pass; counting in narrow types is not. Each threshold gets a byte of a uint32 word (four per word), summed
  over chunks of <= 32 entries of the last axis (no byte can overflow), then split and summed in int32.
  Reshaping only the last axis keeps leaves' shardings intact.
  """
  t = xs.shape[0]
  if key.ndim == 0:
    return (key <= xs).astype(jnp.int32)
  d = key.shape[-1]
  c = _chunk(d, 32)
  spec = _explicit_spec(key)
  if c < 8 or (spec is not None and len(spec) == key.ndim and spec[-1] is not None):
    return jnp.stack([jnp.sum(key <= xs[j], dtype=jnp.int32) for j in range(t)])
  out = []
  for w in range(0, t, 4):
    lanes = sum((key <= xs[j]).astype(jnp.uint32) << (8 * (j - w)) for j in range(w, min(t, w + 4)))
    part = jnp.sum(lanes.reshape(*key.shape[:-1], d // c, c), axis=-1, dtype=jnp.uint32)
    out += [jnp.sum(((part >> (8 * (j - w))) & 255).astype(jnp.int32)) for j in range(w, min(t, w + 4))]
  return jnp.stack(out)


def _sample(keys: Sequence[jax.Array], total: int) -> jax.Array:
  """A sorted strided sample of about `_SAMPLE` keys, proportional to leaf sizes."""
  parts = []
  for k in keys:
    n = k.size
    take = max(1, min(n, int(round(_SAMPLE * n / total))))
    ax = int(np.argmax(k.shape)) if k.ndim else 0
    stride = max(1, min(k.shape[ax] if k.ndim else 1, n // take))
    sub = k[(slice(None),) * ax + (slice(None, None, stride),)] if k.ndim else k
    parts.append(_replicated(sub).reshape(-1))
  return jnp.sort(jnp.concatenate(parts))


def _explicit_spec(x):
  """The PartitionSpec of `x` when it is sharded in explicit mode (else None)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec is not None and any(s is not None for s in spec):
    return spec
  return None


def _replicated(x: jax.Array) -> jax.Array:
  """Replicates an array whose sharding is explicit (sort and flat cumsum need unsharded axes)."""
  if _explicit_spec(x) is not None:
    mesh = jax.typeof(x).sharding.mesh
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return x


class _Search(NamedTuple):
  lo: jax.Array
  hi: jax.Array
  c_lo: jax.Array
  c_hi: jax.Array
  x_n: jax.Array    # a probe next to the bracket and its count (c_n = -1: none), for quadratic interpolation
  c_n: jax.Array
  stall: jax.Array  # consecutive passes that shrank the count bracket less than 4x
  it: jax.Array


_SAMPLE_SD = (-2.5, -0.8, 0.8, 2.5)  # first pass: sample quantiles at q + a·sd(q), sd(q) the sample's
_COUNT_SD = (-2.0, -0.5, 0.5, 2.0)   # later passes: the key expected to have count k + a·sd, sd the bracket's
_QUARTERS = (0.25, 0.5, 0.75)        # after two stalls: key-space quarters, plus hi - 1 (resolves a tie at hi)


def _values(key: jax.Array) -> jax.Array:
  """Inverse of `_keys` (float32; NaN for keys outside the finite range)."""
  return jax.lax.bitcast_convert_type(jnp.where(key >= 0, key, key ^ jnp.int32(0x7FFFFFFF)), jnp.float32)


def _offsets(frac, width):
  """lo-relative uint32 offsets in [1, width - 1] for fractions of a key width (width >= 2)."""
  off = jnp.minimum(jnp.round(frac * width.astype(jnp.float32)), 4294967040.0).astype(jnp.uint32)
  return jnp.clip(off, jnp.uint32(1), width - 1)


def _interpolate(st: _Search, c: jax.Array) -> jax.Array:
  """Keys expected to have counts `c` (in [c_lo, c_hi]), strictly inside the bracket.

  Inverse quadratic interpolation of value(count) through the bracket ends and the neighbouring probe, in
  value space (keys are log-like across exponents and jump at zero); linear where that fails, and linear in
  key space for narrow or unbounded brackets.
  """
  width = _u32(st.hi - st.lo)
  f = lambda x: x.astype(jnp.float32)
  c0, c1, cn = f(st.c_lo), f(st.c_hi), f(st.c_n)
  v0, v1, vn = _values(st.lo), _values(st.hi), _values(st.x_n)
  lin_v = v0 + (c - c0) / (c1 - c0) * (v1 - v0)
  quad_v = (v0 * (c - c1) * (c - cn) / ((c0 - c1) * (c0 - cn)) + v1 * (c - c0) * (c - cn) / ((c1 - c0) * (c1 - cn))
            + vn * (c - c0) * (c - c1) / ((cn - c0) * (cn - c1)))
  quad_ok = (st.c_n >= 0) & (st.c_n != st.c_lo) & (st.c_n != st.c_hi) & jnp.all((quad_v > v0) & (quad_v < v1))
  v = jnp.where(quad_ok, quad_v, lin_v)
  key_lin = st.lo + _i32(_offsets((c - c0) / (c1 - c0), width))
  by_value = jnp.isfinite(v0) & jnp.isfinite(v1) & (width > 1024) & jnp.all(jnp.isfinite(v))
  key_v = _keys(jnp.where(jnp.isfinite(v), v, 0.0))
  off = jnp.clip(_u32(key_v - st.lo), jnp.uint32(1), width - 1)
  key_v = jnp.where(_u32(key_v - st.lo) >= width, jnp.where(key_v < st.lo, st.lo + 1, st.hi - 1), st.lo + _i32(off))
  return jnp.where(by_value, key_v, key_lin)


def kth_key(units: Sequence[jax.Array], k, key_fn=None) -> _Search:
  """Brackets the k-th smallest key over all leaves with counting passes only, four thresholds per pass.

  Invariant: c_lo = #(key <= lo) < k <= c_hi = #(key <= hi). Stops when c_hi == k (prune every key <= hi) or
  hi == lo + 1 (hi is the k-th key; some entries equal to it are pruned, some kept). The first pass probes
  quantiles of a small strided sample around k/N. Later passes interpolate where the count reaches k and
  probe at ±0.5 and ±2 binomial standard deviations of the bracket's count around it, so a bracket of b
  entries shrinks to about sqrt(b)/2: 16M entries take about four passes. After a pass that fails to shrink
  the bracket 4x the spread grows 4x; after two, the pass probes the key-space quarters and hi - 1 (width /4
  per pass, and a tie at hi is recognised at once), which bounds the worst case. `key_fn` maps a leaf to its
  keys inside each pass, so keys are never stored.
  """
  key_fn = key_fn or (lambda u: u)
  total = sum(int(jax.tree.leaves(x)[0].size) for x in units)
  k = jnp.asarray(k, jnp.int32)
  sample = _sample([key_fn(u) for u in units], total)
  ns = sample.shape[0]
  q = k.astype(jnp.float32) / total
  sd_q = jnp.sqrt(q * (1.0 - q) / ns)
  target = k.astype(jnp.float32) + 0.5
  a_sample, a_count = jnp.array(_SAMPLE_SD, jnp.float32), jnp.array(_COUNT_SD, jnp.float32)

  def probes(st: _Search) -> jax.Array:
    width = _u32(st.hi - st.lo)  # >= 2
    pos = jnp.clip(jnp.round((q + a_sample * sd_q) * ns + a_sample), 0, ns - 1).astype(jnp.int32)
    first = sample[pos]
    b = (st.c_hi - st.c_lo).astype(jnp.float32)
    p = jnp.clip((target - st.c_lo.astype(jnp.float32)) / b, 0.0, 1.0)
    sd = (jnp.sqrt(b * p * (1.0 - p)) + 0.5) * jnp.float32(4.0) ** st.stall.astype(jnp.float32)
    c = jnp.clip(target + a_count * sd, st.c_lo.astype(jnp.float32), b + st.c_lo.astype(jnp.float32))
    interp = _interpolate(st, c)
    quarters = st.lo + _i32(_offsets(jnp.array(_QUARTERS, jnp.float32), width))
    stalled = jnp.concatenate([quarters, (st.hi - 1)[None]])
    small = st.lo + _i32(jnp.minimum(jnp.arange(1, 5, dtype=jnp.uint32), width - 1))
    later = jnp.where(width <= 5, small, jnp.where(st.stall >= 2, stalled, interp))
    return jnp.sort(jnp.where(st.it == 0, first, later))

  def body(st: _Search) -> _Search:
    xs = probes(st)
    cs = sum(_count_le(key_fn(u), xs) for u in units)
    xa = jnp.concatenate([st.lo[None], xs, st.hi[None]])  # sorted
    ca = jnp.concatenate([st.c_lo[None], cs, st.c_hi[None]])
    up = ca >= k
    i_hi = jnp.argmax(up)  # first probe reaching k
    i_lo = xa.shape[0] - 1 - jnp.argmax(~up[::-1])  # last probe below k
    lo, hi, c_lo, c_hi = xa[i_lo], xa[i_hi], ca[i_lo], ca[i_hi]
    # the neighbour on the side with the smaller count gap (bracket ends are never neighbours of themselves)
    below, above = jnp.maximum(i_lo - 1, 0), jnp.minimum(i_hi + 1, xa.shape[0] - 1)
    has_below, has_above = (i_lo >= 1) & (ca[below] != c_lo), (i_hi <= 4) & (ca[above] != c_hi)
    use_below = has_below & (~has_above | (c_lo - ca[below] <= ca[above] - c_hi))
    x_n = jnp.where(use_below, xa[below], xa[above])
    c_n = jnp.where(use_below | has_above, jnp.where(use_below, ca[below], ca[above]), -1)
    shrunk = (4 * (c_hi - c_lo) <= st.c_hi - st.c_lo) | (c_hi - c_lo <= 16)  # few entries left: luck, not a stall
    stall = jnp.where(shrunk | (st.stall >= 2), 0, st.stall + 1)
    return _Search(lo, hi, c_lo, c_hi, x_n, c_n, stall, st.it + 1)

  def cond(st: _Search):
    return (_u32(st.hi - st.lo) > 1) & (st.c_hi != k) & (k > 0)

  def maybe(st: _Search) -> _Search:
    return jax.lax.cond(cond(st), body, lambda s: s, st)

  init = _Search(jnp.int32(_INT_MIN), jnp.int32(_INT_MAX), jnp.int32(0), jnp.int32(total), jnp.int32(0),
                 jnp.int32(-1), jnp.int32(0), jnp.int32(0))
  st = body(init)
  for _ in range(_UNROLLED):  # passes that skip themselves once the search has converged
    st = maybe(st)
  # the loop (rarely entered) sits behind a cond: a while loop in the graph can cost a copy of its operands
  return jax.lax.cond(cond(st), lambda s: jax.lax.while_loop(cond, body, s), lambda s: s, st)


def prune_lowest(units: Sequence[jax.Array], k, key_fn=None) -> list[jax.Array]:
  """Keep-masks pruning exactly the `k` lowest keys over all leaves (ties: leaf order, then row-major).

  Up to `_SORT_MAX` entries in all, the k-th key comes from one sort (cheap to compile, and fast at that size);
  beyond, from `kth_key`'s counting passes, which never sort or concatenate the model.
  """
  key_fn = key_fn or (lambda u: u)
  k = jnp.asarray(k, jnp.int32)
  total = sum(int(jax.tree.leaves(u)[0].size) for u in units)
  if total <= _SORT_MAX:
    xs = [key_fn(u) for u in units]
    flat = jnp.concatenate([_replicated(x).reshape(-1) for x in xs])
    hi = jnp.sort(flat)[jnp.clip(k - 1, 0, total - 1)]
    masks = _tie_masks(xs, hi, k - jnp.sum(flat < hi, dtype=jnp.int32))
    return [jnp.where(k > 0, m, True) for m in masks]
  st = kth_key(units, k, key_fn)
  hi, r = st.hi, k - st.c_lo  # r: how many entries in (lo, hi] (all equal to hi on a partial tie) to prune

  def exact(_):
    return [key_fn(u) > hi for u in units]

  def partial_tie(_):
    return _tie_masks([key_fn(u) for u in units], hi, r)

  masks = jax.lax.cond(st.c_hi == k, exact, partial_tie, None)
  return [jnp.where(k > 0, m, True) for m in masks]


def _tie_masks(xs: Sequence[jax.Array], hi: jax.Array, r: jax.Array) -> list[jax.Array]:
  """Keep-masks: keys > hi kept, keys < hi pruned, and of the keys == hi the first r (leaf order, then
  row-major) pruned. Ties are counted per leaf (one pass); a leaf whose ties all fall before / after the r-th
  keeps (x > hi) / (x >= hi); only the one leaf where the r-th tie falls ranks its ties, inside one row."""
  counts = [jnp.sum(x == hi, dtype=jnp.int32) for x in xs]
  out, before = [], jnp.int32(0)
  for x, c in zip(xs, counts):
    r_leaf = jnp.clip(r - before, 0, c)
    out.append(jax.lax.cond((r_leaf > 0) & (r_leaf < c), _straddle, _all_or_no_ties, x, hi, r_leaf))
    before = before + c
  return out


def _all_or_no_ties(x: jax.Array, hi: jax.Array, r: jax.Array) -> jax.Array:
  """Keep-mask of a leaf whose ties at hi are all pruned (r > 0) or all kept (r == 0)."""
  return (x > hi) | ((x == hi) & (r == 0))


def _straddle(key: jax.Array, hi: jax.Array, r: jax.Array) -> jax.Array:
  """Keep-mask of the leaf where the r-th tie falls: keys > hi, and the ties (keys == hi) of row-major rank >= r.

  The flat leaf is viewed as rows; ties are counted per row, and only the row holding the r-th tie is ranked
  with a cumsum (a flat cumsum over a large leaf costs many passes on CPU).
  """
  shape, spec = key.shape, _explicit_spec(key)
  x = _replicated(key).reshape(-1)
  n = x.shape[0]
  cols = _chunk(n, 4096)
  x2 = x.reshape(n // cols, cols)
  eq = x2 == hi
  row_counts = jnp.sum(eq, axis=1, dtype=jnp.int32)
  ends = jnp.cumsum(row_counts)                     # ties in rows <= i
  j = jnp.sum(ends <= r, dtype=jnp.int32)           # rows before j: all their ties pruned; j holds the r-th
  start = ends[j] - row_counts[j]
  row_eq = jax.lax.dynamic_slice(eq, (j, 0), (1, cols))
  rank = jnp.cumsum(row_eq, axis=1, dtype=jnp.int32) - 1 + start
  row_keep = (jax.lax.dynamic_slice(x2, (j, 0), (1, cols)) > hi) | (row_eq & (rank >= r))
  rows = jnp.arange(n // cols, dtype=jnp.int32)[:, None]
  keep = (x2 > hi) | (eq & (rows > j))
  keep = jax.lax.dynamic_update_slice(keep, row_keep, (j, 0)).reshape(shape)
  if spec is not None:
    keep = jax.sharding.reshard(keep, jax.typeof(key).sharding)
  return keep


def _nm_mask(s: jax.Array, g: Granularity, prior: Optional[jax.Array]) -> jax.Array:
  """Keeps the n highest of every m consecutive entries along the axis (ties: lower index wins)."""
  ax = _norm_axis(g.axis, s.ndim, "", "N:M")
  key = _keys(s)
  if prior is not None:
    key = jnp.where(prior, key, _PRUNED_KEY)
  moved = jnp.moveaxis(key, ax, -1)
  grouped = moved.reshape(*moved.shape[:-1], moved.shape[-1] // g.m, g.m)
  a = grouped[..., :, None]
  b = grouped[..., None, :]
  idx = jnp.arange(g.m)
  earlier = (idx[None, :] < idx[:, None]).reshape((1,) * (grouped.ndim - 1) + (g.m, g.m))
  beats = (b > a) | ((b == a) & earlier)  # [..., i, j]: j ranks before i
  rank = jnp.sum(beats, axis=-1)
  keep = (rank < g.n).reshape(moved.shape)
  return jnp.moveaxis(keep, -1, ax)


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
      check_granularity(g, path, s.shape)
  _tree.check_finite(scores)
  return g, items, flags, prior_leaves


_MICRO = 10 ** 6


def _count_k(s, n: int):
  """How many of n units a sparsity s prunes: round(s·n), ties to even, with s read to 6 decimals
  (d = round(s·10⁶)) and the product computed exactly in integers, so a Python float (eager) and the float32
  it becomes under `jit` give the same count (0.3 · 95 → 28 either way; in float32 arithmetic 0.3·95 would
  round up to 29). A traced s outside [0, 1) is clamped to [0, 0.999999] and NaN counts as 0 (eager values
  outside [0, 1) raise before this)."""
  n = int(n)
  if n >= 2 ** 31 - 1:
    raise ValueError(f"{n} units exceed the int32 counts top-k uses; prune fewer units per call.")
  a, b1, b0 = n // _MICRO, (n % _MICRO) // 1000, n % 1000
  if not _tree.is_traced(s):
    d = min(max(int(round(float(s) * _MICRO)), 0), _MICRO - 1)
    q, r = divmod(d * n, _MICRO)
    return jnp.int32(q + (1 if 2 * r > _MICRO or (2 * r == _MICRO and q % 2) else 0))
  s = jnp.asarray(s, jnp.float32)
  d = jnp.round(jnp.where(jnp.isnan(s), 0.0, jnp.clip(s, 0.0, 1.0)) * _MICRO).astype(jnp.int32)
  d = jnp.minimum(d, _MICRO - 1)
  # d·n / 10⁶ with n = a·10⁶ + b1·10³ + b0: every partial product stays below 2³¹
  t1, t0 = d * b1, d * b0
  q1, r1 = t1 // 1000, t1 % 1000
  q0, r0 = t0 // _MICRO, t0 % _MICRO
  frac = r1 * 1000 + r0                                   # < 2·10⁶
  q = d * a + q1 + q0 + frac // _MICRO
  r = frac % _MICRO
  up = (2 * r > _MICRO) | ((2 * r == _MICRO) & (q % 2 == 1))
  return q + up.astype(jnp.int32)


def topk(scores: PyTree, sparsity, *, where=None, scope: str = "layer", granularity=None,
         masks: Optional[PyTree] = None) -> PyTree:
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
  if scope == "global" and g.kind != "nm":
    if isinstance(sparsity, dict) or not _is_number_like(sparsity):
      raise ValueError("scope='global' takes one sparsity number, not a per-leaf tree.")
    _tree.check_sparsity(sparsity)
  if g.kind == "neurons":
    _warn_unmasked_unit_leaves(items, flags, g)
  leaves = [s for _, s in items]
  args = (leaves, prior_leaves, per_leaf if scope == "layer" or g.kind == "nm" else sparsity)
  statics = dict(flags=tuple(bool(f) for f in flags), g=g, scope=scope)
  traced = any(_tree.is_traced(x) for x in jax.tree.leaves(args))
  # eager calls go through one jitted program per (structure, shapes, dtypes, settings), compiled once and
  # reused; traced calls inline the same code. Traced and eager sparsities prune the same count (`_count_k`).
  out = (_topk_leaves if traced else _topk_leaves_jit)(*args, **statics)
  return jax.tree.unflatten(treedef, out)


class UnmaskedUnitsWarning(UserWarning):
  """Neurons/channels masks leave the unselected leaves that belong to the same units (biases, norms) unmasked."""


def _warn_unmasked_unit_leaves(items, flags, g: Granularity) -> None:
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
  if g.kind == "nm":
    for i, (s, f) in enumerate(zip(leaves, flags)):
      if f:
        out[i] = jnp.where(jnp.asarray(sparsity[i]) > 0, _nm_mask(s, g, prior_leaves[i]), True)
    return out
  units, shapes = {}, {}
  for i, (s, f) in enumerate(zip(leaves, flags)):
    if not f:
      continue
    if s.size == 0:   # nothing to rank: an empty mask of the leaf's shape
      out[i] = jnp.ones(s.shape, jnp.bool_)
      continue
    u = unit_scores(s, g)
    prior = None if prior_leaves[i] is None else unit_mask_of(prior_leaves[i], s.shape, g)
    units[i], shapes[i] = (u, prior), s.shape
  if scope == "global":
    idx = sorted(units)
    if not idx:
      return out
    n_total = sum(int(units[i][0].size) for i in idx)
    keeps = prune_lowest([units[i] for i in idx], _count_k(sparsity, n_total), _unit_key)
    for i, kp in zip(idx, keeps):
      out[i] = expand_units(kp, shapes[i], g)
  else:
    for i, u in units.items():
      kp, = prune_lowest([u], _count_k(sparsity[i], int(u[0].size)), _unit_key)
      out[i] = expand_units(kp, shapes[i], g)
  return out


_topk_leaves_jit = jax.jit(_topk_leaves, static_argnames=("flags", "g", "scope"))


def _is_number_like(x):
  return isinstance(x, (int, float, np.floating, np.integer)) or (hasattr(x, "shape") and np.ndim(x) == 0)


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


def threshold(scores: PyTree, value, *, where=None, granularity=None) -> PyTree:
  """Keeps entries (or units) whose score is >= `value`; e.g. prune |g| < θ.

  Examples:
    >>> import jax.numpy as jnp, jprune as jp
    >>> jp.threshold({"kernel": jnp.array([0.1, 0.5, 2.0])}, 0.5)["kernel"].tolist()
    [False, True, True]
  """
  g, items, flags, _ = _prepare(scores, where, granularity, None)
  if g.kind == "nm":
    raise ValueError("threshold() does not take N:M granularity; use topk(..., granularity=nm(n, m)).")
  out = []
  for (path, s), f in zip(items, flags):
    if not f:
      out.append(jnp.asarray(True))
      continue
    out.append(expand_units(unit_scores(s, g) >= value, s.shape, g))
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


def full_masks(params: PyTree, where=None) -> PyTree:
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
