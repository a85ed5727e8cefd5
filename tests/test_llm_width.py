"""Structured LLM pruning (`jprune.llm.width`): unit scores against hand computations, allocation rules (GQA,
rounding, targets), compaction equal to the masked model (tiny config and SmolLM2), reconstruction, block
removal, and distillation recovery (loss falls, resumes bit-identically, refuses another run's checkpoints)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jprune import llm
from jprune.checkpoint import CheckpointError
from jprune.llm import distill, width
from jprune.models import Llama, LlamaConfig, LlamaMLP, RMSNorm

CFG = LlamaConfig.tiny(dim=32, hidden_dim=48, n_heads=6, n_kv_heads=2, head_dim=8, vocab_size=64, n_layers=3)


@pytest.fixture(scope="module")
def tiny():
  params = Llama(CFG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, params)   # livelier activations than init
  calib = np.random.default_rng(0).integers(0, CFG.vocab_size, (8, 16)).astype(np.int32)
  return params, calib


def _logits(cfg, params, toks):
  return np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray(toks)))


@pytest.mark.parametrize("criterion", width.CRITERIA)
@pytest.mark.parametrize("setting", [dict(sparsity=0.3, allocation="layer"), dict(sparsity=0.3, allocation="global"),
                                     dict(mlp=0.5, heads=0.34, allocation="layer", head_groups="kv"),
                                     dict(sparsity=0.4, blocks=1, reconstruct=True, round_to=4)])
def test_compacted_equals_masked(tiny, criterion, setting):
  params, calib = tiny
  res = width.prune_width(CFG, params, calib, criterion=criterion, progress=False, **setting)
  # the smaller matmuls sum fewer terms in another order: float32 rounding, up to ~2e-5 here depending on XLA's
  # dot kernels (the tests compile at LLVM -O0, see conftest.py)
  np.testing.assert_allclose(_logits(res.config, res.params, calib), _logits(CFG, res.masked_params, calib),
                             rtol=1e-5, atol=5e-5)
  assert width.n_params(res.params) < width.n_params(params)
  assert res.info["params_after"] == width.n_params(res.params)
  # the masks are the core's broadcastable format and zero exactly the removed units
  for (p, w), m in zip(jax.tree_util.tree_flatten_with_path(res.masked_params)[0], jax.tree.leaves(res.masks)):
    assert np.all(np.asarray(w)[~np.broadcast_to(np.asarray(m), w.shape)] == 0), p
  for i in range(res.config.n_layers):
    h, kv, f = res.config.heads_of(i), res.config.kv_heads_of(i), res.config.hidden_of(i)
    assert h % kv == 0 and f % setting.get("round_to", 8) == 0


def test_allocation_targets_rounding_and_gqa(tiny):
  params, calib = tiny
  sc = width.unit_scores(CFG, params, calib, "activation")
  u = width.choose_units(CFG, sc, mlp=0.5, heads=0.34, allocation="layer")
  for i in range(3):
    assert u[f"layers_{i}"]["mlp"].sum() == 24                       # 48 − 24, a multiple of 8
    per_group = u[f"layers_{i}"]["heads"].reshape(2, 3).sum(1)
    assert per_group.tolist() == [2, 2]                               # one query head out of every KV group
    # and it is each group's lowest-scored head
    s = sc[f"layers_{i}"]["heads"].reshape(2, 3)
    assert np.all(~u[f"layers_{i}"]["heads"].reshape(2, 3)[np.arange(2), s.argmin(1)])
    # neurons: the kept ones score at least as high as the removed ones
    f = sc[f"layers_{i}"]["mlp"]
    assert f[u[f"layers_{i}"]["mlp"]].min() >= f[~u[f"layers_{i}"]["mlp"]].max()
  kv = width.choose_units(CFG, sc, heads=0.5, allocation="layer", head_groups="kv")
  for i in range(3):
    assert kv[f"layers_{i}"]["heads"].reshape(2, 3).all(1).sum() == 1 and kv[f"layers_{i}"]["heads"].sum() == 3
  # a params target: the removed share of block params lands within one chunk of it
  for alloc in ("layer", "global"):
    u = width.choose_units(CFG, sc, sparsity=0.3, allocation=alloc, kinds=("mlp",))
    small, _ = width.compact(CFG, width.apply_units(CFG, params, u), u)
    total = sum(CFG.block_params(i) for i in range(3))
    removed = 1 - sum(small.block_params(i) for i in range(3)) / total
    assert abs(removed - 0.3) <= 3 * 8 * 3 * CFG.dim / total, (alloc, removed)


def test_scores_match_hand_computations(tiny):
  params, calib = tiny
  lp = params["layers_0"]
  np_ = lambda x: np.asarray(x, np.float64)
  l2 = width.unit_scores(CFG, params, None, "l2")["layers_0"]
  wg, wu, wd = (np_(lp["mlp"][k]["kernel"]) for k in ("gate_proj", "up_proj", "down_proj"))
  np.testing.assert_allclose(l2["mlp"], np.sqrt((wg ** 2).sum(0) + (wu ** 2).sum(0) + (wd ** 2).sum(1)), rtol=1e-6)
  # activation / flap of block 0 from a direct forward of its pieces
  from jprune.models import LlamaAttention
  h = jnp.take(params["embed"]["embedding"], jnp.asarray(calib), axis=0)
  norm = RMSNorm(CFG.norm_eps)
  a = norm.apply({"params": lp["attn_norm"]}, h)
  mix = LlamaAttention(CFG).apply({"params": lp["attn"]}, a, jnp.arange(16), method="mix")
  hh = h + mix @ lp["attn"]["o_proj"]["kernel"]
  c = np_(LlamaMLP(CFG).apply({"params": lp["mlp"]}, norm.apply({"params": lp["mlp_norm"]}, hh), method="hidden"))
  c = c.reshape(-1, CFG.hidden_dim)
  act = width.unit_scores(CFG, params, calib, "activation")["layers_0"]
  np.testing.assert_allclose(act["mlp"], np.abs(c).mean(0), rtol=1e-4)
  m = np_(mix).reshape(-1, 6, 8)
  np.testing.assert_allclose(act["heads"], np.linalg.norm(m, axis=-1).mean(0), rtol=1e-4)
  flap = width.unit_scores(CFG, params, calib, "flap")["layers_0"]
  np.testing.assert_allclose(flap["mlp"], c.var(0) * (wd ** 2).sum(1), rtol=1e-3)
  # taylor: |dL/dz| for a gate z on each neuron's output, by autodiff of an explicitly gated loss
  def gated_loss(z):
    p2 = jax.tree.map(lambda v: v, params)
    p2["layers_0"]["mlp"]["down_proj"]["kernel"] = params["layers_0"]["mlp"]["down_proj"]["kernel"] * z[:, None]
    logits = Llama(CFG).apply({"params": p2}, jnp.asarray(calib))
    return llm._nll(logits, jnp.asarray(calib)) / (calib.shape[0] * (calib.shape[1] - 1))
  g = np.asarray(jax.grad(gated_loss)(jnp.ones(CFG.hidden_dim)))
  tay = width.unit_scores(CFG, params, calib, "taylor", batch_size=8)["layers_0"]   # one batch: |Σ_b g_b| = |g|
  np.testing.assert_allclose(tay["mlp"], np.abs(g), rtol=1e-3, atol=1e-9)
  fis = width.unit_scores(CFG, params, calib, "fisher", batch_size=8)["layers_0"]
  np.testing.assert_allclose(fis["mlp"], g ** 2, rtol=2e-3, atol=1e-12)


def test_reconstruction_reduces_the_output_error(tiny):
  params, calib = tiny
  sc = width.unit_scores(CFG, params, calib, "l2")
  u = width.choose_units(CFG, sc, mlp=0.5, heads=0.34, allocation="layer")
  plain_p = width.apply_units(CFG, params, u)
  refit_p = width.apply_units(CFG, params, u, calib, reconstruct=True)
  # o_proj's kept rows are the least-squares fit of the unpruned o_proj output on block 0's calibration inputs
  from jprune.models import LlamaAttention
  x = jnp.take(params["embed"]["embedding"], jnp.asarray(calib), axis=0)
  lp = params["layers_0"]
  a = RMSNorm(CFG.norm_eps).apply({"params": lp["attn_norm"]}, x)
  mix = np.asarray(LlamaAttention(CFG).apply({"params": lp["attn"]}, a, jnp.arange(16), method="mix"),
                   np.float64).reshape(-1, 48)
  keep = np.repeat(u["layers_0"]["heads"], 8)
  target = mix @ np.asarray(lp["attn"]["o_proj"]["kernel"], np.float64)
  lsq = np.linalg.lstsq(mix[:, keep], target, rcond=None)[0]
  got = np.asarray(refit_p["layers_0"]["attn"]["o_proj"]["kernel"], np.float64)
  err = lambda w: np.linalg.norm(mix @ w - target)
  assert err(got) <= 1.01 * np.linalg.norm(mix[:, keep] @ lsq - target)          # 1% damping
  assert err(got) < 0.9 * err(np.asarray(plain_p["layers_0"]["attn"]["o_proj"]["kernel"]))
  assert np.all(got[~keep] == 0)
  # and the whole model moves closer to the dense one
  dense = _logits(CFG, params, calib)
  assert np.linalg.norm(_logits(CFG, refit_p, calib) - dense) < np.linalg.norm(_logits(CFG, plain_p, calib) - dense)


def test_block_influence_removes_the_block_that_changes_least(tiny):
  params, calib = tiny
  p = jax.tree.map(lambda x: x, params)
  for k in ("o_proj",):
    p["layers_1"]["attn"][k]["kernel"] = p["layers_1"]["attn"][k]["kernel"] * 1e-3
  p["layers_1"]["mlp"]["down_proj"]["kernel"] = p["layers_1"]["mlp"]["down_proj"]["kernel"] * 1e-3
  res = width.prune_width(CFG, p, calib, mlp=0.0, blocks=1, progress=False)
  assert res.info["removed_blocks"] == [1] and res.config.n_layers == 2
  np.testing.assert_allclose(_logits(res.config, res.params, calib), _logits(CFG, res.masked_params, calib),
                             rtol=1e-5, atol=1e-5)


def test_bad_input(tiny):
  params, calib = tiny
  sc = width.unit_scores(CFG, params, calib, "l2")
  with pytest.raises(ValueError, match="criterion"):
    width.prune_width(CFG, params, calib, sparsity=0.2, criterion="wanda", progress=False)
  with pytest.raises(ValueError, match=r"sparsity= \(fraction of block params\) or mlp="):
    width.choose_units(CFG, sc)
  with pytest.raises(ValueError, match="sparsity must be a fraction"):
    width.choose_units(CFG, sc, sparsity=1.2)
  with pytest.raises(ValueError, match="removes more than"):
    width.choose_units(CFG, sc, sparsity=0.9, kinds=("mlp",), allocation="layer")
  with pytest.raises(ValueError, match="kinds"):
    width.choose_units(CFG, sc, sparsity=0.2, kinds=("experts",))
  u = width.choose_units(CFG, sc, mlp=0.5)
  u["layers_0"]["heads"] = np.array([True, True, False, True, False, False])
  with pytest.raises(ValueError, match=r"layers_0 keeps \[2, 1\] query heads per KV group"):
    width.compact(CFG, params, u)
  u["layers_0"]["heads"] = np.zeros(6, bool)
  with pytest.raises(ValueError, match="layers_0 keeps no attention head"):
    width.apply_units(CFG, params, u)
  with pytest.raises(ValueError, match="calibration_tokens"):
    width.prune_width(CFG, params, calib.astype(np.float32), sparsity=0.2, progress=False)


def test_smollm2_compacted_equals_masked(smollm2):
  cfg, params, tok = smollm2
  toks = np.asarray([tok.encode("The hacker's dictionary: kludge, foo and bar; grok it, don't just read it.")])
  calib = llm.token_windows(tok.encode(llm.jargon_text()[:20_000]), 64, 4)
  res = width.prune_width(cfg, params, calib, sparsity=0.2, kinds=("mlp", "heads"), criterion="activation",
                          allocation="global", progress=False)
  assert res.config.layer_hidden_dims is not None               # per-layer widths
  # In float64, so that what is compared is the compaction, not float32 rounding through 30 blocks (in float32
  # the two differ by ~4e-4 on logits of ~20, from summing a different number of zeros).
  with jax.enable_x64(True):
    f64 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)
    a, b = _logits(res.config, f64(res.params), toks), _logits(cfg, f64(res.masked_params), toks)
  assert a.dtype == np.float64
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
  assert 0.19 <= res.info["removed_fraction_of_blocks"] <= 0.21


# ----------------------------------------------------------------------------------------------- distillation
def test_distillation_lowers_the_loss_resumes_bit_identically_and_refuses_other_runs(tiny, tmp_path):
  params, calib = tiny
  res = width.prune_width(CFG, params, calib, mlp=0.5, progress=False)
  train = np.random.default_rng(1).integers(0, CFG.vocab_size, (16, 16)).astype(np.int32)
  kw = dict(steps=30, batch_size=4, lr=3e-3, warmup=2, log_every=1, save_every=5, progress=False)
  full = distill.distill(res.config, res.params, CFG, params, train, **kw)
  from jprune.recover import distillation_loss

  def kl(p):  # over every training window, against the dense teacher
    s, t = _logits(res.config, p, train)[:, :-1], _logits(CFG, params, train)[:, :-1]
    return float(distillation_loss(jnp.asarray(s.reshape(-1, 64)), jnp.asarray(t.reshape(-1, 64)),
                                   jnp.asarray(train[:, 1:].reshape(-1)), temperature=1.0, alpha=0.0))
  assert kl(full.params) < 0.75 * kl(res.params), (kl(full.params), kl(res.params))
  ck = str(tmp_path / "ck")
  part = distill.distill(res.config, res.params, CFG, params, train, checkpoint_dir=ck, max_seconds=0.0, **kw)
  assert part.steps == 1                         # stopped by the time budget after one step, checkpointed
  more = distill.distill(res.config, res.params, CFG, params, train, checkpoint_dir=ck, **kw)
  assert more.resumed_from == 1 and more.steps == 30
  # the history before the interruption is kept, and the time spent counts towards the budget
  assert [(h["step"], h["loss"]) for h in more.history] == [(h["step"], h["loss"]) for h in full.history]
  assert more.seconds >= part.seconds
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(more.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(CheckpointError, match="other settings"):
    distill.distill(res.config, res.params, CFG, params, train, checkpoint_dir=ck, **dict(kw, lr=1e-3))
  with pytest.raises(CheckpointError, match="tokens"):
    distill.distill(res.config, res.params, CFG, params, train[::-1], checkpoint_dir=ck, **kw)


def test_distillation_of_a_masked_student_keeps_zeros(tiny):
  params, calib = tiny
  pr = llm.prune(CFG, params, calib, method="wanda", granularity="2:4", progress=False)
  train = np.random.default_rng(1).integers(0, CFG.vocab_size, (8, 16)).astype(np.int32)
  d = distill.distill(CFG, pr.params, CFG, params, train, steps=3, batch_size=4, masks=pr.masks, alpha=0.5,
                      progress=False)
  for w, m in zip(jax.tree.leaves(d.params), jax.tree.leaves(pr.masks)):
    assert np.all(np.asarray(w)[~np.broadcast_to(np.asarray(m), w.shape)] == 0)
  with pytest.raises(ValueError, match="batch_size"):
    distill.distill(CFG, pr.params, CFG, params, train, steps=3, batch_size=99, progress=False)
