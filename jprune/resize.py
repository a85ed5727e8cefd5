"""Run any Flax model at the widths its (compacted) params have, without writing a smaller copy of the model.

`structured.compact` slices pruned units out of the params. A linen model still declares its old widths
(`nn.Dense(300)`), and Flax refuses params of another shape. `resized(model)` wraps it so that every linen layer
whose width is an attribute (Dense, DenseGeneral, Conv, ConvTranspose, Embed, MultiHeadDotProductAttention) is
cloned, at call time, with the widths its own params have (`nn.intercept_methods`); layers whose shapes follow
their input (LayerNorm, BatchNorm, RMSNorm, Dropout, activations) need nothing. An nnx model holds its arrays
itself: `shrink(model, small_state)` swaps in the smaller arrays in place and updates the layers' width
attributes. `widths(params)` reports the kept width of every layer, keyed by the layer that owns it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from jprune import _tree
from jprune.types import PyTree



def _param(module: nn.Module, name: str):
  params = module.variables.get("params", {})
  return params.get(name) if hasattr(params, "get") else None


def _updates(module: nn.Module) -> dict:
  """The width attributes `module` must have to accept its own params (empty: nothing to change)."""
  if isinstance(module, nn.MultiHeadDotProductAttention):
    q = module.variables.get("params", {}).get("query", {}).get("kernel")
    out = module.variables.get("params", {}).get("out", {}).get("kernel")
    if q is None or out is None:
      return {}
    heads, head_dim = int(q.shape[-2]), int(q.shape[-1])
    want: dict = {"num_heads": heads, "qkv_features": heads * head_dim, "out_features": int(out.shape[-1])}
  elif isinstance(module, nn.Embed):
    e = _param(module, "embedding")
    if e is None:
      return {}
    want = {"num_embeddings": int(e.shape[0]), "features": int(e.shape[1])}
  elif isinstance(module, nn.DenseGeneral):
    k = _param(module, "kernel")
    feats = module.features if isinstance(module.features, tuple) else (module.features,)
    if k is None:
      return {}
    got = tuple(int(d) for d in k.shape[k.ndim - len(feats):])
    want = {"features": got if isinstance(module.features, tuple) else got[0]}
  elif isinstance(module, (nn.Dense, nn.Conv, nn.ConvTranspose, nn.ConvLocal)):
    k = _param(module, "kernel")
    if k is None:
      return {}
    want = {"features": int(k.shape[-1])}
  else:
    return {}
  return {k: v for k, v in want.items() if getattr(module, k) != v}


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  if context.method_name != "__call__" or module.scope is None or module.is_initializing():
    return next_fun(*args, **kwargs)
  change = _updates(module)
  if not change:
    return next_fun(*args, **kwargs)
  return module.clone(parent=None, **change).apply(dict(module.variables), *args, **kwargs)


class Resized:
  """A linen model that runs at the widths of whatever params it is given (see `resized`)."""

  def __init__(self, model: nn.Module):
    self.model = model

  def apply(self, variables, *args, **kwargs):
    with nn.intercept_methods(_interceptor):
      return self.model.apply(variables, *args, **kwargs)

  def __repr__(self) -> str:
    return f"Resized({type(self.model).__name__})"


def resized(model: nn.Module) -> Resized:
  """Wraps a linen model so that `.apply(variables, ...)` accepts compacted variables.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> model = nn.Dense(4)
    >>> v = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> small = {"params": {"kernel": v["params"]["kernel"][:, :2], "bias": v["params"]["bias"][:2]}}
    >>> resized(model).apply(small, jnp.ones((1, 3))).shape
    (1, 2)

  The wrapper runs the same module code: only the width attributes of layers whose params are smaller change
  (mutable collections such as `batch_stats` work as in `model.apply`). Layers that compute a width from their
  own attributes inside `__call__` (a custom `x.reshape(..., self.heads, -1)`) need those attributes to follow
  their params: give such a module its widths yourself (`model.clone(...)`).
  """
  return Resized(model)


def widths(params: PyTree) -> dict:
  """The width of every layer, keyed by the layer that owns it: `{"Conv_0": 24, "Dense_1": 50, ...}` (a kernel's
  last axis; an attention's `{"heads": h, "head_dim": d}` from its query kernel)."""
  out: dict[str, Any] = {}
  for path, x in _tree.leaves_with_paths(_tree.pure(params)):
    layer, _, name = path.rpartition("/")
    if name == "kernel" and getattr(x, "ndim", 0) >= 2:
      if layer.endswith("/query") and x.ndim == 3:
        out[layer.rpartition("/")[0]] = {"heads": int(x.shape[1]), "head_dim": int(x.shape[2])}
      elif not layer.endswith(("/key", "/value", "/query")):
        out[layer] = int(x.shape[-1])
  return out


def shrink(model, small: PyTree):
  """Shrinks an nnx model in place to the shapes of `small` (the compacted `nnx.Param` state or its pure dict).

  Every Variable found in `small` takes the new array; Linear/Conv/LinearGeneral/Embed/BatchNorm/LayerNorm
  width attributes follow their arrays. Returns the model. Its outputs are the masked model's (tested).
  """
  from flax import nnx
  values = dict(_tree.leaves_with_paths(_tree.pure(small)))
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable):
      key = "/".join(str(p) for p in path)
      if key in values:
        var.set_value(values[key])
  for _, m in nnx.iter_graph(model):
    _fix_nnx_widths(m)
  return model


def _fix_nnx_widths(m) -> None:
  from flax import nnx
  k = getattr(m, "kernel", None)
  shape = getattr(k, "shape", None) if isinstance(k, nnx.Variable) else None
  if isinstance(m, nnx.Linear) and shape is not None:
    m.in_features, m.out_features = int(shape[0]), int(shape[1])
  elif isinstance(m, nnx.Conv) and shape is not None:
    m.in_features, m.out_features = int(shape[-2]), int(shape[-1])
    m.kernel_shape = tuple(int(d) for d in shape)
  elif isinstance(m, nnx.Embed):
    e = m.embedding
    m.num_embeddings, m.features = int(e.shape[0]), int(e.shape[1])
  elif isinstance(m, (nnx.BatchNorm, nnx.LayerNorm)):
    ref = m.scale if getattr(m, "scale", None) is not None else getattr(m, "mean", None)
    if ref is not None:
      m.num_features = int(ref.shape[-1])
