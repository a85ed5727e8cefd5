"""Moved to `jprune.app.data` (the application apart from the library); this name keeps working."""

import sys

from jprune.app import data as _module

sys.modules[__name__] = _module
