#!/usr/bin/env bash
# Sets everything up (venv, package, Debian's Fashion-MNIST), then runs the main job on real data:
# train LeNet-300-100, prune it to 90% with gradual magnitude pruning, fine-tune, report (runs/main/report.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --data
exec .venv/bin/jprune run --model lenet300 --sparsity 0.9 --out runs/main "$@"
