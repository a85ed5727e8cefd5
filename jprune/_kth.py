"""The k-th-key search behind exact top-k: `prune_lowest(units, k, key_fn)` and the helpers it is built from.

Scores map to int32 keys with the same order (`keys`). Up to `SORT_MAX` entries one sort finds the k-th key;
beyond, `kth_key` brackets it with counting passes — elementwise ops and reductions only, one fused read of every
leaf per pass counting four thresholds at once, placed where interpolation through the counts seen so far
expects the k-th key — so the model itself is never sorted or concatenated (a strided sample of 32K keys is).
Ties at the threshold are broken by leaf order, then row-major index, counted per leaf and ranked only inside
the one row where the k-th tie falls.

Public to the package (masks, transform, structured, llm): `prune_lowest`, `prune_lowest_groups`, `kth_key`,
`kth_keys`, `keys`, `unit_key`,
`count_k`, `PRUNED_KEY`, `SORT_MAX`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from jprune import _tree

_INT_MIN = np.iinfo(np.int32).min
_INT_MAX = np.iinfo(np.int32).max
_PRUNED_KEY = _INT_MIN + 1   # key of already-pruned entries: below every real score
_SAMPLE = 1 << 15            # size of the strided sample that seeds the search (shared by the groups)
_SAMPLE_MIN = 1 << 11        # the least sample per group
_SAMPLE_FRACTION = 32       # ... and at most 1/32 of the largest group (sorting 32K keys costs 6 read passes of LeNet)
_PART_MAX = 1 << 20          # partial counts a counting pass may keep (4 MB)
_SORT_MAX = 1 << 14          # up to this many entries in one top-k, one sort finds the k-th key


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


def _unit_size(u) -> int:
  """Entries of a unit: an array, a `(scores, prior)` tuple, or an object with a `size` (lazy scores)."""
  return int(u.size) if hasattr(u, "size") else int(jax.tree.leaves(u)[0].size)


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


def _count_packed(preds, lead: int = 0) -> jax.Array:
  """How many entries of each bool array in `preds` (one shape) are True: int32 `(len(preds),)`, or with
  `lead=1` int32 `(len(preds), shape[0])` counted per index of the first axis.

  On XLA:CPU a reduction over a fused bool-to-int32 convert is an order of magnitude slower than a read pass;
  counting in narrow types is not. Each predicate gets a byte of a uint32 word (four per word), summed over
  chunks of <= 32 entries of the last axis (no byte can overflow), then split and summed in int32. Reshaping
  only the last axis keeps leaves' shardings intact.
  """
  p0 = preds[0]
  axes = tuple(range(lead, p0.ndim))
  if p0.ndim == lead:
    return jnp.stack([p.astype(jnp.int32) for p in preds])
  d = p0.shape[-1]
  c = _chunk(d, 32)
  spec = _explicit_spec(p0)
  if c < 8 or (spec is not None and len(spec) == p0.ndim and spec[-1] is not None):
    return jnp.stack([jnp.sum(p, axis=axes, dtype=jnp.int32) for p in preds])
  # Partial counts over g·c <= 255 entries, g chunks of c at a time where n/c partial counts would be a large
  # buffer (2^27 entries: one count pass 2.0 -> 0.8 read passes with g = 4).
  g, m = 1, d // c
  if p0.size // c > _PART_MAX:
    fits = [q for q in range(1, 255 // c + 1) if m % q == 0]
    g = next((q for q in fits if p0.size // (c * q) <= _PART_MAX), fits[-1])
  out = []
  for w in range(0, len(preds), 4):
    group = preds[w:w + 4]
    lanes = sum((p.astype(jnp.uint32) << (8 * j) for j, p in enumerate(group)), jnp.zeros((), jnp.uint32))
    part = jnp.sum(lanes.reshape(*p0.shape[:-1], d // (c * g), g, c), axis=(-2, -1), dtype=jnp.uint32)
    if lead == 0:   # one reduction splits all four bytes (one kernel, not four)
      shifts = (jnp.arange(len(group), dtype=jnp.uint32) * 8).reshape((1,) * part.ndim + (len(group),))
      out.append(jnp.sum(((part[..., None] >> shifts) & 255).astype(jnp.int32), axis=tuple(range(part.ndim))))
    else:
      out.append(jnp.stack([jnp.sum(((part >> (8 * j)) & 255).astype(jnp.int32), axis=tuple(range(lead, part.ndim)))
                            for j in range(len(group))]))
  return jnp.concatenate(out)


def _count_le(key: jax.Array, xs: jax.Array) -> jax.Array:
  """#(key <= x) for each threshold in `xs`, for one leaf, in one pass: int32 `(len(xs),)`."""
  return _count_packed([key <= xs[j] for j in range(xs.shape[0])])


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
  n_lo: jax.Array   # per leaf: #(key <= lo) and #(key <= hi) of its group's bracket
  n_hi: jax.Array


_GROUP_FIELDS = _Search._fields[:-2]

_SAMPLE_SD = (-2.5, -0.8, 0.8, 2.5)  # first pass: sample quantiles at q + a·sd(q), sd(q) the sample's
_COUNT_SD = (-2.0, -0.5, 0.5, 2.0)   # later passes: the key expected to have count k + a·sd, sd the bracket's
_QUARTERS = (0.25, 0.5, 0.75)        # after _STALLS stalls: key-space quarters, plus hi - 1 (resolves a tie at hi)
_STALLS = 2
_FEW, _FIFTHS = 8, (0.2, 0.4, 0.6, 0.8)  # at most _FEW entries in the bracket: probe its count fifths
_SAMPLE_PROBES = 16                  # at most this many sample keys inside the bracket: probe one of them


def _values(key: jax.Array) -> jax.Array:
  """Inverse of `_keys` (float32; NaN for keys outside the finite range)."""
  return jax.lax.bitcast_convert_type(jnp.where(key >= 0, key, key ^ jnp.int32(0x7FFFFFFF)), jnp.float32)


def _offsets(frac, width):
  """lo-relative uint32 offsets in [1, width - 1] for fractions of a key width (width >= 2)."""
  off = jnp.minimum(jnp.round(frac * width.astype(jnp.float32)), 4294967040.0).astype(jnp.uint32)
  return jnp.clip(off, jnp.uint32(1), width - 1)


def _interpolate(st: _Search, c: jax.Array) -> jax.Array:
  """Keys expected to have counts `c_lo + c` (`c` in [0, c_hi - c_lo]), strictly inside the bracket.

  Counts are taken relative to c_lo: float32 cannot tell apart counts above 2^24 that differ by less than
  their ulp (8 at 10^8), which made every probe of a narrow bracket of a large tree collapse onto lo + 1.

  Inverse quadratic interpolation of value(count) through the bracket ends and the neighbouring probe, in
  value space (keys are log-like across exponents and jump at zero); linear where that fails, and linear in
  key space for narrow or unbounded brackets.
  """
  width = _u32(st.hi - st.lo)
  f = lambda x: x.astype(jnp.float32)
  c0, c1, cn = jnp.float32(0.0), f(st.c_hi - st.c_lo), f(st.c_n - st.c_lo)
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


def _group_sample(keys: Sequence[jax.Array], total: int, size: int) -> jax.Array:
  """An unsorted strided sample of about `size` keys of one group's leaves, proportional to leaf sizes.

  Each leaf is sampled flat with a stride coprime to its row length, so the sample visits every column and
  rows spread over the whole leaf (taking whole rows would over-represent a leaf's first rows, whose scale
  need not be typical: on SmolLM2's kernels that bias cost the first pass its lower bracket end).
  """
  parts = []
  for k in keys:
    n = k.size
    take = max(1, min(n, int(round(size * n / total))))
    stride = max(1, n // take)
    row = k.shape[-1] if k.ndim else 1
    while stride > 1 and math.gcd(stride, row) > 1:
      stride -= 1
    parts.append(_replicated(k).reshape(-1)[::stride][:take])
  return jnp.concatenate(parts)


def _grid(sample: jax.Array) -> jax.Array:
  """Per group, the largest power of two G that divides every positive key of its sample (1 when it has none).

  Weights stored in low precision (bf16, f16, dequantized int8 blocks) have float32 scores whose low mantissa
  bits are zero, so their keys are multiples of some G: 2^16 for bf16 |w|, 2^9 on SmolLM2's kernels. The search
  then probes only multiples of G, and a tie at the k-th key is pinned in one pass instead of narrowing key
  space bit by bit. It is a guess from the sample: counts stay exact whatever the data, and off-grid entries only
  cost passes.
  """
  valid = (sample > 0) & (sample < _INT_MAX)     # INT_MAX: the padding (no score has that key)
  tz = jax.lax.population_count((sample & -sample) - 1)             # trailing zero bits of a positive key
  bits = jnp.min(jnp.where(valid, tz, 31), axis=1)
  return jnp.where(jnp.any(valid, axis=1), jnp.left_shift(jnp.int32(1), jnp.minimum(bits, 23)), 1)


def _on_grid(p: jax.Array, lo: jax.Array, hi: jax.Array, grid: jax.Array) -> jax.Array:
  """Probes moved to the nearest multiple of `grid` strictly inside (lo, hi) (non-negative probes only; probes
  without such a multiple stay where they are)."""
  down, up = p & -grid, (p & -grid) + grid
  ok_down, ok_up = down > lo, (up < hi) & (up > p)
  near = jnp.where(ok_up & (~ok_down | (up - p < p - down)), up, jnp.where(ok_down, down, p))
  return jnp.where((grid > 1) & (p >= 0) & (p <= _INT_MAX - grid), near, p)


def kth_keys(groups: Sequence[Sequence[Any]], ks, key_fn=None) -> _Search:
  """Brackets the k-th smallest key of each group of leaves, all groups in one loop: counting passes only,
  four thresholds per group per pass. Every field of the result is `(G,)` except `n_lo`, `n_hi`: `(L,)`, each
  leaf's count at its group's lo / hi (leaves in group order), from which ties are split without another pass.

  Invariant per group: c_lo = #(key <= lo) < k <= c_hi = #(key <= hi). A group stops when c_hi == k (prune
  every key <= hi) or hi == lo + 1 (hi is the k-th key; some entries equal to it are pruned, some kept). The
  first pass probes quantiles of a small strided sample around k/N. Later passes interpolate where the count
  reaches k and probe at ±0.5 and ±2 binomial standard deviations of the bracket's count around it, so a
  bracket of b entries shrinks to about sqrt(b)/2: 16M entries take about four passes. After a pass that fails
  to shrink the bracket 4x the spread grows 4x; after two, the pass probes the key-space quarters and hi - 1
  (width /4 per pass, and a tie at hi is recognised at once), which bounds the worst case. Keys of weights stored
  in low precision are multiples of a power of two (`_grid`, guessed from the sample); probes then sit on that
  grid, and a bracket holding one grid key is pinned by probing hi - 1. `key_fn` maps a leaf
  to its keys inside each pass, so keys are never stored. The scalar logic is traced once for all groups
  (`vmap`), so layer scope over many leaves compiles one loop, not one per leaf; each leaf's count sits in a
  `cond` on its group being active, so a converged leaf is not read again.
  """
  key_fn = key_fn or (lambda u: u)
  n_groups = len(groups)
  units = [u for grp in groups for u in grp]
  gid = np.concatenate([np.full(len(grp), g, np.int32) for g, grp in enumerate(groups)])
  sizes = np.array([_unit_size(u) for u in units], np.int64)
  totals = np.zeros(n_groups, np.int64)
  np.add.at(totals, gid, sizes)
  ks = jnp.stack([jnp.asarray(k, jnp.int32).reshape(()) for k in ks]) if isinstance(ks, (list, tuple)) \
      else jnp.asarray(ks, jnp.int32).reshape(n_groups)
  # each group's sample in proportion to its own size (a small leaf next to a large one is not sampled as
  # heavily: sorting is most of the fixed cost on small trees, ~30 ns a key); groups whose samples have one
  # length share one sort, and the sorted samples are padded with INT_MAX to one (G, n) array
  per = [max(_SAMPLE_MIN, min(_SAMPLE // n_groups, int(t) // _SAMPLE_FRACTION)) for t in totals]
  parts = [_group_sample([key_fn(u) for u in grp], int(totals[g]), per[g]) for g, grp in enumerate(groups)]
  ns = np.array([p.shape[0] for p in parts])
  by_len: dict = {}
  for g, p in enumerate(parts):
    by_len.setdefault(p.shape[0], []).append(g)
  sorted_parts: list = [None] * n_groups
  for n_g, gs in by_len.items():
    block = jnp.sort(jnp.stack([parts[g] for g in gs]), axis=1)
    for i, g in enumerate(gs):
      sorted_parts[g] = jnp.pad(block[i], (0, ns.max() - n_g), constant_values=_INT_MAX)
  sample = jnp.stack(sorted_parts)
  q = ks.astype(jnp.float32) / totals.astype(np.float32)
  sd_q = jnp.sqrt(q * (1.0 - q) / ns.astype(np.float32))
  grid = _grid(sample)
  a_sample, a_count = jnp.array(_SAMPLE_SD, jnp.float32), jnp.array(_COUNT_SD, jnp.float32)

  def probes(st: _Search, sample, ns, q, sd_q, k, grid) -> jax.Array:   # one group
    width = _u32(st.hi - st.lo)  # >= 2
    pos = jnp.clip(jnp.round((q + a_sample * sd_q) * ns + a_sample), 0, ns - 1).astype(jnp.int32)
    first = sample[pos]
    b = (st.c_hi - st.c_lo).astype(jnp.float32)
    target = (k - st.c_lo).astype(jnp.float32) + 0.5   # relative to c_lo (float32 is exact there)
    p = jnp.clip(target / b, 0.0, 1.0)
    sd = (jnp.sqrt(b * p * (1.0 - p)) + 0.5) * jnp.float32(4.0) ** st.stall.astype(jnp.float32)
    # a bracket of few entries: probes at the count fifths (the ±2 sd probes would clip onto its ends)
    c = jnp.where(b <= _FEW, b * jnp.array(_FIFTHS, jnp.float32), jnp.clip(target + a_count * sd, 0.0, b))
    interp = _interpolate(st, c)
    quarters = st.lo + _i32(_offsets(jnp.array(_QUARTERS, jnp.float32), width))
    stalled = jnp.concatenate([quarters, (st.hi - 1)[None]])
    small = st.lo + _i32(jnp.minimum(jnp.arange(1, 5, dtype=jnp.uint32), width - 1))
    later = _on_grid(jnp.where(st.stall >= _STALLS, stalled, interp), st.lo, st.hi, grid)
    # Few sample keys left inside the bracket: they are real keys, so probing one of them, s, and s - 1 resolves
    # the bracket at once when s is the k-th key. On lumpy (quantized) weights the bracket often comes down to
    # one run of equal keys that interpolation and quarters would take several passes to pin.
    i_a = jnp.searchsorted(sample, st.lo, side="right", method="compare_all")
    m = jnp.minimum(jnp.searchsorted(sample, st.hi, side="right", method="compare_all"), ns.astype(jnp.int32)) - i_a
    at = i_a + jnp.clip(jnp.floor(p * m.astype(jnp.float32)).astype(jnp.int32), 0, jnp.maximum(m - 1, 0))
    s = sample[at]
    # s repeated in the sample: likely a run of many equal keys (dequantized weights), so probe it however many
    # sample keys the bracket still holds
    repeated = ((at > i_a) & (sample[jnp.maximum(at - 1, 0)] == s)) | \
        ((at + 1 < i_a + m) & (sample[jnp.minimum(at + 1, sample.shape[0] - 1)] == s))
    on_sample = (m >= 1) & ((m <= _SAMPLE_PROBES) | repeated)
    later = jnp.where(on_sample, jnp.stack([s - 1, later[1], later[2], s]), later)
    # No grid key strictly inside the bracket and hi on the grid: on grid data hi is the only key left in it, so
    # hi - 1 pins it (its count is c_lo); the key-space quarters go on where the data is off the grid after all.
    tight = (grid > 1) & (st.hi > 0) & ((st.hi & (grid - 1)) == 0) & (((st.hi - 1) & -grid) <= st.lo)
    later = jnp.where(tight, jnp.concatenate([(st.hi - 1)[None], quarters]), later)
    later = jnp.where(width <= 5, small, later)
    return jnp.sort(jnp.where(st.it == 0, first, later))

  def update(st: _Search, xs, cs, k):   # one group: the new bracket and which of the 6 counts its ends are
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
    stall = jnp.where(shrunk | (st.stall >= _STALLS), 0, st.stall + 1)
    return (_Search(lo, hi, c_lo, c_hi, x_n, c_n, stall, st.it + 1, st.n_lo, st.n_hi), i_lo, i_hi)

  per_group = lambda st: st._replace(n_lo=jnp.zeros(n_groups), n_hi=jnp.zeros(n_groups))

  def active(st: _Search):
    return (_u32(st.hi - st.lo) > 1) & (st.c_hi != ks) & (ks > 0)

  # Keys as a program of explicit operands (the units' arrays and every array `key_fn` closes over), so each
  # pass can take them through an optimization barrier: otherwise XLA hoists the loop-invariant key computation
  # out of the loop and materializes every leaf's keys (params-sized fresh buffers, whose page faults cost as
  # much as the whole search).
  # (Layer scope keeps key_fn whole: each leaf's count sits in its own cond, which XLA does not hoist from.)
  flat, treedef = jax.tree.flatten(units)
  keys_jaxpr = jax.make_jaxpr(lambda *fl: [key_fn(u) for u in jax.tree.unflatten(treedef, fl)])(*flat) \
      if n_groups == 1 else None

  def body(carry):
    st, fl, consts = carry
    fl, consts = jax.lax.optimization_barrier((fl, consts))
    xs = jax.vmap(probes)(per_group(st), sample, ns.astype(np.float32), q, sd_q, ks, grid)   # (G, 4)
    on = active(st)   # converged groups keep their state
    if keys_jaxpr is not None:
      keys = jex.core.jaxpr_as_fun(jex.core.ClosedJaxpr(keys_jaxpr.jaxpr, consts))(*fl)
      cnt = jnp.stack([_count_le(kk, xs[g]) for kk, g in zip(keys, gid)])                # (L, 4)
    else:   # a converged group's leaves are not read again: layer scope costs the mean passes, not the most
      us = jax.tree.unflatten(treedef, fl)
      cnt = jnp.stack([jax.lax.cond(on[g], lambda u=u, g=g: _count_le(key_fn(u), xs[g]),
                                    lambda: jnp.zeros(4, jnp.int32)) for u, g in zip(us, gid)])
    cs = cnt.sum(0, keepdims=True) if n_groups == 1 else jax.ops.segment_sum(cnt, gid, n_groups)
    new, i_lo, i_hi = jax.vmap(update)(per_group(st), xs, cs, ks)
    la = jnp.concatenate([st.n_lo[:, None], cnt, st.n_hi[:, None]], axis=1)           # (L, 6), sorted as xa
    n_lo = jnp.take_along_axis(la, i_lo[gid][:, None], axis=1)[:, 0]
    n_hi = jnp.take_along_axis(la, i_hi[gid][:, None], axis=1)[:, 0]
    st = new._replace(**{f: jnp.where(on, getattr(new, f), getattr(st, f)) for f in _GROUP_FIELDS},
                      n_lo=jnp.where(on[gid], n_lo, st.n_lo), n_hi=jnp.where(on[gid], n_hi, st.n_hi))
    return st, fl, consts

  def cond(carry):
    return jnp.any(active(carry[0]))

  z = jnp.zeros(n_groups, jnp.int32)
  init = _Search(z + _INT_MIN, z + _INT_MAX, z, jnp.asarray(totals, jnp.int32), z, z - 1, z, z,
                 jnp.zeros(len(units), jnp.int32), jnp.asarray(sizes, jnp.int32))
  # one loop body for every pass: the program (and its compile time) does not grow with the passes
  return jax.lax.while_loop(cond, body, (init, list(flat), list(keys_jaxpr.consts) if keys_jaxpr else []))[0]


def kth_key(units: Sequence[Any], k, key_fn=None) -> _Search:
  """`kth_keys` for one group: scalar fields (`n_lo`, `n_hi` per leaf)."""
  st = kth_keys([units], [k], key_fn)
  return st._replace(**{f: getattr(st, f)[0] for f in _Search._fields if f not in ("n_lo", "n_hi")})


def prune_lowest(units: Sequence[Any], k, key_fn=None) -> list[jax.Array]:
  """Keep-masks pruning exactly the `k` lowest keys over all leaves (ties: leaf order, then row-major)."""
  return prune_lowest_groups([units], [k], key_fn)[0]


def prune_lowest_groups(groups: Sequence[Sequence[Any]], ks: Sequence[Any], key_fn=None) -> list[list[jax.Array]]:
  """`prune_lowest` of each group of leaves with its own k, the groups searched together in one loop.

  A group of up to `_SORT_MAX` entries gets its k-th key from one sort (cheap to compile, fast at that size);
  larger groups from `kth_keys`' counting passes, which never sort or concatenate the model. The masks take
  one more pass: ties at the k-th key are split with the per-leaf counts the search kept, and only the one
  leaf per group where the split falls ranks its ties (inside one row).
  """
  key_fn = key_fn or (lambda u: u)
  ks = [jnp.asarray(k, jnp.int32) for k in ks]
  totals = [sum(_unit_size(u) for u in grp) for grp in groups]
  out: list = [None] * len(groups)
  big = [g for g, t in enumerate(totals) if t > _SORT_MAX]
  for g, (grp, k, total) in enumerate(zip(groups, ks, totals)):
    if total <= _SORT_MAX:
      # the k-th lowest key from one sort of the keys, and the flat position of the tie at it that is pruned
      # last; each leaf's mask is then elementwise (keeps its sharding): a few kernels to compile, where a tie
      # split per leaf took about twenty. (Sorting (key, position) pairs instead took 7x as long at 16K entries.)
      xs = [key_fn(u) for u in grp]
      flat = jnp.concatenate([_replicated(x).reshape(-1) for x in xs])
      hi = jnp.sort(flat)[jnp.clip(k - 1, 0, total - 1)]
      # the (k - #below)-th tie (1-based) is pruned last: its index is the number of running tie counts below that
      last = jnp.sum(_cumsum((flat == hi).astype(jnp.int32)) < k - jnp.sum(flat < hi, dtype=jnp.int32),
                     dtype=jnp.int32)
      masks, offset = [], 0
      for x in xs:
        at = offset + jnp.arange(x.size, dtype=jnp.int32).reshape(x.shape)
        xr = _replicated(x)
        masks.append(_like(((xr > hi) | ((xr == hi) & (at > last))) | (k <= 0), x))
        offset += int(x.size)
      out[g] = masks
  if big:
    st = kth_keys([groups[g] for g in big], [ks[g] for g in big], key_fn)
    # the units' arrays pass a barrier with the search's result, so the masks compute the keys again instead of
    # sharing the sample's key expression, which XLA would materialize as a fresh params-sized int32 buffer.
    # (Arrays key_fn closes over, as topk_of's inputs, are whole trees for every unit and are not passed.)
    units, st = jax.lax.optimization_barrier(([u for g in big for u in groups[g]], st))
    # each leaf's share of the ties to prune, for all leaves at once: written as a running sum in Python, every
    # leaf's share would be its own chain of adds over the leaves before it (L² operations for L leaves)
    group_of = np.repeat(np.arange(len(big)), [len(groups[g]) for g in big])
    starts = np.cumsum([0] + [len(groups[g]) for g in big])
    ties = st.n_hi - st.n_lo
    excl = _cumsum(ties) - ties                         # ties in the leaves before, over all groups
    before = excl - excl[starts[:-1][group_of]]         # ties in the leaves before, within the leaf's group
    r = jnp.asarray([ks[g] for g in big]) - st.c_lo    # entries in (lo, hi] = {hi} to prune when not exact
    r_leaf = jnp.clip(r[group_of] - before, 0, ties)
    exact = st.c_hi == jnp.asarray([ks[g] for g in big])
    straddles = ~exact[group_of] & (r_leaf > 0) & (r_leaf < ties)
    r_leaf = jnp.where(exact[group_of], 1, r_leaf)
    r_leaf, straddles = jax.lax.optimization_barrier((r_leaf, straddles))
    leaf = 0
    for j, g in enumerate(big):
      hi, k = st.hi[j], ks[g]
      masks = []
      for u in units[leaf:leaf + len(groups[g])]:
        m = jax.lax.cond(straddles[leaf], lambda u=u, r=r_leaf[leaf], hi=hi: _straddle(key_fn, u, hi, r),
                         lambda u=u, r=r_leaf[leaf], hi=hi: _all_or_no_ties(key_fn(u), hi, r))
        masks.append(jnp.where(k > 0, m, True))
        leaf += 1
      out[g] = masks
  return out


def _like(mask: jax.Array, x: jax.Array) -> jax.Array:
  """`mask` with the explicit sharding of `x`, if it has one."""
  return jax.sharding.reshard(mask, jax.typeof(x).sharding) if _explicit_spec(x) is not None else mask


def _all_or_no_ties(x: jax.Array, hi: jax.Array, r: jax.Array) -> jax.Array:
  """Keep-mask of a leaf whose ties at hi are all pruned (r > 0) or all kept (r == 0)."""
  return (x > hi) | ((x == hi) & (r == 0))


def _cumsum(x: jax.Array) -> jax.Array:
  """Inclusive cumsum of a 1-D int32 array in two `reduce_window`s (blocks of 64, then the block totals): a
  few kernels to compile, where `jnp.cumsum` on CPU is a scan of ~2·log2(n) kernels."""
  n = x.shape[0]
  b = _chunk(n, 64)
  nb = n // b
  if nb > 4096:
    return jnp.cumsum(x)
  within = jax.lax.reduce_window(x.reshape(nb, b), 0, jax.lax.add, (1, b), (1, 1), [(0, 0), (b - 1, 0)])
  totals = within[:, -1]
  before = jax.lax.reduce_window(totals, 0, jax.lax.add, (nb,), (1,), [(nb - 1, 0)]) - totals
  return (within + before[:, None]).reshape(n)


def _straddle(key_of, ops, hi: jax.Array, r: jax.Array) -> jax.Array:
  """Keep-mask of the leaf where the r-th tie falls: keys > hi, and the ties (keys == hi) of row-major rank >= r.

  The leaf's keys are `key_of(ops)`. The flat leaf is viewed as rows; ties are counted per row, and only the
  row (at most 512 entries) holding the r-th tie is ranked, by one sort of its tie positions (a flat cumsum over
  a large leaf costs many passes on CPU). That gives one number, the flat index of the first tie kept, so the
  mask is one elementwise pass: two passes over the leaf in all (the row counts, then the mask). Optimization
  barriers keep the stages apart, each computing the keys again from `ops` (else XLA materializes them as a
  fresh leaf-sized buffer): 4096² in 6 ms instead of 31.
  """
  key = key_of(ops)
  shape, n = key.shape, key.size
  cols = _chunk(n, 512)
  as_rows = lambda k: _replicated(k).reshape(n // cols, cols)
  row_counts = _count_packed([as_rows(key) == hi], lead=1)[0]
  ends = _cumsum(row_counts)                        # ties in rows <= i
  j = jnp.sum(ends <= r, dtype=jnp.int32)           # rows before j: all their ties pruned; j holds the r-th
  start = ends[j] - row_counts[j]
  ops, j, start = jax.lax.optimization_barrier((ops, j, start))
  row_eq = jax.lax.dynamic_slice(as_rows(key_of(ops)), (j, 0), (1, cols))[0] == hi
  # row j prunes its first r - start ties (fewer than it has): the first kept is its tie of that 0-based index
  # (a sort of 512 positions: ~15 us; rows of 4096 took ~90 us a leaf, and a cumsum compiled into dozens of
  # instructions per leaf)
  col = jnp.sort(jnp.where(row_eq, jnp.arange(cols, dtype=jnp.int32), cols))[r - start]
  first_kept = j * cols + col                       # flat row-major index: ties from here on are kept
  ops, first_kept = jax.lax.optimization_barrier((ops, first_kept))
  x2 = as_rows(key_of(ops))
  at = jax.lax.broadcasted_iota(jnp.int32, x2.shape, 0) * cols + jax.lax.broadcasted_iota(jnp.int32, x2.shape, 1)
  return _like(((x2 > hi) | ((x2 == hi) & (at >= first_kept))).reshape(shape), key)


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
    di = min(max(int(round(float(s) * _MICRO)), 0), _MICRO - 1)
    qi, ri = divmod(di * n, _MICRO)
    return jnp.int32(qi + (1 if 2 * ri > _MICRO or (2 * ri == _MICRO and qi % 2) else 0))
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


# the names the rest of the package uses
keys = _keys
unit_key = _unit_key
count_k = _count_k
PRUNED_KEY = _PRUNED_KEY
SORT_MAX = _SORT_MAX
