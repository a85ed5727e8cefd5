"""Prune a GGUF that does not fit in memory: read it block by block from a memory map, write the pruned GGUF as
it goes.

`prune_gguf` keeps in RAM only the current decoder block (as float32), the calibration activations and, for
SparseGPT, that block's Hessians: the embedding table is never loaded (the calibration tokens' rows are gathered
from the map), every tensor that is not pruned is copied byte for byte, and the pages of the map a finished block
used are handed back to the kernel. Peak memory is therefore about one float32 block plus its activations, whatever
the model's size (a 7B Llama: ~0.8 GB a block). The pruning itself is `llm.prune`'s `prune_block`, so the streamed
result equals the in-memory one bit for bit on the same float32 weights.

`random_gguf` writes a Llama-shaped GGUF of random weights the same way, tensor by tensor, for measuring memory and
time on shapes (7B and up) whose real weights are not at hand.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jprune.llm import gguf as _g
from jprune.llm.prune import BLOCK_KERNELS, NEEDS_ACTIVATIONS, _get, _granularity_name, check_arguments, prune_block
from jprune.models import LlamaConfig


def _skeleton(cfg: LlamaConfig) -> dict:
  """The params tree of `models.Llama(cfg)` as `jax.ShapeDtypeStruct`s (paths and shapes, no data)."""
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  tree: dict = {"embed": {"embedding": s(cfg.vocab_size, cfg.dim)}, "norm": {"scale": s(cfg.dim)}}
  if not cfg.tie_embeddings:
    tree["lm_head"] = {"kernel": s(cfg.dim, cfg.vocab_size)}
  for i in range(cfg.n_layers):
    b = _g._block_shapes(cfg, i)
    k = lambda name: s(*reversed(b[name]))   # GGUF (out, in) -> Flax kernel (in, out)
    tree[f"layers_{i}"] = {
        "attn_norm": {"scale": s(cfg.dim)}, "mlp_norm": {"scale": s(cfg.dim)},
        "attn": {"q_proj": {"kernel": k("attn_q")}, "k_proj": {"kernel": k("attn_k")},
                 "v_proj": {"kernel": k("attn_v")}, "o_proj": {"kernel": k("attn_output")}},
        "mlp": {"gate_proj": {"kernel": k("ffn_gate")}, "up_proj": {"kernel": k("ffn_up")},
                "down_proj": {"kernel": k("ffn_down")}}}
  return tree


def _order(cfg: LlamaConfig) -> list:
  """Tensor names in the order they are written (llama.cpp's converter's order: embeddings, then blocks)."""
  names = ["token_embd.weight", "output_norm.weight"] + ([] if cfg.tie_embeddings else ["output.weight"])
  for i in range(cfg.n_layers):
    names += [f"blk.{i}.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                                              "ffn_gate", "ffn_up", "ffn_down")]
  return names


_KEEP_TYPES = ("F32", "F16", "Q8_0")
_GGUF_NAME = {"attn/q_proj/kernel": "attn_q", "attn/k_proj/kernel": "attn_k", "attn/v_proj/kernel": "attn_v",
              "attn/o_proj/kernel": "attn_output", "mlp/gate_proj/kernel": "ffn_gate", "mlp/up_proj/kernel": "ffn_up",
              "mlp/down_proj/kernel": "ffn_down"}


def _plan(gguf, t, dtype: Optional[str], rewritten: bool):
  """(ggml type, raw copy?) of one output tensor. `rewritten`: its values change (a pruned kernel)."""
  q = gguf.GGMLQuantizationType
  src = q(int(t.tensor_type))
  one_d = len(t.shape) == 1
  if dtype is None and not rewritten:
    return src, True   # copied byte for byte, whatever its type
  if dtype is None:
    kind = src if src.name in _KEEP_TYPES else (q.F32 if one_d else q.F16)
  elif one_d or dtype == "f32":
    kind = q.F32
  elif dtype == "q8_0" and int(t.shape[0]) % 32 == 0:   # t.shape is GGUF's (in, out) order: rows of `in` values
    kind = q.Q8_0
  else:
    kind = q.F16
  return kind, (kind == src and not rewritten)


def _nbytes(gguf, kind, n_elements: int) -> int:
  block, size = gguf.GGML_QUANT_SIZES[kind]
  return n_elements // block * size


def _encode(gguf, arr: np.ndarray, kind) -> np.ndarray:
  q = gguf.GGMLQuantizationType
  if kind == q.F32:
    return np.ascontiguousarray(arr, np.float32)
  if kind == q.F16:
    return np.ascontiguousarray(arr, np.float16)
  return gguf.quants.quantize(np.asarray(arr, np.float32), kind)


class _Writer:
  """A GGUF written tensor by tensor in a planned order, to a temporary file renamed when complete."""

  def __init__(self, gguf, path: str, arch: str, fields: dict, plan: list):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"{path}: folder {folder} does not exist.")
    fd, self.tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    self.path, self.gguf = path, gguf
    try:
      w = gguf.GGUFWriter(self.tmp, arch)
      for key, (value, vtype, sub) in fields.items():
        w.add_key_value(key, value, vtype, sub)
      for name, shape, kind in plan:   # shape: numpy row-major (GGUF's dims reversed)
        np_dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(kind)
        n = _nbytes(gguf, kind, int(np.prod(shape)))
        if np_dtype is None:   # add_tensor_info takes a quantized tensor's byte shape
          w.add_tensor_info(name, gguf.quants.quant_shape_to_byte_shape(shape, kind), np.dtype(np.uint8), n,
                            raw_dtype=kind)
        else:
          w.add_tensor_info(name, shape, np.dtype(np_dtype), n)
      w.write_header_to_file()
      w.write_kv_data_to_file()
      w.write_ti_data_to_file()
      self.w = w
    except BaseException:
      self.abort()
      raise

  def write(self, data: np.ndarray) -> None:
    self.w.write_tensor_data(data)

  def finish(self) -> int:
    self.w.close()
    with open(self.tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(self.tmp, self.path)
    return os.path.getsize(self.path)

  def abort(self) -> None:
    w = getattr(self, "w", None)
    if w is not None:
      w.close()
    if os.path.exists(self.tmp):
      os.unlink(self.tmp)


def _release(reader) -> None:
  """Hands the pages of the file's map back to the kernel (they are re-read from the page cache if touched)."""
  mm = getattr(reader.data, "_mmap", None)
  if mm is not None and hasattr(mm, "madvise"):
    mm.madvise(mmap.MADV_DONTNEED)


def prune_gguf(source: str, target: str, calibration_tokens, method: str = "wanda", sparsity: float = 0.5,
               granularity=None, where=BLOCK_KERNELS, *, compare: Optional[str] = None,
               dtype: Optional[str] = None, batch_size: int = 8, blocksize: int = 128, percdamp: float = 0.01,
               max_blocks: Optional[int] = None, progress: bool = True) -> dict:
  """Prunes a Llama GGUF one block at a time from a memory map and writes the pruned GGUF as it goes.

  Every metadata field and every tensor the model does not prune is carried over unchanged (tensors jprune's
  Llama does not use, such as Llama 3's `rope_freqs`, too).

  Same pruning as `llm.prune` (Wanda, SparseGPT or magnitude; unstructured or N:M; block by block, each block
  calibrated on the pruned blocks' outputs), with memory bounded by one block: see the module docstring.

  Args:
    source: the GGUF to prune (llama or deci architecture; any tensor type the `gguf` package reads).
    target: the GGUF to write (atomically: a temporary file in the same folder, renamed when complete). It may be
      `source` itself.
    calibration_tokens, method, sparsity, granularity, where, compare, batch_size, blocksize, percdamp: as in
      `llm.prune` ("gradient" and "taylor" need the whole model's gradient and are not streamed).
    dtype: None keeps each tensor's type: tensors not pruned are copied byte for byte, pruned kernels keep f32,
      f16 or q8_0 (other quantizations, e.g. q4_1, are written as f16: re-quantizing would not keep the zeros);
      or "f32", "f16", "q8_0" for every 2-D tensor (norms stay f32).
    max_blocks: prune only the first `max_blocks` blocks (the rest are copied unchanged): for timing a few blocks
      of a model too slow to prune whole.
    progress: a progress bar with an ETA over the blocks.

  Returns:
    {"path", "bytes", "block_seconds", "seconds", "blocks_pruned", "selected_params", "pruned_params", "info"}.
  """
  gguf = _g._gguf()
  if method not in ("magnitude", "wanda", "sparsegpt"):
    if method in ("gradient", "taylor"):
      raise ValueError(f"method {method!r} needs the gradient of the whole model, which prune_gguf does not hold; "
                       "use llm.prune on a model that fits in memory, or 'wanda' / 'sparsegpt' / 'magnitude'.")
    raise ValueError(f"method must be one of magnitude, wanda, sparsegpt; got {method!r}.")
  if dtype is not None and dtype not in _g.DTYPES:
    raise _g.GGUFError(f"dtype must be None or one of {', '.join(_g.DTYPES)}; got {dtype!r}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  t0 = time.perf_counter()
  reader = _g._reader(source)
  meta, typed = _g._fields(reader)
  tensors = {t.name: t for t in reader.tensors}
  shapes = {name: tuple(int(s) for s in reversed(t.shape.tolist())) for name, t in tensors.items()}
  cfg = _g.config_from_gguf(meta, shapes, source)
  g, compare, calib, sel_paths = check_arguments(cfg, _skeleton(cfg), calibration_tokens, method, sparsity,
                                                    granularity, where, compare)
  n_prune = cfg.n_layers if max_blocks is None else int(max_blocks)
  if not 0 <= n_prune <= cfg.n_layers:
    raise ValueError(f"max_blocks must lie in [0, {cfg.n_layers}], got {max_blocks!r}.")

  def get(name):   # float32, GGUF row-major shape
    t = tensors[name]
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shapes[name])

  pruned_names = set()
  for path in sel_paths:
    i, rest = path.split("/", 1)
    pruned_names.add((int(i[len("layers_"):]), rest))
  rewritten = {f"blk.{i}.{_GGUF_NAME[rest]}.weight" for i, rest in pruned_names if i < n_prune}
  head = _order(cfg)[: 3 - cfg.tie_embeddings]
  extra = [name for name in tensors if name not in set(_order(cfg))]   # e.g. rope_freqs: not used, kept as is
  order = head + extra + _order(cfg)[len(head):]
  plan, kinds = [], {}
  for name in order:
    kind, raw = _plan(gguf, tensors[name], dtype, name in rewritten)
    kinds[name] = (kind, raw)
    plan.append((name, shapes[name], kind))
  fields = {k: v for k, v in typed.items() if not k.startswith("GGUF.") and k != "general.architecture"}
  if dtype is not None:
    fields["general.file_type"] = (_g._FILE_TYPE[dtype], gguf.GGUFValueType.UINT32, None)
  writer = _Writer(gguf, target, meta.get("general.architecture", "llama"), fields, plan)

  def put(name, arr=None):
    kind, raw = kinds[name]
    t = tensors[name]
    if raw and arr is None:
      writer.write(np.asarray(t.data))   # the source bytes, unchanged
    else:
      writer.write(_encode(gguf, get(name) if arr is None else arr, kind))

  seconds, selected, zeros = [], 0, 0
  try:
    emb = tensors["token_embd.weight"]
    xs = []
    for s in range(0, len(calib), batch_size) if method in NEEDS_ACTIVATIONS else ():
      ids = calib[s: s + batch_size]
      rows = gguf.quants.dequantize(np.asarray(emb.data[ids.reshape(-1)]), emb.tensor_type)
      xs.append(jnp.asarray(np.asarray(rows, np.float32).reshape(*ids.shape, cfg.dim)))
    for name in head + extra:
      put(name)
    _release(reader)
    from jprune._progress import progress_bar
    for i in progress_bar(range(cfg.n_layers), desc=f"{method} blocks (streamed)", disable=not progress):
      b0 = time.perf_counter()
      names = _order(cfg)[len(head) + 9 * i: len(head) + 9 * (i + 1)]
      if i >= n_prune:
        for name in names:
          put(name)
        _release(reader)
        continue
      block = jax.tree.map(jnp.asarray, _g.block_params(cfg, i, get))
      here = {rest for j, rest in pruned_names if j == i}
      block, masks, xs = prune_block(cfg.layer(i), block, xs, here, method, sparsity, g, compare, None,
                                        blocksize, percdamp)
      for rest in here:
        keep = _get(masks, rest)
        selected += int(keep.size)
        zeros += int(keep.size - jnp.sum(keep))
      del masks
      for name, arr in _g.block_tensors(cfg, i, block):
        put(name, None if kinds[name][1] else arr)
      del block
      _release(reader)
      seconds.append(time.perf_counter() - b0)
    size = writer.finish()
  except BaseException:
    writer.abort()
    raise
  info = {"method": method, "sparsity": float(sparsity), "granularity": _granularity_name(g),
          "compare": compare, "calibration": list(calib.shape), "dtype": dtype}
  return {"path": target, "bytes": size, "block_seconds": seconds, "seconds": time.perf_counter() - t0,
          "blocks_pruned": n_prune, "selected_params": selected, "pruned_params": zeros, "info": info}


def random_gguf(path: str, config: LlamaConfig, *, dtype: str = "f16", seed: int = 0, std: float = 0.02,
                progress: bool = True) -> dict:
  """Writes a Llama-architecture GGUF of random weights (normal, `std`; norm scales 1), one tensor at a time.

  For measuring memory and time on real shapes whose weights are not at hand (e.g. `LlamaConfig.llama2_7b()`):
  its outputs are meaningless. The vocabulary is placeholder strings (a gpt2-style tokenizer with no merges), so
  llama.cpp can load the file but not tokenize text sensibly.

  Returns:
    {"path", "bytes", "seconds"}.
  """
  gguf = _g._gguf()
  if dtype not in _g.DTYPES:
    raise _g.GGUFError(f"dtype must be one of {', '.join(_g.DTYPES)}; got {dtype!r}.")
  if not isinstance(config, LlamaConfig) or not config.uniform:
    raise _g.GGUFError("config must be a jprune.models.LlamaConfig with the same widths in every block.")
  t0 = time.perf_counter()
  q, vt = gguf.GGMLQuantizationType, gguf.GGUFValueType
  cfg = config
  fields = {
      "general.name": ("jprune random", vt.STRING, None),
      "general.file_type": (_g._FILE_TYPE[dtype], vt.UINT32, None),
      "llama.block_count": (cfg.n_layers, vt.UINT32, None),
      "llama.context_length": (cfg.max_seq_len, vt.UINT32, None),
      "llama.embedding_length": (cfg.dim, vt.UINT32, None),
      "llama.feed_forward_length": (cfg.hidden_of(0), vt.UINT32, None),
      "llama.attention.head_count": (cfg.heads_of(0), vt.UINT32, None),
      "llama.attention.head_count_kv": (cfg.kv_heads_of(0), vt.UINT32, None),
      "llama.attention.key_length": (cfg.d_head, vt.UINT32, None),
      "llama.attention.value_length": (cfg.d_head, vt.UINT32, None),
      "llama.rope.dimension_count": (cfg.d_head, vt.UINT32, None),
      "llama.rope.freq_base": (float(cfg.rope_theta), vt.FLOAT32, None),
      "llama.attention.layer_norm_rms_epsilon": (float(cfg.norm_eps), vt.FLOAT32, None),
      "llama.vocab_size": (cfg.vocab_size, vt.UINT32, None),
      "tokenizer.ggml.model": ("gpt2", vt.STRING, None),
      "tokenizer.ggml.tokens": ([f"<t{i}>" for i in range(cfg.vocab_size)], vt.ARRAY, vt.STRING),
      "tokenizer.ggml.token_type": ([1] * cfg.vocab_size, vt.ARRAY, vt.INT32),
  }
  shapes = {"token_embd.weight": (cfg.vocab_size, cfg.dim), "output_norm.weight": (cfg.dim,),
            "output.weight": (cfg.vocab_size, cfg.dim)}
  for i in range(cfg.n_layers):
    shapes.update({f"blk.{i}.{n}.weight": s for n, s in _g._block_shapes(cfg, i).items()})
  names = _order(cfg)

  def kind_of(name):
    if len(shapes[name]) == 1 or dtype == "f32":
      return q.F32
    return q.Q8_0 if dtype == "q8_0" and shapes[name][-1] % 32 == 0 else q.F16

  writer = _Writer(gguf, path, "llama", fields, [(n, shapes[n], kind_of(n)) for n in names])
  try:
    from jprune._progress import progress_bar
    for j, name in enumerate(progress_bar(names, desc="random GGUF", disable=not progress)):
      if len(shapes[name]) == 1:
        arr = np.ones(shapes[name], np.float32)
      else:
        rng = np.random.default_rng([seed, j])
        arr = rng.standard_normal(shapes[name], dtype=np.float32)
        arr *= std
      writer.write(_encode(gguf, arr, kind_of(name)))
      del arr
    size = writer.finish()
  except BaseException:
    writer.abort()
    raise
  return {"path": path, "bytes": size, "seconds": time.perf_counter() - t0}
