"""Evaluation of Llama params: perplexity over token windows and greedy generation (one jit per config)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jprune.llm.text import token_windows
from jprune.models import Llama, LlamaConfig


def _config(model) -> LlamaConfig:
  if isinstance(model, LlamaConfig):
    return model
  if isinstance(model, Llama):
    return model.config
  raise TypeError(f"expected a jprune.models.Llama (or its LlamaConfig), got {type(model).__name__}.")


@jax.jit
def _nll(logits, tokens):
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def perplexity(model, params, tokens, seq_len: int = 512, batch_size: int = 4, progress: bool = False) -> float:
  """exp(mean next-token NLL) over consecutive windows of `seq_len` tokens (a flat stream or (n, seq_len))."""
  cfg = _config(model)
  windows = token_windows(tokens, seq_len) if np.ndim(tokens) == 1 else np.asarray(tokens, np.int32)
  fwd = _forward_fn(cfg)
  total, count = 0.0, 0
  from jprune._progress import progress_bar
  for s in progress_bar(range(0, len(windows), batch_size), desc="perplexity", disable=not progress):
    batch = jnp.asarray(windows[s: s + batch_size])
    total += float(_nll(fwd(params, batch), batch))
    count += batch.shape[0] * (batch.shape[1] - 1)
  return float(np.exp(total / count))


_FORWARD_CACHE: dict = {}


def forward_fn(cfg: LlamaConfig):
  """The jitted forward `(params, tokens) -> logits` of `Llama(cfg)`, one per config."""
  if cfg not in _FORWARD_CACHE:  # one jitted forward per config (a cache of compiled functions, not of state)
    _FORWARD_CACHE[cfg] = jax.jit(lambda p, x: Llama(cfg).apply({"params": p}, x))
  return _FORWARD_CACHE[cfg]


_forward_fn = forward_fn   # older name


def generate(model, params, prompt_ids, max_new_tokens: int = 20, stop_id: Optional[int] = None) -> list[int]:
  """Greedy decoding (no sampling): the new token ids after `prompt_ids`."""
  cfg = _config(model)
  prompt = [int(i) for i in prompt_ids]
  length = len(prompt) + max_new_tokens
  buf = np.zeros((1, length), np.int32)
  buf[0, : len(prompt)] = prompt
  fwd = _forward_fn(cfg)
  out = []
  for pos in range(len(prompt), length):  # causal attention: the padding after `pos` does not matter
    nxt = int(jnp.argmax(fwd(params, jnp.asarray(buf))[0, pos - 1]))
    buf[0, pos] = nxt
    out.append(nxt)
    if stop_id is not None and nxt == stop_id:
      break
  return out
