"""Checkpoints of a whole pruning run (orbax) and a compressed sparse export. All orbax use lives here.

`Manager` wraps `orbax.checkpoint.CheckpointManager`. Orbax writes each step to a temporary folder and renames
it when complete, so an interrupted write never looks like a checkpoint. On top of that, after a step is
finalised `Manager` writes `jprune_manifest.json` (atomically: temp file + rename) with the SHA-256 of every
file and the tree's paths, shapes and dtypes. A step without a manifest is incomplete and skipped; a file
whose hash differs raises `CheckpointError` naming the step and the file; a restore target whose structure,
shape or dtype differs names the first differing path.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import os
import tempfile
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jprune import _tree
from jprune.types import PyTree

MANIFEST = "jprune_manifest.json"


class CheckpointError(RuntimeError):
  """A checkpoint is missing, incomplete, corrupted, or does not match the restore target."""


def _atomic_write(path: Path, data: bytes) -> None:
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _is_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl(x):
  return jax.random.key_impl(x) if isinstance(x, jax.Array) else x.dtype._impl  # noqa: SLF001


def _to_savable(state: PyTree) -> PyTree:
  """Typed PRNG keys become their uint32 key data; Python scalars become numpy scalars."""
  def conv(x):
    if _is_key(x):
      return jax.random.key_data(x)
    if isinstance(x, (bool, int, float)):
      return jnp.asarray(x)  # JAX's dtypes (int32/float32 by default), as jax.eval_shape reports them
    return x
  return jax.tree.map(conv, state)


def _describe(tree: PyTree) -> list:
  return [[path, list(np.shape(x)), str(jnp.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype)]
          for path, x in _tree.leaves_with_paths(tree)]


def _abstract(like: PyTree) -> PyTree:
  """ShapeDtypeStructs (keeping shardings) for a concrete or abstract restore target."""
  def conv(x):
    if _is_key(x):
      x = jax.eval_shape(jax.random.key_data, x)
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    x = jnp.asarray(x) if isinstance(x, (bool, int, float)) else np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return jax.tree.map(conv, like)


def _hash_file(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _files(step_dir: Path) -> list[Path]:
  """The files a manifest covers: all but the manifest and its temporary files."""
  return sorted(p for p in step_dir.rglob("*")
                if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}."))


class Manager:
  """Saves and restores whole training states (params, `pruned(...)` optimizer state, RNG keys, data position).

  Args:
    directory: checkpoint folder (created if missing).
    max_to_keep: keep only the newest N complete checkpoints (None keeps all).
    save_every: `save(step, ...)` only writes when `step % save_every == 0` (or `force=True`).
    async_save: let orbax write in the background; `wait()` (or the next save/restore/close) finishes it.

  Examples:
    >>> import tempfile, jax.numpy as jnp, jprune as jp
    >>> with jp.checkpoint.Manager(tempfile.mkdtemp()) as mngr:
    ...   _ = mngr.save(10, {"w": jnp.arange(3.0)}, metadata={"note": "hi"})
    ...   mngr.restore(like={"w": jnp.zeros(3)})["w"].tolist(), mngr.metadata(10)
    ([0.0, 1.0, 2.0], {'note': 'hi'})
  """

  def __init__(self, directory, *, max_to_keep: Optional[int] = None, save_every: int = 1,
               async_save: bool = False):
    self.directory = Path(directory).absolute()
    self.directory.mkdir(parents=True, exist_ok=True)
    self.save_every = max(1, int(save_every))
    self._pending: list[tuple[int, list]] = []
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  # -------------------------------------------------------------------------------------------- saving
  def save(self, step: int, state: PyTree, *, metadata: Optional[dict] = None, force: bool = False) -> bool:
    """Saves `state` at `step` (skipped unless `step % save_every == 0` or `force`); returns whether it saved."""
    step = int(step)
    if not force and step % self.save_every:
      return False
    self._finalize()
    step_dir = self.directory / str(step)
    if step_dir.exists() and not (step_dir / MANIFEST).exists():
      # orbax committed this step but the process died before its manifest was written: the step was never
      # complete (restore ignores it), so it is replaced instead of blocking every later save of this step
      self._mngr.reload()
      if step in self._mngr.all_steps():
        self._mngr.delete(step)
      else:
        shutil.rmtree(step_dir)
    savable = _to_savable(state)
    desc = _describe(savable)
    args = ocp.args.Composite(state=ocp.args.StandardSave(savable),
                              metadata=ocp.args.JsonSave(metadata or {}))
    saved = self._mngr.save(step, args=args, force=True)
    if saved:
      self._pending.append((step, desc))
      if not self._mngr._options.enable_async_checkpointing:  # noqa: SLF001 (no public getter)
        self._finalize()
    return bool(saved)

  def wait(self) -> None:
    """Blocks until asynchronous saves are on disk and their manifests written."""
    self._finalize()

  def _finalize(self) -> None:
    self._mngr.wait_until_finished()
    pending, self._pending = self._pending, []
    if not pending:
      return
    # Several processes (jax.distributed) save collectively: orbax has committed every process's files; process
    # 0 alone writes the manifests, and the others wait for it, so all see the same complete steps.
    if jax.process_index() == 0:
      for step, desc in pending:
        step_dir = self.directory / str(step)
        if not step_dir.exists():  # removed by max_to_keep already
          continue
        files = {str(p.relative_to(step_dir)): _hash_file(p) for p in _files(step_dir)}
        manifest = {"step": step, "files": files, "tree": desc}
        _atomic_write(step_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"jprune-manifest-{pending[-1][0]}")

  # -------------------------------------------------------------------------------------------- listing
  def all_steps(self) -> list[int]:
    """Steps with a complete checkpoint (orbax-finalised and manifest written), ascending."""
    self._finalize()
    self._mngr.reload()
    return sorted(s for s in self._mngr.all_steps() if (self.directory / str(s) / MANIFEST).exists())

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def _manifest(self, step: int) -> dict:
    path = self.directory / str(step) / MANIFEST
    if not path.exists():
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is incomplete or missing "
                            f"(complete steps: {self.all_steps()}).")
    try:
      manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"checkpoint step {step}: {path} is corrupted ({e}).") from e
    except OSError as e:
      raise CheckpointError(f"checkpoint step {step}: {path} cannot be read ({e.strerror or e}).") from e
    ok = (isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)
          and isinstance(manifest.get("tree"), list) and manifest.get("step") == step)
    if not ok:
      raise CheckpointError(f"checkpoint step {step}: {path} is not a jprune manifest (expected step, files and "
                            f"tree); {self._earlier_hint(step)}")
    return manifest

  def verify(self, step: int) -> None:
    """Checks every file of `step` against its recorded SHA-256; raises CheckpointError naming the file."""
    manifest = self._manifest(step)
    step_dir = self.directory / str(step)
    for rel, digest in manifest["files"].items():
      p = step_dir / rel
      if not p.exists():
        raise CheckpointError(f"checkpoint step {step}: file {p} is missing.")
      try:
        actual = _hash_file(p)
      except OSError as e:
        raise CheckpointError(f"checkpoint step {step}: file {p} cannot be read ({e.strerror or e}).") from e
      if actual != digest:
        raise CheckpointError(f"checkpoint step {step}: file {p} is corrupted (SHA-256 differs from the "
                              f"manifest); {self._earlier_hint(step)}")

  def _previous(self, step):
    earlier = [s for s in self.all_steps() if s < step]
    return earlier[-1] if earlier else None

  def _earlier_hint(self, step) -> str:
    prev = self._previous(step)
    if prev is None:
      return "no earlier complete step exists: remove the folder to start over."
    return (f"resume from the earlier step {prev} with `jprune checkpoints {self.directory} --keep-up-to {prev}` "
            f"(sets the later steps aside, deleting nothing).")

  def inspect(self) -> list[tuple[int, str]]:
    """Every step folder with its state: "ok" (complete, files match the manifest), "incomplete" (no manifest:
    killed while saving; never restored) or "corrupted: <reason>"."""
    self._finalize()
    steps = sorted(int(p.name) for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit())
    out = []
    for step in steps:
      if not (self.directory / str(step) / MANIFEST).exists():
        out.append((step, "incomplete"))
        continue
      try:
        self._manifest(step)
        self.verify(step)
        out.append((step, "ok"))
      except CheckpointError as e:
        out.append((step, "corrupted: " + str(e).split(": ", 1)[-1].split("; ")[0]))
    return out

  def set_aside(self, keep_up_to: int) -> Path:
    """Moves every step after `keep_up_to` into `<directory>.set-aside/` (nothing is deleted), so the next
    `restore()` / resumed run starts from `keep_up_to`; returns that folder."""
    keep_up_to = int(keep_up_to)
    self._finalize()
    if keep_up_to not in [s for s, state in self.inspect() if state == "ok"]:
      raise CheckpointError(f"step {keep_up_to} is not a complete, verified checkpoint in {self.directory} "
                            f"(steps: {self.inspect()}).")
    aside = self.directory.with_name(self.directory.name + ".set-aside")
    for step, _ in self.inspect():
      if step > keep_up_to:
        aside.mkdir(exist_ok=True)
        target = aside / str(step)
        n = 1
        while target.exists():
          target, n = aside / f"{step}.{n}", n + 1
        os.replace(self.directory / str(step), target)
    self._mngr.reload()
    return aside

  # -------------------------------------------------------------------------------------------- restoring
  def restore(self, step: Optional[int] = None, *, like: PyTree, verify: bool = True) -> PyTree:
    """Restores the state saved at `step` (default: latest complete) into the structure of `like`.

    `like` is the restore target: a concrete state or its abstract version (`jax.eval_shape` of your init);
    NamedTuples, bool masks, dtypes and shardings (of `ShapeDtypeStruct.sharding` or the arrays) are kept.
    """
    self._finalize()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f"no complete checkpoint in {self.directory}.")
    step = int(step)
    manifest = self._manifest(step)
    if verify:
      self.verify(step)
    abstract = _abstract(like)
    self._check_target(step, manifest["tree"], abstract)
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except Exception as e:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} could not be read: "
                            f"{type(e).__name__}: {str(e)[:300]}") from e
    restored = out.state

    def back(r, target):
      return jax.random.wrap_key_data(r, impl=_key_impl(target)) if _is_key(target) else r

    return jax.tree.map(back, restored, like)

  def _check_target(self, step, saved, abstract):
    target = _describe(abstract)
    for (sp, ss, sd), (tp, ts, td) in zip(saved, target):
      if sp != tp:
        raise CheckpointError(f"checkpoint step {step} does not match the restore target: first differing path "
                              f"is {sp!r} in the checkpoint vs {tp!r} in the target.")
      if list(ss) != list(ts) or sd != td:
        raise CheckpointError(f"checkpoint step {step}: {sp!r} is {sd}{tuple(ss)} in the checkpoint but "
                              f"{td}{tuple(ts)} in the restore target.")
    if len(saved) != len(target):
      longer = saved if len(saved) > len(target) else target
      where = "checkpoint" if len(saved) > len(target) else "target"
      raise CheckpointError(f"checkpoint step {step} does not match the restore target: {len(saved)} leaves "
                            f"saved, {len(target)} in the target; first extra path {longer[min(len(saved), len(target))][0]!r} "
                            f"in the {where}.")

  def metadata(self, step: Optional[int] = None) -> dict:
    """The JSON metadata saved with `step` (default: latest)."""
    step = self.latest_step() if step is None else int(step)
    out = self._mngr.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    return dict(out.metadata or {})

  def close(self) -> None:
    self._finalize()
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ------------------------------------------------------------------------------------------------ export
def _raw(x: np.ndarray) -> np.ndarray:
  """A plain unsigned-int view of a float array (bfloat16/float16 included) for byte-exact storage."""
  return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def _shuffle_bytes(values: np.ndarray) -> bytes:
  """Byte-plane shuffle (like blosc): exponent bytes line up, so the compressor finds their redundancy."""
  u8 = np.ascontiguousarray(_raw(values)).view(np.uint8).reshape(-1, values.dtype.itemsize)
  return np.ascontiguousarray(u8.T).tobytes()


def _unshuffle_bytes(data: bytes, dtype, n: int) -> np.ndarray:
  item = np.dtype(dtype).itemsize
  planes = np.frombuffer(data, np.uint8).reshape(item, n)
  return np.ascontiguousarray(planes.T).view(dtype).reshape(-1)


def export_sparse(path, params: PyTree, masks: PyTree, *, level: int = 9) -> int:
  """Writes the kept values plus bit-packed, compressed masks; returns the file size in bytes.

  Structured masks (size-1 axes) are stored at their own small shape; unmasked leaves (scalar True) store their
  dense values. Values are byte-plane shuffled and compressed with lzma, masks packed with `np.packbits` and
  compressed (an entropy coder over the packed bits). The file is written atomically.
  """
  import lzma
  _tree.check_broadcastable(params, masks)
  meta, blobs = [], []
  for (p_path, p), m in zip(_tree.leaves_with_paths(params), jax.tree.leaves(masks)):
    arr = np.asarray(jax.device_get(p))
    m = np.asarray(jax.device_get(m), bool)
    full = np.broadcast_to(m, arr.shape)
    kept = arr[full] if m.ndim else arr.reshape(-1)
    if m.ndim and not (arr[~full] == 0).all():
      raise ValueError(f"params at {p_path!r} have non-zero pruned entries; apply the masks before exporting.")
    packed = lzma.compress(np.packbits(m.reshape(-1)).tobytes(), preset=level) if m.ndim else b""
    values = lzma.compress(_shuffle_bytes(np.ascontiguousarray(kept)), preset=level)
    meta.append({"path": p_path, "shape": list(arr.shape), "dtype": arr.dtype.name, "mask_shape": list(m.shape),
                 "mask_scalar": bool(m) if m.ndim == 0 else None, "n_kept": int(kept.size),
                 "mask_bytes": len(packed), "value_bytes": len(values)})
    blobs += [packed, values]
  header = json.dumps({"format": "jprune-sparse-2", "leaves": meta}).encode()
  digest = hashlib.sha256(header).digest()   # a flipped header byte must not rename or reshape a leaf
  data = len(header).to_bytes(8, "little") + header + digest + b"".join(blobs)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  _atomic_write(path, data)
  return len(data)


def load_sparse(path, like: Optional[PyTree] = None) -> tuple[PyTree, PyTree]:
  """Reads an `export_sparse` file: returns (dense params with pruned entries 0, masks), bit-identical.

  Without `like` the trees are nested dicts keyed by the '/'-joined paths; with `like` they take its structure.
  """
  import lzma
  import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
  try:
    raw = Path(path).read_bytes()
  except OSError as e:
    raise ValueError(f"{path}: cannot read ({e.strerror or e}).") from None
  header, off = _sparse_header(path, raw)

  def unpack(blob, n_bytes, what):
    """lzma-decompress exactly n_bytes (a larger or smaller payload is corruption, never a big allocation)."""
    try:
      d = lzma.LZMADecompressor()
      out = d.decompress(blob, max_length=n_bytes)
    except lzma.LZMAError as e:
      raise ValueError(f"{path}: {what} is corrupted ({e}).") from None
    if len(out) == n_bytes and not d.eof:
      try:
        extra = d.decompress(b"", max_length=1)
      except (lzma.LZMAError, EOFError):
        extra = b"?"
      if extra or not d.eof:
        raise ValueError(f"{path}: {what} holds more than the {n_bytes} bytes the header declares.")
    if len(out) != n_bytes:
      raise ValueError(f"{path}: {what} holds {len(out)} bytes, the header declares {n_bytes}.")
    return out

  params, masks = [], []
  for leaf in header["leaves"]:
    mb, vb = leaf["mask_bytes"], leaf["value_bytes"]
    dtype = jnp.dtype(leaf["dtype"])
    shape = tuple(leaf["shape"])
    n_kept = leaf["n_kept"]
    values = unpack(raw[off + mb:off + mb + vb], n_kept * dtype.itemsize, f"the values of {leaf['path']!r}")
    values = _unshuffle_bytes(values, dtype, n_kept)
    if leaf["mask_scalar"] is not None:
      mask = np.asarray(leaf["mask_scalar"])
      dense = values.reshape(shape)
    else:
      mshape = tuple(leaf["mask_shape"])
      n_mask = int(np.prod(mshape))
      bits = np.frombuffer(unpack(raw[off:off + mb], (n_mask + 7) // 8, f"the mask of {leaf['path']!r}"), np.uint8)
      mask = np.unpackbits(bits, count=n_mask).astype(bool).reshape(mshape)
      full = np.broadcast_to(mask, shape)
      if int(full.sum()) != n_kept:
        raise ValueError(f"{path}: the mask of {leaf['path']!r} keeps {int(full.sum())} entries, the header says "
                         f"{n_kept}.")
      dense = np.zeros(shape, dtype)
      dense[full] = values
    off += mb + vb
    params.append(jnp.asarray(dense))
    masks.append(jnp.asarray(mask))
  paths = [leaf["path"] for leaf in header["leaves"]]
  if like is not None:
    want = _tree.leaves_with_paths(like)
    if [p for p, _ in want] != paths:
      first = next((a, b) for a, b in zip([p for p, _ in want] + [None] * len(paths), paths + [None] * len(want))
                   if a != b)
      raise ValueError(f"{path} does not match `like`: first differing path is {first[1]!r} in the file vs "
                       f"{first[0]!r} in like ({len(paths)} leaves in the file, {len(want)} in like).")
    for (p, x), got in zip(want, params):
      if tuple(np.shape(x)) != got.shape or jnp.dtype(x.dtype) != got.dtype:
        raise ValueError(f"{path}: {p!r} is {got.dtype}{got.shape} in the file but {jnp.dtype(x.dtype)}"
                         f"{tuple(np.shape(x))} in like.")
    treedef = jax.tree.structure(like)
    return jax.tree.unflatten(treedef, params), jax.tree.unflatten(treedef, masks)
  return _nest(paths, params), _nest(paths, masks)


def _sparse_header(path, raw: bytes):
  """(header, offset of the first blob), with every declared size checked against the file before anything
  is allocated."""
  if len(raw) < 8:
    raise ValueError(f"{path} is not a jprune sparse export (only {len(raw)} bytes).")
  n = int.from_bytes(raw[:8], "little")
  if n > len(raw) - 8:
    raise ValueError(f"{path} is not a jprune sparse export, or is truncated (header of {n} bytes declared).")
  try:
    header = json.loads(raw[8:8 + n])
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise ValueError(f"{path} is not a jprune sparse export (unreadable header).") from None
  fmt = header.get("format") if isinstance(header, dict) else None
  if fmt not in ("jprune-sparse-1", "jprune-sparse-2"):
    raise ValueError(f"{path} is not a jprune sparse export.")
  off = 8 + n
  if fmt == "jprune-sparse-2":
    if raw[off:off + 32] != hashlib.sha256(raw[8:8 + n]).digest():
      raise ValueError(f"{path}: the header is corrupted (its SHA-256 differs).")
    off += 32
  end = off
  leaves = header.get("leaves")
  if not isinstance(leaves, list):
    raise ValueError(f"{path}: the header lists no leaves.")
  for leaf in leaves:
    try:
      shape, mshape = [int(d) for d in leaf["shape"]], [int(d) for d in leaf["mask_shape"]]
      sizes = (int(leaf["mask_bytes"]), int(leaf["value_bytes"]), int(leaf["n_kept"]))
      jnp.dtype(leaf["dtype"])
      str(leaf["path"])
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"{path}: a leaf entry of the header is malformed: {str(leaf)[:200]}") from None
    broadcastable = len(mshape) == len(shape) and all(m in (1, d) for m, d in zip(mshape, shape))
    scalar = leaf.get("mask_scalar") is not None
    if (min(shape + mshape + list(sizes), default=0) < 0 or sizes[2] > int(np.prod(shape))
        or (scalar and sizes[2] != int(np.prod(shape))) or (not scalar and not broadcastable)):
      raise ValueError(f"{path}: leaf {leaf['path']!r} declares impossible sizes (shape {shape}, mask {mshape}, "
                       f"{sizes[2]} kept).")
    end += sizes[0] + sizes[1]
  if end != len(raw):
    raise ValueError(f"{path}: the header declares {end} bytes but the file has {len(raw)} (truncated or "
                     "corrupted).")
  return header, off


def _nest(paths, leaves):
  out: dict = {}
  for p, x in zip(paths, leaves):
    d = out
    parts = p.split("/")
    for k in parts[:-1]:
      d = d.setdefault(k, {})
    d[parts[-1]] = x
  return out
