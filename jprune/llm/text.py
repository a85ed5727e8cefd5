"""Offline text for calibration and evaluation, and how it is cut into token windows."""

from __future__ import annotations

import gzip
import os
from typing import Optional

import numpy as np

JARGON = "/usr/share/doc/jargon-text/jargon.txt.gz"


def jargon_text(path: Optional[str] = None) -> str:
  """The Jargon File (Debian's `jargon-text`, public domain) as one string: from `path`, else $JPRUNE_JARGON,
  else Debian's install path."""
  path = path or os.environ.get("JPRUNE_JARGON") or JARGON
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: `apt-get install jargon-text` (or `bash scripts/setup.sh --text`, "
                            f"or set JPRUNE_JARGON to a jargon.txt.gz).")
  with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
    return f.read()


def token_windows(ids, seq_len: int, n: Optional[int] = None) -> np.ndarray:
  """Consecutive non-overlapping windows (n, seq_len) of a token stream."""
  ids = np.asarray(ids, np.int32).reshape(-1)
  count = len(ids) // seq_len if n is None else min(n, len(ids) // seq_len)
  if count == 0:
    raise ValueError(f"{len(ids)} tokens do not fill one window of {seq_len}.")
  return ids[: count * seq_len].reshape(count, seq_len)


def split_text_tokens(ids, calib: int, calib_len: int, eval_windows: int, eval_len: int):
  """Calibration windows spread over the first half of a token stream; evaluation windows from its end."""
  ids = np.asarray(ids, np.int32)
  half = len(ids) // 2
  if half < calib_len or len(ids) - half < eval_windows * eval_len:
    raise ValueError(f"{len(ids)} tokens are too few for {calib}×{calib_len} calibration and "
                     f"{eval_windows}×{eval_len} evaluation tokens.")
  step = max(calib_len, (half - calib_len) // max(calib, 1))
  n = min(calib, (half - calib_len) // step + 1)
  cal = np.stack([ids[i * step: i * step + calib_len] for i in range(n)])
  return cal, token_windows(ids[-eval_windows * eval_len:], eval_len)


def train_windows(ids, seq_len: int) -> np.ndarray:
  """Every non-overlapping window of the first half of a token stream (for recovery training; the evaluation
  windows of `split_text_tokens` come from the end, so the two never overlap)."""
  ids = np.asarray(ids, np.int32)
  return token_windows(ids[: len(ids) // 2], seq_len)
