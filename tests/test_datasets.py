"""The seeds' datasets through tfds's own builders, with tfds.testing.mock_data (never the network)."""

import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jprune import cli
from jprune import data


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3)),
                                        ("fashion_mnist", (28, 28, 1))])
def test_dataset_names_resolve_through_tfds(name, shape, tmp_path, monkeypatch):
  monkeypatch.delenv("JPRUNE_FASHION_MNIST_DIR", raising=False)  # no Debian files: tfds's own builder
  monkeypatch.setattr(data, "DEFAULT_MANUAL_DIR", str(tmp_path / "none"))
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data.load(name, cache_dir=str(tmp_path / "tfds"))
  assert ds.x_train.shape == (24, *shape) and ds.x_test.shape == (24, *shape)
  assert ds.x_train.dtype == np.float32 and 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
  assert ds.y_train.dtype == np.int32 and set(np.unique(ds.y_train)) <= set(range(10))


def test_run_cifar10_simplecnn_with_mock_data(tmp_path, capsys):
  out = tmp_path / "run"
  with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE), \
      jax.numpy_dtype_promotion("standard"):  # optax's adam mixes python floats and int32 step counts
    rc = cli.main(["run", "--dataset", "cifar10", "--model", "simplecnn", "--epochs", "1", "--finetune-epochs",
                   "1", "--batch-size", "32", "--sparsity", "0.5", "--out", str(out), "--no-progress"])
  assert rc == 0, capsys.readouterr().err
  m = json.loads((out / "metrics.json").read_text())
  assert abs(m["sparsity"] - 0.5) < 0.01
  assert "Conv_1/kernel" in (out / "report.md").read_text()
