"""Recovery of a pruned Llama by knowledge distillation from the dense one, resumable through checkpoints.

Loss per token: (1 − α) · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + α · CE(student, next token)
(`jprune.recover.distillation_loss`, Hinton et al. 2015; the LLM-Pruner / Minitron recovery step). The student
may be a compacted model (any `LlamaConfig`) or a masked one: with `masks`, `keep_pruned` keeps its pruned
entries exactly zero. Batches are drawn from a permutation of the training windows fixed by (seed, epoch), so
a run killed at any point and restarted from its last checkpoint (`jprune.checkpoint.Manager`: params,
optimizer state and step) continues bit-identically; a checkpoint folder written with other settings or inputs
is refused, not resumed.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jprune.llm.eval import _config
from jprune.models import Llama
from jprune.recover import distillation_loss
from jprune.types import PyTree



class DistillResult(NamedTuple):
  params: PyTree
  history: list       # [{"step", "loss", "seconds"}] every `log_every` steps (and evaluations if asked)
  steps: int          # steps done in total (including those restored from a checkpoint)
  seconds: float      # wall time spent distilling, including the time before a resume
  resumed_from: Optional[int]


def _digest(*parts) -> str:
  h = hashlib.sha256()
  for p in parts:
    if isinstance(p, np.ndarray):
      h.update(str((p.shape, p.dtype.str)).encode())
      h.update(np.ascontiguousarray(p).tobytes())
    else:
      h.update(json.dumps(p, sort_keys=True, default=str).encode())
  return h.hexdigest()[:16]


def _tree_digest(tree) -> str:
  return _digest(*[np.asarray(x) for x in jax.tree.leaves(tree)])


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Rows of the training windows for `step`: consecutive slices of a permutation fixed per (seed, epoch)."""
  per_epoch = max(1, n // batch_size)
  epoch, k = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  return perm[k * batch_size:(k + 1) * batch_size]


def distill(student, student_params: PyTree, teacher, teacher_params: PyTree, train_tokens, *, steps: int,
            batch_size: int = 8, lr: float = 2e-4, warmup: int = 20, weight_decay: float = 0.0,
            temperature: float = 1.0, alpha: float = 0.0, masks: Optional[PyTree] = None, seed: int = 0,
            checkpoint_dir: Optional[str] = None, save_every: int = 50, max_seconds: Optional[float] = None,
            log_every: int = 10, eval_tokens=None, eval_every: int = 0, remat: bool = False,
            progress: bool = True) -> DistillResult:
  """Distils `teacher` into `student` on windows of training tokens (n, T) for `steps` AdamW steps.

  Args:
    student, teacher: `jprune.models.Llama` (or their `LlamaConfig`s); widths may differ, the vocab must not.
    train_tokens: int token windows (n, T), e.g. from the first half of a text (`llm.split_text_tokens`).
    steps: optimizer steps in total (a resumed run does the remaining ones). Cosine decay after `warmup`.
    temperature, alpha: distillation temperature and weight of the plain LM loss (0: pure distillation).
    masks: keep-masks of a masked (unstructured / N:M) student; its pruned entries stay exactly 0.
    checkpoint_dir: resumable checkpoints every `save_every` steps and at the end (or at `max_seconds`).
    max_seconds: stop after this wall time (checkpointed), e.g. to bound recovery to a time budget; a resumed run
      counts the seconds spent before the interruption (and keeps the earlier `history`).
    eval_tokens, eval_every: perplexity on held-out windows every `eval_every` steps (into `history`).
    remat: recompute each student block in the backward pass (memory of one block's activations, ~25% slower).
  """
  s_cfg, t_cfg = _config(student), _config(teacher)
  if s_cfg.vocab_size != t_cfg.vocab_size:
    raise ValueError(f"student vocab {s_cfg.vocab_size} differs from the teacher's {t_cfg.vocab_size}.")
  toks = np.asarray(train_tokens)
  if toks.ndim != 2 or not np.issubdtype(toks.dtype, np.integer) or toks.shape[1] < 2:
    raise ValueError(f"train_tokens must be int token windows (n, T >= 2), got {toks.dtype} {toks.shape}.")
  if toks.min() < 0 or toks.max() >= s_cfg.vocab_size:
    raise ValueError(f"train_tokens must lie in [0, {s_cfg.vocab_size}).")
  if not (isinstance(steps, int) and steps >= 0):
    raise ValueError(f"steps must be an int >= 0, got {steps!r}.")
  if not (isinstance(batch_size, int) and 1 <= batch_size <= len(toks)):
    raise ValueError(f"batch_size must be in [1, {len(toks)}] (the number of training windows), got {batch_size!r}.")
  if not (0.0 <= alpha <= 1.0) or temperature <= 0 or lr <= 0:
    raise ValueError(f"need 0 <= alpha <= 1, temperature > 0 and lr > 0; got {alpha}, {temperature}, {lr}.")
  s_model, t_model = Llama(s_cfg, remat=remat), Llama(t_cfg)
  w = max(1, min(warmup, steps))
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, w, max(steps, w + 1), lr * 0.1)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=weight_decay))
  if masks is not None:
    from jprune.transform import keep_pruned
    tx = optax.chain(tx, keep_pruned(masks))

  def loss_fn(p, batch):
    s = s_model.apply({"params": p}, batch)[:, :-1]
    t = jax.lax.stop_gradient(t_model.apply({"params": teacher_params}, batch)[:, :-1])
    v = s.shape[-1]
    return distillation_loss(s.reshape(-1, v).astype(jnp.float32), t.reshape(-1, v).astype(jnp.float32),
                             batch[:, 1:].reshape(-1), temperature=temperature, alpha=alpha)

  @jax.jit
  def step_fn(p, opt, batch):
    with jax.numpy_dtype_promotion("standard"):   # optax's schedules mix Python floats with int32 counts
      loss, g = jax.value_and_grad(loss_fn)(p, batch)
      u, opt = tx.update(g, opt, p)
      return optax.apply_updates(p, u), opt, loss

  params = jax.tree.map(jnp.asarray, student_params)
  opt = tx.init(params)
  start, resumed, spent, history = 0, None, 0.0, []
  identity = {"student": _digest(repr(s_cfg)), "teacher": _digest(repr(t_cfg)),
              "student_params": _tree_digest(student_params), "teacher_params": _tree_digest(teacher_params),
              "tokens": _digest(toks), "masks": None if masks is None else _tree_digest(masks),
              "settings": [steps, batch_size, lr, warmup, weight_decay, temperature, alpha, seed]}
  mngr = None
  if checkpoint_dir is not None:
    from jprune.checkpoint import CheckpointError, Manager
    mngr = Manager(checkpoint_dir, max_to_keep=2)
    latest = mngr.latest_step()
    if latest is not None:
      meta = mngr.metadata(latest)
      saved = meta.get("identity")
      if saved != identity:
        diff = [k for k in identity if (saved or {}).get(k) != identity[k]]
        raise CheckpointError(f"{checkpoint_dir} holds a distillation run with other {', '.join(diff) or 'inputs'}; "
                              "use another folder (nothing was resumed).")
      state = mngr.restore(latest, like={"params": params, "opt": opt})
      params, opt, start, resumed = state["params"], state["opt"], latest, latest
      spent, history = float(meta.get("seconds", 0.0)), list(meta.get("history", []))
  t0 = time.perf_counter() - spent   # a resumed run's time budget counts the time already spent
  from jprune._progress import progress_bar
  bar = progress_bar(total=steps, initial=start, desc="distill", disable=not progress)
  done = start
  try:
    for step in range(start, steps):
      batch = jnp.asarray(toks[batch_indices(len(toks), batch_size, step, seed)])
      params, opt, loss = step_fn(params, opt, batch)
      done = step + 1
      bar.update(1)
      if done % log_every == 0 or done == steps:
        history.append({"step": done, "loss": float(loss), "seconds": time.perf_counter() - t0})
        bar.set_postfix(loss=f"{float(loss):.4f}")
      if eval_tokens is not None and eval_every and done % eval_every == 0:
        from jprune.llm.eval import perplexity
        history.append({"step": done, "perplexity": perplexity(s_cfg, params, eval_tokens,
                                                                 seq_len=np.shape(eval_tokens)[-1])})
      out_of_time = max_seconds is not None and time.perf_counter() - t0 >= max_seconds
      if mngr is not None and (done % save_every == 0 or done == steps or out_of_time):
        mngr.save(done, {"params": params, "opt": opt}, force=True,
                  metadata={"identity": identity, "seconds": time.perf_counter() - t0, "history": history})
      if out_of_time:
        break
  finally:
    bar.close()
    if mngr is not None:
      mngr.close()
  return DistillResult(params, history, done, time.perf_counter() - t0, resumed)
