"""Training utilities for the reference models: jitted steps (BatchNorm aware), resumable fitting, evaluation.

The state is a plain dict `{"params", "opt", "pos"[, "batch_stats"]}`; `pos` = [epoch, batch] is the data
position, so a run restored from a checkpoint continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
import json
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jprune import checkpoint as _checkpoint
from jprune.app import data as _data
from jprune._progress import progress_bar
from jprune.recover import distillation_loss



def init_variables(model, x, seed: int = 0) -> dict:
  # one compiled program instead of one per initializer op (bit-identical to the eager init)
  return dict(jax.jit(model.init)(jax.random.key(seed), jnp.asarray(x[:1])))


def apply_fn(model, params, batch_stats, x, train: bool = False):
  """Logits (and new batch stats when training a model with BatchNorm)."""
  variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
  if train and batch_stats:
    logits, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return logits, upd["batch_stats"]
  return model.apply(variables, x, train=False), batch_stats


def make_step(model, tx, *, teacher: Optional[tuple] = None, distill_temperature: float = 4.0,
              distill_alpha: float = 0.5) -> Callable:
  """A jitted train step `(state, x, y) -> (state, loss)`; with `teacher=(params, batch_stats)`, distils."""

  def loss_fn(params, batch_stats, x, y):
    logits, new_stats = apply_fn(model, params, batch_stats, x, train=True)
    if teacher is None:
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    else:
      t_logits, _ = apply_fn(model, teacher[0], teacher[1], x)
      loss = distillation_loss(logits, jax.lax.stop_gradient(t_logits), y, temperature=distill_temperature,
                               alpha=distill_alpha)
    return loss, new_stats

  @jax.jit
  def step(state, x, y):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], state.get("batch_stats"),
                                                                     x, y)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    new = dict(state, params=optax.apply_updates(state["params"], updates), opt=opt)
    if "batch_stats" in state:
      new["batch_stats"] = stats
    return new, loss

  return step


@functools.lru_cache(maxsize=64)
def _logits_fn(model, noisy: bool) -> Callable:
  """The jitted evaluation forward pass, one per (model, noisy): repeated `evaluate` calls do not recompile."""
  @jax.jit
  def logits_of(params, batch_stats, xb, key, noise):
    xb = xb + noise.astype(xb.dtype) * jax.random.normal(key, xb.shape, xb.dtype) if noisy else xb
    return apply_fn(model, params, batch_stats, xb)[0]
  return logits_of


def evaluate(model, params, batch_stats, x, y, batch_size: int = 1000, noise: float = 0.0,
             seed: int = 0) -> dict:
  """Top-1 and top-5 accuracy (and mean loss) on (x, y); `noise` adds Gaussian input noise of that std."""
  logits_of = _logits_fn(model, bool(noise))
  std = jnp.asarray(noise, jnp.float32)
  top1 = top5 = loss = 0.0
  key = jax.random.key(seed)
  for i, (xb, yb) in enumerate(_data.eval_batches(x, y, batch_size)):
    lg = logits_of(params, batch_stats, xb, jax.random.fold_in(key, i), std)
    top1 += float(jnp.sum(jnp.argmax(lg, -1) == yb))
    k = min(5, lg.shape[-1])
    top5 += float(jnp.sum(jnp.any(jax.lax.top_k(lg, k)[1] == yb[:, None], axis=-1)))
    loss += float(jnp.sum(optax.softmax_cross_entropy_with_integer_labels(lg, yb)))
  n = len(y)
  return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n}


class _Placement:
  """Where `fit` puts its arrays when several JAX processes run it (`jax.distributed`): the state replicated on
  every device of every process, each batch split over all devices along its first axis (data parallel). Every
  process holds the same data and draws the same batches, so each contributes the rows of its own devices."""

  def __init__(self):
    from jax.sharding import AxisType, NamedSharding, PartitionSpec
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    self.replicated = NamedSharding(mesh, PartitionSpec())
    self.split = NamedSharding(mesh, PartitionSpec("data"))
    self.n = jax.device_count()

  def state(self, tree):
    return jax.device_put(tree, self.replicated)

  def batch(self, x):   # a batch that does not divide over the devices (the last one) is replicated instead
    return jax.device_put(x, self.split if len(x) % self.n == 0 else self.replicated)


def _placement() -> Optional[_Placement]:
  return _Placement() if jax.process_count() > 1 else None


def fit(model, state: dict, tx, ds: _data.Dataset, *, epochs: int, batch_size: int, seed: int,
        ckpt_dir: Optional[str] = None, save_every: int = 200, desc: str = "train", progress: bool = True,
        teacher=None, history: Optional[list] = None, on_epoch: Optional[Callable] = None,
        metadata: Optional[dict] = None, identity: Optional[dict] = None) -> tuple[dict, list]:
  """Trains `state` for `epochs` over `ds`, resuming from `ckpt_dir` when it holds a checkpoint.

  `identity` (JSON-able) is saved with every checkpoint; resuming from a checkpoint saved with another identity
  raises CheckpointError naming the settings that differ, so nothing is silently reused.

  Checkpoints every `save_every` steps and at each epoch end (atomic; see `jprune.checkpoint`). Returns the final
  state and the per-epoch history (train loss, test accuracy), which is saved with every checkpoint.
  """
  history = list(history or [])
  steps_per_epoch = _data.steps_per_epoch(len(ds.x_train), batch_size)
  total = epochs * steps_per_epoch
  mngr = _checkpoint.Manager(ckpt_dir, max_to_keep=2) if ckpt_dir else None
  if identity is not None:
    identity = json.loads(json.dumps(identity, default=str))   # as it reads back from the checkpoint
    metadata = dict(metadata or {}, identity=identity)
  place = _placement()
  if place is not None:
    state = place.state(state)
  if mngr is not None and mngr.latest_step() is not None:
    if identity is not None:
      saved = mngr.metadata().get("identity")
      if saved != identity:
        mngr.close()
        differ = sorted(k for k in set(identity) | set(saved or {}) if (saved or {}).get(k) != identity.get(k))
        raise _checkpoint.CheckpointError(
            f"{ckpt_dir} holds checkpoints of another run (differs in: {', '.join(differ) or 'format'}); "
            f"nothing was resumed: use another --out or remove that folder.")
    state = mngr.restore(like=state if place is not None else jax.eval_shape(lambda s: s, state))
    history = list(mngr.metadata().get("history", []))
  step_fn = make_step(model, tx, teacher=teacher)
  epoch, start = (int(v) for v in np.asarray(state["pos"]))
  done = epoch * steps_per_epoch + start
  bar = progress_bar(total=total, initial=done, desc=desc, disable=not progress, unit="step")
  try:
    while epoch < epochs:
      losses = []
      for b, (xb, yb) in enumerate(_data.batches(ds.x_train, ds.y_train, batch_size, seed=seed, epoch=epoch,
                                                 start=start), start=start):
        if place is not None:
          xb, yb = place.batch(xb), place.batch(yb)
        state, loss = step_fn(state, xb, yb)
        losses.append(loss)
        done += 1
        bar.update(1)
        state["pos"] = _pos(place, epoch, b + 1)
        if mngr is not None and done % save_every == 0 and b + 1 < steps_per_epoch:
          mngr.save(done, state, metadata=dict(metadata or {}, history=history), force=True)
        if b % 50 == 0:
          bar.set_postfix(loss=f"{float(loss):.3f}")
      epoch, start = epoch + 1, 0
      state["pos"] = _pos(place, epoch, 0)
      acc = evaluate(model, state["params"], state.get("batch_stats"), ds.x_test, ds.y_test)["top1"]
      entry = {"epoch": epoch, "train_loss": float(np.mean([float(l) for l in losses])) if losses else None,
               "test_top1": acc}
      if on_epoch is not None:
        entry.update(on_epoch(state) or {})
      history.append(entry)
      if mngr is not None:
        mngr.save(done, state, metadata=dict(metadata or {}, history=history), force=True)
  finally:
    bar.close()
    if mngr is not None:
      mngr.close()
  return state, history


def _pos(place, epoch: int, batch: int):
  pos = jnp.asarray([epoch, batch], jnp.int32)
  return pos if place is None else place.state(pos)
