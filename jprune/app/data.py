"""Data: a tensorflow-datasets builder for Fashion-MNIST from local IDX files, and deterministic batching.

Offline machines get Fashion-MNIST from Debian's `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist`).
tfds's own `fashion_mnist` builder refuses those files (Debian recompressed them, so checksums differ), so
`FashionMnistLocal` reads the four IDX files from a manual dir and writes `array_record` files with
`tfds.features.Tensor` features: no TensorFlow needed, random access through `as_data_source`. Other names
(`mnist`, `cifar10`, `fashion_mnist`) go through tfds's own builders, which download when online.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import sys
import struct
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np

DEFAULT_MANUAL_DIR = "/usr/share/datasets/fashion-mnist"
ENV_DATA_DIR = "JPRUNE_FASHION_MNIST_DIR"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DataError(RuntimeError):
  """Raised when a dataset cannot be found or prepared; the message says what to install or point at."""


def read_idx(path) -> np.ndarray:
  """Reads an IDX file (optionally gzip-compressed) into a numpy array; a DataError names a cut or foreign file."""
  path = Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (EOFError, OSError, zlib.error) as e:
    raise DataError(f"{path} cannot be read: {type(e).__name__}: {e or 'cut short'}.") from None
  if len(data) < 4:
    raise DataError(f"{path} is not an IDX file ({len(data)} bytes).")
  zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
  if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4 or len(data) < 4 + 4 * ndim:
    raise DataError(f"{path} is not an unsigned-byte IDX file.")
  shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
  expected = 4 + 4 * ndim + int(np.prod(shape, dtype=np.int64))
  if len(data) != expected:
    raise DataError(f"{path} declares shape {shape} ({expected:,} bytes) but holds {len(data):,} bytes: "
                    f"the file is cut short or corrupted.")
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_manual_dir(data_dir: Optional[str] = None) -> Path:
  """The folder holding the four Fashion-MNIST IDX files, or a DataError saying how to get them.

  `data_dir` wins, then ${ENV_DATA_DIR}; only when neither is given is Debian's folder used. A folder that is
  named but lacks the files is an error, never a silent fallback to another folder.
  """
  env = os.environ.get(ENV_DATA_DIR)
  chosen, how = (data_dir, "--data-dir") if data_dir else (env, ENV_DATA_DIR) if env else (DEFAULT_MANUAL_DIR, None)
  missing = [f for pair in FILES.values() for f in pair
             if not (Path(chosen) / f).exists() and not (Path(chosen) / f[:-3]).exists()]
  if not missing:
    return Path(chosen)
  if how:
    raise DataError(f"{how} {chosen}: Fashion-MNIST IDX file(s) {', '.join(missing)} not found there (Debian's "
                    f"come with `apt-get install dataset-fashion-mnist`).")
  raise DataError(
      f"Fashion-MNIST IDX files not found (looked in {chosen}). Install them with "
      f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass --data-dir / set {ENV_DATA_DIR} to a "
      f"folder with {', '.join(f for pair in FILES.values() for f in pair)}.")


def _manual_digest(folder: Path) -> str:
  """SHA-256 over the four IDX files' bytes (what the prepared tfds copy is keyed by)."""
  h = hashlib.sha256()
  for split, (im, lb) in FILES.items():
    for name in (im, lb):
      p = _idx_path(folder, name)
      h.update(f"{split}/{p.name}\0".encode())
      with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          h.update(chunk)
  return h.hexdigest()


def _check_pairs(folder: Path) -> None:
  for split, (im, lb) in FILES.items():
    x, y = read_idx(_idx_path(folder, im)), read_idx(_idx_path(folder, lb))
    if x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
      raise DataError(f"{folder}: {split} images {x.shape} and labels {y.shape} do not form a Fashion-MNIST "
                      f"split (N×28×28 images, N labels, N > 0).")


def _idx_path(folder: Path, name: str) -> Path:
  p = folder / name
  return p if p.exists() else folder / name[:-3]


@functools.lru_cache(maxsize=None)
def _builder_class():
  import tensorflow_datasets as tfds

  class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST (Xiao et al. 2017) from local IDX files."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Install Debian's dataset-fashion-mnist (files in {DEFAULT_MANUAL_DIR}) or place the four IDX files "
        f"in the manual dir.")

    def _info(self):
      return self.dataset_info_from_configs(
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
              "label": tfds.features.Tensor(shape=(), dtype=np.int64),
          }),
          supervised_keys=("image", "label"),
          homepage="https://github.com/zalandoresearch/fashion-mnist",
      )

    def _split_generators(self, dl_manager):
      folder = Path(dl_manager.manual_dir)
      return {split: self._generate_examples(_idx_path(folder, im), _idx_path(folder, lb))
              for split, (im, lb) in FILES.items()}

    def _generate_examples(self, images_path, labels_path):
      images, labels = read_idx(images_path), read_idx(labels_path)
      for i in range(len(labels)):
        yield i, {"image": images[i][..., None], "label": np.int64(labels[i])}

  return FashionMnistLocal


class Dataset(NamedTuple):
  x_train: np.ndarray  # float32, NHWC in [0, 1]
  y_train: np.ndarray  # int32
  x_test: np.ndarray
  y_test: np.ndarray
  name: str


def _to_arrays(source) -> tuple[np.ndarray, np.ndarray]:
  n = len(source)
  try:
    items = source.__getitems__(list(range(n)))
  except (AttributeError, TypeError):  # sources without a working batched read (tfds's mock data)
    items = [source[i] for i in range(n)]
  x = np.stack([np.asarray(it["image"]) for it in items]).astype(np.float32) / 255.0
  y = np.asarray([int(it["label"]) for it in items], np.int32)
  return x, y


def tfds_dir(cache_dir: Optional[str] = None) -> str:
  return cache_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def load(name: str = "fashion_mnist", *, data_dir: Optional[str] = None, cache_dir: Optional[str] = None,
         limit: Optional[int] = None) -> Dataset:
  """Loads a dataset as in-memory numpy arrays (images float32 NHWC in [0, 1], labels int32).

  Args:
    name: "fashion_mnist" (local Debian files when present, else tfds's online builder), "mnist", "cifar10",
      any tfds image-classification name with `image`/`label` features, or your own "package.module:function"
      returning `(x_train, y_train, x_test, y_test)` (or a dict with those keys): inputs as float arrays of any
      shape your model takes (used as given), labels as integer class ids.
    data_dir: folder with the Fashion-MNIST IDX files (default: $JPRUNE_FASHION_MNIST_DIR, then
      /usr/share/datasets/fashion-mnist).
    cache_dir: where tfds writes prepared array_record files (default $TFDS_DATA_DIR or ~/tensorflow_datasets).
    limit: keep only the first `limit` examples of each split (for quick runs).

  The prepared copy of local IDX files lives under `cache_dir/jprune_fashion_mnist/<sha256 of the files>`, so
  other files (another --data-dir, an edited file) are prepared anew, never answered from an older copy.
  """
  if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
    raise DataError(f"limit must be a positive number of examples per split, got {limit!r}.")
  if ":" in name:
    return _user_dataset(name, limit)
  import tensorflow_datasets as tfds
  from jprune._progress import _is_terminal
  if os.environ.get("JPRUNE_NO_PROGRESS") or not _is_terminal(sys.stderr):   # tfds's preparation bars: terminal only
    tfds.disable_progress_bar()
  cache = tfds_dir(cache_dir)
  if name == "fashion_mnist":
    explicit = data_dir or os.environ.get(ENV_DATA_DIR)
    try:
      manual = find_manual_dir(data_dir)
    except DataError:
      if explicit:
        raise
      manual = None
    if manual is not None:
      _check_pairs(manual)
      keyed = os.path.join(cache, "jprune_fashion_mnist", _manual_digest(manual)[:16])
      builder = _builder_class()(data_dir=keyed, file_format="array_record")
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    else:
      builder = _tfds_builder(name, cache)
  else:
    builder = _tfds_builder(name, cache)
  arrays: list = []
  for split in ("train", "test"):
    try:
      n = builder.info.splits[split].num_examples
    except KeyError:  # no split metadata (e.g. under tfds.testing.mock_data)
      n = None
    whole = limit is None or (n is not None and limit >= n)
    source = builder.as_data_source(split=split if whole else f"{split}[:{limit}]")
    arrays.extend(_to_arrays(source))
  x_train, y_train, x_test, y_test = arrays
  return Dataset(x_train, y_train, x_test, y_test, name=name)


_SPLITS = ("x_train", "y_train", "x_test", "y_test")


def _user_dataset(spec: str, limit: Optional[int]) -> Dataset:
  """Arrays from the user's "package.module:function", checked (one clear line for each problem)."""
  from jprune import _spec
  fn = _spec.load_object(spec, "--dataset")
  try:
    got = fn() if callable(fn) else fn
  except Exception as e:
    raise DataError(f"--dataset {spec!r}: the function raised {type(e).__name__}: {str(e)[:200]}") from e
  if isinstance(got, dict):
    missing = [k for k in _SPLITS if k not in got]
    if missing:
      raise DataError(f"--dataset {spec!r}: the dict lacks {', '.join(missing)}; expected keys {', '.join(_SPLITS)}.")
    got = tuple(got[k] for k in _SPLITS)
  if not isinstance(got, (tuple, list)) or len(got) != 4:
    raise DataError(f"--dataset {spec!r}: expected (x_train, y_train, x_test, y_test) or a dict with those keys, "
                    f"got {type(got).__name__}.")
  arrays = [np.asarray(a) for a in got]
  for split, (x, y) in (("train", arrays[:2]), ("test", arrays[2:])):
    if x.ndim < 2 or not np.issubdtype(x.dtype, np.number):
      raise DataError(f"--dataset {spec!r}: x_{split} must be a numeric array (examples, ...), got dtype "
                      f"{x.dtype} and shape {x.shape}.")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
      raise DataError(f"--dataset {spec!r}: y_{split} must be 1-D non-negative integer class ids, got dtype "
                      f"{y.dtype} and shape {y.shape}.")
    if len(x) != len(y) or len(x) == 0:
      raise DataError(f"--dataset {spec!r}: x_{split} has {len(x)} examples and y_{split} {len(y)}; expected the "
                      f"same positive number.")
    if not np.all(np.isfinite(x)):
      raise DataError(f"--dataset {spec!r}: x_{split} holds NaN or inf.")
  if arrays[0].shape[1:] != arrays[2].shape[1:]:
    raise DataError(f"--dataset {spec!r}: train inputs {arrays[0].shape[1:]} and test inputs "
                    f"{arrays[2].shape[1:]} differ in shape.")
  if limit is not None:
    arrays = [a[:limit] for a in arrays]
  xtr, ytr, xte, yte = arrays
  return Dataset(xtr.astype(np.float32), ytr.astype(np.int32), xte.astype(np.float32), yte.astype(np.int32),
                 name=spec)


def _tfds_builder(name, cache):
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(name, data_dir=cache, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f"unknown dataset {name!r}: use fashion_mnist (offline, Debian's files or --data-dir) or a "
                    f"tensorflow-datasets image-classification name such as mnist or cifar10.") from None
  try:
    builder.download_and_prepare()
    return builder
  except Exception as e:  # network or missing-package failures: one clear line
    hint = (" Offline, Fashion-MNIST comes from Debian's dataset-fashion-mnist: `apt-get install "
            "dataset-fashion-mnist`." if name == "fashion_mnist" else "")
    raise DataError(f"could not prepare tfds dataset {name!r}: {type(e).__name__}: {str(e)[:200]}.{hint}") from e


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int, epoch: int, start: int = 0,
            drop_last: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields the batches of one epoch, shuffled by (seed, epoch), starting at batch `start` (to resume)."""
  perm = np.random.default_rng([seed, epoch]).permutation(len(x))
  n = len(x) // batch_size if drop_last else -(-len(x) // batch_size)
  for b in range(start, n):
    idx = perm[b * batch_size:(b + 1) * batch_size]
    yield x[idx], y[idx]


def steps_per_epoch(n: int, batch_size: int) -> int:
  return n // batch_size


def eval_batches(x, y, batch_size: int = 1000):
  for i in range(0, len(x), batch_size):
    yield x[i:i + batch_size], y[i:i + batch_size]


def fingerprint(ds: Dataset) -> str:
  """SHA-256 over a dataset's arrays (shapes, dtypes and bytes): what a run's identity records of its data."""
  h = hashlib.sha256()
  for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))  # type: ignore[arg-type]
  return h.hexdigest()
