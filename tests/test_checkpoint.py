"""Orbax checkpoints: bit-identical resume in a fresh process, SIGKILL mid-save, corruption, linen/nnx/
inject_hyperparams round-trips, sharded restore; compressed sparse export round-trips exactly."""

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jprune as jp
from conftest import xla_flags

JOB = str(Path(__file__).with_name("_resume_job.py"))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).parents[1]))


def _run(*args, timeout=300):
  out = subprocess.run([sys.executable, JOB, *args], capture_output=True, text=True, env=ENV, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def _load(path):
  with open(path, "rb") as f:
    return pickle.load(f)


def _assert_identical(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  d = tmp_path_factory.mktemp("full")
  _run("--dir", str(d / "ck"), "--out", str(d / "final.pkl"))
  return _load(d / "final.pkl")


@pytest.mark.parametrize("k", [10, 12])  # 10: inside a mask-update interval; 12: exactly on a mask update
def test_resume_in_fresh_process_is_bit_identical(tmp_path, uninterrupted, k):
  ck = str(tmp_path / "ck")
  _run("--dir", ck, "--until", str(k), "--save-at", str(k))
  _run("--dir", ck, "--out", str(tmp_path / "resumed.pkl"))  # a fresh process restores k and continues
  _assert_identical(_load(tmp_path / "resumed.pkl"), uninterrupted)


def test_sigkill_while_saving_leaves_a_restorable_run(tmp_path, uninterrupted):
  ck = tmp_path / "ck"
  # a 48 MB extra leaf makes each save slow enough to be killed in the middle of writing
  proc = subprocess.Popen([sys.executable, JOB, "--dir", str(ck), "--save-every", "4", "--big", "12288"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
  seen = []
  for line in proc.stdout:
    seen.append(line.strip())
    if line.startswith("saving 12"):
      time.sleep(0.05)
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, seen
  steps = jp.checkpoint.Manager(ck).all_steps()
  assert steps and max(steps) in (8, 12), steps
  # the big leaf changes the loss, so compare against an uninterrupted big run from the same checkpoint dir
  _run("--dir", str(ck), "--big", "12288", "--out", str(tmp_path / "resumed.pkl"))
  full_dir = tmp_path / "full"
  _run("--dir", str(full_dir), "--big", "12288", "--out", str(tmp_path / "full.pkl"))
  _assert_identical(_load(tmp_path / "resumed.pkl"), _load(tmp_path / "full.pkl"))


def _small_state():
  params = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4)}
  tx = jp.pruned(optax.adam(0.1), schedule=jp.constant(0.5), where="w")
  return {"params": params, "opt": tx.init(params)}


def _saved(tmp_path, steps=(1, 2)):
  """A small state saved at `steps`; returns (state, manager)."""
  state = _small_state()
  mngr = jp.checkpoint.Manager(tmp_path)
  for step in steps:
    mngr.save(step, state)
  return state, mngr


def test_corruption_is_detected_and_previous_step_restores(tmp_path):
  state, mngr = _saved(tmp_path)
  files = [p for p in (tmp_path / "2").rglob("*") if p.is_file() and p.name != jp.checkpoint.MANIFEST]
  biggest = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(biggest.read_bytes())
  data[len(data) // 2] ^= 0xFF
  biggest.write_bytes(bytes(data))
  with pytest.raises(jp.checkpoint.CheckpointError, match=r"step 2: file .* corrupted"):
    mngr.restore(2, like=state)
  restored = mngr.restore(1, like=state)
  _assert_identical(jax.device_get(restored), jax.device_get(state))
  biggest.write_bytes(bytes(data[: len(data) // 3]))  # truncated
  with pytest.raises(jp.checkpoint.CheckpointError, match="step 2"):
    mngr.restore(2, like=state)


def test_incomplete_step_is_skipped(tmp_path):
  state, mngr = _saved(tmp_path)
  (tmp_path / "2" / jp.checkpoint.MANIFEST).unlink()  # as if killed between orbax's commit and ours
  assert mngr.all_steps() == [1] and mngr.latest_step() == 1
  with pytest.raises(jp.checkpoint.CheckpointError, match="incomplete"):
    mngr.restore(2, like=state)


def test_mismatched_target_names_the_path(tmp_path):
  state, mngr = _saved(tmp_path, steps=(1,))
  wrong = dict(state, params={"w": jnp.zeros((3, 5)), "b": jnp.ones(4)})
  with pytest.raises(jp.checkpoint.CheckpointError, match=r"params/w.*\(3, 4\).*\(3, 5\)"):
    mngr.restore(1, like=wrong)
  with pytest.raises(jp.checkpoint.CheckpointError, match="first differing path"):
    mngr.restore(1, like={"params": {"v": jnp.zeros((3, 4)), "b": jnp.ones(4)}, "opt": state["opt"]})


class _Linen(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


class _Nnx(nnx.Module):
  def __init__(self, rngs):
    self.l0 = nnx.Linear(4, 8, rngs=rngs)
    self.l1 = nnx.Linear(8, 3, rngs=rngs)


@pytest.mark.parametrize("kind", ["linen", "nnx", "inject"])
def test_round_trips(tmp_path, kind):
  if kind == "nnx":
    params = nnx.as_pure(nnx.state(_Nnx(nnx.Rngs(0)), nnx.Param))
  else:
    params = _Linen().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  inner = (optax.inject_hyperparams(optax.adamw)(learning_rate=0.01, weight_decay=0.1) if kind == "inject"
           else optax.sgd(0.1, momentum=0.9))
  tx = jp.pruned(inner, criterion=jp.fisher(), schedule=jp.one_shot(at=1, sparsity=0.5))
  opt = tx.init(params)
  with jax.numpy_dtype_promotion("standard"):
    for _ in range(3):
      u, opt = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), opt, params)
      params = optax.apply_updates(params, u)
  state = {"params": params, "opt": opt, "rng": jax.random.key(3), "epoch": 2}
  with jp.checkpoint.Manager(tmp_path) as mngr:
    mngr.save(3, state, metadata={"kind": kind})
    restored = mngr.restore(like=jax.eval_shape(lambda s: s, state))
    assert mngr.metadata(3) == {"kind": kind}
  assert isinstance(restored["opt"], jp.PruneState)
  assert restored["opt"].masks["Dense_0" if kind != "nnx" else "l0"]["kernel"].dtype == jnp.bool_
  assert jax.tree.structure(restored["params"]) == jax.tree.structure(params)
  assert jnp.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  _assert_identical(jax.device_get(jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(
      x.dtype, jax.dtypes.prng_key) else x, restored)), jax.device_get(jax.tree.map(
          lambda x: jax.random.key_data(x) if isinstance(x, jax.Array) and jnp.issubdtype(
              x.dtype, jax.dtypes.prng_key) else jnp.asarray(x), state)))


SHARDED = textwrap.dedent("""
import os, sys, tempfile
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
import jprune as jp
assert jax.device_count() == 8
mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
params = {"w": jax.device_put(jnp.arange(64.0 * 32).reshape(64, 32), NamedSharding(mesh, P("a", "b"))),
          "v": jax.device_put(jnp.arange(32.0), NamedSharding(mesh, P("b")))}
tx = jp.pruned(optax.adam(0.1), schedule=jp.constant(0.5), where="w")
state = {"params": params, "opt": tx.init(params)}
d = tempfile.mkdtemp()
with jp.checkpoint.Manager(d) as m:
  m.save(1, state)
abstract = jax.eval_shape(lambda s: s, state)
abstract = jax.tree.map(lambda a, x: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=x.sharding), abstract, state)
with jp.checkpoint.Manager(d) as m:
  r = m.restore(like=abstract)
for a, b in zip(jax.tree.leaves(r), jax.tree.leaves(state)):
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
assert len(r["params"]["w"].sharding.device_set) == 8
print("SHARDED-RESTORE-OK")
""")


def test_sharded_restore_on_8_devices():
  env = dict(ENV, XLA_FLAGS=xla_flags(8))
  out = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "SHARDED-RESTORE-OK" in out.stdout


@pytest.mark.parametrize("gran", ["unstructured", "2:4", "neurons", "blocks2x2"])
def test_export_sparse_round_trip_exact(tmp_path, gran):
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
                  "bias": jnp.asarray(rng.standard_normal(8), jnp.float32)},
            "b": {"kernel": jnp.asarray(rng.standard_normal((8, 4)), jnp.bfloat16)},
            "c": {"kernel": jnp.asarray(rng.standard_normal((4, 3, 4, 8)), jnp.float16)}}
  masks = jp.topk(jp.scores(jp.magnitude(), params), 0.5, granularity=gran)
  pruned = jp.apply(params, masks)
  size = jp.export_sparse(tmp_path / "m.jps", pruned, masks)
  assert size == (tmp_path / "m.jps").stat().st_size
  p2, m2 = jp.load_sparse(tmp_path / "m.jps", like=params)
  for x, y in zip(jax.tree.leaves(p2) + jax.tree.leaves(m2), jax.tree.leaves(pruned) + jax.tree.leaves(masks)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
  p3, _ = jp.load_sparse(tmp_path / "m.jps")
  assert p3["b"]["kernel"].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="non-zero pruned entries"):
    jp.export_sparse(tmp_path / "x.jps", params, masks)


def test_load_sparse_refuses_corrupted_or_mismatched_files(tmp_path):
  """#12: a flipped header byte must not rename a leaf; `like` must match; declared sizes are checked against
  the file before anything is allocated."""
  params = {"a": {"kernel": jnp.arange(12.0).reshape(3, 4)}, "b": {"kernel": jnp.ones((4, 2))}}
  masks = jp.topk(params, 0.5)
  path = tmp_path / "m.jps"
  jp.export_sparse(path, jp.apply(params, masks), masks)
  raw = path.read_bytes()
  i = raw.index(b'"a/kernel"') + 1
  bad = tmp_path / "flip.jps"
  bad.write_bytes(raw[:i] + b"A" + raw[i + 1:])              # a/kernel -> A/kernel
  with pytest.raises(ValueError, match="header is corrupted"):
    jp.load_sparse(bad)
  with pytest.raises(ValueError, match="does not match `like`.*'b/kernel' in the file vs None"):
    jp.load_sparse(path, like={"a": {"kernel": params["a"]["kernel"]}})
  with pytest.raises(ValueError, match=r"'b/kernel' is float32\(4, 2\) in the file but float32\(2, 4\)"):
    jp.load_sparse(path, like={"a": params["a"], "b": {"kernel": jnp.ones((2, 4))}})
  (tmp_path / "cut.jps").write_bytes(raw[:-5])
  with pytest.raises(ValueError, match="truncated"):
    jp.load_sparse(tmp_path / "cut.jps")
  # a header that declares a huge shape (re-hashed, so only the size checks can catch it)
  import hashlib, json
  n = int.from_bytes(raw[:8], "little")
  header = json.loads(raw[8:8 + n])
  header["leaves"][0]["shape"] = [1 << 20, 1 << 20]
  h = json.dumps(header).encode()
  huge = tmp_path / "huge.jps"
  huge.write_bytes(len(h).to_bytes(8, "little") + h + hashlib.sha256(h).digest() + raw[8 + n + 32:])
  with pytest.raises(ValueError, match="declares impossible sizes"):
    jp.load_sparse(huge)
  (tmp_path / "tiny.jps").write_bytes(b"\x10\x00")
  with pytest.raises(ValueError, match="not a jprune sparse export"):
    jp.load_sparse(tmp_path / "tiny.jps")
