"""Progress bars (tqdm) with an ETA: redrawn in place on a terminal, one plain line every 30 s in a log file.

`JPRUNE_NO_PROGRESS=1` (or `disable=True`) turns them off. tqdm is the `progress` extra: without it the
library's own loops (`jprune.scores`, the LLM pruning passes) run without a bar.
"""

import os
import sys
import time

LOG_INTERVAL_S = 30.0


class _Lines:
  """A file for tqdm that writes a refresh as one whole line (no carriage returns, no erased lines): the first, then
  at most one per `LOG_INTERVAL_S` (`set_postfix` refreshes on every call), and the finished one."""

  def __init__(self, stream):
    self.stream = stream
    self.last = None

  def write(self, s: str) -> None:
    s = s.replace("\r", "").strip()
    now = time.monotonic()
    if s and (self.last is None or now - self.last >= LOG_INTERVAL_S or "100%|" in s):
      self.stream.write(s + "\n")
      self.last = now

  def flush(self) -> None:
    self.stream.flush()


def _is_terminal(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


def progress_bar(iterable=None, **kwargs):
  try:
    from tqdm.auto import tqdm
  except ImportError:   # the core library without the `progress` extra: no bar, the iterable as it is
    if iterable is None:
      raise
    return iterable
  kwargs.setdefault("dynamic_ncols", True)
  kwargs.setdefault("leave", False)
  if os.environ.get("JPRUNE_NO_PROGRESS"):
    kwargs["disable"] = True
  if "file" not in kwargs and not _is_terminal(sys.stderr):   # a log: a line now and then, no bar redraws
    kwargs.update(file=_Lines(sys.stderr), mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S, ascii=True,
                  dynamic_ncols=False, ncols=100)
  return tqdm(iterable, **kwargs)
