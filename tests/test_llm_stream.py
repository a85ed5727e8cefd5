"""Streamed pruning of a GGUF (`llm.stream.prune_gguf`) against the in-memory `llm.prune` on the same weights, the
file types it writes, its partial runs, its errors, and llama.cpp running what it wrote."""

import os

import gguf
import jax
import numpy as np
import pytest

from jprune import llm
from jprune.llm import llamacpp, stream
from jprune.models import LlamaConfig

from test_llm import _write_tiny_gguf


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _types(path):
  return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def _raw(path):
  return {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def random_f32(tmp_path_factory):
  """3 blocks, untied, GQA (4 query / 2 KV heads): float32, so streamed and in-memory see the same weights."""
  path = str(tmp_path_factory.mktemp("stream") / "r32.gguf")
  cfg = LlamaConfig.tiny(n_layers=3, tie_embeddings=False)
  info = stream.random_gguf(path, cfg, dtype="f32", seed=3, std=0.3, progress=False)
  assert info["bytes"] == os.path.getsize(path)
  return path


@pytest.mark.parametrize("method,granularity,where", [
    ("wanda", None, llm.BLOCK_KERNELS),
    ("sparsegpt", "2:4", llm.BLOCK_KERNELS),
    ("magnitude", None, r"layers_[02]/mlp/.*/kernel"),
])
def test_streamed_equals_in_memory_bit_for_bit(random_f32, tmp_path, method, granularity, where):
  cfg, params, _ = llm.load_gguf(random_f32)
  calib = np.random.default_rng(0).integers(0, cfg.vocab_size, (5, 16))   # 5 = batches of 2, 2, 1
  ref = llm.prune(cfg, params, calib, method=method, granularity=granularity, where=where, batch_size=2,
                  blocksize=16, progress=False)
  out = str(tmp_path / "p.gguf")
  got = stream.prune_gguf(random_f32, out, calib, method=method, granularity=granularity, where=where,
                          batch_size=2, blocksize=16, progress=False)
  cfg2, streamed, _ = llm.load_gguf(out)
  assert cfg2 == cfg
  for a, b in zip(_leaves(ref.params), _leaves(streamed)):
    np.testing.assert_array_equal(a, b)
  masks = [np.asarray(m) for m in jax.tree.leaves(ref.masks) if np.ndim(m)]
  assert got["selected_params"] == sum(m.size for m in masks)
  assert got["pruned_params"] == sum(int((~m).sum()) for m in masks) > 0
  assert len(got["block_seconds"]) == cfg.n_layers and got["bytes"] == os.path.getsize(out)
  # tensors the method does not change are the source's bytes
  src, dst = _raw(random_f32), _raw(out)
  assert dst["token_embd.weight"] == src["token_embd.weight"] and dst["output.weight"] == src["output.weight"]
  if where != llm.BLOCK_KERNELS:
    assert dst["blk.1.ffn_up.weight"] == src["blk.1.ffn_up.weight"]
    assert dst["blk.0.attn_q.weight"] == src["blk.0.attn_q.weight"]
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_types_kept_or_chosen_zeros_exact_and_partial_runs(tmp_path):
  cfg = LlamaConfig.tiny(n_layers=2, dim=64, hidden_dim=128)   # rows of 64 / 128 values: q8_0 blocks fit
  src = str(tmp_path / "r16.gguf")
  stream.random_gguf(src, cfg, dtype="q8_0", seed=1, std=0.3, progress=False)
  assert set(_types(src).values()) == {"Q8_0", "F32"}
  _, params, _ = llm.load_gguf(src)
  calib = np.random.default_rng(1).integers(0, cfg.vocab_size, (4, 16))
  ref = llm.prune(cfg, params, calib, method="wanda", progress=False)
  kept = str(tmp_path / "kept.gguf")
  stream.prune_gguf(src, kept, calib, method="wanda", progress=False)     # dtype None: every type kept
  assert _types(kept) == _types(src)
  _, p_kept, _ = llm.load_gguf(kept)
  for m, w in zip(jax.tree.leaves(ref.masks), jax.tree.leaves(p_kept)):
    if np.ndim(m):   # q8_0 keeps the zeros exactly (a block scales by its max) and requantizes the rest
      np.testing.assert_array_equal(np.asarray(w) != 0, np.asarray(m))
  f16 = str(tmp_path / "f16.gguf")
  stream.prune_gguf(src, f16, calib, method="wanda", dtype="f16", progress=False)
  assert {n: t for n, t in _types(f16).items() if n.endswith("norm.weight")} == {
      n: "F32" for n in _types(src) if n.endswith("norm.weight")}
  assert {t for n, t in _types(f16).items() if not n.endswith("norm.weight")} == {"F16"}
  # max_blocks: only block 0 pruned, block 1 copied byte for byte
  part = str(tmp_path / "part.gguf")
  got = stream.prune_gguf(src, part, calib, method="sparsegpt", max_blocks=1, progress=False, blocksize=32)
  assert got["blocks_pruned"] == 1 and len(got["block_seconds"]) == 1
  a, b = _raw(src), _raw(part)
  assert all(a[n] == b[n] for n in a if n.startswith("blk.1."))
  assert a["blk.0.ffn_up.weight"] != b["blk.0.ffn_up.weight"]
  # the target may be the source itself (written to a temporary file, then renamed over it)
  same = str(tmp_path / "same.gguf")
  stream.random_gguf(same, cfg, dtype="f32", seed=1, std=0.3, progress=False)
  stream.prune_gguf(same, same, calib, method="magnitude", progress=False)
  _, p_same, _ = llm.load_gguf(same)
  assert abs(float(np.mean(np.asarray(p_same["layers_1"]["mlp"]["down_proj"]["kernel"]) == 0)) - 0.5) < 1e-6


def test_bad_input_one_clear_error_and_nothing_left(random_f32, tmp_path, monkeypatch):
  calib = np.zeros((2, 8), np.int32)
  out = str(tmp_path / "x.gguf")
  with pytest.raises(ValueError, match="'gradient' needs the gradient of the whole model"):
    stream.prune_gguf(random_f32, out, calib, method="gradient", progress=False)
  with pytest.raises(llm.GGUFError, match="dtype must be None or one of"):
    stream.prune_gguf(random_f32, out, calib, dtype="q4_0", progress=False)
  with pytest.raises(ValueError, match=r"max_blocks must lie in \[0, 3\]"):
    stream.prune_gguf(random_f32, out, calib, max_blocks=4, progress=False)
  with pytest.raises(ValueError, match="calibration_tokens must lie in"):
    stream.prune_gguf(random_f32, out, calib + 1000, progress=False)
  with pytest.raises(ValueError, match="nothing_here.*matched no float leaf"):
    stream.prune_gguf(random_f32, out, calib, where=r"nothing_here", progress=False)
  with pytest.raises(FileNotFoundError, match="no such GGUF"):
    stream.prune_gguf(str(tmp_path / "missing.gguf"), out, calib, progress=False)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    stream.prune_gguf(random_f32, str(tmp_path / "no" / "x.gguf"), calib, progress=False)
  # a failure half way (here: the disk fills while block 1 is written) leaves neither the target nor a temp file
  real = stream._Writer.write
  calls = []

  def failing(self, data):
    calls.append(1)
    if len(calls) > 12:
      raise OSError("disk full")
    return real(self, data)

  monkeypatch.setattr(stream._Writer, "write", failing)
  with pytest.raises(OSError, match="disk full"):
    stream.prune_gguf(random_f32, out, calib, progress=False)
  assert os.listdir(tmp_path) == []


def test_llamacpp_runs_the_streamed_file_like_jprune(tmp_path):
  if not llamacpp.available():
    if os.environ.get("CI"):
      pytest.fail("llama.cpp (node-llama-cpp) is missing in CI: scripts/setup.sh --llm installs it.")
    pytest.skip("node-llama-cpp not installed (bash scripts/setup.sh --llm)")
  src = str(tmp_path / "tiny.gguf")
  _write_tiny_gguf(src, np.random.default_rng(5), tied=True)   # a real byte-level BPE tokenizer, tied embeddings
  cfg, params, _ = llm.load_gguf(src)
  calib = np.random.default_rng(2).integers(0, cfg.vocab_size, (4, 32))
  out = str(tmp_path / "pruned.gguf")
  stream.prune_gguf(src, out, calib, method="sparsegpt", granularity="2:4", blocksize=16, progress=False)
  cfg2, pruned, _ = llm.load_gguf(out)
  windows = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 48))
  got = llamacpp.run(out, windows=windows)
  ppl_cpp = float(np.exp(sum(got["nll"]) / sum(got["count"])))
  ppl = llm.perplexity(cfg2, pruned, windows, seq_len=48)
  assert abs(ppl_cpp / ppl - 1) < 0.01, (ppl_cpp, ppl)
  assert abs(ppl / llm.perplexity(cfg, params, windows, seq_len=48) - 1) > 1e-3   # pruning changed the model


def test_cli_stream_writes_the_pruned_gguf(tmp_path, capsys):
  from jprune import cli
  src = str(tmp_path / "tiny.gguf")
  _write_tiny_gguf(src, np.random.default_rng(2))
  text = tmp_path / "text.txt"
  text.write_text("in the answer, an antenna and the thin tin man " * 40)
  out = str(tmp_path / "pruned.gguf")
  args = ["llm", "--stream", "--gguf", src, "--text", str(text), "--method", "wanda", "--sparsity", "0.6", "--calib",
          "4", "--calib-len", "16", "--export", out, "--no-progress"]
  assert cli.main(args) == 0
  printed = capsys.readouterr().out
  cfg, params, tok = llm.load_gguf(src)
  ids = tok.encode(text.read_text())
  calib, _ = llm.split_text_tokens(ids, 4, 16, 0, 1)
  ref = llm.prune(cfg, params, calib, method="wanda", sparsity=0.6, progress=False)
  _, got, _ = llm.load_gguf(out)
  for a, b in zip(_leaves(ref.params), _leaves(got)):
    np.testing.assert_array_equal(a, b)
  masks = [np.asarray(m) for m in jax.tree.leaves(ref.masks) if np.ndim(m)]
  pruned, total = sum(int((~m).sum()) for m in masks), sum(m.size for m in masks)
  assert f"{pruned / total:.1%} of {total:,} block weights pruned (wanda, unstructured)" in printed
  assert cli.main(["llm", "--stream", "--gguf", src, "--no-progress"]) == 1
  assert "give --export" in capsys.readouterr().err
  assert cli.main(["llm", "--stream", "--gguf", src, "--export", out, "--method", "taylor", "--no-progress"]) == 1
  assert "needs the gradient of the whole model" in capsys.readouterr().err


def test_compacted_deci_file_and_unused_tensors_carried_over(tmp_path):
  from test_llm_export import _tiny_compacted
  src = str(tmp_path / "tiny.gguf")
  rope = np.linspace(1, 2, 4).astype(np.float32)   # a tensor jprune's Llama does not use (Llama 3's rope_freqs)
  _write_tiny_gguf(src, np.random.default_rng(7), tied=False, extra={"rope_freqs.weight": rope})
  cfg, params, tok = llm.load_gguf(src)
  small_cfg, small, _ = _tiny_compacted(cfg, params)          # per-block widths: written as `deci`
  deci = str(tmp_path / "deci.gguf")
  assert llm.save_gguf(deci, small_cfg, small, tok)["architecture"] == "deci"
  calib = np.random.default_rng(4).integers(0, cfg.vocab_size, (4, 16))
  for path in (src, deci):
    c, p, _ = llm.load_gguf(path)
    ref = llm.prune(c, p, calib, method="sparsegpt", blocksize=8, progress=False)
    out = str(tmp_path / "out.gguf")
    stream.prune_gguf(path, out, calib, method="sparsegpt", blocksize=8, progress=False)
    c2, got, _ = llm.load_gguf(out)
    assert c2 == c
    for a, b in zip(_leaves(ref.params), _leaves(got)):
      np.testing.assert_array_equal(a, b)
    meta_in, _ = llm.read_gguf(path)
    meta_out, tensors_out = llm.read_gguf(out)
    assert {k: v for k, v in meta_in.items() if not k.startswith("GGUF.")} == {
        k: v for k, v in meta_out.items() if not k.startswith("GGUF.")}
    if path == src:
      np.testing.assert_array_equal(tensors_out["rope_freqs.weight"], rope)
