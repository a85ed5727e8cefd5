"""Objects named "package.module:name" on the command line (your model factory, your data function)."""

from __future__ import annotations

import importlib
import os
import sys


def load_object(spec: str, what: str):
  """The object named by "package.module:attribute" (the current folder first on the path), or one clear error."""
  mod_name, _, attr = spec.partition(":")
  if not mod_name or not attr:
    raise ValueError(f"{what} {spec!r}: expected package.module:name.")
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
  try:
    mod = importlib.import_module(mod_name)
  except Exception as e:   # an ImportError, or the module's own error while importing
    raise ValueError(f"{what} {spec!r}: cannot import {mod_name} ({type(e).__name__}: {str(e)[:200]}).") from None
  obj = mod
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise ValueError(f"{what} {spec!r}: {mod_name} has no attribute {attr!r}.")
    obj = getattr(obj, part)
  return obj
