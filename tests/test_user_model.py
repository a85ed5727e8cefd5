"""`jprune run / sensitivity --model package.module:factory --dataset package.module:function`: your own model and
data through the CLI, with the same reuse rules (an edited model file trains anew) and one-line errors."""

import json
import sys
import textwrap

import jax
import numpy as np
import pytest

from jprune import cli
from jprune.job import RunConfig

MODULE = textwrap.dedent('''
import flax.linen as nn
import numpy as np


class Net(nn.Module):
  num_classes: int = 4
  width: int = 32

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes)(nn.relu(nn.Dense(self.width)(x)))


def make(num_classes):
  return Net(num_classes=num_classes)


def data():
  rng = np.random.default_rng(0)
  protos = rng.standard_normal((4, 6, 6, 2)).astype(np.float32)
  y = rng.integers(0, 4, 256)
  x = protos[y] + 0.5 * rng.standard_normal((256, 6, 6, 2)).astype(np.float32)
  return {"x_train": x[:192], "y_train": y[:192], "x_test": x[192:], "y_test": y[192:]}


def no_train():
  return nn.Dense(3)


def bad_labels():
  x = np.zeros((8, 4), np.float32)
  return x, np.full(8, 0.5), x, np.zeros(8, np.int64)
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
  name = f"jprune_user_{tmp_path.name.replace('-', '_')}"
  (tmp_path / f"{name}.py").write_text(MODULE)
  monkeypatch.chdir(tmp_path)     # the current folder is on the path for --model / --dataset
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  yield name
  sys.modules.pop(name, None)


def _main(args):
  with jax.numpy_dtype_promotion("standard"):
    return cli.main([*args, "--no-progress"])


def test_run_and_sensitivity_on_your_own_model_and_data(user_module, tmp_path, capsys):
  base = ["--model", f"{user_module}:make", "--dataset", f"{user_module}:data", "--epochs", "2", "--batch-size",
          "32", "--out", str(tmp_path / "out")]
  assert _main(["run", *base, "--finetune-epochs", "1", "--sparsity", "0.75", "--scope", "layer"]) == 0, \
      capsys.readouterr().err[-2000:]
  m = json.loads((tmp_path / "out" / "metrics.json").read_text())
  assert m["dense"]["top1"] > 0.6                   # the 4 prototypes are learnable
  rows = {r["path"]: r for r in m["summary"]["leaves"]}
  kernels = {"Conv_0/kernel": 3 * 3 * 2 * 8, "Dense_0/kernel": 32 * 4, "Dense_1/kernel": 6 * 6 * 8 * 32}
  for path, n in kernels.items():     # layer scope: exactly round(0.75 n) of each kernel of your model
    assert rows[path]["size"] == n and rows[path]["kept"] == n - round(0.75 * n), rows[path]
  assert rows["BatchNorm_0/scale"]["kept"] == 8 and rows["Dense_1/bias"]["kept"] == 32   # kernels only
  assert "jprune run" in (tmp_path / "out" / "report.md").read_text()
  # sensitivity: one line per kernel of your model, and an allocation reaching the target
  assert _main(["sensitivity", *base, "--grid", "0.5,0.9", "--target", "0.6"]) == 0
  alloc = json.loads((tmp_path / "out" / "allocation.json").read_text())
  assert set(alloc) == {f"^{p}$" for p in kernels}
  assert sum(alloc[f"^{p}$"] * n for p, n in kernels.items()) / sum(kernels.values()) >= 0.6
  assert (tmp_path / "out" / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
  # the model file is part of the dense identity: an edited file is a different model
  cfg = RunConfig(model=f"{user_module}:make", dataset=f"{user_module}:data")
  before = cfg.dense_identity("fp")
  (tmp_path / f"{user_module}.py").write_text(MODULE.replace("width: int = 32", "width: int = 16"))
  assert cfg.dense_identity("fp") != before and before["model_code"] != cfg.dense_identity("fp")["model_code"]


@pytest.mark.parametrize("args, message", [
    (["--model", "no_such_module_xyz:make"], "--model 'no_such_module_xyz:make': cannot import no_such_module_xyz"),
    (["--model", "{mod}:missing"], "has no attribute 'missing'"),
    (["--model", "{mod}:no_train", "--dataset", "{mod}:data"], "takes no `train` argument"),
    (["--model", "{mod}:MODULE_NAME_TYPO"], "has no attribute"),
    (["--dataset", "{mod}:bad_labels"], "y_train must be 1-D non-negative integer class ids"),
    (["--dataset", "{mod}:nothing"], "has no attribute 'nothing'"),
])
def test_your_model_or_data_wrong_is_one_line(user_module, tmp_path, capsys, args, message):
  args = [a.format(mod=user_module) for a in args]
  code = _main(["run", *args, "--epochs", "1", "--finetune-epochs", "1", "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err
  assert code != 0 and message in err, err
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_dataset_function_output_is_checked(user_module):
  from jprune import data
  ds = data.load(f"{user_module}:data", limit=50)
  assert ds.x_train.shape == (50, 6, 6, 2) and ds.x_train.dtype == np.float32 and ds.y_test.dtype == np.int32
  assert len(ds.x_test) == 50
