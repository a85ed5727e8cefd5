"""Granularities: how a leaf's scores become units and a unit mask becomes the leaf's mask, one type each.

Every granularity is a frozen (hashable, so a static `jit` argument) dataclass carrying its own behaviour:

- `check(path, shape)` raises one `ValueError` line naming the leaf when the granularity cannot apply to it;
- `unit_scores(s)` reduces a leaf's scores to one score per unit;
- `expand(unit_mask, shape)` turns a unit mask back into a mask broadcastable to the leaf;
- `units_of(mask, shape)` is the unit view of an existing leaf mask (inverse of `expand`);
- `mask_shape(shape)` is the shape of the masks `pruned` keeps for a leaf of `shape`;
- `name` is the spelling `parse` reads back ("unstructured", "2:4", "blocks4x4", "neurons").

`NM` is the one granularity whose masks are not a ranking of units (n of every m, whatever the sparsity): it
has `fixed_pattern = True` and its own `mask(s, prior)`.
(JaxPruner's `sparsity_types.py` habit: one type per kind instead of a string dispatched in every module.)
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Sequence, Union

import jax
import jax.numpy as jnp


def _norm_axis(axis, ndim, path, what):
  if axis is None:
    axis = -2 if ndim >= 2 else 0
  if not -ndim <= axis < ndim:
    raise ValueError(f"{what} axis {axis} is out of range for {path!r} with {ndim} dims.")
  return axis % ndim


@dataclasses.dataclass(frozen=True)
class Granularity:
  """Base type (and the unstructured behaviour): every entry is its own unit."""
  kind: ClassVar[str] = "unstructured"
  fixed_pattern: ClassVar[bool] = False     # True: masks keep n of every m (NM), not a ranking of units

  @property
  def name(self) -> str:
    return self.kind

  def check(self, path: str, shape: Sequence[int]) -> None:
    del path, shape

  def unit_scores(self, s: jax.Array) -> jax.Array:
    return s.astype(jnp.float32)

  def expand(self, unit_mask: jax.Array, shape) -> jax.Array:
    del shape
    return unit_mask

  def units_of(self, mask: jax.Array, shape) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(mask, jnp.bool_), shape)

  def mask_shape(self, shape) -> tuple:
    return tuple(shape)


@dataclasses.dataclass(frozen=True)
class Unstructured(Granularity):
  """Individual entries."""


@dataclasses.dataclass(frozen=True)
class NM(Granularity):
  """Exactly `n` of every `m` consecutive entries along `axis` (None: the input axis, -2, of kernels)."""
  n: int = 2
  m: int = 4
  axis: Optional[int] = None
  kind: ClassVar[str] = "nm"
  fixed_pattern: ClassVar[bool] = True

  @property
  def name(self) -> str:
    return f"{self.n}:{self.m}"

  def check(self, path, shape):
    ax = _norm_axis(self.axis, len(shape), path, "N:M")
    if shape[ax] % self.m:
      raise ValueError(f"N:M {self.n}:{self.m} needs axis {ax} of {path!r} (size {shape[ax]}) to be divisible "
                       f"by {self.m}.")

  def mask(self, s: jax.Array, prior: Optional[jax.Array]) -> jax.Array:
    """Keeps the n highest of every m consecutive entries along the axis (ties: lower index wins)."""
    from jprune import _kth
    ax = _norm_axis(self.axis, s.ndim, "", "N:M")
    key = _kth.keys(s)
    if prior is not None:
      key = jnp.where(prior, key, _kth.PRUNED_KEY)
    moved = jnp.moveaxis(key, ax, -1)
    grouped = moved.reshape(*moved.shape[:-1], moved.shape[-1] // self.m, self.m)
    a = grouped[..., :, None]
    b = grouped[..., None, :]
    idx = jnp.arange(self.m)
    earlier = (idx[None, :] < idx[:, None]).reshape((1,) * (grouped.ndim - 1) + (self.m, self.m))
    beats = (b > a) | ((b == a) & earlier)  # [..., i, j]: j ranks before i
    rank = jnp.sum(beats, axis=-1)
    keep = (rank < self.n).reshape(moved.shape)
    return jnp.moveaxis(keep, -1, ax)


@dataclasses.dataclass(frozen=True)
class Blocks(Granularity):
  """`(bh, bw)` blocks of the last two axes; a block's score is the mean of its scores."""
  block: tuple = (1, 1)
  kind: ClassVar[str] = "blocks"

  @property
  def name(self) -> str:
    return f"blocks{self.block[0]}x{self.block[1]}"

  def check(self, path, shape):
    if len(shape) < 2:
      raise ValueError(f"blocks{self.block} needs a leaf with at least 2 dims; {path!r} has shape {tuple(shape)}.")
    if shape[-2] % self.block[0] or shape[-1] % self.block[1]:
      raise ValueError(f"blocks{self.block} do not divide the last two axes of {path!r} (shape {tuple(shape)}).")

  def unit_scores(self, s):
    bh, bw = self.block
    *lead, h, w = s.shape
    return s.astype(jnp.float32).reshape(*lead, h // bh, bh, w // bw, bw).mean(axis=(-3, -1))

  def expand(self, unit_mask, shape):
    bh, bw = self.block
    return jnp.repeat(jnp.repeat(unit_mask, bh, axis=-2), bw, axis=-1)

  def units_of(self, mask, shape):
    bh, bw = self.block
    return jnp.broadcast_to(jnp.asarray(mask, jnp.bool_), shape)[..., ::bh, ::bw]


_REDUCE = {"mean": jnp.mean, "sum": jnp.sum, "max": jnp.max,
           "l2": lambda s, axis, keepdims: jnp.sqrt(jnp.sum(jnp.square(s), axis=axis, keepdims=keepdims))}


@dataclasses.dataclass(frozen=True)
class Neurons(Granularity):
  """Whole slices along `axis` (output units, conv filters, heads); unit score = `reduce` over the other axes.

  Masks keep the leaf's rank with size 1 on every other axis, so they broadcast against it."""
  axis: int = -1
  reduce: str = "mean"
  kind: ClassVar[str] = "neurons"

  def check(self, path, shape):
    if len(shape) == 0:
      raise ValueError(f"neuron/channel pruning needs a leaf with at least 1 dim; {path!r} is a scalar.")
    _norm_axis(self.axis, len(shape), path, "neuron")

  def _other(self, ndim):
    ax = self.axis % ndim
    return tuple(i for i in range(ndim) if i != ax)

  def unit_scores(self, s):
    return _REDUCE[self.reduce](s.astype(jnp.float32), axis=self._other(s.ndim), keepdims=True)

  def units_of(self, mask, shape):
    mask = jnp.asarray(mask, jnp.bool_)
    if mask.shape != self.mask_shape(shape):
      mask = jnp.all(jnp.broadcast_to(mask, shape), axis=self._other(len(shape)), keepdims=True)
    return mask

  def mask_shape(self, shape):
    ax = self.axis % len(shape)
    return tuple(shape[i] if i == ax else 1 for i in range(len(shape)))


def unstructured() -> Unstructured:
  """Prune individual entries."""
  return Unstructured()


def nm(n: int, m: int, axis: Optional[int] = None) -> NM:
  """Keep exactly `n` of every `m` consecutive entries along `axis` (default: the input axis, -2, of kernels).

  For a Flax Dense kernel `(in, out)` the default groups along `in`, which is the 2:4 pattern sparse tensor cores
  use for `x @ kernel`.
  """
  if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
    raise ValueError(f"nm(n, m) needs integers 0 < n <= m, got n={n!r}, m={m!r}.")
  return NM(n=n, m=m, axis=axis)


def blocks(bh: int, bw: int) -> Blocks:
  """Prune `(bh, bw)` blocks of the last two axes together (block score = mean of its scores)."""
  if bh < 1 or bw < 1:
    raise ValueError(f"blocks(bh, bw) needs positive sizes, got ({bh}, {bw}).")
  return Blocks(block=(int(bh), int(bw)))


def neurons(axis: int = -1, reduce: str = "mean") -> Neurons:
  """Prune whole slices along `axis` (default: output units); unit score = `reduce` over the other axes."""
  if reduce not in _REDUCE:
    raise ValueError(f"reduce must be one of mean, sum, l2, max; got {reduce!r}.")
  return Neurons(axis=axis, reduce=reduce)


def channels(axis: int = -1, reduce: str = "mean") -> Neurons:
  """Prune conv filters / output channels (axis -1 of `(h, w, in, out)`); `axis=-2` prunes input channels."""
  return neurons(axis=axis, reduce=reduce)


GranularityLike = Union[Granularity, str, None]


def parse(spec: GranularityLike) -> Granularity:
  """A Granularity as it is, or one from a string: 'unstructured', 'neurons', 'channels', '2:4', 'blocks4x4'."""
  if isinstance(spec, Granularity):
    return spec
  if spec in (None, "unstructured"):
    return unstructured()
  if spec in ("neurons", "channels", "filters"):
    return neurons()
  try:
    if isinstance(spec, str) and ":" in spec:
      n, m = spec.split(":")
      return nm(int(n), int(m))
    if isinstance(spec, str) and spec.startswith("blocks"):
      bh, bw = spec[len("blocks"):].split("x")
      return blocks(int(bh), int(bw))
  except ValueError as e:
    if str(e).startswith(("nm(", "blocks(")):
      raise
  raise ValueError(f"unknown granularity {spec!r}; expected unstructured, neurons, channels, N:M or blocksHxW.")
