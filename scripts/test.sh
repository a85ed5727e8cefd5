#!/usr/bin/env bash
# Sets everything up, then runs the test suite (doctests included).
set -euo pipefail
cd "$(dirname "$0")/.."
# the tests and the examples (smoke mode) read Fashion-MNIST and the Jargon File: --data installs both
bash scripts/setup.sh --llm --data
# Debian packages unpacked into .data/ when setup had no root (see setup.sh)
if [ -f .data/usr/share/doc/jargon-text/jargon.txt.gz ] && [ -z "${JPRUNE_JARGON:-}" ]; then
  export JPRUNE_JARGON="$PWD/.data/usr/share/doc/jargon-text/jargon.txt.gz"
fi
if [ -d .data/usr/share/datasets/fashion-mnist ] && [ -z "${JPRUNE_FASHION_MNIST_DIR:-}" ]; then
  export JPRUNE_FASHION_MNIST_DIR="$PWD/.data/usr/share/datasets/fashion-mnist"
fi
export JPRUNE_NO_PROGRESS=1
# One pytest worker per core (at most 4): much of the suite is XLA compilation and Python, which one process
# runs on one core. Workers share one XLA compilation cache for the run (tests/conftest.py).
workers=$(.venv/bin/python -c 'import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))')
# --all: also the end-to-end checks marked `slow` (the real SmolLM2 through llama.cpp; benchmarks cover them too)
args=()
for a in "$@"; do
  if [ "$a" = "--all" ]; then args+=(-m ""); else args+=("$a"); fi
done
set -- "${args[@]+"${args[@]}"}"
# the library and the application lint- and type-clean (rules and settings in pyproject.toml)
.venv/bin/ruff check jprune tests benchmarks examples --output-format concise
.venv/bin/mypy
exec .venv/bin/python -m pytest -n "$workers" --dist worksteal --doctest-modules --durations=30 jprune tests "$@"
