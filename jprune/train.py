"""Moved to `jprune.app.train` (the application apart from the library); this name keeps working."""

import sys

from jprune.app import train as _module

sys.modules[__name__] = _module
