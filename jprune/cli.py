"""Moved to `jprune.app.cli` (the application apart from the library); this name keeps working."""

import sys

from jprune.app import cli as _module

if __name__ == "__main__":
  sys.exit(_module.main())
sys.modules[__name__] = _module
