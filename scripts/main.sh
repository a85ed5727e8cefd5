#!/usr/bin/env bash
# Sets everything up (venv, package, Debian data), then runs the main job on real Fashion-MNIST.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --data
cd examples && exec ../.venv/bin/python 01_one_shot_gradient.py "$@"
