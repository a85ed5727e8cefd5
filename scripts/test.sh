#!/usr/bin/env bash
# Sets everything up, then runs the test suite (doctests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --llm
export JPRUNE_NO_PROGRESS=1
exec .venv/bin/python -m pytest --doctest-modules --durations=25 jprune tests "$@"
