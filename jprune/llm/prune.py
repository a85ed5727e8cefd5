"""One-shot unstructured and N:M pruning of a Llama's linear layers, block by block from calibration activations.

`prune` runs the calibration tokens through the model one decoder block at a time. For block i it records what
the method needs from each linear layer's input (a sum of squares per input feature for Wanda, X·Xᵀ for
SparseGPT), prunes the block's kernels, and feeds the pruned block's outputs to block i + 1 (Frantar &
Alistarh 2023; Sun et al. 2023). Peak memory is one block's activations for the calibration set plus its
Hessians. The result is params and masks in the core's formats, so `jprune.summary`, checkpoints and
`jprune.keep_pruned` fine-tuning work on them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jprune import _kth, _tree
from jprune import masks as _masks
from jprune.granularity import NM, Unstructured
from jprune import select as _select
from jprune.llm.eval import _config, _nll
from jprune.llm.sparsegpt import sparsegpt
from jprune.models import Llama, LlamaAttention, LlamaBlock, LlamaConfig, LlamaMLP, RMSNorm
from jprune.types import PyTree

METHODS = ("magnitude", "gradient", "taylor", "wanda", "sparsegpt")
NEEDS_ACTIVATIONS = ("wanda", "sparsegpt")
BLOCK_KERNELS = r"layers_\d+/.*/kernel"   # default selection: every linear layer inside the decoder blocks


class LLMPruneResult(NamedTuple):
  params: PyTree          # pruned params (SparseGPT: with the remaining weights updated)
  masks: PyTree           # bool masks in the core's format (scalar True at leaves not pruned)
  block_seconds: list     # wall time per block
  info: dict              # method, sparsity, granularity, calibration shape


_STAGE_CACHE: dict = {}


def _stages(cfg: LlamaConfig):
  """Jitted pieces of a Llama block, each taking that piece's params (cached per config)."""
  if cfg in _STAGE_CACHE:
    return _STAGE_CACHE[cfg]
  norm, attn, mlp = RMSNorm(cfg.norm_eps), LlamaAttention(cfg), LlamaMLP(cfg)

  def positions(x):
    return jnp.arange(x.shape[1])

  fns = {
      "norm": jax.jit(lambda p, x: norm.apply({"params": p}, x)),
      "mix": jax.jit(lambda p, x: attn.apply({"params": p}, x, positions(x), method="mix")),
      "o": jax.jit(lambda p, x, m: x + attn.apply({"params": p}, m, method=lambda mod, m: mod.o_proj(m))),
      "hidden": jax.jit(lambda p, x: mlp.apply({"params": p}, x, method="hidden")),
      "down": jax.jit(lambda p, h, c: h + mlp.apply({"params": p}, c, method=lambda mod, c: mod.down_proj(c))),
      "block": jax.jit(lambda p, x: LlamaBlock(cfg).apply({"params": p}, x, positions(x))),
      "sumsq": jax.jit(lambda a: jnp.sum(jnp.square(a.reshape(-1, a.shape[-1]).astype(jnp.float32)), axis=0)),
      "hessian": jax.jit(lambda a: (lambda a2: a2.T @ a2)(a.reshape(-1, a.shape[-1]).astype(jnp.float32))),
  }
  _STAGE_CACHE[cfg] = fns
  return fns


_TILE_BYTES = 1 << 21   # columns per tile of `_per_output_mask`: about 2 MB of keys, so its passes run in cache


@jax.jit(static_argnames=("k",))
def _per_output_mask(score: jax.Array, k: int) -> jax.Array:
  """Keep-mask pruning exactly the k lowest scores of every output column (kernel (in, out)); ties by row index.

  All columns at once, by counting passes only (no sort, no cumsum): 32 passes fix the k-th smallest key of each
  column bit by bit (keys are the scores' order-preserving integers), and where ties straddle it, log2(in)
  passes more find the row of each column's last pruned tie. The columns are taken a tile of ~2 MB at a time, so
  all the passes over a tile read it from cache: a 7B model's (4096, 11008) kernel would otherwise stream its
  180 MB from memory 32 times (0.82 s -> 0.14 s on 2 cores), and the time per entry would grow with the kernel.
  Counts are uint16 where the column is shorter than 2^16 (a bool -> int32 sum costs about twice as much).
  """
  rows, cols = score.shape
  if k == 0:
    return jnp.ones(score.shape, bool)
  ctype = jnp.uint16 if rows < (1 << 16) else jnp.int32
  count = lambda p: jnp.sum(p.astype(ctype), axis=0, dtype=ctype).astype(jnp.int32)   # per column
  row = jnp.arange(rows, dtype=jnp.int32)[:, None]
  n_bits = max(1, int(rows).bit_length())

  def tile_mask(s):   # (rows, c) scores -> (rows, c) keep-mask
    u = jax.lax.bitcast_convert_type(_kth.keys(s), jnp.uint32) ^ jnp.uint32(0x80000000)   # unsigned, same order

    def key_bit(i, v):   # v: per column, the largest key value with #(u < v) < k, built from the top bit down
      bit = jnp.uint32(1) << (jnp.uint32(31) - i.astype(jnp.uint32))
      return jnp.where(count(u < (v + bit)[None, :]) < k, v + bit, v)

    v = jax.lax.fori_loop(0, 32, key_bit, jnp.zeros(s.shape[1], jnp.uint32))[None, :]   # the k-th smallest
    r = k - count(u < v)          # ties at v to prune, per column (>= 1)
    ties = count(u == v)

    def straddle(_):
      def row_bit(i, t):   # t: per column, the largest row with #(ties in rows < t) < r: the r-th tie's row
        bit = jnp.int32(1) << (jnp.int32(n_bits - 1) - i)
        return jnp.where(count((u == v) & (row < (t + bit)[None, :])) < r, t + bit, t)
      t = jax.lax.fori_loop(0, n_bits, row_bit, jnp.zeros(s.shape[1], jnp.int32))[None, :]
      return (u > v) | ((u == v) & (row > t))

    return jax.lax.cond(jnp.any(r < ties), straddle, lambda _: u > v, None)

  tile = max(1, min(cols, _TILE_BYTES // (4 * rows)))
  n_tiles = -(-cols // tile)
  if n_tiles == 1:
    return tile_mask(score)

  def body(i, keep):   # the last tile ends at the last column (it may overlap the one before: same result there)
    start = jnp.minimum(i * tile, cols - tile)
    part = tile_mask(jax.lax.dynamic_slice(score, (0, start), (rows, tile)))
    return jax.lax.dynamic_update_slice(keep, part, (0, start))

  return jax.lax.fori_loop(0, n_tiles, body, jnp.zeros(score.shape, bool))


@jax.jit(static_argnames=("sparsity", "g", "compare"))
def _choose(score: jax.Array, sparsity: float, g: _masks.Granularity, compare: str) -> jax.Array:
  if isinstance(g, NM):
    return dataclasses.replace(g, axis=0).mask(score, None)
  if compare == "output":
    return _per_output_mask(score, k=int(round(sparsity * score.shape[0])))
  keep, = _kth.prune_lowest([(score, None)], int(round(sparsity * score.size)), _kth.unit_key)
  return keep


def _blocksize(cols: int, want: int, m: int) -> int:
  for b in range(min(want, cols), 0, -1):
    if cols % b == 0 and b % max(m, 1) == 0:
      return b
  return cols


def _gradient_scores(cfg, params, calib, batch_size, kind, progress):
  """Mean |g| (or |w · mean g|) of the LM loss over the calibration set, on the dense model (remat per block)."""
  model = Llama(cfg, remat=True)

  def loss(p, toks):
    logits = model.apply({"params": p}, toks)
    return _nll(logits, toks) / (toks.shape[0] * (toks.shape[1] - 1))

  @jax.jit
  def step(acc, p, toks):
    g = jax.grad(loss)(p, toks)
    return jax.tree.map(lambda a, x: a + (jnp.abs(x) if kind == "gradient" else x), acc, g)

  acc = jax.tree.map(jnp.zeros_like, params)
  from jprune._progress import progress_bar
  starts = list(range(0, len(calib), batch_size))
  for s in progress_bar(starts, desc="gradients", disable=not progress):
    acc = step(acc, params, jnp.asarray(calib[s: s + batch_size]))
  mean = jax.tree.map(lambda a: a / len(starts), acc)
  if kind == "gradient":
    return mean
  return jax.tree.map(lambda w, g: jnp.abs(w * g), params, mean)


def check_arguments(cfg: LlamaConfig, params: PyTree, calibration_tokens, method: str, sparsity: float,
                    granularity, where, compare: Optional[str]):
  """Checks `prune`'s arguments; returns (granularity, compare, calibration tokens, selected leaf paths).

  `params` may hold `jax.ShapeDtypeStruct`s (only paths and shapes are read)."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}.")
  _tree.check_sparsity(sparsity)
  g = _masks.parse_granularity(granularity) if granularity is not None else _masks.unstructured()
  if not isinstance(g, (Unstructured, NM)):
    raise ValueError(f"LLM pruning takes unstructured or N:M granularity, got {g.name!r}.")
  compare = compare or ("output" if method == "wanda" else "layer")
  if compare not in ("output", "layer"):
    raise ValueError(f"compare must be 'output' or 'layer', got {compare!r}.")
  calib = np.asarray(calibration_tokens)
  if calib.ndim != 2 or not np.issubdtype(calib.dtype, np.integer):
    raise ValueError(f"calibration_tokens must be int tokens (n, seq_len), got {calib.dtype} {calib.shape}.")
  if calib.min() < 0 or calib.max() >= cfg.vocab_size:
    raise ValueError(f"calibration_tokens must lie in [0, {cfg.vocab_size}).")
  selected = _select.resolve(where, params)
  sel_paths = {p for p, f in _tree.leaves_with_paths(selected) if f}
  if not sel_paths:
    raise ValueError(f"where={where!r} selects no leaf of params.")
  for p, leaf in _tree.leaves_with_paths(params):
    if p in sel_paths and (len(leaf.shape) != 2 or not p.startswith("layers_")):
      raise ValueError(f"{p}: LLM pruning prunes 2-D kernels inside the decoder blocks; got shape {leaf.shape}.")
    if p in sel_paths and isinstance(g, NM) and leaf.shape[0] % g.m:
      raise ValueError(f"{p}: N:M with m={g.m} does not divide the input axis of size {leaf.shape[0]}.")
  return g, compare, calib, sel_paths


def prune(model, params: PyTree, calibration_tokens, method: str = "wanda", sparsity: float = 0.5,
          granularity=None, where=BLOCK_KERNELS, *, compare: Optional[str] = None, batch_size: int = 8,
          blocksize: int = 128, percdamp: float = 0.01, progress: bool = True) -> LLMPruneResult:
  """Prunes a Llama's linear layers one-shot, block by block, from calibration activations.

  Args:
    model: a `jprune.models.Llama` (or its `LlamaConfig`).
    params: its params (the tree `load_gguf` returns, or `model.init(...)["params"]`).
    calibration_tokens: int tokens (n, seq_len).
    method: "magnitude" (|w|), "gradient" (mean |∂L/∂w| of the LM loss on the calibration set, the seeds'
      criterion), "taylor" (|w·∂L/∂w|), "wanda" (|w|·‖x‖ per input feature), "sparsegpt".
    sparsity: fraction pruned in [0, 1) (ignored by N:M, which keeps n of every m).
    granularity: `unstructured()` (default), `nm(2, 4)`, `nm(4, 8)` or a string like "2:4"; N:M groups run
      along the kernel's input axis (the layout sparse tensor cores use).
    where: which leaves to prune (regex/predicate/bool tree); default every kernel inside the blocks.
    compare: "output" (each output neuron loses exactly round(s·in) inputs; Wanda's default) or "layer"
      (exactly round(s·n) per kernel; default for magnitude/gradient/taylor). SparseGPT chooses its mask per
      column block.
    batch_size: calibration sequences per device call.
    blocksize, percdamp: SparseGPT's column block and dampening (fraction of the mean diagonal of H).

  Returns:
    `LLMPruneResult(params, masks, block_seconds, info)`.
  """
  cfg = _config(model)
  g, compare, calib, sel_paths = check_arguments(cfg, params, calibration_tokens, method, sparsity, granularity,
                                                 where, compare)

  grad_scores = None
  if method in ("gradient", "taylor"):
    grad_scores = _gradient_scores(cfg, params, calib, batch_size, method, progress)
  embed = params["embed"]["embedding"]
  # only Wanda and SparseGPT read activations; the other scores need no forward pass through the blocks
  xs = [jnp.take(embed, jnp.asarray(calib[s: s + batch_size]), axis=0)
        for s in range(0, len(calib), batch_size)] if method in NEEDS_ACTIVATIONS else []

  params = flax.core.unfreeze(params)
  new_params = jax.tree.map(lambda x: x, params)
  masks = jax.tree.map(lambda _: jnp.asarray(True), params)
  seconds = []
  from jprune._progress import progress_bar
  for i in progress_bar(range(cfg.n_layers), desc=f"{method} blocks", disable=not progress):
    t0 = time.perf_counter()
    name = f"layers_{i}"
    prefix = name + "/"
    selected_here = {p[len(prefix):] for p in sel_paths if p.startswith(prefix)}
    grads = None if grad_scores is None else grad_scores[name]
    new_params[name], block_masks, xs = prune_block(cfg.layer(i), new_params[name], xs, selected_here, method,
                                                    sparsity, g, compare, grads, blocksize, percdamp)
    masks[name] = block_masks
    seconds.append(time.perf_counter() - t0)
  info = {"method": method, "sparsity": float(sparsity), "granularity": _granularity_name(g), "compare": compare,
          "calibration": list(calib.shape)}
  return LLMPruneResult(new_params, masks, seconds, info)


def prune_block(cfg: LlamaConfig, block: PyTree, xs: list, selected, method: str, sparsity: float, g, compare: str,
                grad_scores: Optional[PyTree] = None, blocksize: int = 128, percdamp: float = 0.01):
  """Prunes one decoder block from its calibration inputs; returns (new block params, block masks, block outputs).

  Args:
    cfg: the block's config (`LlamaConfig.layer(i)`: its own widths).
    block: the block's params (`models.LlamaBlock` layout).
    xs: the block's inputs, a list of (batch, seq, dim) arrays (the calibration set in device-sized pieces).
    selected: the block-relative kernel paths to prune, like {"attn/q_proj/kernel", "mlp/down_proj/kernel"}.
    method, sparsity, g, compare, blocksize, percdamp: as in `prune` (g a parsed `Granularity`).
    grad_scores: the block's gradient scores ("gradient"/"taylor" only).

  Inside the block each layer sees the outputs of the layers before it, already pruned (SparseGPT's order), and
  the outputs returned are the pruned block's, so the next block is calibrated on what it will really see.
  """
  fn = _stages(cfg)   # blocks of equal widths share their compiled stages
  need = {"wanda": "sumsq", "sparsegpt": "hessian"}.get(method)
  block = jax.tree.map(lambda x: x, dict(block))
  masks = jax.tree.map(lambda _: jnp.asarray(True), block)

  def prune_kernels(part, sub, inputs):
    paths = [p for p in (f"{part}/{k}/kernel" for k in sub) if p in selected]
    if not paths:
      return
    stat = None
    if need:
      for a in inputs:
        st = fn[need](a)
        stat = st if stat is None else stat + st
    for p in paths:
      new_w, keep = _prune_kernel(_get(block, p), method, sparsity, g, compare, stat,
                                  None if grad_scores is None else _get(grad_scores, p), blocksize, percdamp)
      _set(block, p, new_w)
      _set(masks, p, keep)

  if not need:  # scores do not depend on activations: prune, then one forward (none when `xs` is empty)
    prune_kernels("attn", ("q_proj", "k_proj", "v_proj", "o_proj"), [])
    prune_kernels("mlp", ("gate_proj", "up_proj", "down_proj"), [])
    xs = [fn["block"](block, x) for x in xs]
  else:  # sequential inside the block: each layer sees the outputs of the already-pruned layers before it
    a = [fn["norm"](block["attn_norm"], x) for x in xs]
    prune_kernels("attn", ("q_proj", "k_proj", "v_proj"), a)
    mix = [fn["mix"](block["attn"], x) for x in a]
    del a
    prune_kernels("attn", ("o_proj",), mix)
    hs = [fn["o"](block["attn"], x, m) for x, m in zip(xs, mix)]
    del mix, xs
    b = [fn["norm"](block["mlp_norm"], h) for h in hs]
    prune_kernels("mlp", ("gate_proj", "up_proj"), b)
    c = [fn["hidden"](block["mlp"], x) for x in b]
    del b
    prune_kernels("mlp", ("down_proj",), c)
    xs = [fn["down"](block["mlp"], h, x) for h, x in zip(hs, c)]
    del c, hs
  jax.block_until_ready(xs)
  return block, masks, xs


_granularity_name = _masks.granularity_name


def _prune_kernel(w, method, sparsity, g, compare, stat, grad, blocksize, percdamp):
  if method == "sparsegpt":
    n, m = (g.n, g.m) if isinstance(g, NM) else (0, 0)
    return sparsegpt(w, stat, float(sparsity), n, m, _blocksize(w.shape[0], blocksize, m), percdamp)
  if method == "magnitude":
    score = jnp.abs(w)
  elif method == "wanda":
    score = jnp.abs(w) * jnp.sqrt(stat)[:, None]
  else:
    score = grad
  keep = _choose(score.astype(jnp.float32), sparsity=float(sparsity), g=g, compare=compare)
  return jnp.where(keep, w, jnp.zeros_like(w)), keep


def _set(tree, path, value):
  keys = path.split("/")
  for k in keys[:-1]:
    tree = tree[k]
  tree[keys[-1]] = value


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree
