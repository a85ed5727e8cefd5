"""Several JAX processes (JAX's own distributed runtime, gloo collectives on CPU) give the one-process results.

Two processes with 4 host devices each form one 8-device mesh; a single process with 8 forced host devices is the
reference. Both run the same script: `pruned(adamw)` training with the batch data-parallel and the params
FSDP-sharded, and top-k masks (global, layer, N:M, neurons) on leaves sharded across the processes. Process 0
gathers the results and writes them. Masks and top-k results equal the one-process run bit for bit; the trained
floats equal it to the last bit of float32 (the two runtimes all-reduce gradients in different orders), and
two 2-process runs are bit-identical. `llm.prune` (Wanda; SparseGPT 2:4) on a tiny Llama whose block kernels are
sharded over both processes gives the one-process masks bit for bit (which equal the unsharded one-device masks) (and Wanda's weights; SparseGPT's updated
weights to float32 rounding). An orbax checkpoint written by two processes is restored by one process,
and one written by one process is restored by two, bit for bit.
"""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from conftest import xla_flags


ROOT = Path(__file__).parents[1]

SCRIPT = textwrap.dedent("""
import os, sys
n_proc, pid, port, out, ck_in, ck_out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
mode = sys.argv[7]   # full: everything; train: training and checkpoints only; restore: only restore ck_in
import jax
if n_proc > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=n_proc, process_id=pid)
import jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.experimental import multihost_utils
import jprune as jp
from jprune import checkpoint as ckpt
assert jax.device_count() == 8 and jax.process_count() == n_proc, (jax.devices(), jax.process_count())
from jax.sharding import AxisType
mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))

def put(x, spec):   # a global array from the same host data in every process (each keeps its own shards)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda idx: x[idx])

def gather(tree):
  return jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), tree)

rng = np.random.default_rng(0)
host = {"Dense_0": {"kernel": rng.standard_normal((64, 128)).astype(np.float32) * 0.1,
                    "bias": np.zeros(128, np.float32)},
        "Dense_1": {"kernel": rng.standard_normal((128, 16)).astype(np.float32) * 0.1}}
specs = {"Dense_0": {"kernel": P("data", "model"), "bias": P("model")}, "Dense_1": {"kernel": P("model", "data")}}
params = jax.tree.map(put, host, specs)
xs = rng.standard_normal((6, 32, 64)).astype(np.float32)
ys = rng.integers(0, 16, (6, 32)).astype(np.int32)

def loss_fn(p, x, y):
  h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  return optax.softmax_cross_entropy_with_integer_labels(h @ p["Dense_1"]["kernel"], y).mean()

tx = jp.pruned(optax.adamw(1e-2), schedule=jp.polynomial(final=0.75, begin=0, end=4, every=2), scope="global")

@jax.jit
def step(p, s, x, y):
  g = jax.grad(loss_fn)(p, x, y)
  u, s = tx.update(g, s, p)
  return optax.apply_updates(p, u), s

result = {}
if mode != "restore":
  state = jax.jit(tx.init)(params)
  for i in range(len(xs)):
    params, state = step(params, state, put(xs[i], P("data")), put(ys[i], P("data")))
  result = {"params": gather(params), "masks": gather(jp.masks_of(state))}
# unstructured at both scopes; N:M (per group: scope plays no part) and neurons at one each
for scope, name, gran in (("layer", "unstructured", jp.unstructured()), ("global", "unstructured", jp.unstructured()),
                          ("layer", "2:4", jp.nm(2, 4)), ("global", "neurons", jp.neurons())) if mode == "full" else ():
  m = jax.jit(lambda p: jp.topk(jp.scores(jp.magnitude(), p), 0.6, scope=scope, granularity=gran))(params)
  result[f"topk-{scope}-{name}"] = gather(m)

# llm.prune (Wanda, SparseGPT 2:4) on a tiny Llama whose block kernels are sharded over both processes
from jprune import llm
from jprune.models import Llama, LlamaConfig
lcfg = LlamaConfig.tiny(dim=64, hidden_dim=128, n_heads=8, n_kv_heads=4, vocab_size=64)
lhost = jax.tree.map(np.asarray, jax.jit(Llama(lcfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
lspec = lambda p, x: P(None, "model") if x.ndim == 2 and "layers_" in jax.tree_util.keystr(p) else P()
lparams = jax.tree_util.tree_map_with_path(lambda p, x: put(x, lspec(p, x)), lhost)
calib = rng.integers(0, 64, (8, 16)).astype(np.int32)
for method, gran in (("wanda", None), ("sparsegpt", "2:4")) if mode == "full" else ():
  res = llm.prune(lcfg, lparams, calib, method=method, granularity=gran, progress=False)
  q = res.params["layers_1"]["mlp"]["up_proj"]["kernel"]
  assert len(q.sharding.device_set) == 8 and not q.is_fully_addressable or n_proc == 1, q.sharding
  result[f"llm-{method}"] = gather({"masks": res.masks, "params": res.params})
  if n_proc == 1:   # and sharded over 8 devices == on one device, unsharded
    one = llm.prune(lcfg, lhost, calib, method=method, granularity=gran, progress=False)
    for x, y in zip(jax.tree.leaves(one.masks), jax.tree.leaves(result[f"llm-{method}"]["masks"])):
      np.testing.assert_array_equal(np.asarray(x), y)

# orbax through jprune.checkpoint.Manager: every process writes its shards, any process count restores
if ck_out != "-":
  with ckpt.Manager(ck_out) as m:
    m.save(1, {"params": params}, force=True)
if ck_in != "-":
  with ckpt.Manager(ck_in) as m:
    restored = m.restore(m.latest_step(), like={"params": params})["params"]
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
    assert a.sharding == b.sharding, (a.sharding, b.sharding)
  result["restored"] = gather(restored)
if pid == 0:
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(result)[0]}
  np.savez(out, **flat)
print("MP-OK", pid, flush=True)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(n_proc, out, ck_in, ck_out, mode="full"):
  devices = 8 // n_proc
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu",
             PYTHONPATH=str(ROOT))
  port = str(_free_port())
  return [subprocess.Popen([sys.executable, "-c", SCRIPT, str(n_proc), str(i), port, str(out), str(ck_in),
                            str(ck_out), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
          for i in range(n_proc)]


def _wait(procs):
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (so, se) in zip(procs, outs):
    assert p.returncode == 0, se[-4000:]
    assert "MP-OK" in so


def test_two_processes_match_one_process_and_repeat_bit_for_bit(tmp_path):
  one, two = tmp_path / "one.npz", tmp_path / "two.npz"
  # side by side (most of each run is compiling, one core each): one process x 8 devices, the reference, and
  # two processes x 4 devices; each saves a checkpoint
  runs = _start(1, one, "-", tmp_path / "ck1") + _start(2, two, "-", tmp_path / "ck2")
  _wait(runs)
  # then, side by side: two processes restore the 1-process save and train again; one process restores the
  # 2-process save
  runs = _start(2, tmp_path / "again.npz", tmp_path / "ck1", "-", "train")
  runs += _start(1, tmp_path / "back.npz", tmp_path / "ck2", "-", "restore")
  _wait(runs)
  a, b, back = np.load(one), np.load(two), np.load(tmp_path / "back.npz")
  again = np.load(tmp_path / "again.npz")
  assert set(b.files) == set(a.files)
  for k in a.files:
    if k.startswith("['llm-sparsegpt']['params']"):   # the OBS update divides by Cholesky factors: ~1e-5
      np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
    elif k.startswith("['params']"):
      # XLA's in-process all-reduce and gloo sum the 4 data-parallel partial gradients in different orders,
      # so trained floats may differ in the last bit; everything decided from them below is identical. (Likewise
      # SparseGPT's updated weights: its Hessians are sums over the sharded activations.)
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)
    else:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)           # masks and top-k: bit for bit
  restored = [k for k in again.files if k.startswith("['restored']")]
  assert restored and {k for k in back.files} == set(restored)
  for k in restored:
    p = k.replace("['restored']", "['params']")
    np.testing.assert_array_equal(again[k], a[p], err_msg=k)        # 2 processes restored the 1-process save
    np.testing.assert_array_equal(back[k], b[p], err_msg=k)         # 1 process restored the 2-process save
  masks = [a[k] for k in a.files if k.startswith("['masks']")]
  kept = sum(int(m.sum()) for m in masks) / sum(m.size for m in masks)
  assert abs(kept - 0.25) < 0.01                                    # the schedule reached 75% (global scope)
  assert {k.split("]")[0] for k in a.files} >= {"['topk-layer-unstructured'", "['topk-global-unstructured'",
                                                "['topk-layer-2:4'", "['topk-global-neurons'", "['llm-wanda'",
                                                "['llm-sparsegpt'"}
  llm_masks = [a[k] for k in a.files if k.startswith("['llm-wanda']['masks']") and a[k].ndim == 2]
  assert len(llm_masks) == 14 and abs(np.mean([m.mean() for m in llm_masks]) - 0.5) < 0.01   # Wanda 50% pruned

  # and the second 2-process training run repeats the first bit for bit
  trained = {k for k in again.files if k.startswith(("['masks']", "['params']"))}
  assert trained == {k for k in b.files if k.startswith(("['masks']", "['params']"))}
  for k in trained:
    np.testing.assert_array_equal(again[k], b[k], err_msg=k)


def test_jprune_run_on_two_processes_matches_one(tmp_path, capsys):
  """`jprune run --distributed`: two processes train data-parallel (each batch split over the 4 devices of both),
  process 0 alone writes the reports, and the result is the one-process run's (to float32 rounding of the
  all-reduced gradients; the exact top-k keeps the same counts)."""
  import json
  import jax
  from test_cli import write_idx
  from jprune import cli
  idx = write_idx(tmp_path / "idx", n_train=256, n_test=128)
  args = ["run", "--data-dir", str(idx), "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "32",
          "--sparsity", "0.8", "--save-every", "3", "--no-progress"]
  env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu",
             PYTHONPATH=str(ROOT), TFDS_DATA_DIR=str(tmp_path / "tfds"), JPRUNE_NO_PROGRESS="1")
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, "-m", "jprune.cli", *args, "--out", str(tmp_path / "two"),
                             "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                             "--process-id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env) for i in range(2)]
  # meanwhile the one-process reference, in this process
  os.environ["TFDS_DATA_DIR"] = str(tmp_path / "tfds1")
  try:
    with jax.numpy_dtype_promotion("standard"):
      assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0, capsys.readouterr().err[-3000:]
  finally:
    os.environ.pop("TFDS_DATA_DIR")
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (so, se) in zip(procs, outs):
    assert p.returncode == 0, se[-4000:]
  assert "report:" in outs[0][0] and "report:" not in outs[1][0]      # process 0 reports, process 1 is quiet
  a = json.loads((tmp_path / "one" / "metrics.json").read_text())
  b = json.loads((tmp_path / "two" / "metrics.json").read_text())
  for phase in ("dense", "pruned"):
    assert a[phase]["top1"] == b[phase]["top1"]
    np.testing.assert_allclose(a[phase]["loss"], b[phase]["loss"], rtol=1e-4)
  la = [h["train_loss"] for h in a["history"]["dense"] + a["history"]["finetune"]]
  lb = [h["train_loss"] for h in b["history"]["dense"] + b["history"]["finetune"]]
  np.testing.assert_allclose(la, lb, rtol=1e-4)
  assert a["sparsity"] == b["sparsity"] and abs(a["sparsity"] - 0.8) < 0.01
  assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))   # reports once, no lock clash
