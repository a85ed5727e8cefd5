"""Hostile use of the `jprune` command and its run folder: nothing silently reused, one line for bad input.

Regression tests for issue #12: run identity (settings and data content decide which checkpoints are reused),
data-folder precedence, the manifest window, concurrent jobs, argument validation, the `checkpoints` command,
and a property test that feeds random argument lists to `jprune`.
"""

import gzip
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jprune import checkpoint as ckpt
from jprune import cli
from jprune import data as jdata
from jprune import job

ROOT = Path(__file__).parents[1]


def write_idx(folder: Path, n_train=96, n_test=48, seed=0, label=None):
  """Fashion-MNIST-shaped IDX files (noisy class prototypes); `label` makes every label that class."""
  rng = np.random.default_rng(seed)
  protos = rng.integers(0, 256, (10, 28, 28))
  folder.mkdir(parents=True, exist_ok=True)
  for split, n in (("train", n_train), ("t10k", n_test)):
    y = (rng.integers(0, 10, n) if label is None else np.full(n, label)).astype(np.uint8)
    x = np.clip(protos[y] + rng.normal(0, 60, (n, 28, 28)), 0, 255).astype(np.uint8)
    with gzip.open(folder / f"{split}-images-idx3-ubyte.gz", "wb") as f:
      f.write(struct.pack(">HBBIII", 0, 8, 3, n, 28, 28) + x.tobytes())
    with gzip.open(folder / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
      f.write(struct.pack(">HBBI", 0, 8, 1, n) + y.tobytes())
  return folder


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  return write_idx(tmp_path_factory.mktemp("idx"))


def main(args, capsys):
  """`jprune ARGS` in this process: (exit code, stderr lines). argparse errors exit through SystemExit."""
  try:
    with jax.numpy_dtype_promotion("standard"):  # the CLI runs with JAX's default promotion
      code = cli.main([*args, "--no-progress"] if args and args[0] != "checkpoints" else args)
  except SystemExit as e:
    code = e.code
  err = capsys.readouterr().err
  return code, [l for l in err.splitlines() if l.strip()]


def one_line_error(code, lines, needle):
  assert code not in (0, None), lines
  assert len(lines) == 1 and lines[0].startswith("jprune: error:") and needle in lines[0], lines


# ------------------------------------------------------------------------------------------------ run identity
def test_other_settings_train_anew_and_same_settings_reuse(idx_dir, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  out = tmp_path / "run"
  base = ["run", "--data-dir", str(idx_dir), "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "16",
          "--limit", "160", "--sparsity", "0.5", "--out", str(out)]
  assert main(base, capsys)[0] == 0
  first = json.loads((out / "metrics.json").read_text())
  # the case: another seed and lr on the same --out must not report the old model's accuracy
  assert main(base + ["--seed", "1", "--lr", "0.01"], capsys)[0] == 0
  second = json.loads((out / "metrics.json").read_text())
  assert len(list(out.glob("dense-*"))) == 2 and len(list(out.glob("prune-*"))) == 2
  assert second["dense"] != first["dense"]          # a new dense model, not the seed-0 one reported again
  # the same settings again: everything is reused (no new folder) and the numbers are the same
  assert main(base, capsys)[0] == 0
  assert len(list(out.glob("dense-*"))) == 2
  again = json.loads((out / "metrics.json").read_text())
  assert again["dense"] == first["dense"] and again["pruned"] == first["pruned"]
  # only --epochs of fine-tuning differs: the dense model is reused, the pruned one is new
  assert main(base + ["--finetune-epochs", "2"], capsys)[0] == 0
  assert len(list(out.glob("dense-*"))) == 2 and len(list(out.glob("prune-*"))) == 3
  # other data content under the same folder name trains anew
  other = write_idx(tmp_path / "idx2", seed=1)
  assert main([*base[:2], str(other), *base[3:]], capsys)[0] == 0
  assert len(list(out.glob("dense-*"))) == 3


def test_allocation_is_keyed_by_content(idx_dir, tmp_path):
  alloc = tmp_path / "a.json"
  alloc.write_text(json.dumps({"^Dense_0/kernel$": 0.5}))
  cfg = job.RunConfig(data_dir=str(idx_dir), allocation=str(alloc), out=str(tmp_path / "o"))
  tag = cfg.prune_tag("fp")
  alloc.write_text(json.dumps({"^Dense_0/kernel$": 0.6}))
  assert cfg.prune_tag("fp") != tag
  moved = tmp_path / "b.json"
  moved.write_text(json.dumps({"^Dense_0/kernel$": 0.6}))
  assert job.RunConfig(data_dir=str(idx_dir), allocation=str(moved), out=str(tmp_path / "o")).prune_tag("fp") \
      == cfg.prune_tag("fp")


def test_resuming_a_checkpoint_of_another_identity_fails_in_one_line(tmp_path):
  from jprune import train
  d = tmp_path / "ck"
  with ckpt.Manager(d) as m:
    m.save(1, {"w": jnp.zeros(2)}, metadata={"identity": {"seed": 0}})
  ds = jdata.Dataset(np.zeros((4, 28, 28, 1), np.float32), np.zeros(4, np.int32),
                     np.zeros((4, 28, 28, 1), np.float32), np.zeros(4, np.int32), "t")
  with pytest.raises(ckpt.CheckpointError, match=r"differs in: seed\); nothing was resumed"):
    train.fit(None, {"w": jnp.zeros(2)}, None, ds, epochs=1, batch_size=2, seed=0, ckpt_dir=str(d),
              identity={"seed": 1}, progress=False)


# ------------------------------------------------------------------------------------------------ data
def test_data_dir_is_never_answered_from_another_folders_copy(idx_dir, tmp_path, monkeypatch):
  cache = str(tmp_path / "tfds")
  a = jdata.load("fashion_mnist", data_dir=str(idx_dir), cache_dir=cache)
  assert len(a.x_train) == 96
  zeros = write_idx(tmp_path / "zeros", n_train=100, n_test=10, label=0)
  b = jdata.load("fashion_mnist", data_dir=str(zeros), cache_dir=cache)
  assert len(b.x_train) == 100 and not b.y_train.any() and not b.y_test.any()
  # the environment variable is honoured the same way, and a named folder without the files is an error
  monkeypatch.setenv(jdata.ENV_DATA_DIR, str(zeros))
  assert len(jdata.load("fashion_mnist", cache_dir=cache).x_train) == 100
  monkeypatch.setenv(jdata.ENV_DATA_DIR, "/nonexistent")
  with pytest.raises(jdata.DataError, match=f"{jdata.ENV_DATA_DIR} /nonexistent: Fashion-MNIST IDX file"):
    jdata.load("fashion_mnist", cache_dir=cache)
  # an edited file under the same folder is prepared anew
  write_idx(zeros, n_train=50, n_test=10, label=3)
  monkeypatch.setenv(jdata.ENV_DATA_DIR, str(zeros))
  c = jdata.load("fashion_mnist", cache_dir=cache)
  assert len(c.x_train) == 50 and (c.y_train == 3).all()


@pytest.mark.parametrize("damage", ["cut_gz", "cut_raw", "wrong_count"])
def test_damaged_idx_files_name_the_file(tmp_path, damage):
  d = write_idx(tmp_path / "idx")
  victim = d / "train-images-idx3-ubyte.gz"
  blob = gzip.decompress(victim.read_bytes())
  if damage == "cut_gz":
    victim.write_bytes(victim.read_bytes()[:-100])
  elif damage == "cut_raw":
    victim.unlink()
    (d / "train-images-idx3-ubyte").write_bytes(blob[:-28])
  else:  # a whole file whose header declares more images than it holds
    victim.write_bytes(gzip.compress(blob[:4] + struct.pack(">I", 97) + blob[8:]))
  with pytest.raises(jdata.DataError, match="train-images-idx3-ubyte"):
    jdata.load("fashion_mnist", data_dir=str(d), cache_dir=str(tmp_path / "tfds"))


def test_unknown_dataset_is_one_line(tmp_path, capsys):
  code, lines = main(["run", "--dataset", "no_such_dataset", "--out", str(tmp_path / "o")], capsys)
  one_line_error(code, lines, "unknown dataset 'no_such_dataset'")


# ------------------------------------------------------------------------------------------------ checkpoints
def test_kill_between_commit_and_manifest_does_not_block_the_step(tmp_path, monkeypatch):
  d = tmp_path / "ck"
  real = ckpt._atomic_write
  calls = []

  def dies_once(path, data):
    calls.append(path)
    if len(calls) == 1:
      raise KeyboardInterrupt  # what a kill in the window leaves: orbax's step committed, no manifest
    return real(path, data)

  monkeypatch.setattr(ckpt, "_atomic_write", dies_once)
  m = ckpt.Manager(d)
  with pytest.raises(KeyboardInterrupt):
    m.save(400, {"w": jnp.arange(3.0)})
  assert (d / "400").is_dir() and not (d / "400" / ckpt.MANIFEST).exists()
  m2 = ckpt.Manager(d)  # the rerun
  assert m2.all_steps() == [] and m2.inspect() == [(400, "incomplete")]
  assert m2.save(400, {"w": jnp.arange(3.0) + 1})
  np.testing.assert_array_equal(m2.restore(like={"w": jnp.zeros(3)})["w"], [1.0, 2.0, 3.0])
  assert m2.inspect() == [(400, "ok")]
  m2.close()


@pytest.mark.parametrize("manifest", ["{}", "null", "[1, 2]", '{"step": 1, "files": 3, "tree": []}'])
def test_malformed_manifest_is_a_checkpoint_error(tmp_path, manifest):
  d = tmp_path / "ck"
  with ckpt.Manager(d) as m:
    m.save(1, {"w": jnp.zeros(2)})
  (d / "1" / ckpt.MANIFEST).write_text(manifest)
  with ckpt.Manager(d) as m, pytest.raises(ckpt.CheckpointError, match="not a jprune manifest"):
    m.restore(like={"w": jnp.zeros(2)})


def test_checkpoints_command_lists_verifies_and_sets_aside(tmp_path, capsys):
  d = tmp_path / "run" / "dense-abc"
  with ckpt.Manager(d) as m:
    for step in (1, 2, 3):
      m.save(step, {"w": jnp.full(4, float(step))})
  data = max((d / "3" / "state").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else -1)
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  data.write_bytes(bytes(raw))
  with ckpt.Manager(d) as m, pytest.raises(ckpt.CheckpointError, match=r"--keep-up-to 2") as e:
    m.restore(like={"w": jnp.zeros(4)})
  assert f"jprune checkpoints {d}" in str(e.value)
  code, _ = main(["checkpoints", str(tmp_path / "run")], capsys)
  assert code == 0
  code, lines = main(["checkpoints", str(d), "--keep-up-to", "2"], capsys)
  assert code == 0 and not lines
  with ckpt.Manager(d) as m:
    assert m.all_steps() == [1, 2]
    np.testing.assert_array_equal(m.restore(like={"w": jnp.zeros(4)})["w"], [2.0] * 4)
  assert (tmp_path / "run" / "dense-abc.set-aside" / "3").is_dir()  # set aside, not deleted
  one_line_error(*main(["checkpoints", str(d), "--keep-up-to", "7"], capsys), "step 7 is not a complete")
  one_line_error(*main(["checkpoints", str(tmp_path / "nope")], capsys), "is not a folder")


def test_checkpoints_command_output(tmp_path, capsys):
  d = tmp_path / "ck"
  with ckpt.Manager(d) as m:
    m.save(5, {"w": jnp.zeros(2)})
  (d / "9").mkdir()  # a step folder orbax never finished
  assert cli.main(["checkpoints", str(d)]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[1].split() == ["5", "ok"] and out[2].split() == ["9", "incomplete"]


# ------------------------------------------------------------------------------------------------ concurrency
def test_a_second_job_on_the_same_out_fails_at_once(idx_dir, tmp_path, capsys):
  out = tmp_path / "o"
  out.mkdir()
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys; from jprune import job\nwith job._locked(sys.argv[1]):\n"
       " print('held', flush=True); sys.stdin.read()", str(out)],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  try:
    assert holder.stdout.readline().strip() == "held"
    code, lines = main(["run", "--data-dir", str(idx_dir), "--out", str(out)], capsys)
    one_line_error(code, lines, f"--out {out} is in use by another jprune job (pid {holder.pid})")
    assert not list(out.glob("dense-*"))
  finally:
    holder.stdin.close()
    holder.wait(timeout=30)
  with job._locked(str(out)):   # released when the holder ends
    pass


# ------------------------------------------------------------------------------------------------ validation
def _bad(tmp):
  (tmp / "afile").write_text("x")
  return [
      (["--batch-size", "0"], "--batch-size must be >= 1"),
      (["--batch-size", "-5"], "--batch-size must be >= 1"),
      (["--save-every", "0"], "--save-every must be >= 1"),
      (["--limit", "0"], "--limit must be >= 1"),
      (["--limit", "-5"], "--limit must be >= 1"),
      (["--lr", "nan"], "--lr must be a positive number"),
      (["--finetune-epochs", "0"], "would prune nothing"),
      (["--allocation", str(tmp / "missing.json")], "cannot be read"),
      (["--allocation", str(tmp / "afile")], "not JSON"),
      (["--out", str(tmp / "afile")], "is a file, not a folder"),
      (["--out", str(tmp / "afile" / "sub")], "is a file, not a folder"),
      (["--batch-size", "100000", "--data-dir", "IDX"], "larger than the 96 training examples"),
  ]


@pytest.mark.parametrize("case", range(12))
def test_bad_run_arguments_are_one_line(idx_dir, tmp_path, capsys, monkeypatch, case):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  args, needle = _bad(tmp_path)[case]
  args = [str(idx_dir) if a == "IDX" else a for a in args]
  if "--out" not in args:
    args = args + ["--out", str(tmp_path / "o")]
  if "--data-dir" not in args:
    args = args + ["--data-dir", str(idx_dir)]
  one_line_error(*main(["run", *args], capsys), needle)


# ------------------------------------------------------------------------------------------------ property test
# each option's values: the first `GOOD[opt]` are valid together, the rest hostile
OPTIONS = {
    "--sparsity": ["0.5", "0", "0.95", "1", "1.2", "-0.1", "nan", "abc"],
    "--batch-size": ["16", "32", "0", "-5", "100000", "x"],
    "--limit": ["32", "40", "1", "0", "-5"],
    "--epochs": ["0", "1", "-1"],
    "--finetune-epochs": ["1", "0", "-2"],
    "--schedule": ["one-shot", "polynomial", "iterative", "bogus"],
    "--criterion": ["magnitude", "random", "taylor", "bogus"],
    "--scope": ["global", "layer", "everywhere"],
    "--granularity": ["unstructured", "2:4", "blocks2x2", "3:2", "0:0", "blocks0x2", "blocks"],
    "--distribution": ["uniform", "erk", "nope"],
    "--save-every": ["1", "7", "0", "-3"],
    "--lr": ["0.01", "nan", "-1", "inf"],
    "--seed": ["0", "3", "x"],
    "--model": ["lenet300", "lenet5", "bogus"],
    "--dataset": ["fashion_mnist", "no_such_dataset"],
    "--allocation": ["alloc.json", "missing.json", "afile"],
    "--data-dir": ["IDX", "/nonexistent", "CUT"],
    "--calib-batches": ["1", "2", "0"],
}
GOOD = {"--sparsity": 3, "--batch-size": 2, "--limit": 2, "--epochs": 2, "--finetune-epochs": 1, "--schedule": 3,
        "--criterion": 3, "--scope": 2, "--granularity": 3, "--distribution": 2, "--save-every": 2, "--lr": 1,
        "--seed": 2, "--model": 2, "--dataset": 1, "--allocation": 1, "--data-dir": 1, "--calib-batches": 2}
FLAGS = ["--distill", "--compact", "--frobnicate"]


@st.composite
def argv(draw):
  """A quarter of the lists use valid values only (so real jobs run), the rest anything."""
  hostile = draw(st.integers(0, 3)) > 0
  command = draw(st.sampled_from(["run", "run", "run", "sweep", "sensitivity"] + (["frobnicate"] if hostile else [])))
  args = [command]
  for opt in draw(st.lists(st.sampled_from(sorted(OPTIONS)), max_size=4, unique=True)):
    values = OPTIONS[opt] if hostile else OPTIONS[opt][:GOOD[opt]]
    args += [opt, draw(st.sampled_from(values))]
  args += draw(st.lists(st.sampled_from(FLAGS if hostile else FLAGS[:1]), max_size=1))
  args += ["--out", draw(st.sampled_from(["out", "out/sub", "afile", "afile/sub"] if hostile else ["out", "o/s"]))]
  return args


OUTCOMES = []


def _files(root: Path) -> set:
  return {p.relative_to(root) for p in root.rglob("*") if p.is_file()}


@hypothesis.settings(max_examples=8, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture,
                                            hypothesis.HealthCheck.too_slow])
@hypothesis.given(args=argv())
def test_random_argument_lists(args, monkeypatch, capsys):
  """Any argument list: exit 0, or one `jprune: error:` line and a non-zero code; never a traceback (an
  exception out of `cli.main`); nothing written outside --out and the tfds cache."""
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    idx = write_idx(tmp / "idx", n_train=48, n_test=16)
    cut = write_idx(tmp / "cut", n_train=48, n_test=16)
    (cut / "t10k-labels-idx1-ubyte.gz").write_bytes((cut / "t10k-labels-idx1-ubyte.gz").read_bytes()[:20])
    (tmp / "afile").write_text("not a folder")
    (tmp / "alloc.json").write_text(json.dumps({"^Dense_0/kernel$": 0.5}))
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp / "tfds"))
    monkeypatch.delenv(jdata.ENV_DATA_DIR, raising=False)
    args = [{"IDX": str(idx), "CUT": str(cut)}.get(a, a) for a in args]
    if "--data-dir" not in args and "--dataset" not in args:
      args += ["--data-dir", str(idx)]
    if "--epochs" not in args:
      args += ["--epochs", "1"]
    if "--finetune-epochs" not in args:
      args += ["--finetune-epochs", "1"]
    if "--limit" not in args:
      args += ["--limit", "32"]
    if "--batch-size" not in args:
      args += ["--batch-size", "16"]
    if args[0] == "sweep":
      args += ["--criteria", "magnitude", "--sparsities", "0.5"]
    if args[0] == "sensitivity":
      args += ["--grid", "0.5"]
    before = _files(tmp)
    code, lines = main(args, capsys)
    OUTCOMES.append(code)
    if code != 0:
      assert code is not None and len(lines) == 1 and lines[0].startswith("jprune: error:"), (args, lines)
    out = args[args.index("--out") + 1]
    new = {p for p in _files(tmp) - before if p.parts[0] not in ("tfds",) and not str(p).startswith(out + "/")}
    assert not new, (args, sorted(map(str, new)))


def test_random_argument_lists_ran_real_jobs():
  """The property test above exercised both sides: some lists ran a whole job, some were refused."""
  if not OUTCOMES:
    pytest.skip("the property test did not run in this session")
  assert OUTCOMES.count(0) >= 1 and len(OUTCOMES) - OUTCOMES.count(0) >= 5, OUTCOMES
