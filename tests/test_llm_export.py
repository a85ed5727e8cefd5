"""GGUF export (`llm.save_gguf`) read back by jprune and run by llama.cpp itself (node-llama-cpp's prebuilt CPU
binary): dense, unstructured, N:M and compacted (per-layer widths, `deci`) models, f32 / f16 / q8_0."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jprune import llm
from jprune.llm import gguf as G
from jprune.llm import llamacpp, width
from jprune.models import Llama

from test_llm import _write_tiny_gguf


def _need_llamacpp():
  if not llamacpp.available():
    if os.environ.get("CI"):
      pytest.fail("llama.cpp (node-llama-cpp) is missing in CI: scripts/setup.sh --llm installs it.")
    pytest.skip("node-llama-cpp not installed (bash scripts/setup.sh --llm)")


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
  _write_tiny_gguf(path, np.random.default_rng(1), tied=False)
  return path


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _tiny_compacted(cfg, params, rng_seed=0):
  """Per-block widths that differ: block 0 keeps 2 of 4 heads (1 per KV group) and 24 of 48 neurons."""
  units = {"layers_0": {"mlp": np.arange(cfg.hidden_of(0)) % 2 == 0, "heads": np.array([True, False, False, True])},
           "layers_1": {"mlp": np.ones(cfg.hidden_of(1), bool), "heads": np.ones(4, bool)}}
  masked = width.apply_units(cfg, params, units)
  return width.compact(cfg, masked, units) + (masked,)


def test_round_trip_f32_exact_f16_close_q8_keeps_zeros(tiny_file, tmp_path):
  cfg, params, tok = llm.load_gguf(tiny_file)
  out = str(tmp_path / "a.gguf")
  info = llm.save_gguf(out, cfg, params, tok, dtype="f32")
  assert info["architecture"] == "llama" and info["tensor_types"] == {"f32": 21}
  cfg2, params2, tok2 = llm.load_gguf(out)
  assert cfg2 == cfg
  for a, b in zip(_leaves(params), _leaves(params2)):
    np.testing.assert_array_equal(a, b)       # q/k permutation and transposes undone exactly
  assert tok2.encode("in the answer") == tok.encode("in the answer")
  assert tok2.gguf_metadata.keys() == tok.gguf_metadata.keys()
  # an unstructured-pruned model: zeros survive every dtype exactly
  res = llm.prune(cfg, params, np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 16)).astype(np.int32),
                  method="wanda", sparsity=0.5, progress=False)
  for dtype, tol in (("f16", 2e-3), ("q8_0", 2e-2)):
    path = str(tmp_path / f"s_{dtype}.gguf")
    info = llm.save_gguf(path, cfg, res.params, tok, dtype=dtype)
    _, back, _ = llm.load_gguf(path)
    for p, w, m, b in zip(jax.tree_util.tree_flatten_with_path(res.params)[0], _leaves(res.params),
                          _leaves(res.masks), _leaves(back)):
      m = np.broadcast_to(m, w.shape)
      assert np.all(b[~m] == 0.0), (dtype, p[0])
      np.testing.assert_allclose(b, w, atol=tol * np.abs(w).max() + 1e-7)
  # q8_0 needs rows of 32 values: ffn_down's rows hold 48 here, so those two fall back to f16; norms stay f32
  assert info["tensor_types"] == {"q8_0": 14, "f16": 2, "f32": 5}


def test_compacted_model_round_trips_as_deci(tiny_file, tmp_path):
  cfg, params, tok = llm.load_gguf(tiny_file)
  small_cfg, small, masked = _tiny_compacted(cfg, params)
  assert small_cfg.layer_n_heads == (2, 4) and small_cfg.layer_hidden_dims == (24, 48)
  out = str(tmp_path / "c.gguf")
  info = llm.save_gguf(out, small_cfg, small, tok)
  assert info["architecture"] == "deci"
  cfg2, back, _ = llm.load_gguf(out)
  assert (cfg2.layer_n_heads, cfg2.layer_n_kv_heads, cfg2.layer_hidden_dims) == ((2, 4), (2, 2), (24, 48))
  toks = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 12)))
  np.testing.assert_allclose(Llama(cfg2).apply({"params": back}, toks), Llama(cfg).apply({"params": masked}, toks),
                             rtol=1e-5, atol=1e-5)


def test_export_bad_input_names_the_problem_and_leaves_nothing(tiny_file, tmp_path, monkeypatch):
  cfg, params, tok = llm.load_gguf(tiny_file)
  out = tmp_path / "x.gguf"
  with pytest.raises(G.GGUFError, match="dtype"):
    llm.save_gguf(str(out), cfg, params, tok, dtype="q4_k")
  bad = jax.tree.map(lambda x: x, params)
  bad["layers_1"]["mlp"]["up_proj"]["kernel"] = bad["layers_1"]["mlp"]["up_proj"]["kernel"][:, :5]
  with pytest.raises(G.GGUFError, match="layers_1/mlp/up_proj/kernel"):
    llm.save_gguf(str(out), cfg, bad, tok)
  bad = jax.tree.map(lambda x: x, params)
  bad["norm"]["scale"] = bad["norm"]["scale"].at[0].set(jnp.nan)
  with pytest.raises(G.GGUFError, match="norm/scale.*NaN"):
    llm.save_gguf(str(out), cfg, bad, tok)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    llm.save_gguf(str(tmp_path / "no" / "x.gguf"), cfg, params, tok)
  # a failure while writing leaves neither the file nor a temporary one
  def boom(*a):
    yield "token_embd.weight", np.zeros((cfg.vocab_size, cfg.dim), np.float32)
    raise OSError("disk full")
  monkeypatch.setattr(G, "_tensors", boom)
  with pytest.raises(OSError, match="disk full"):
    llm.save_gguf(str(out), cfg, params, tok)
  assert list(tmp_path.iterdir()) == []


def test_loading_bad_gguf_files_gives_one_clear_error(tiny_file, tmp_path):
  import gguf
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(open(tiny_file, "rb").read()[:200])
  with pytest.raises(G.GGUFError, match="cut.gguf"):
    llm.load_gguf(str(cut))
  other = tmp_path / "gpt2.gguf"
  w = gguf.GGUFWriter(str(other), "gpt2")
  w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  with pytest.raises(G.GGUFError, match="architecture 'gpt2'"):
    llm.load_gguf(str(other))
  no_vocab = tmp_path / "novocab.gguf"
  w = gguf.GGUFWriter(str(no_vocab), "llama")
  w.add_embedding_length(4); w.add_block_count(1); w.add_head_count(1); w.add_feed_forward_length(4)
  w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
  w.add_tensor("output_norm.weight", np.zeros(4, np.float32))
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  with pytest.raises(G.GGUFError, match="tokenizer.ggml.tokens"):
    llm.load_gguf(str(no_vocab))


# ----------------------------------------------------------------------------------------------- llama.cpp
def test_llamacpp_runs_tiny_exports_like_jprune(tiny_file, tmp_path):
  _need_llamacpp()
  cfg, params, tok = llm.load_gguf(tiny_file)
  rng = np.random.default_rng(0)
  windows = rng.integers(0, cfg.vocab_size, (3, 32))
  calib = rng.integers(0, cfg.vocab_size, (4, 16)).astype(np.int32)
  small_cfg, small, _ = _tiny_compacted(cfg, params)
  cases = {"dense": (cfg, params),
           "wanda50": (cfg, llm.prune(cfg, params, calib, method="wanda", progress=False).params),
           "sparsegpt2:4": (cfg, llm.prune(cfg, params, calib, method="sparsegpt", granularity="2:4",
                                           progress=False).params),
           "compacted": (small_cfg, small)}
  prompt = [5, 77, 9, 31]
  for name, (c, p) in cases.items():
    path = str(tmp_path / f"{name}.gguf")
    llm.save_gguf(path, c, p, tok)
    got = llamacpp.run(path, windows=windows, prompts=[prompt], new_tokens=6)
    ppl_cpp = float(np.exp(sum(got["nll"]) / sum(got["count"])))
    ppl = llm.perplexity(c, p, windows, seq_len=windows.shape[1])
    assert ppl_cpp == pytest.approx(ppl, rel=1e-3), name
    assert got["greedy"][0] == llm.generate(c, p, prompt, 6), name


@pytest.mark.slow
def test_llamacpp_smollm2_exports_match_jprune(smollm2, tmp_path):
  """The issue's fidelity checks on the real model: greedy tokens on 4 of 5 prompts, perplexity within 1%
  (f32, f16, a width-pruned compacted model, a 2:4 model) and 3% (q8_0) of jprune's on the same token ids.

  Slow (several 540 MB exports): out of the default run; `benchmarks/llm_structured.py` measures the same
  fidelity on every run (and `test_llamacpp_runs_tiny_exports_like_jprune` checks the same path on every test run)."""
  _need_llamacpp()
  cfg, params, tok = smollm2
  ids = tok.encode(llm.jargon_text()[-60_000:])
  windows = llm.token_windows(ids, 256, 4)
  prompts = ["The capital of France is", "A hacker is a person who", "In the beginning", "The kernel of Unix",
             "Emacs is a text editor that"]
  p_ids = [tok.encode(p) for p in prompts]
  want = [llm.generate(cfg, params, p, 8) for p in p_ids]
  ppl = llm.perplexity(cfg, params, windows, seq_len=256)
  path = str(tmp_path / "m.gguf")
  for dtype, tol in (("f32", 0.01), ("f16", 0.01), ("q8_0", 0.03)):
    llm.save_gguf(path, cfg, params, tok, dtype=dtype)
    got = llamacpp.run(path, windows=windows, prompts=p_ids if dtype == "f32" else None, new_tokens=8)
    ppl_cpp = float(np.exp(sum(got["nll"]) / sum(got["count"])))
    assert abs(ppl_cpp / ppl - 1) <= tol, (dtype, ppl_cpp, ppl)
    if dtype == "f32":
      assert sum(g == w for g, w in zip(got["greedy"], want)) >= 4, (got["greedy"], want)
  # structured: 20% of the MLP neurons of every block removed, compacted (llama arch, smaller widths)
  calib = llm.token_windows(ids[:4096], 128, 4)
  sc = width.unit_scores(cfg, params, calib, "activation")
  units = width.choose_units(cfg, sc, mlp=0.2, allocation="layer")
  small_cfg, small = width.compact(cfg, width.apply_units(cfg, params, units), units)
  # N:M: 2:4 by magnitude
  nm = llm.prune(cfg, params, calib, method="magnitude", granularity="2:4", progress=False).params
  for name, (c, p) in {"compacted": (small_cfg, small), "2:4": (cfg, nm)}.items():
    llm.save_gguf(path, c, p, tok, dtype="f32")
    got = llamacpp.run(path, windows=windows)
    ppl_cpp = float(np.exp(sum(got["nll"]) / sum(got["count"])))
    ppl_j = llm.perplexity(c, p, windows, seq_len=256)
    assert abs(ppl_cpp / ppl_j - 1) <= 0.01, (name, ppl_cpp, ppl_j)


def test_llamacpp_missing_gives_one_clear_error(tmp_path, monkeypatch, tiny_file):
  monkeypatch.setattr(llamacpp, "find", lambda: None)
  with pytest.raises(llamacpp.LlamaCppError, match="setup.sh --llm"):
    llamacpp.run(tiny_file, windows=np.zeros((1, 4), int))
  monkeypatch.setattr(llamacpp.shutil, "which", lambda name: None)
  with pytest.raises(llamacpp.LlamaCppError, match="node"):
    llamacpp.run(tiny_file, windows=np.zeros((1, 4), int))
