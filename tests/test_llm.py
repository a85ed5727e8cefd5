"""LLM pruning: block-by-block methods on a tiny random Llama, SparseGPT's reconstruction, the GGUF loader
against a numpy reference forward (tiny written file and the real SmolLM2-135M), the tokenizer, sharding."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jprune as jp
from jprune import _tree, llm
from jprune.models import Llama, LlamaConfig


@pytest.fixture(scope="module")
def tiny():
  cfg = LlamaConfig.tiny(dim=32, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=64)
  model = Llama(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  calib = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 16)).astype(np.int32)
  return model, params, calib


def _kernels(tree):
  return {p: x for p, x in _tree.leaves_with_paths(tree) if "layers_" in p and p.endswith("kernel")}


@pytest.mark.parametrize("method", llm.METHODS)
def test_block_by_block_exact_sparsity_and_zeros(tiny, method):
  model, params, calib = tiny
  res = llm.prune(model, params, calib, method=method, sparsity=0.5, progress=False)
  kern = _kernels(res.params)
  masks = _kernels(res.masks)
  assert len(kern) == 2 * 7
  for p, w in kern.items():
    m = np.asarray(masks[p])
    assert m.shape == w.shape and m.dtype == bool
    assert np.all(np.asarray(w)[~m] == 0.0), p  # pruned entries are exactly zero
    if method == "wanda":  # per output neuron: each column keeps exactly in - round(s·in)
      assert np.all(m.sum(axis=0) == w.shape[0] - round(0.5 * w.shape[0])), p
    elif method in ("magnitude", "gradient", "taylor"):
      assert m.sum() == w.size - round(0.5 * w.size), p
    else:  # SparseGPT: exactly round(s·rows·block) per column block, so exactly half here
      assert m.sum() == w.size // 2, p
  # the rest of the tree is untouched, and the core understands the result
  np.testing.assert_array_equal(res.params["embed"]["embedding"], params["embed"]["embedding"])
  assert float(jp.sparsity(res.masks, res.params)) == pytest.approx(0.5)
  assert "layers_0/attn/q_proj/kernel" in str(jp.summary(res.params, res.masks))
  assert len(res.block_seconds) == model.config.n_layers


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "gradient"])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_exact_along_input_axis(tiny, method, n, m):
  model, params, calib = tiny
  res = llm.prune(model, params, calib, method=method, granularity=f"{n}:{m}", progress=False)
  for p, mask in _kernels(res.masks).items():
    mask = np.asarray(mask)
    groups = mask.reshape(mask.shape[0] // m, m, mask.shape[1]).sum(axis=1)
    assert np.all(groups == n), p


@pytest.mark.parametrize("tiles", [1, 3])
@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros", "signed-nan-inf"])
def test_per_output_mask_prunes_exactly_the_k_lowest_of_every_column(kind, tiles, monkeypatch):
  """Wanda's per-output choice against numpy: a stable argsort of each column's order-preserving keys. With
  tiles=3 the columns are taken 3 at a time (7 columns: tiles 0-2, 3-5 and an overlapping 4-6)."""
  import importlib
  from jprune import masks as M
  P = importlib.import_module("jprune.llm.prune")   # the module (jprune.llm.prune is also the function)
  if tiles > 1:
    monkeypatch.setattr(P, "_TILE_BYTES", 4 * 300 * 3)
  P._per_output_mask.clear_cache()   # traced with the tile size above
  rng = np.random.default_rng(3)
  x = rng.standard_normal((300, 7)).astype(np.float32)
  if kind != "signed-nan-inf":
    x = np.abs(x)
  if kind == "ties":        # few distinct values: ties straddle the k-th in most columns
    x = np.round(x * 2) / 2
  if kind == "zeros":       # whole columns and rows of zeros (weights pruned before, or quantized to 0)
    x[:, :3] = 0
    x[:100] = 0
  if kind == "signed-nan-inf":
    x[rng.random(x.shape) < 0.1] = np.nan
    x[rng.random(x.shape) < 0.05] = -np.inf
    x[rng.random(x.shape) < 0.05] = np.inf
  keys = np.asarray(M._keys(jnp.asarray(x))).astype(np.int64)
  for k in (0, 1, 150, 299, 300):
    want = np.ones(x.shape, bool)
    for c in range(x.shape[1]):
      want[np.argsort(keys[:, c], kind="stable")[:k], c] = False
    np.testing.assert_array_equal(np.asarray(P._per_output_mask(jnp.asarray(x), k=k)), want, err_msg=f"k={k}")
  P._per_output_mask.clear_cache()


def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda():
  rng = np.random.default_rng(0)
  d_in, d_out, tokens = 64, 48, 512
  mix = rng.standard_normal((d_in, d_in)) * rng.uniform(0.1, 3.0, d_in)  # correlated, unevenly scaled inputs
  x = (rng.standard_normal((tokens, d_in)) @ mix).astype(np.float32)
  w = rng.standard_normal((d_in, d_out)).astype(np.float32)   # Flax kernel (in, out)
  h = jnp.asarray(x.T @ x)
  err = lambda k: float(np.linalg.norm(x @ w - x @ np.asarray(k)))
  for gran, (n, m) in (("unstructured", (0, 0)), ("2:4", (2, 4))):
    g = jp.masks.parse_granularity(gran)
    w_sgpt, keep = llm.sparsegpt(jnp.asarray(w), h, 0.5, n, m, 16)
    assert np.all(np.asarray(w_sgpt)[~np.asarray(keep)] == 0.0)
    assert np.asarray(keep).mean() == pytest.approx(0.5)
    mag = llm._choose(jnp.abs(jnp.asarray(w)), sparsity=0.5, g=g, compare="layer")
    wanda_score = jnp.abs(jnp.asarray(w)) * jnp.sqrt(jnp.sum(jnp.asarray(x) ** 2, axis=0))[:, None]
    wanda = llm._choose(wanda_score, sparsity=0.5, g=g, compare="output")
    e_sgpt, e_mag, e_wanda = err(w_sgpt), err(np.where(mag, w, 0)), err(np.where(wanda, w, 0))
    assert e_sgpt < e_wanda < e_mag, (gran, e_sgpt, e_wanda, e_mag)


def test_perplexity_and_generate_match_direct_computation(tiny):
  model, params, calib = tiny
  logits = model.apply({"params": params}, jnp.asarray(calib))
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  nll = -np.mean(np.take_along_axis(np.asarray(logp), calib[:, 1:, None], axis=-1))
  assert llm.perplexity(model, params, calib.reshape(-1), seq_len=16) == pytest.approx(np.exp(nll), rel=1e-5)
  prompt = [3, 1, 4]
  out = llm.generate(model, params, prompt, 4)
  seq = list(prompt)
  for _ in range(4):
    seq.append(int(jnp.argmax(model.apply({"params": params}, jnp.asarray([seq]))[0, -1])))
  assert out == seq[len(prompt):]


def test_pruned_llm_fine_tunes_with_keep_pruned(tiny):
  model, params, calib = tiny
  res = llm.prune(model, params, calib, method="wanda", granularity="2:4", progress=False)
  tx = optax.chain(optax.adam(1e-3), jp.keep_pruned(res.masks))
  state = tx.init(res.params)

  def loss(p):
    return llm._nll(model.apply({"params": p}, jnp.asarray(calib)), jnp.asarray(calib))

  p = res.params
  with jax.numpy_dtype_promotion("standard"):  # optax's adam mixes python floats and int32 counts
    for _ in range(3):
      u, state = tx.update(jax.grad(loss)(p), state, p)
      p = optax.apply_updates(p, u)
  for path, w in _kernels(p).items():
    assert np.all(np.asarray(w)[~np.asarray(_kernels(res.masks)[path])] == 0.0)


def test_bad_input_errors(tiny):
  model, params, calib = tiny
  with pytest.raises(ValueError, match="method"):
    llm.prune(model, params, calib, method="obs", progress=False)
  with pytest.raises(ValueError, match="sparsity"):
    llm.prune(model, params, calib, sparsity=1.0, progress=False)
  with pytest.raises(ValueError, match="layers_0/attn/.*m=3 does not divide"):
    llm.prune(model, params, calib, granularity=jp.nm(1, 3), progress=False)
  with pytest.raises(ValueError, match="calibration_tokens"):
    llm.prune(model, params, calib.astype(np.float32), progress=False)
  with pytest.raises(ValueError, match="nothing_here.*matched no float leaf"):
    llm.prune(model, params, calib, where=r"nothing_here", progress=False)
  with pytest.raises(TypeError, match="Llama"):
    llm.prune(object(), params, calib, progress=False)


# ----------------------------------------------------------------------------------------------- GGUF
def _bytes_to_unicode():
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def _ref_bpe(word: str, ranks: dict, vocab: dict) -> list[int]:
  """Textbook byte-level BPE of one pre-token: merge the lowest-ranked adjacent pair until none applies."""
  b2u = _bytes_to_unicode()
  parts = [b2u[b] for b in word.encode("utf-8")]
  while len(parts) > 1:
    pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
    r, i = min(pairs)
    if r == 1 << 30:
      break
    parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
  return [vocab[p] for p in parts]


def _np_forward(t: dict, meta: dict, tokens) -> np.ndarray:
  """Reference Llama forward in numpy on GGUF tensors as stored: (out, in) rows, llama.cpp's q/k layout with
  RoPE on adjacent pairs (GGML's normal mode)."""
  g = lambda k: meta[f"llama.{k}"]
  n_h, n_kv, eps, theta = int(g("attention.head_count")), int(g("attention.head_count_kv")), \
      float(g("attention.layer_norm_rms_epsilon")), float(g("rope.freq_base"))
  emb = t["token_embd.weight"].astype(np.float64)
  x = emb[np.asarray(tokens)]
  T = x.shape[0]
  norm = lambda v, w: v / np.sqrt(np.mean(v * v, -1, keepdims=True) + eps) * w

  def rope(v):  # (T, H, D): rotate pairs (2j, 2j+1)
    D = v.shape[-1]
    ang = np.arange(T)[:, None] * theta ** (-np.arange(0, D, 2) / D)[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = v[..., 0::2], v[..., 1::2]
    out = np.empty_like(v)
    out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
    return out

  for i in range(int(g("block_count"))):
    w = lambda n: t[f"blk.{i}.{n}.weight"].astype(np.float64)
    h = norm(x, w("attn_norm"))
    D = w("attn_q").shape[0] // n_h
    q = rope((h @ w("attn_q").T).reshape(T, n_h, D))
    k = rope((h @ w("attn_k").T).reshape(T, n_kv, D))
    v = (h @ w("attn_v").T).reshape(T, n_kv, D)
    o = np.zeros((T, n_h, D))
    for hd in range(n_h):
      kv = hd // (n_h // n_kv)
      s = q[:, hd] @ k[:, kv].T / np.sqrt(D) + np.triu(np.full((T, T), -np.inf), 1)
      p = np.exp(s - s.max(-1, keepdims=True))
      o[:, hd] = (p / p.sum(-1, keepdims=True)) @ v[:, kv]
    x = x + o.reshape(T, -1) @ w("attn_output").T
    h = norm(x, w("ffn_norm"))
    gate = h @ w("ffn_gate").T
    x = x + (gate / (1 + np.exp(-gate)) * (h @ w("ffn_up").T)) @ w("ffn_down").T
  x = norm(x, t["output_norm.weight"])
  return x @ (t["output.weight"] if "output.weight" in t else emb).T


def _write_tiny_gguf(path, rng, tied=True, extra=None):
  import gguf
  n_h, n_kv, dim, hid, layers = 4, 2, 32, 48, 2
  b2u = _bytes_to_unicode()
  tokens = [b2u[b] for b in range(256)]
  merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n"), ("Ġ", "a")]
  tokens += [a + b for a, b in merges] + ["<|endoftext|>"]
  w = gguf.GGUFWriter(path, "llama")
  w.add_block_count(layers)
  w.add_context_length(128)
  w.add_embedding_length(dim)
  w.add_feed_forward_length(hid)
  w.add_head_count(n_h)
  w.add_head_count_kv(n_kv)
  w.add_rope_freq_base(10000.0)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(tokens)
  w.add_token_merges([f"{a} {b}" for a, b in merges])
  w.add_token_types([1] * (len(tokens) - 1) + [3])
  w.add_eos_token_id(len(tokens) - 1)
  f = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)
  w.add_tensor("token_embd.weight", f(len(tokens), dim))
  w.add_tensor("output_norm.weight", 1 + f(dim))
  if not tied:
    w.add_tensor("output.weight", f(len(tokens), dim))
  D = dim // n_h
  for i in range(layers):
    w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + f(dim))
    w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + f(dim))
    w.add_tensor(f"blk.{i}.attn_q.weight", f(n_h * D, dim))
    w.add_tensor(f"blk.{i}.attn_k.weight", f(n_kv * D, dim))
    w.add_tensor(f"blk.{i}.attn_v.weight", f(n_kv * D, dim))
    w.add_tensor(f"blk.{i}.attn_output.weight", f(dim, n_h * D))
    w.add_tensor(f"blk.{i}.ffn_gate.weight", f(hid, dim))
    w.add_tensor(f"blk.{i}.ffn_up.weight", f(hid, dim))
    w.add_tensor(f"blk.{i}.ffn_down.weight", f(dim, hid))
  for name, value in (extra or {}).items():
    w.add_tensor(name, value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_loads_and_matches_numpy_reference(tmp_path, tied):
  path = str(tmp_path / "tiny.gguf")
  _write_tiny_gguf(path, np.random.default_rng(1), tied)
  cfg, params, tok = llm.load_gguf(path)
  assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.tie_embeddings) == (2, 32, 4, 2, tied)
  meta, t = llm.read_gguf(path)
  tokens = [5, 77, 256, 3, 200, 9, 31]
  ref = _np_forward(t, meta, tokens)
  out = np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray([tokens])))[0]
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
  assert tok.encode(" the") == [256 + 2]  # "Ġ"+"t" -> "Ġt"; "h"+"e" -> "he"; "Ġt"+"he" -> "Ġthe"
  assert tok.decode(tok.encode("in an answer, the end")) == "in an answer, the end"


@pytest.fixture(scope="module")
def smollm(smollm2):
  return smollm2


def test_smollm2_forward_matches_numpy_reference(smollm):
  cfg, params, tok = smollm
  assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim) == (30, 576, 9, 3, 1536)
  assert sum(x.size for x in jax.tree.leaves(params)) == 134_515_008
  meta, t = llm.read_gguf(llm.smollm2_path())
  tokens = tok.encode("The capital of France is")
  ref = _np_forward(t, meta, tokens)
  out = np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray([tokens])))[0]
  np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max(), rtol=1e-4)
  assert tok.decode(llm.generate(Llama(cfg), params, tokens, 3)).startswith(" Paris")


def test_smollm2_tokenizer_matches_reference_bpe_and_round_trips(smollm):
  _, _, tok = smollm
  import gguf
  reader = gguf.GGUFReader(llm.smollm2_path())
  tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
  merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
  vocab = {s: i for i, s in enumerate(tokens)}
  ranks = {m: r for r, m in enumerate(merges)}
  text = ("The hacker's dictionary: kludge, foo and bar; grok it, don't just read it. "
          "Wizards frobnicate obscure hackish cruft.")
  import re
  words = re.findall(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+", text)
  ref = [i for w in words for i in _ref_bpe(w, ranks, vocab)]
  assert tok.encode(text) == ref
  assert [tok.token(i) for i in tok.encode("The capital of France is")] == ["The", "Ġcapital", "Ġof", "ĠFrance",
                                                                          "Ġis"]
  assert [tok.token(i) for i in tok.encode("in 2024")] == ["in", "Ġ", "2", "0", "2", "4"]  # digits split
  for s in ("naïve café — ünïcödé ✓ 日本語", "tabs\tand\nnewlines  double  spaces", "<|im_start|>user"):
    assert tok.decode(tok.encode(s)) == s
  assert tok.encode("<|im_start|>") == [vocab["<|im_start|>"]]


# ----------------------------------------------------------------------------------------------- sharding
def test_cli_llm_writes_report(tmp_path, capsys):
  from jprune import cli
  path = str(tmp_path / "tiny.gguf")
  _write_tiny_gguf(path, np.random.default_rng(2))
  text = tmp_path / "text.txt"
  text.write_text("in the answer, an antenna and the thin tin man " * 40)
  out = tmp_path / "run"
  rc = cli.main(["llm", "--gguf", path, "--text", str(text), "--method", "sparsegpt", "--granularity", "2:4",
                 "--calib", "4", "--calib-len", "16", "--eval-windows", "2", "--eval-len", "32", "--out", str(out),
                 "--prompt", "the", "--no-progress"])
  assert rc == 0
  import json
  m = json.loads((out / "metrics.json").read_text())
  assert m["granularity"] == "2:4" and m["pruned_fraction_of_block_kernels"] == pytest.approx(0.5)
  assert m["perplexity"] > 1 and m["dense_perplexity"] > 1 and len(m["block_seconds"]) == 2
  for f in ("report.md", "block_seconds.png", "block_sparsity.png"):
    assert (out / f).stat().st_size > 0
  assert "perplexity dense" in capsys.readouterr().out
  assert cli.main(["llm", "--gguf", path, "--sparsity", "1.5", "--out", str(out)]) == 1
  assert "sparsity" in capsys.readouterr().err


def _sparsegpt_reference(w, h, sparsity, blocksize, percdamp=0.01):
  """SparseGPT as the authors' reference code writes it (IST-DASLab/sparsegpt, `fasterprune`), in float64 numpy:
  W (out, in); per block of columns the mask is the round(s * rows * block) lowest w^2 / [U]_cc^2 (stable order),
  each column's error is spread over the block's later columns, then lazily over the remaining ones."""
  w = np.asarray(w, np.float64).T.copy()
  h = np.asarray(h, np.float64).copy()
  rows, cols = w.shape
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  w[:, dead] = 0
  h += percdamp * np.mean(np.diag(h)) * np.eye(cols)
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  prune = np.zeros_like(w, bool)
  for i1 in range(0, cols, blocksize):
    i2 = min(i1 + blocksize, cols)
    w1, u1 = w[:, i1:i2].copy(), u[i1:i2, i1:i2]
    tmp = (w1 ** 2 / np.diag(u1)[None, :] ** 2).ravel()
    p1 = np.zeros(tmp.size, bool)
    p1[np.argsort(tmp, kind="stable")[:int(round(sparsity * tmp.size))]] = True
    p1 = p1.reshape(w1.shape)
    err1 = np.zeros_like(w1)
    for i in range(i2 - i1):
      q = np.where(p1[:, i], 0.0, w1[:, i])
      err = (w1[:, i] - q) / u1[i, i]
      w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
      err1[:, i] = err
    w[:, i1:i2] = np.where(p1, 0.0, w1)
    w[:, i2:] -= err1 @ u[i1:i2, i2:]
    prune[:, i1:i2] = p1
  return w.T, ~prune.T


def test_sparsegpt_matches_the_reference_algorithm():
  """llm.sparsegpt (float32, counting-pass selection) against the authors' algorithm in float64 numpy: the same
  masks, and weights equal to float32 precision; a dead input (zero Hessian row) is zeroed."""
  rng = np.random.default_rng(1)
  d_in, d_out, tokens = 96, 40, 400
  x = (rng.standard_normal((tokens, d_in)) @ (rng.standard_normal((d_in, d_in)) * rng.uniform(0.2, 2.0, d_in)))
  x[:, 5] = 0   # a dead input
  w = rng.standard_normal((d_in, d_out))
  h = x.T @ x
  for sparsity, bs in ((0.5, 16), (0.7, 32), (0.5, 96), (0.5, 40), (0.6, 128)):   # 40, 128: a shorter last block
    want_w, want_keep = _sparsegpt_reference(w, h, sparsity, bs)
    got_w, got_keep = llm.sparsegpt(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), sparsity, 0, 0, bs)
    np.testing.assert_array_equal(np.asarray(got_keep), want_keep, err_msg=f"sparsity {sparsity}, block {bs}")
    np.testing.assert_allclose(np.asarray(got_w), want_w, rtol=0, atol=2e-4 * np.abs(want_w).max())
    assert not np.asarray(got_keep)[5].any()
    assert abs((~want_keep).mean() - sparsity) < 0.01   # every column block pruned, the last one too


def test_sparsegpt_bad_shapes_raise_one_clear_error():
  w, h = jnp.ones((12, 4)), jnp.eye(12)
  with pytest.raises(ValueError, match=r"Hessian must be \(in, in\) = \(12, 12\)"):
    llm.sparsegpt(w, jnp.eye(10))
  with pytest.raises(ValueError, match="multiples of m = 4 for 2:4"):
    llm.sparsegpt(w, h, 0.5, 2, 4, 6)
  with pytest.raises(ValueError, match="multiples of m = 8"):
    llm.sparsegpt(w, h, 0.5, 2, 8, 8)
  for sparsity in (1.5, -0.2):   # pruned everything / nothing without a word before
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got"):
      llm.sparsegpt(w, h, sparsity)
  with pytest.raises(ValueError, match="0 < n <= m; got 5:4"):
    llm.sparsegpt(w, h, 0.5, 5, 4)
  with pytest.raises(ValueError, match="percdamp must be >= 0"):   # NaN weights before
    llm.sparsegpt(w, h, 0.5, percdamp=-2.0)
