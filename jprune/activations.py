"""Activation statistics recorded without touching the model's code, and the criteria built on them.

`record(apply_fn, params, batches)` runs the model under `flax.linen.intercept_methods` and accumulates, for
every `nn.Dense`, `nn.DenseGeneral` and `nn.Conv` call, per output unit: the number of activations seen,
Σ|a|, Σa², Σmax(a, 0) and the count of a ≤ 0 (after a ReLU these are the zeros: APoZ, Hu et al. 2016), and per
input feature Σx² (Wanda's input norms). Statistics are keyed by the layer's kernel path (`Dense_0/kernel`),
so they line up with the params tree.

`activation(stats, reduce=...)` scores each kernel entry by its output unit's activity (use it with
`neurons()` / `channels()` granularity or structured groups); `wanda(stats)` scores |w|·‖x‖ per input feature.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jprune import _tree
from jprune.criteria import Criterion
from jprune.types import PyTree

LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv)
REDUCTIONS = ("mean_abs", "mean_relu", "rms", "apoz")


class LayerStats(NamedTuple):
  """Sums over every activation a layer produced (batch and spatial positions), per output unit / input feature."""
  count: jax.Array     # type: ignore[assignment]  # float32 scalar: activations per unit seen
  abs_sum: jax.Array   # (out,) Σ|a|
  sq_sum: jax.Array    # (out,) Σa²
  pos_sum: jax.Array   # (out,) Σmax(a, 0)  (the post-ReLU activity)
  nonpos: jax.Array    # (out,) #(a <= 0)   (zeros after a ReLU)
  in_sq_sum: jax.Array  # (in,) Σx² of the layer's input features

  def mean_abs(self):
    return self.abs_sum / self.count

  def apoz(self):
    """Average percentage of zeros after a ReLU, per output unit."""
    return self.nonpos / self.count


def _layer_stats(x, y) -> LayerStats:
  y2 = y.reshape(-1, y.shape[-1]).astype(jnp.float32)
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  return LayerStats(jnp.asarray(y2.shape[0], jnp.float32), jnp.sum(jnp.abs(y2), 0), jnp.sum(y2 * y2, 0),
                    jnp.sum(jnp.maximum(y2, 0.0), 0), jnp.sum(y2 <= 0, 0, dtype=jnp.int32).astype(jnp.float32),
                    jnp.sum(x2 * x2, 0))


def stats_of(apply_fn: Callable, params: PyTree, *args, layers=LAYERS, **kwargs) -> tuple[Any, dict]:
  """(output, {kernel path: LayerStats}) of one call `apply_fn(params, *args, **kwargs)`; jit-able.

  A layer called several times (shared weights) accumulates over its calls.
  """
  stats: dict = {}

  def intercept(next_fun, a, kw, context):
    out = next_fun(*a, **kw)
    if isinstance(context.module, layers) and context.method_name == "__call__" and a:
      path = "/".join(context.module.path) + "/kernel"
      s = _layer_stats(a[0], out)
      stats[path] = s if path not in stats else jax.tree.map(jnp.add, stats[path], s)
    return out

  with nn.intercept_methods(intercept):
    out = apply_fn(params, *args, **kwargs)
  return out, stats


def record(apply_fn: Callable, params: PyTree, batches: Iterable, *, layers=LAYERS, progress: bool = True) -> dict:
  """Accumulates `LayerStats` of every Dense/Conv layer over `batches` (each passed as `apply_fn(params, b)`).

  Args:
    apply_fn: `(params, batch) -> output`, e.g. `lambda p, x: model.apply({"params": p}, x)`.
    params: the params.
    batches: an iterable of batches (one compile: keep shapes fixed).
    layers: module classes to record.

  Returns:
    {kernel path: LayerStats}, paths as in the params tree (`Dense_0/kernel`).
  """
  step = jax.jit(lambda p, b: stats_of(apply_fn, p, b, layers=layers)[1])
  total = None
  from jprune._progress import progress_bar
  for b in progress_bar(batches, desc="activations", disable=not progress):
    s = step(params, b)
    total = s if total is None else jax.tree.map(jnp.add, total, s)
  if not total:
    raise ValueError("no activations recorded: batches was empty or the model calls no Dense/Conv layer.")
  return total


def record_nnx(model, batches: Iterable, *, forward: Optional[Callable] = None, layers=None,
               progress: bool = True) -> dict:
  """`record` for a Flax nnx model: statistics of every `nnx.Linear` / `nnx.Conv` call, keyed by kernel path.

  nnx has no method interceptor, so inside the traced step the layer classes' `__call__` is wrapped for the
  duration of the forward pass (and restored after, even on error); the model itself is not modified (the
  step runs on a merged copy of its state).

  Args:
    model: an `nnx.Module`.
    batches: an iterable of batches.
    forward: `(model, batch) -> output` (default `model(batch)`).
    layers: nnx module classes to record (default Linear and Conv).

  Returns:
    {kernel path: LayerStats}, paths as in `nnx.state(model, nnx.Param)` (`l0/kernel`, `layers/0/kernel`).
  """
  from flax import nnx
  layers = tuple(layers or (nnx.Linear, nnx.Conv))
  forward = forward or (lambda m, b: m(b))
  graphdef, state = nnx.split(model)

  def run(state, b):
    m = nnx.merge(graphdef, state)
    names = {id(mod): "/".join(str(k) for k in path) for path, mod in nnx.iter_graph(m)
             if isinstance(mod, layers)}
    stats: dict = {}
    originals = {cls: cls.__dict__["__call__"] for cls in layers if "__call__" in cls.__dict__}

    def wrapped(orig):
      def call(self, x, *a, **kw):
        y = orig(self, x, *a, **kw)
        if id(self) in names:
          path = names[id(self)] + "/kernel"
          s = _layer_stats(x, y)
          stats[path] = s if path not in stats else jax.tree.map(jnp.add, stats[path], s)
        return y
      return call

    try:
      for cls, orig in originals.items():
        cls.__call__ = wrapped(orig)
      forward(m, b)
    finally:
      for cls, orig in originals.items():
        cls.__call__ = orig
    return stats

  step = jax.jit(run)
  total = None
  from jprune._progress import progress_bar
  for b in progress_bar(batches, desc="activations", disable=not progress):
    s = step(state, b)
    total = s if total is None else jax.tree.map(jnp.add, total, s)
  if not total:
    raise ValueError("no activations recorded: batches was empty or the model calls no Linear/Conv layer.")
  return total


def _unit_scores(st: LayerStats, reduce: str) -> jax.Array:
  if reduce == "mean_abs":
    return st.abs_sum / st.count
  if reduce == "mean_relu":
    return st.pos_sum / st.count
  if reduce == "rms":
    return jnp.sqrt(st.sq_sum / st.count)
  return 1.0 - st.nonpos / st.count  # apoz: units that are mostly zero score lowest


def _check_stats(stats, params, what):
  if not isinstance(stats, dict) or not stats:
    raise ValueError(f"{what} needs the dict that jprune.activations.record returns.")
  for path, leaf in _tree.leaves_with_paths(params):
    if path in stats and stats[path].abs_sum.shape[0] != leaf.shape[-1]:
      raise ValueError(f"{path}: statistics for {stats[path].abs_sum.shape[0]} output units, kernel has "
                       f"{leaf.shape[-1]}.")


def activation(stats: dict, reduce: str = "mean_abs") -> Criterion:
  """Neuron activity: every entry of a kernel scores its output unit's activity (higher = keep).

  Args:
    stats: from `record`.
    reduce: "mean_abs" (mean |a| of the layer's output), "mean_relu" (mean post-ReLU activity), "rms", or
      "apoz" (1 − fraction of a ≤ 0, i.e. of zeros after a ReLU).

  A recorded layer's bias scores like its kernel (its output unit's activity); kernels without statistics score
  by |w| (select recorded layers with `where`), other leaves 0. Use with `neurons()` / `channels()`
  granularity or `structured.group_scores`.
  """
  if reduce not in REDUCTIONS:
    raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}; got {reduce!r}.")

  def score(state, params):
    _check_stats(stats, params, "activation")
    flat = []
    for path, w in _tree.leaves_with_paths(params):
      layer = path if path.endswith("kernel") else path.rsplit("/", 1)[0] + "/kernel"
      if layer in stats and w.ndim >= 1 and w.shape[-1] == stats[layer].abs_sum.shape[0]:
        u = _unit_scores(stats[layer], reduce)   # a kernel, or its layer's bias: the output unit's activity
        flat.append(jnp.broadcast_to(u.reshape((1,) * (w.ndim - 1) + (-1,)), w.shape))
      elif path.endswith("kernel"):
        flat.append(jnp.abs(jnp.asarray(w, jnp.float32)))
      else:
        flat.append(jnp.zeros(w.shape, jnp.float32))
    return jax.tree.unflatten(jax.tree.structure(params), flat)

  return Criterion(lambda params: (), lambda state, params, grads=None, **extra: state, score)


def wanda(stats: dict) -> Criterion:
  """Wanda (Sun et al. 2023): |w| · ‖x‖₂ of the input feature each weight reads (‖x‖ over all recorded inputs).

  Dense kernels (in, out) and Conv kernels (..., in, out) scale along their input axis. Kernels without
  statistics score by |w|. Wanda compares within each output unit: use `scope="layer"`; for the paper's
  per-output selection use `jprune.llm` or group masks.
  """

  def score(state, params):
    _check_stats(stats, params, "wanda")
    flat = []
    for path, w in _tree.leaves_with_paths(params):
      a = jnp.abs(jnp.asarray(w, jnp.float32))
      if path in stats:
        norm = jnp.sqrt(stats[path].in_sq_sum)
        if w.ndim < 2 or norm.shape[0] != w.shape[-2]:
          raise ValueError(f"{path}: {norm.shape[0]} input features recorded, kernel {w.shape} reads "
                           f"{w.shape[-2] if w.ndim >= 2 else '?'} on axis -2.")
        a = a * norm.reshape((1,) * (w.ndim - 2) + (-1, 1))
      flat.append(a)
    return jax.tree.unflatten(jax.tree.structure(params), flat)

  return Criterion(lambda params: (), lambda state, params, grads=None, **extra: state, score)
