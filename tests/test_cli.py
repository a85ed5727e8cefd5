"""The `jprune` command end to end on small generated IDX files (the real tfds builder, no network)."""

import gzip
import argparse
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jprune import data as jdata

ROOT = Path(__file__).parents[1]


def write_idx(folder: Path, n_train=640, n_test=200, seed=0):
  """Fashion-MNIST-shaped IDX files of a learnable task: each class is a noisy prototype."""
  rng = np.random.default_rng(seed)
  protos = rng.integers(0, 256, (10, 28, 28))
  folder.mkdir(parents=True, exist_ok=True)
  for split, n in (("train", n_train), ("t10k", n_test)):
    y = rng.integers(0, 10, n).astype(np.uint8)
    x = np.clip(protos[y] + rng.normal(0, 60, (n, 28, 28)), 0, 255).astype(np.uint8)
    with gzip.open(folder / f"{split}-images-idx3-ubyte.gz", "wb") as f:
      f.write(struct.pack(">HBBIII", 0, 8, 3, n, 28, 28) + x.tobytes())
    with gzip.open(folder / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
      f.write(struct.pack(">HBBI", 0, 8, 1, n) + y.tobytes())
  return folder


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  return write_idx(tmp_path_factory.mktemp("idx"))


def _env(tmp):
  return dict(os.environ, TFDS_DATA_DIR=str(tmp / "tfds"), JPRUNE_NO_PROGRESS="1", JAX_PLATFORMS="cpu",
              PYTHONPATH=str(ROOT))


def jprune(args, tmp, timeout=600, check=True):
  out = subprocess.run([sys.executable, "-m", "jprune.cli", *args], capture_output=True, text=True,
                       env=_env(tmp), timeout=timeout)
  if check:
    assert out.returncode == 0, out.stderr[-3000:]
  return out


def jprune_here(args, capsys):
  """`jprune ARGS` in this process (where a separate process is not the point: no interpreter start-up)."""
  from jprune import cli
  with jax.numpy_dtype_promotion("standard"):   # the CLI runs with JAX's default promotion
    code = cli.main([*args, "--no-progress"])
  assert code == 0, capsys.readouterr().err[-3000:]


def test_read_idx_and_builder(idx_dir, tmp_path):
  x = jdata.read_idx(idx_dir / "train-images-idx3-ubyte.gz")
  assert x.shape == (640, 28, 28) and x.dtype == np.uint8
  ds = jdata.load("fashion_mnist", data_dir=str(idx_dir), cache_dir=str(tmp_path / "tfds"))
  assert ds.x_train.shape == (640, 28, 28, 1) and ds.x_test.shape == (200, 28, 28, 1)
  assert ds.x_train.dtype == np.float32 and 0 <= ds.x_train.min() and ds.x_train.max() <= 1
  assert sorted(np.bincount(ds.y_train, minlength=10).nonzero()[0]) == list(range(10))
  # batches: deterministic per (seed, epoch), resumable at a batch index
  a = list(jdata.batches(ds.x_train, ds.y_train, 64, seed=1, epoch=2))
  b = list(jdata.batches(ds.x_train, ds.y_train, 64, seed=1, epoch=2, start=3))
  np.testing.assert_array_equal(a[3][1], b[0][1])
  assert not np.array_equal(a[0][1], list(jdata.batches(ds.x_train, ds.y_train, 64, seed=1, epoch=3))[0][1])


def test_run_end_to_end(idx_dir, tmp_path):
  out = tmp_path / "run"
  res = jprune(["run", "--data-dir", str(idx_dir), "--epochs", "2", "--finetune-epochs", "2",
                "--batch-size", "32", "--sparsity", "0.8", "--criterion", "taylor", "--out", str(out)], tmp_path)
  assert "dense top-1" in res.stdout and "Dense_0/kernel" in res.stdout
  m = json.loads((out / "metrics.json").read_text())
  assert abs(m["sparsity"] - 0.8) < 0.01
  assert m["dense"]["top1"] > 0.5 and m["pruned"]["top1"] > 0.3  # the synthetic task is learnable
  assert m["flops"]["effective"] < 0.4 * m["flops"]["dense"]
  assert set(m["robustness_top1"]) == {"0.1", "0.2", "0.3"}
  report = (out / "report.md").read_text()
  assert "| dense |" in report and "Dense_1/kernel" in report
  for png in ("sparsity.png", "curves.png", "scores.png"):
    assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra", [["--schedule", "one-shot", "--criterion", "gradient", "--scope", "global"],
                                   ["--schedule", "iterative", "--granularity", "neurons", "--distill"],
                                   ["--granularity", "2:4", "--model", "simplecnn", "--distribution", "erk"]])
def test_run_variants(idx_dir, tmp_path, extra):
  out = tmp_path / "run"
  jprune(["run", "--data-dir", str(idx_dir), "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "64",
          "--limit", "320", "--out", str(out), *extra], tmp_path)
  m = json.loads((out / "metrics.json").read_text())
  assert m["sparsity"] > 0.4


def test_killed_run_resumes_to_the_same_result(idx_dir, tmp_path, capsys):
  args = ["run", "--data-dir", str(idx_dir), "--epochs", "3", "--finetune-epochs", "1", "--batch-size", "16",
          "--limit", "320", "--save-every", "5", "--sparsity", "0.7"]
  ref = tmp_path / "ref"
  jprune_here(args + ["--out", str(ref)], capsys)      # the reference, uninterrupted (no process of its own needed)
  out = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, "-m", "jprune.cli", *args, "--out", str(out)], env=_env(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while time.time() < deadline:  # kill once a mid-training checkpoint of the dense phase is complete
    steps = list(out.glob("dense-*/*/jprune_manifest.json"))
    if steps:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert not (out / "metrics.json").exists()
  jprune(args + ["--out", str(out)], tmp_path)
  a = json.loads((ref / "metrics.json").read_text())
  b = json.loads((out / "metrics.json").read_text())
  assert a["dense"] == b["dense"] and a["pruned"] == b["pruned"]


@pytest.mark.parametrize("schedule", ["one-shot", "every"])
def test_run_by_absolute_threshold(idx_dir, tmp_path, capsys, schedule):
  """`--threshold θ`: one-shot prunes exactly the dense kernel entries with |w| < θ (counted here in numpy from
  the dense checkpoint the run trained), then fine-tunes with them held at 0; `--schedule every` prunes them at
  its first update and more as weights shrink below θ while fine-tuning (never fewer)."""
  from jprune import job
  theta = 0.02
  args = ["run", "--data-dir", str(idx_dir), "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "32",
          "--limit", "320", "--threshold", str(theta), "--schedule", schedule, "--out", str(tmp_path / "o")]
  if schedule == "every":
    args += ["--every", "3"]
  jprune_here(args, capsys)
  m = json.loads((tmp_path / "o" / "metrics.json").read_text())
  cfg = job.RunConfig(data_dir=str(idx_dir), epochs=1, finetune_epochs=1, batch_size=32, limit=320,
                      out=str(tmp_path / "o"), progress=False)
  ds = job.load_data(cfg)
  with jax.numpy_dtype_promotion("standard"):
    dense, _ = job.train_dense(cfg, ds, job.model_for(cfg, ds))   # the run's own dense checkpoint, reused
  kept = {r["path"]: r["kept"] for r in m["summary"]["leaves"]}
  for layer in ("Dense_0", "Dense_1", "Dense_2"):
    below = int(np.sum(np.abs(np.asarray(dense["params"][layer]["kernel"])) < theta))
    size = dense["params"][layer]["kernel"].size
    assert below > 0
    if schedule == "one-shot":
      assert kept[f"{layer}/kernel"] == size - below, layer
    else:
      assert kept[f"{layer}/kernel"] <= size - below, layer
  assert "pruned where the score < **0.02**" in (tmp_path / "o" / "report.md").read_text()


BAD = [
    (["run", "--threshold", "0.1"], "use --schedule one-shot"),
    (["run", "--threshold", "0.1", "--schedule", "one-shot", "--sparsity", "0.5"], "drop --sparsity"),
    (["run", "--threshold", "0.1", "--schedule", "every", "--granularity", "2:4"], "unstructured or blocks"),
    (["run", "--schedule", "every"], "give --threshold"),
    (["run", "--criterion", "saliencyx"], "unknown criterion"),
    (["run", "--sparsity", "1.2"], "sparsity must be in [0, 1)"),
    (["run", "--data-dir", "/nonexistent/fmnist"], "apt-get install dataset-fashion-mnist"),
    (["run", "--granularity", "3:2"], "0 < n <= m"),
    (["sweep", "--sparsities", "0.5,abc"], "comma-separated"),
    (["sweep", "--distributed"], "--distributed is for `jprune run`"),
]


@pytest.mark.parametrize("args,needle", BAD)
def test_bad_arguments_give_one_line(tmp_path, capsys, args, needle):
  from jprune import cli
  try:
    code = cli.main(args + ["--out", str(tmp_path / "o"), "--no-progress"])
  except SystemExit as e:  # argparse errors exit directly
    code = e.code
  err = capsys.readouterr().err
  assert code != 0
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and needle in lines[0], err


@pytest.mark.parametrize("model,gran,needle", [("lenet300", "3:5", "Dense_0/kernel (784, 300): 235,200 of the 266,200"),
                                               ("lenet5", "2:4", "Dense_0/kernel (1250, 500): 625,500 of the 655,500")])
def test_granularity_that_fits_few_kernels_is_refused_before_training(idx_dir, tmp_path, capsys, model, gran, needle):
  """N:M that does not divide most kernels' input axis would leave them dense and report the sparsity of the rest:
  refused in one line, before the dense model trains. (A small misfit, like a first conv with one input channel,
  is a note.)"""
  from jprune import cli
  with jax.numpy_dtype_promotion("standard"):
    code = cli.main(["run", "--data-dir", str(idx_dir), "--model", model, "--granularity", gran, "--limit", "64", "--batch-size", "32",
                     "--out", str(tmp_path / "o"), "--no-progress"])
  lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert code != 0 and len(lines) == 1 and lines[0].startswith("jprune: error: --granularity") and needle in lines[0]
  assert not list((tmp_path / "o").glob("dense-*"))      # nothing trained


def test_bad_arguments_in_a_real_process_have_no_traceback(tmp_path):
  res = jprune(["run", "--sparsity", "1.2", "--out", str(tmp_path / "o")], tmp_path, check=False)
  assert res.returncode != 0 and "Traceback" not in res.stderr
  assert [l for l in res.stderr.splitlines() if l.strip()] == ["jprune: error: sparsity must be in [0, 1), got 1.2."]


def test_sweep_and_sensitivity(idx_dir, tmp_path, capsys):
  out = tmp_path / "sw"
  base = ["--data-dir", str(idx_dir), "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "64",
          "--limit", "320", "--out", str(out)]
  # (the grid over several criteria: tests/test_analysis.py; here the CLI's cells, cache, plot and report)
  jprune_here(["sweep", *base, "--criterion", "magnitude", "--sparsity", "0.5"], capsys)
  cells = json.loads((out / "sweep.json").read_text())
  assert set(cells) == {"magnitude@0.5"}
  assert (out / "sweep.png").exists()
  # cached: a second sweep with one more sparsity only computes the new cell
  before = {k: v["top1"] for k, v in cells.items()}
  jprune_here(["sweep", *base, "--criteria", "magnitude", "--sparsities", "0.5,0.9"], capsys)   # older spellings
  cells = json.loads((out / "sweep.json").read_text())
  assert set(cells) == {"magnitude@0.5", "magnitude@0.9"}
  assert cells["magnitude@0.5"]["top1"] == before["magnitude@0.5"]
  assert len(list(out.glob("prune-*"))) == 2           # one pruned model per cell, none trained twice
  report = (out / "report.md").read_text()             # the same kind of report as `jprune run` writes
  assert report.startswith("# jprune sweep: lenet300 on fashion_mnist\n") and "![sweep](sweep.png)" in report
  assert "| magnitude | 90% |" in report and "| criterion | 50% | 90% |" in report
  jprune_here(["sensitivity", *base, "--grid", "0.5,0.9", "--target", "0.6"], capsys)
  alloc = json.loads((out / "allocation.json").read_text())
  assert set(alloc) == {"^Dense_0/kernel$", "^Dense_1/kernel$", "^Dense_2/kernel$"}
  sizes = {"^Dense_0/kernel$": 784 * 300, "^Dense_1/kernel$": 300 * 100, "^Dense_2/kernel$": 100 * 10}
  assert sum(alloc[k] * n for k, n in sizes.items()) / sum(sizes.values()) >= 0.6
  assert (out / "sensitivity.png").exists()
  report = (out / "report.md").read_text()
  assert report.startswith("# jprune sensitivity: lenet300") and "| layer | 50% | 90% |" in report
  assert "| ^Dense_0/kernel$ |" in report and "![sensitivity](sensitivity.png)" in report
  jprune_here(["run", *base, "--allocation", str(out / "allocation.json"), "--sparsity", "0.6"], capsys)


def test_run_neurons_compact(idx_dir, tmp_path):
  out = tmp_path / "c"
  res = jprune(["run", "--data-dir", str(idx_dir), "--epochs", "2", "--finetune-epochs", "1", "--batch-size", "32",
                "--granularity", "neurons", "--sparsity", "0.5", "--scope", "layer", "--compact", "--out", str(out)],
               tmp_path)
  assert "compacted: top-1" in res.stdout
  m = json.loads((out / "metrics.json").read_text())
  c = m["compact"]
  assert c["widths"] == {"Dense_0/bias[0]": 150, "Dense_1/bias[0]": 50}
  assert abs(c["top1"] - m["pruned"]["top1"]) < 1e-6  # compaction does not change the function
  assert c["params"] < 0.5 * c["dense_params"] and c["flops"] < 0.5 * c["dense_flops"]
  assert "Compacted model" in (out / "report.md").read_text()
  bad = jprune(["run", "--compact", "--out", str(out)], tmp_path, check=False)
  assert bad.returncode != 0 and "--granularity neurons" in bad.stderr


def test_progress_in_a_log_is_whole_lines_with_an_eta(monkeypatch, capsys):
  """Not on a terminal, a progress bar writes whole lines (no carriage returns): the first, at most one per
  interval however often it refreshes, and the finished one; each shows the count and elapsed<remaining time."""
  from jprune import _progress
  monkeypatch.delenv("JPRUNE_NO_PROGRESS", raising=False)
  monkeypatch.setattr(_progress, "LOG_INTERVAL_S", 3600.0)
  bar = _progress.progress_bar(total=50, desc="steps", unit="step")
  for i in range(50):
    bar.update(1)
    bar.set_postfix(loss=f"{i:.3f}")      # a refresh per step
  bar.close()
  err = capsys.readouterr().err
  lines = err.splitlines()
  assert "\r" not in err and len(lines) == 2, err
  assert lines[0].startswith("steps:   0%|") and "0/50 [00:00<?" in lines[0]
  assert lines[1].startswith("steps: 100%|") and "50/50 [" in lines[1] and "loss=49.000" in lines[1]


def test_every_option_has_help_with_its_default_and_one_spelling():
  """`jprune CMD --help` explains every option and shows its default; sweep's lists are --criterion/--sparsity,
  and the older --criteria/--sparsities (unlisted) set the same thing."""
  from jprune import cli
  parser = cli.build_parser()
  subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
  for name, sp in subs.items():
    text = sp.format_help()
    for a in sp._actions:
      if a.help == argparse.SUPPRESS or not a.option_strings or a.dest == "help":
        continue
      assert a.help, (name, a.option_strings)
      if a.default not in (None, False):
        assert "default" in sp._get_formatter()._get_help_string(a), (name, a.option_strings)
    listed = [o for a in sp._actions if a.help != argparse.SUPPRESS for o in a.option_strings]
    assert len(listed) == len(set(listed)) and "--criteria" not in text and "--sparsities" not in text, name
  assert "(default: 20)" in " ".join(subs["run"].format_help().split())            # 20 dense epochs, shown
  new = parser.parse_args(["sweep", "--criterion", "gradient,random", "--sparsity", "0.5,0.9"])
  old = parser.parse_args(["sweep", "--criteria", "gradient,random", "--sparsities", "0.5,0.9"])
  assert (new.criteria, new.sparsities) == (old.criteria, old.sparsities) == ("gradient,random", [0.5, 0.9])
  assert cli._config(new).criterion == "gradient"
