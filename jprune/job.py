"""Moved to `jprune.app.job` (the application apart from the library); this name keeps working."""

import sys

from jprune.app import job as _module

sys.modules[__name__] = _module
