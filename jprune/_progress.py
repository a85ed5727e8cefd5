"""Progress bars (tqdm) that stay quiet in CI logs and non-interactive runs when asked."""

import os

from tqdm.auto import tqdm


def progress_bar(iterable=None, **kwargs):
  kwargs.setdefault("dynamic_ncols", True)
  kwargs.setdefault("leave", False)
  if os.environ.get("JPRUNE_NO_PROGRESS"):
    kwargs["disable"] = True
  return tqdm(iterable, **kwargs)
