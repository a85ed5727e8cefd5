"""The main job: train a reference model, prune it, fine-tune with masks kept, evaluate and report.

`run(RunConfig)` writes to `out/`: `report.md`, `metrics.json`, PNG plots and orbax checkpoints (`dense/`,
`prune-<tag>/`), and resumes from them after Ctrl-C or a crash. `sweep` reuses one dense checkpoint across a
criteria × sparsities grid, caching each cell; `sensitivity` prunes one layer at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jprune as jp
from jprune import _tree
from jprune import criteria as _criteria
from jprune.app import data as _data
from jprune import models as _models
from jprune.granularity import Blocks, Neurons, Unstructured
from jprune import report as _report
from jprune.app import train as _train

CRITERIA = _criteria.NAMES
SCHEDULES = ("polynomial", "one-shot", "iterative", "every")   # every: with --threshold, every --every steps


@dataclasses.dataclass
class RunConfig:
  model: str = "lenet300"
  dataset: str = "fashion_mnist"
  data_dir: Optional[str] = None
  criterion: str = "magnitude"
  sparsity: float = 0.9
  schedule: str = "polynomial"
  scope: str = "global"
  granularity: str = "unstructured"
  distribution: str = "uniform"
  allocation: Optional[str] = None
  recipe: Optional[str] = None      # a TOML recipe (jprune.recipe): replaces criterion/sparsity/schedule/...
  epochs: int = 20
  finetune_epochs: int = 20
  batch_size: int = 128
  lr: float = 1e-3
  finetune_lr: float = 1e-3
  weight_decay: float = 1e-4
  seed: int = 0
  out: str = "runs/default"
  distill: bool = False
  limit: Optional[int] = None
  calib_batches: int = 20
  noise: tuple = (0.1, 0.2, 0.3)
  progress: bool = True
  save_every: int = 200
  compact: bool = False
  threshold: Optional[float] = None   # prune scores below θ (instead of a sparsity): one-shot or every N steps
  every: Optional[int] = None         # --schedule every: steps between threshold updates (default 100)

  def dense_identity(self, data_fingerprint: str) -> dict:
    """Everything that decides the dense model: a checkpoint is reused only when all of it matches."""
    identity = {"format": 1, "model": self.model, "dataset": self.dataset, "data": data_fingerprint,
                "limit": self.limit, "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                "weight_decay": self.weight_decay, "seed": self.seed}
    code = _models.code_digest(self.model)   # your own model: the content of the file that defines it
    return identity if code is None else {**identity, "model_code": code}

  def prune_identity(self, data_fingerprint: str) -> dict:
    """Everything that decides the pruned model (the dense model's identity included; the allocation by content)."""
    keys: tuple = ("criterion", "sparsity", "schedule", "scope", "granularity", "distribution", "finetune_epochs",
            "finetune_lr", "distill", "calib_batches")
    if self.threshold is not None:   # (absent otherwise, so earlier runs keep their identity)
      keys += ("threshold", "every")
    ident = {"dense": self.dense_identity(data_fingerprint), "allocation": _allocation_content(self.allocation),
             **{k: getattr(self, k) for k in keys}}
    if self.recipe:   # by content, defaults filled in (not by path)
      ident["recipe"] = _recipe_of(self).to_dict()
    return ident

  def dense_dir(self, data_fingerprint: str) -> str:
    return os.path.join(self.out, "dense-" + _digest(self.dense_identity(data_fingerprint)))

  def prune_tag(self, data_fingerprint: str = "") -> str:
    head = "recipe" if self.recipe else f"{self.criterion}-{self.schedule}-" + (
        f"th{self.threshold:g}" if self.threshold is not None else f"{self.sparsity:g}")
    return f"{head}-" + _digest(self.prune_identity(data_fingerprint))


def _digest(identity: dict) -> str:
  return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]


_RECIPE_SETS = {"criterion": "magnitude", "sparsity": 0.9, "schedule": "polynomial", "scope": "global",
                "granularity": "unstructured", "distribution": "uniform", "allocation": None}


def _recipe_of(cfg: "RunConfig"):
  """The run's recipe (parsed, defaults filled in); refuses options the recipe sets, given as well."""
  from jprune import recipe as _recipe
  both = [k for k, default in _RECIPE_SETS.items() if getattr(cfg, k) != default]
  if both:
    raise ValueError(f"--recipe sets the criterion, sparsity, schedule, scope, granularity and distribution of "
                     f"each entry; drop {', '.join('--' + k for k in both)}.")
  if cfg.compact:
    raise ValueError("--compact needs --granularity neurons without a recipe (coupled groups from the jaxpr).")
  return _recipe.load(str(cfg.recipe))


def _allocation_content(path: Optional[str]):
  """The allocation file's mapping (its content, not its path, is part of a run's identity)."""
  if not path:
    return None
  try:
    with open(path) as f:
      mapping = json.load(f)
  except OSError as e:
    raise ValueError(f"--allocation {path}: cannot be read ({e.strerror or e}).") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"--allocation {path}: not JSON ({e}).") from None
  ok = isinstance(mapping, dict) and mapping and all(
      isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1
      for k, v in mapping.items())
  if not ok:
    raise ValueError(f"--allocation {path}: expected a JSON object {{regex: sparsity in [0, 1)}}, as written by "
                     f"`jprune sensitivity --target`.")
  return mapping


def validate(cfg: RunConfig) -> None:
  """Raises ValueError with one readable line for a bad configuration."""
  if cfg.criterion not in CRITERIA:
    raise ValueError(f"unknown criterion {cfg.criterion!r}; choose from {', '.join(CRITERIA)}.")
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"unknown schedule {cfg.schedule!r}; choose from {', '.join(SCHEDULES)}.")
  if not 0.0 <= cfg.sparsity < 1.0:
    raise ValueError(f"sparsity must be in [0, 1), got {cfg.sparsity}.")
  if cfg.scope not in ("layer", "global"):
    raise ValueError(f"scope must be layer or global, got {cfg.scope!r}.")
  if ":" in cfg.model:
    _models.code_digest(cfg.model)   # importable (one clear line if not); built when the data's shape is known
  elif cfg.model not in _models.MODELS:
    raise ValueError(f"unknown model {cfg.model!r}; choose from {', '.join(_models.MODELS)}, or give your own as "
                     f"package.module:factory.")
  jp.masks.parse_granularity(cfg.granularity)
  if cfg.distribution not in ("uniform", "erk") and not cfg.allocation:
    raise ValueError(f"unknown distribution {cfg.distribution!r}; choose uniform or erk (or --allocation FILE).")
  if cfg.epochs < 0 or cfg.finetune_epochs < 0:
    raise ValueError(f"--epochs and --finetune-epochs must be >= 0, got {cfg.epochs} and {cfg.finetune_epochs}.")
  for name in ("batch_size", "save_every", "calib_batches"):
    if getattr(cfg, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}.")
  if cfg.limit is not None and cfg.limit < 1:
    raise ValueError(f"--limit must be >= 1 examples per split, got {cfg.limit}.")
  for name in ("lr", "finetune_lr"):
    if not math.isfinite(getattr(cfg, name)) or getattr(cfg, name) <= 0:
      raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {getattr(cfg, name)}.")
  if cfg.finetune_epochs == 0 and cfg.schedule != "one-shot" and cfg.sparsity > 0:
    raise ValueError(f"--finetune-epochs 0 with --schedule {cfg.schedule} would prune nothing (that schedule "
                     f"prunes during fine-tuning); use --schedule one-shot to prune without fine-tuning.")
  _allocation_content(cfg.allocation)
  _check_threshold(cfg)
  if cfg.recipe:
    _recipe_of(cfg)
  _check_out(cfg.out)
  if cfg.compact and not isinstance(jp.masks.parse_granularity(cfg.granularity), Neurons):
    raise ValueError("--compact removes whole neurons/channels: use it with --granularity neurons.")


def _check_threshold(cfg: RunConfig) -> None:
  """--threshold θ: one-shot (prune once, then fine-tune) or --schedule every (every --every steps of fine-tuning)."""
  if cfg.threshold is None:
    if cfg.schedule == "every" or cfg.every is not None:
      raise ValueError("--schedule every / --every N prune by an absolute threshold: give --threshold θ as well.")
    return
  if not math.isfinite(cfg.threshold):
    raise ValueError(f"--threshold must be a finite number, got {cfg.threshold}.")
  if cfg.schedule not in ("one-shot", "every"):
    raise ValueError(f"--threshold prunes every score below θ: use --schedule one-shot (once, then fine-tune) or "
                     f"--schedule every [--every N] (while fine-tuning), not --schedule {cfg.schedule}.")
  if cfg.every is not None and (cfg.schedule != "every" or cfg.every < 1):
    raise ValueError(f"--every {cfg.every} needs --schedule every and a value >= 1.")
  g = jp.masks.parse_granularity(cfg.granularity)
  if not isinstance(g, (Unstructured, Blocks)):
    raise ValueError(f"--threshold takes unstructured or blocks granularity, got {g.name}.")
  given = [f for f, bad in (("--sparsity", cfg.sparsity != 0.9), ("--distribution", cfg.distribution != "uniform"),
                            ("--allocation", bool(cfg.allocation)), ("--recipe", bool(cfg.recipe)),
                            ("--compact", cfg.compact)) if bad]
  if given:
    raise ValueError(f"--threshold decides what is pruned by the scores alone; drop {', '.join(given)}.")


def _check_out(out: str) -> None:
  p = Path(out)
  for parent in [p, *p.parents]:
    if parent.exists() and not parent.is_dir():
      raise ValueError(f"--out {out}: {parent} is a file, not a folder.")
    if parent.exists():
      break
  try:
    p.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--out {out}: cannot create the folder ({e.strerror or e}).") from None
  if not os.access(p, os.W_OK | os.X_OK):
    raise ValueError(f"--out {out}: the folder is not writable.")


@contextlib.contextmanager
def _locked(out: str):
  """Holds an exclusive lock on `out` for the whole job: a second job on the same folder fails at once."""
  import fcntl
  Path(out).mkdir(parents=True, exist_ok=True)
  f = open(Path(out) / ".jprune.lock", "a+")
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      raise ValueError(f"--out {out} is in use by another jprune job ({holder}); wait for it to finish or use "
                       f"another --out.") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}")
    f.flush()
    yield
  finally:
    f.close()


def _check_data(cfg: RunConfig, ds: _data.Dataset) -> None:
  if cfg.batch_size > len(ds.x_train):
    raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {len(ds.x_train)} training examples: "
                     f"no step would run.")
  if cfg.recipe:   # before any training: a schedule that ends after the last step would never reach its target
    per_epoch = _data.steps_per_epoch(len(ds.x_train), cfg.batch_size)
    total, at = cfg.finetune_epochs * per_epoch, _recipe_of(cfg).reaches_target_at()
    if at > total:
      raise ValueError(f"--recipe {cfg.recipe}: its schedules reach their targets at step {at}, but fine-tuning "
                       f"runs {total} steps ({cfg.finetune_epochs} epochs × {per_epoch}); end the schedules "
                       f"earlier or fine-tune longer.")


def criterion_of(name: str, for_training: bool) -> jp.Criterion:
  return _criteria.by_name(name, ema=0.9 if for_training else None)


def _distribution(cfg: RunConfig):
  if cfg.allocation:
    return jp.by_path(_allocation_content(cfg.allocation))
  return jp.erk() if cfg.distribution == "erk" else None


def model_for(cfg: RunConfig, ds: _data.Dataset):
  """The configured model for this data (classes from its labels), refusing a granularity that does not fit."""
  classes = int(max(ds.y_train.max(), ds.y_test.max())) + 1
  model = _models.create(cfg.model, num_classes=classes)
  check_granularity_fits(cfg, model, ds)
  return model


_model_for = model_for   # older name


def adamw_cosine(lr: float, wd: float, steps: int) -> optax.GradientTransformation:
  """The CLI's optimizer: AdamW with weight decay `wd` and a cosine-decayed learning rate over `steps`."""
  sched = optax.cosine_decay_schedule(lr, max(steps, 1))
  return optax.adamw(sched, weight_decay=wd)


_adam = adamw_cosine   # older name


def load_data(cfg: RunConfig) -> _data.Dataset:
  load = lambda: _data.load(cfg.dataset, data_dir=cfg.data_dir, limit=cfg.limit)
  if jax.process_count() == 1:
    ds = load()
  else:   # several processes: process 0 prepares the tfds files once, the others then read them
    from jax.experimental import multihost_utils
    first = load() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("jprune: data prepared")
    ds = first if first is not None else load()
  _check_data(cfg, ds)
  return ds


def train_dense(cfg: RunConfig, ds: _data.Dataset, model):
  """Trains (or resumes, or loads) the dense model under out/dense-<identity>; returns (state, history).

  The folder is named by the digest of everything that decides the dense model (`RunConfig.dense_identity`:
  model, data content, limit, epochs, batch size, lr, weight decay, seed), so another setting trains anew in its own
  folder and the same settings resume or reuse; the identity is also stored with each checkpoint and checked.
  """
  fp = _data.fingerprint(ds)
  variables = _train.init_variables(model, ds.x_train, cfg.seed)
  steps = cfg.epochs * _data.steps_per_epoch(len(ds.x_train), cfg.batch_size)
  tx = _adam(cfg.lr, cfg.weight_decay, steps)
  state = {"params": variables["params"], "opt": tx.init(variables["params"]), "pos": jnp.zeros(2, jnp.int32)}
  if "batch_stats" in variables:
    state["batch_stats"] = variables["batch_stats"]
  return _train.fit(model, state, tx, ds, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                    ckpt_dir=cfg.dense_dir(fp), desc="dense", progress=cfg.progress,
                    save_every=cfg.save_every, metadata={"phase": "dense", "model": cfg.model},
                    identity=cfg.dense_identity(fp))


def _where_for(gran, params, quiet: bool = False):
  """Kernels the granularity can apply to (e.g. 2:4 skips a first conv with one input channel), with a note."""
  def ok(path, leaf):
    if not jp.select.kernels(path, leaf):
      return False
    try:
      jp.masks.check_granularity(gran, path, leaf.shape)
      return True
    except ValueError:
      return False
  kernels = [(p, x) for p, x in _tree.leaves_with_paths(params) if jp.select.kernels(p, x)]
  skipped = [(p, x) for p, x in kernels if not ok(p, x)]
  if skipped:
    left = sum(int(np.prod(x.shape)) for _, x in skipped)
    total = sum(int(np.prod(x.shape)) for _, x in kernels)
    names = ", ".join(f"{p} {tuple(x.shape)}" for p, x in skipped)
    label = jp.masks.granularity_name(gran)
    if left > _MAX_LEFT_DENSE * total:   # the target could not be approached: refuse rather than report ~0%
      raise ValueError(f"--granularity {label} does not fit {names}: {left:,} of the {total:,} "
                       f"kernel weights ({left / total:.0%}) would stay dense; choose a granularity that divides "
                       f"these kernels (N:M groups run along the input axis; neurons and blocks fit any kernel).")
    if not quiet:
      print(f"jprune: note: --granularity {label} does not fit {names} ({left / total:.1%} of "
            f"the kernel weights); left dense.", file=sys.stderr)
  return ok


_MAX_LEFT_DENSE = 0.1   # at most this fraction of the kernel weights may be left dense by a granularity that does
                        # not fit them (like 2:4 and a first conv with one input channel)


def check_granularity_fits(cfg: "RunConfig", model, ds) -> None:
  """Before any training: refuses a granularity that does not fit most kernels of the model (one line)."""
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jnp.asarray(ds.x_train[:1]))["params"]
  _where_for(jp.masks.parse_granularity(cfg.granularity), shapes)


def _loss_fn(model, batch_stats):
  def loss_fn(params, batch):
    x, y = batch
    logits, _ = _train.apply_fn(model, params, batch_stats, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss_fn


def prune_and_finetune(cfg: RunConfig, ds, model, dense_state) -> dict:
  """Prunes the dense state as configured and fine-tunes with masks kept; resumable under out/prune-<tag>."""
  params, stats = dense_state["params"], dense_state.get("batch_stats")
  gran = jp.masks.parse_granularity(cfg.granularity)
  steps_per_epoch = _data.steps_per_epoch(len(ds.x_train), cfg.batch_size)
  total = max(1, cfg.finetune_epochs * steps_per_epoch)
  dist = _distribution(cfg)
  scope = "layer" if dist is not None else cfg.scope  # a distribution sets per-layer targets
  where = _where_for(gran, params, quiet=True)   # noted (or refused) by check_granularity_fits before training
  scores = None
  groups = gmasks = None
  if cfg.recipe:
    tx = _recipe_of(cfg).pruned(_adam(cfg.finetune_lr, cfg.weight_decay, total))
  elif cfg.threshold is not None and cfg.schedule == "one-shot":   # prune score < θ once, then fine-tune
    scores = _calib_scores(cfg, ds, model, params, stats, progress=cfg.progress)
    masks = jp.threshold(scores, cfg.threshold, where=where, granularity=gran)
    reached = float(jp.sparsity(masks, params))
    if reached > 0.99 or reached < 0.01:   # a threshold that suits one model prunes all or nothing of another
      print(f"jprune: note: --threshold {cfg.threshold:g} on {cfg.criterion} scores prunes {reached:.1%} of the "
            f"selected weights.", file=sys.stderr)
    params = jp.apply(params, masks)
    tx = optax.chain(_adam(cfg.finetune_lr, cfg.weight_decay, total), jp.keep_pruned(masks))
  elif cfg.threshold is not None:   # prune score < θ at step 0 and every N steps, up to 70% of fine-tuning
    schedule = jp.thresholds(cfg.threshold, every=cfg.every or 100, end=max(1, int(0.7 * total)))
    tx = jp.pruned(_adam(cfg.finetune_lr, cfg.weight_decay, total),
                   criterion=criterion_of(cfg.criterion, for_training=True), schedule=schedule,
                   granularity=gran, where=where)
  elif isinstance(gran, Neurons):
    # whole neurons/channels/heads: groups of coupled axes from the jaxpr, so every member (bias, BatchNorm,
    # next layer's input) is masked together and the result can be compacted
    from jprune import structured as S
    if cfg.schedule != "one-shot":
      print("jprune: note: structured pruning prunes once (one-shot), then fine-tunes with masks kept.",
            file=sys.stderr)
    groups = _groups(model, params, stats, ds)
    scores = _calib_scores(cfg, ds, model, params, stats, progress=cfg.progress)
    gmasks = S.group_masks(groups, S.group_scores(groups, scores, reduce="l2"), cfg.sparsity,
                           scope="global" if cfg.scope == "global" else "group")
    masks = S.to_param_masks(groups, gmasks, params)
    params = jp.apply(params, masks)
    tx = optax.chain(_adam(cfg.finetune_lr, cfg.weight_decay, total), jp.keep_pruned(masks))
  elif cfg.schedule == "one-shot":
    scores = _calib_scores(cfg, ds, model, params, stats, progress=cfg.progress)
    target = cfg.sparsity if dist is None else dist(params, cfg.sparsity, where)
    masks = jp.topk(scores, target, scope=scope, granularity=gran, where=where)
    params = jp.apply(params, masks)
    tx = optax.chain(_adam(cfg.finetune_lr, cfg.weight_decay, total), jp.keep_pruned(masks))
  else:
    end = max(1, int(0.7 * total))
    if cfg.schedule == "polynomial":
      schedule = jp.polynomial(final=cfg.sparsity, begin=0, end=end, every=max(1, min(100, end // 10)))
    else:
      n_levels = 4
      levels = [1.0 - (1.0 - cfg.sparsity) ** ((i + 1) / n_levels) for i in range(n_levels)]
      schedule = jp.iterative(levels, every=max(1, end // (n_levels - 1)))
    tx = jp.pruned(_adam(cfg.finetune_lr, cfg.weight_decay, total),
                   criterion=criterion_of(cfg.criterion, for_training=True), schedule=schedule,
                   scope=scope, granularity=gran, distribution=dist, where=where)
  state = {"params": params, "opt": tx.init(params), "pos": jnp.zeros(2, jnp.int32)}
  if stats:
    state["batch_stats"] = stats
  teacher = (dense_state["params"], stats) if cfg.distill else None
  fp = _data.fingerprint(ds)
  ckpt = os.path.join(cfg.out, f"prune-{cfg.prune_tag(fp)}")

  def on_epoch(st):
    return {"sparsity": float(jp.sparsity(jp.masks_of(st["opt"]), st["params"]))}

  state, history = _train.fit(model, state, tx, ds, epochs=cfg.finetune_epochs, batch_size=cfg.batch_size,
                              seed=cfg.seed + 7, ckpt_dir=ckpt, desc="prune+finetune", progress=cfg.progress,
                              teacher=teacher, save_every=cfg.save_every, on_epoch=on_epoch,
                              metadata={"phase": "prune", "config": dataclasses.asdict(cfg)},
                              identity=cfg.prune_identity(fp))
  masks = jp.masks_of(state["opt"])
  if scores is None and cfg.recipe:   # several criteria: the histograms show |w| of the dense weights
    scores = jp.scores(jp.magnitude(), dense_state["params"])
  if scores is None:  # scores of the trained criterion state; weight-only criteria on the dense weights
    crit = criterion_of(cfg.criterion, for_training=True)
    weights = dense_state["params"] if not crit.needs_grads else state["params"]
    scores = crit.score(state["opt"].criterion, weights)
  return {"state": state, "masks": masks, "history": history, "scores": scores, "groups": groups,
          "group_masks": gmasks}


def _groups(model, params, stats, ds):
  from jprune import structured as S
  x = jnp.asarray(ds.x_test[:2])
  if stats:
    return S.groups(lambda p, b, x: model.apply({"params": p, "batch_stats": b}, x), params, stats, x)
  return S.groups(lambda p, x: model.apply({"params": p}, x), params, x)


def run(cfg: RunConfig, ds: Optional[_data.Dataset] = None, dense=None) -> dict:
  """The whole job; returns the metrics it writes to out/metrics.json (one job per `out` at a time)."""
  validate(cfg)
  if jax.process_index() != 0:   # several processes (jax.distributed): process 0 holds the lock and writes reports
    return _run(cfg, ds, dense)
  with _locked(cfg.out):
    return _run(cfg, ds, dense)


def _run(cfg: RunConfig, ds, dense) -> dict:
  out = Path(cfg.out)
  if ds is None:
    ds = load_data(cfg)
  else:
    _check_data(cfg, ds)
  model = model_for(cfg, ds)
  dense_state, dense_hist = dense if dense is not None else train_dense(cfg, ds, model)
  dense_eval = _train.evaluate(model, dense_state["params"], dense_state.get("batch_stats"), ds.x_test, ds.y_test)
  res = prune_and_finetune(cfg, ds, model, dense_state)
  st, masks = res["state"], res["masks"]
  pruned_eval = _train.evaluate(model, st["params"], st.get("batch_stats"), ds.x_test, ds.y_test)
  robustness = {str(s): {"dense": _train.evaluate(model, dense_state["params"], dense_state.get("batch_stats"),
                                                  ds.x_test, ds.y_test, noise=s)["top1"],
                         "pruned": _train.evaluate(model, st["params"], st.get("batch_stats"), ds.x_test,
                                                   ds.y_test, noise=s)["top1"]} for s in cfg.noise}
  summ = jp.summary(st["params"], masks)
  variables = {"params": dense_state["params"], **({"batch_stats": st["batch_stats"]} if "batch_stats" in st else {})}
  xb = jnp.asarray(ds.x_test[:256])
  fwd = lambda v, x: model.apply(v, x)
  total_flops = _report.flops(fwd, variables, xb)
  per_layer = _report.layer_flops(model, variables, xb)
  eff_flops = _report.effective_flops(total_flops, per_layer, st["params"], masks)
  lat_dense = _report.latency(fwd, variables, xb)
  lat_pruned = _report.latency(fwd, dict(variables, params=st["params"]), xb)
  compact = None
  if cfg.compact:
    compact = _compact_metrics(cfg, ds, model, st, res, variables, xb, total_flops)
  metrics = {
      "compact": compact,
      "config": dataclasses.asdict(cfg),
      "dense": dense_eval, "pruned": pruned_eval,
      "sparsity": float(jp.sparsity(masks, st["params"])),
      "bytes": {"dense": summ.total.dense_bytes, "sparse": summ.total.sparse_bytes},
      "flops": {"dense": total_flops, "effective": eff_flops, "per_layer": per_layer, "batch": int(xb.shape[0])},
      "latency_s": {"dense": lat_dense, "masked": lat_pruned, "batch": int(xb.shape[0])},
      "robustness_top1": robustness,
      "history": {"dense": dense_hist, "finetune": res["history"]},
      "summary": summ.to_dict(),
  }
  if jax.process_index() != 0:
    return metrics
  tmp = out / "metrics.json.tmp"
  tmp.write_text(json.dumps(metrics, indent=1, default=float))
  os.replace(tmp, out / "metrics.json")
  _report.plot_sparsity(st["params"], masks, str(out / "sparsity.png"))
  _report.plot_curves({"dense": dense_hist, "prune + fine-tune": res["history"]}, str(out / "curves.png"))
  _report.plot_score_histograms(res["scores"], masks, str(out / "scores.png"))
  (out / "report.md").write_text(_markdown(cfg, metrics, summ))
  return metrics


def _compact_metrics(cfg, ds, model, st, res, dense_variables, xb, dense_flops) -> dict:
  """Physically removes the pruned units, rebuilds the smaller model, and measures it next to the others."""
  from jprune import structured as S
  stats = st.get("batch_stats")
  if stats:
    small, widths, small_stats = S.compact(st["params"], res["groups"], res["group_masks"], extra=stats)
  else:
    (small, widths), small_stats = S.compact(st["params"], res["groups"], res["group_masks"]), None
  small_model = _models.resize(model, small)
  ev = _train.evaluate(small_model, small, small_stats, ds.x_test, ds.y_test)
  variables = {"params": small, **({"batch_stats": small_stats} if small_stats else {})}
  fwd = lambda v, x: small_model.apply(v, x)
  dense_fwd = lambda v, x: model.apply(v, x)
  # latency side by side, alternating, so both see the same machine state
  lat_small, lat_dense = [], []
  for _ in range(5):
    lat_dense.append(_report.latency(dense_fwd, dense_variables, xb, repeats=20))
    lat_small.append(_report.latency(fwd, variables, xb, repeats=20))
  return {"top1": ev["top1"], "top5": ev["top5"], "widths": widths,
          "params": int(sum(x.size for x in jax.tree.leaves(small))),
          "dense_params": int(sum(x.size for x in jax.tree.leaves(dense_variables["params"]))),
          "bytes": int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(small))),
          "flops": _report.flops(fwd, variables, xb), "dense_flops": dense_flops,
          "latency_s": float(np.median(lat_small)), "dense_latency_s": float(np.median(lat_dense)),
          "speedup": float(np.median(lat_dense) / np.median(lat_small))}


def _header_md(command: str, cfg) -> str:
  """The first lines every report.md starts with: the command, model, data and training settings."""
  how = (f"criterion **{cfg.criterion}**, granularity **{cfg.granularity}**" if command == "sensitivity" else
         f"schedule **{cfg.schedule}**, scope **{cfg.scope}**, granularity **{cfg.granularity}**")
  return (f"# jprune {command}: {cfg.model} on {cfg.dataset}\n\n{how}; dense {cfg.epochs} epochs (batch {cfg.batch_size}, lr {cfg.lr:g}, seed "
          f"{cfg.seed}){f', fine-tune {cfg.finetune_epochs} epochs (lr {cfg.finetune_lr:g})' if command != 'sensitivity' else ''}"
          f"{f', first {cfg.limit} examples of each split' if cfg.limit else ''}.")


def _what_md(cfg, m) -> str:
  """What was pruned and how: the options, or the recipe's entries."""
  if cfg.recipe:
    return (f"recipe `{cfg.recipe}`:\n\n{_recipe_of(cfg).markdown()}\nreached {m['sparsity']:.2%} over the "
            f"selected leaves")
  if cfg.threshold is not None:
    when = "once before fine-tuning" if cfg.schedule == "one-shot" else f"every {cfg.every or 100} steps of fine-tuning"
    return (f"criterion **{cfg.criterion}**, pruned where the score < **{cfg.threshold:g}** ({when}), granularity "
            f"**{cfg.granularity}**\n(reached {m['sparsity']:.2%})")
  return (f"criterion **{cfg.criterion}**, schedule **{cfg.schedule}**, scope **{cfg.scope}**, granularity\n"
          f"**{cfg.granularity}**, distribution **{cfg.allocation or cfg.distribution}**, target sparsity "
          f"**{cfg.sparsity:.0%}**\n(reached {m['sparsity']:.2%})")


def _markdown(cfg, m, summ) -> str:
  d, p = m["dense"], m["pruned"]
  rob = "\n".join(f"| σ = {s} | {100 * v['dense']:.2f}% | {100 * v['pruned']:.2f}% |"
                  for s, v in m["robustness_top1"].items())
  return f"""# jprune run: {cfg.model} on {cfg.dataset}

{_what_md(cfg, m)}; dense {cfg.epochs} epochs, fine-tune {cfg.finetune_epochs} epochs
{'with distillation from the dense model' if cfg.distill else ''}.

| model | top-1 | top-5 | test loss |
|---|---:|---:|---:|
| dense | {100 * d['top1']:.2f}% | {100 * d['top5']:.2f}% | {d['loss']:.4f} |
| pruned + fine-tuned | {100 * p['top1']:.2f}% | {100 * p['top5']:.2f}% | {p['loss']:.4f} |

| | dense | pruned |
|---|---:|---:|
| parameter bytes (sparse = kept values + 1 bit/entry) | {m['bytes']['dense']:,} | {m['bytes']['sparse']:,} |
| FLOPs per batch of {m['flops']['batch']} (XLA cost analysis; pruned = effective) | {m['flops']['dense']:,.0f} | {m['flops']['effective']:,.0f} |
| inference latency, batch {m['latency_s']['batch']} (masked weights, dense kernels) | {1e3 * m['latency_s']['dense']:.3f} ms | {1e3 * m['latency_s']['masked']:.3f} ms |

{_compact_md(m.get('compact'))}
Accuracy under Gaussian input noise:

| noise | dense | pruned |
|---|---:|---:|
{rob}

## Per-layer sparsity

{summ.markdown()}
![sparsity](sparsity.png)

## Training curves

![curves](curves.png)

## Score histograms

![scores](scores.png)
"""


def _compact_md(c) -> str:
  if not c:
    return ""
  return f"""Compacted model (pruned neurons/channels physically removed; widths {c['widths']}):

| | dense | compacted |
|---|---:|---:|
| top-1 / top-5 | | {100 * c['top1']:.2f}% / {100 * c['top5']:.2f}% |
| parameters | {c['dense_params']:,} | {c['params']:,} |
| FLOPs (XLA cost analysis) | {c['dense_flops']:,.0f} | {c['flops']:,.0f} |
| inference latency (median, side by side) | {1e3 * c['dense_latency_s']:.3f} ms | {1e3 * c['latency_s']:.3f} ms ({c['speedup']:.2f}x faster) |

"""


# ------------------------------------------------------------------------------------------------ sweep
def sweep(cfg: RunConfig, criteria, sparsities) -> dict:
  """Runs the criteria × sparsities grid from one dense checkpoint; cached per cell in out/sweep.json."""
  validate(cfg)
  for c in criteria:
    validate(dataclasses.replace(cfg, criterion=c))
  for s in sparsities:
    validate(dataclasses.replace(cfg, sparsity=s))
  with _locked(cfg.out):
    return _sweep(cfg, criteria, sparsities)


def _sweep(cfg: RunConfig, criteria, sparsities) -> dict:
  out = Path(cfg.out)
  # every cell ever computed here, keyed by its prune tag (the digest of everything that decides it): a cell is
  # reused only when all of that matches; sweep.json holds this sweep's cells keyed "criterion@sparsity"
  cache_path = out / "sweep-cache.json"
  try:
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
  except (json.JSONDecodeError, UnicodeDecodeError):
    cache = {}   # a damaged cache only costs recomputation
  if not isinstance(cache, dict):
    cache = {}
  ds = load_data(cfg)
  model = model_for(cfg, ds)
  dense_state, dense_hist = train_dense(cfg, ds, model)
  fp = _data.fingerprint(ds)
  tags = {(c, s): dataclasses.replace(cfg, criterion=c, sparsity=s).prune_tag(fp) for c in criteria for s in sparsities}
  stats = dense_state.get("batch_stats")

  def evaluate(p):
    return _train.evaluate(model, p, stats, ds.x_test, ds.y_test)

  def prune(c, s):   # the run's own pruning: scheduled, fine-tuned, resumable under out/prune-<tag>
    res = prune_and_finetune(dataclasses.replace(cfg, criterion=c, sparsity=s, progress=False), ds, model,
                             dense_state)
    return res["state"]["params"], res["masks"]

  def store(cell, value):
    c, s = cell
    cache[tags[cell]] = {"criterion": c, "sparsity": s, "top1": value["eval"]["top1"],
                         "top5": value["eval"]["top5"], "reached": value["reached"]}
    tmp = cache_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    os.replace(tmp, cache_path)

  # a cell is reused only when its prune tag (the digest of everything that decides it) is in the cache
  done = {cell: {"metric": cache[t]["top1"]} for cell, t in tags.items() if t in cache}
  from jprune import analysis
  result = analysis.sweep(dense_state["params"], evaluate, {c: None for c in criteria}, sparsities, prune=prune,
                          done=done, on_cell=store, metric="top1", progress=cfg.progress)
  dense_acc = result.baseline
  cells_out = {f"{c}@{s:g}": cache[tags[c, s]] for c, s in tags}
  tmp = out / "sweep.json.tmp"
  tmp.write_text(json.dumps(cells_out, indent=1))
  os.replace(tmp, out / "sweep.json")
  analysis.plot_sweep(result, str(out / "sweep.png"), ylabel="test top-1",
                      title=f"{cfg.model}: accuracy vs sparsity ({cfg.schedule})")
  table = "| criterion | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |\n|---|" + "---:|" * len(sparsities) + "\n"
  for c in criteria:
    table += f"| {c} | " + " | ".join(f"{100 * cells_out[f'{c}@{s:g}']['top1']:.2f}%" for s in sparsities) + " |\n"
  cell_rows = "".join(f"| {c} | {s:.0%} | {100 * cells_out[f'{c}@{s:g}']['reached']:.2f}% | "
                      f"{100 * cells_out[f'{c}@{s:g}']['top1']:.2f}% | {100 * cells_out[f'{c}@{s:g}']['top5']:.2f}% | "
                      f"`prune-{tags[c, s]}` |\n" for c, s in tags)
  report = (f"{_header_md('sweep', cfg)}\n\nEvery cell starts from the same dense model (top-1 "
            f"{100 * dense_acc:.2f}%), prunes by its criterion to its sparsity and fine-tunes; test top-1:\n\n"
            f"{table}\n![sweep](sweep.png)\n\n| criterion | target | reached | top-1 | top-5 | run folder |\n"
            f"|---|---:|---:|---:|---:|---|\n{cell_rows}")
  for name in ("report.md", "sweep.md"):   # sweep.md: the name earlier versions wrote
    (out / name).write_text(report)
  return {"dense_top1": dense_acc, "cells": cells_out, "table": table}


# ------------------------------------------------------------------------------------------------ sensitivity
def sensitivity(cfg: RunConfig, grid=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98), target: Optional[float] = None,
                allocation_path: Optional[str] = None) -> dict:
  """Prunes one layer at a time (criterion, one-shot, no fine-tuning) over `grid`; plots accuracy per layer.

  With `target`, greedily raises the sparsity of whichever layer loses the least accuracy per pruned weight
  until the overall sparsity over the selected layers reaches `target`, and writes the `by_path` allocation.
  """
  validate(cfg)
  with _locked(cfg.out):
    return _sensitivity(cfg, grid, target, allocation_path)


def _calib_scores(cfg, ds, model, params, stats, *, progress):
  """The criterion's one-shot scores over `cfg.calib_batches` training batches (seeded apart from training)."""
  crit = criterion_of(cfg.criterion, for_training=False)
  calib = list(_data.batches(ds.x_train, ds.y_train, 256, seed=cfg.seed + 1, epoch=0))[:cfg.calib_batches]
  return jp.scores(crit, params, loss_fn=_loss_fn(model, stats), batches=calib, progress=progress)


def _sensitivity(cfg, grid, target, allocation_path) -> dict:
  from jprune import analysis
  out = Path(cfg.out)
  ds = load_data(cfg)
  model = model_for(cfg, ds)
  dense_state, _ = train_dense(cfg, ds, model)
  params, stats = dense_state["params"], dense_state.get("batch_stats")
  scores = _calib_scores(cfg, ds, model, params, stats, progress=False)
  top1 = lambda p: _train.evaluate(model, p, stats, ds.x_test, ds.y_test)["top1"]
  sens = analysis.layer_sensitivity(params, scores, top1, grid, progress=cfg.progress)
  analysis.plot_sensitivity(sens, str(out / "sensitivity.png"), ylabel="test top-1",
                            title=f"{cfg.model}: per-layer sensitivity ({cfg.criterion})")
  result: dict = {"dense_top1": sens.baseline, "grid": list(sens.grid), "accuracy": sens.metric}
  if target is not None:
    mapping = analysis.allocate(sens, target)
    total = sum(sens.sizes.values())
    result["allocation"] = mapping
    result["allocation_sparsity"] = sum(mapping["^" + re.escape(l) + "$"] * n for l, n in sens.sizes.items()) / total
    path = allocation_path or str(out / "allocation.json")
    with open(path, "w") as f:
      json.dump(mapping, f, indent=1)
    result["allocation_path"] = path
  with open(out / "sensitivity.json", "w") as f:
    json.dump(result, f, indent=1)
  alloc_md = ""
  if target is not None:
    alloc_md = (f"\n\nAllocation for an overall {target:.0%} (greedy: the least top-1 lost per pruned weight; "
                f"reached {result['allocation_sparsity']:.2%}), written to `{result['allocation_path']}` for "
                f"`jprune run --allocation`:\n\n| layer | sparsity |\n|---|---:|\n"
                + "".join(f"| {k} | {v:.0%} |\n" for k, v in result["allocation"].items()))
  (out / "report.md").write_text(
      f"{_header_md('sensitivity', cfg)}\n\nEach layer alone pruned one-shot by **{cfg.criterion}** (no "
      f"fine-tuning); test top-1 (dense {100 * sens.baseline:.2f}%):\n\n"
      f"{analysis.table(sens, fmt='{:.2%}')}\n![sensitivity](sensitivity.png){alloc_md}\n")
  return result
