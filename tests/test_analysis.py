"""`jprune.analysis`: per-layer sensitivity, allocation and sweeps on any model, against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jprune as jp
from jprune import analysis as A


def _mlp():
  rng = np.random.default_rng(0)
  params = {"Dense_0": {"kernel": jnp.asarray(rng.standard_normal((8, 16)), jnp.float32),
                        "bias": jnp.zeros(16, jnp.float32)},
            "Dense_1": {"kernel": jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)}}
  x = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
  y = jnp.argmax(jax.nn.relu(x @ params["Dense_0"]["kernel"]) @ params["Dense_1"]["kernel"], -1)

  @jax.jit
  def logits(p):
    return jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"][None]) @ p["Dense_1"]["kernel"]

  def accuracy(p):
    return float(jnp.mean(jnp.argmax(logits(p), -1) == y))
  return params, accuracy


def _numpy_prune(w, s):
  """Zeroes the round(s·n) smallest |w| of one array (numpy's stable argsort; no ties here)."""
  w = np.asarray(w)
  k = int(round(s * w.size))
  out = w.reshape(-1).copy()
  out[np.argsort(np.abs(out), kind="stable")[:k]] = 0
  return out.reshape(w.shape)


def test_layer_sensitivity_prunes_one_layer_at_a_time():
  params, accuracy = _mlp()
  grid = (0.25, 0.5, 0.9)
  seen = []
  sens = A.layer_sensitivity(params, jp.scores(jp.magnitude(), params), lambda p: seen.append(p) or accuracy(p),
                             grid)
  assert sens.baseline == 1.0 and sens.grid == grid and set(sens.metric) == {"Dense_0/kernel", "Dense_1/kernel"}
  assert sens.sizes == {"Dense_0/kernel": 128, "Dense_1/kernel": 64}
  assert len(seen) == 1 + 2 * len(grid)
  for name in ("Dense_0", "Dense_1"):
    for s, got in zip(grid, sens.metric[f"{name}/kernel"]):
      ref = jax.tree.map(np.asarray, params)
      ref[name]["kernel"] = _numpy_prune(ref[name]["kernel"], s)      # only this layer pruned
      assert got == accuracy(ref), (name, s)
  # every evaluated tree has exactly one layer pruned, the other untouched
  for p in seen[1:]:
    zeros = [int(np.sum(np.asarray(p[n]["kernel"]) == 0)) for n in ("Dense_0", "Dense_1")]
    assert sorted(z > 0 for z in zeros) == [False, True]
  assert sens.metric["Dense_1/kernel"][-1] < 1.0     # 90% of the output layer costs accuracy
  # the allocation feeds jp.by_path: top-k then prunes each layer to its allocated sparsity
  alloc = A.allocate(sens, 0.5)
  masks = jp.topk(jp.scores(jp.magnitude(), params), jp.by_path(alloc))
  for name, n in (("Dense_0", 128), ("Dense_1", 64)):
    assert int(np.sum(~np.asarray(masks[name]["kernel"]))) == round(alloc[f"^{name}/kernel$"] * n)
  assert float(jp.sparsity(masks, params)) >= 0.5


def test_allocate_spends_the_target_where_it_costs_least():
  sizes = {"a": 100, "b": 300, "c": 600}
  # accuracy with only this layer pruned to 0.5 / 0.8: c is cheap, b moderate, a expensive
  sens = A.Sensitivity(0.9, (0.5, 0.8), {"a": [0.5, 0.1], "b": [0.88, 0.8], "c": [0.899, 0.89]}, sizes, True)
  alloc = A.allocate(sens, 0.5)
  # cost per weight: c 0.5→ (0.001/300), then c 0.8 (0.009/180); b 0.5 (0.02/150) ...
  assert alloc == {"^a$": 0.0, "^b$": 0.5, "^c$": 0.8}
  reached = sum(alloc["^" + l + "$"] * n for l, n in sizes.items()) / sum(sizes.values())
  assert reached >= 0.5
  assert A.allocate(sens, 0.2) == {"^a$": 0.0, "^b$": 0.0, "^c$": 0.5}
  # a loss (lower is better) read the other way round: the layer whose loss grows least goes first
  loss = A.Sensitivity(1.0, (0.5,), {"a": [1.1], "b": [3.0]}, {"a": 10, "b": 10}, False)
  assert A.allocate(loss, 0.25) == {"^a$": 0.5, "^b$": 0.0}
  # the grid's top is not enough: every layer at 0.5 falls short of 0.9 (the result says so by its sum)
  assert A.allocate(loss, 0.9) == {"^a$": 0.5, "^b$": 0.5}
  # paths with regex characters are escaped, so by_path selects exactly that leaf
  odd = A.Sensitivity(1.0, (0.5,), {"blocks[0]/kernel": [0.9]}, {"blocks[0]/kernel": 4}, True)
  assert A.allocate(odd, 0.5) == {r"^blocks\[0\]/kernel$": 0.5}
  with pytest.raises(ValueError, match="target"):
    A.allocate(sens, 1.5)


def test_sweep_grid_finetune_reuse_and_plots(tmp_path):
  params, accuracy = _mlp()
  calls, tuned = [], []

  def evaluate(p):
    calls.append(1)
    return {"top1": accuracy(p), "other": 0.0}

  def finetune(p, masks):        # sees the pruned params and their masks
    tuned.append(float(jp.sparsity(masks, p)))
    for a, m in zip(jax.tree.leaves(p), jax.tree.leaves(masks)):
      assert not np.any(np.asarray(a)[~np.broadcast_to(np.asarray(m), a.shape)])
    return p

  stored = {}
  res = A.sweep(params, evaluate, ["magnitude", "random"], [0.5, 0.9], finetune=finetune, metric="top1",
                on_cell=lambda cell, v: stored.__setitem__(cell, v))
  assert res.criteria == ("magnitude", "random") and res.sparsities == (0.5, 0.9)
  assert set(res.cells) == set(stored) == {(c, s) for c in ("magnitude", "random") for s in (0.5, 0.9)}
  assert len(calls) == 5 and len(tuned) == 4
  for (c, s), cell in res.cells.items():
    assert cell["reached"] == pytest.approx(round(s * 192) / 192, abs=1e-6)   # global over both kernels: exact count
    ref = jp.apply(params, jp.topk(jp.scores(A._criterion(c)[1], params), s, scope="global"))
    assert cell["metric"] == accuracy(ref) == cell["eval"]["top1"]
  assert res.cells["magnitude", 0.5]["metric"] >= res.cells["random", 0.5]["metric"]
  # cells given as done are not recomputed
  calls.clear()
  again = A.sweep(params, evaluate, ["magnitude", "random"], [0.5, 0.9], metric="top1", done=stored)
  assert len(calls) == 1 and again.cells == res.cells
  # plots and a table
  for path in (A.plot_sweep(res, str(tmp_path / "sweep.png")),
               A.plot_sensitivity(A.layer_sensitivity(params, jp.scores(jp.magnitude(), params), accuracy, (0.5,)),
                                  str(tmp_path / "sens.png"))):
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert A.table(res).splitlines()[0] == "| criterion | 50% | 90% |"
  # bad input: one clear error each
  with pytest.raises(ValueError, match="metric="):
    A.sweep(params, evaluate, ["magnitude"], [0.5])
  with pytest.raises(ValueError, match="unknown criterion 'l1'"):
    A.sweep(params, accuracy, ["l1"], [0.5])
  with pytest.raises(ValueError, match="sparsities must be in"):
    A.sweep(params, accuracy, ["magnitude"], [1.0])
  with pytest.raises(ValueError, match="N:M"):
    A.layer_sensitivity(params, params, accuracy, (0.5,), granularity="2:4")


def test_sensitivity_takes_an_nnx_state_and_evaluates_states():
  from flax import nnx
  model = nnx.Sequential(nnx.Linear(6, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
  x = jax.random.normal(jax.random.key(0), (16, 6))
  graphdef, state = nnx.split(model, nnx.Param)
  ref_out = model(x)

  def evaluate(st):
    assert isinstance(st, nnx.State)
    return float(jnp.mean(jnp.abs(nnx.merge(graphdef, st)(x) - ref_out)))   # distance from the unpruned outputs
  sens = A.layer_sensitivity(state, jp.scores(jp.magnitude(), state), evaluate, (0.5, 0.9), higher_is_better=False)
  assert sens.baseline == 0.0 and set(sens.metric) == {"layers/0/kernel", "layers/2/kernel"}
  assert all(0 < a < b for a, b in sens.metric.values())
  # scores and topk take the State as it comes and give States back
  masks = jp.topk(jp.scores(jp.magnitude(), state), 0.5)
  assert isinstance(masks, nnx.State) and float(jp.sparsity(masks, state)) == 0.5
