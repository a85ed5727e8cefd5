"""Every example runs to the end in its smoke mode (`JPRUNE_EXAMPLE_SMOKE=1`: a few hundred steps), so none rots."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("examples-tfds")   # one prepared dataset for every example of a worker


# 04 loads the real SmolLM2 and prunes all 30 blocks twice (~40 s even in smoke mode): marked slow, as
# `benchmarks/llm.py` runs the same Wanda / magnitude 2:4 path on the full model (`bash scripts/test.sh --all` runs it)
SLOW = {"04_llm_wanda.py"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in sorted(p.name for p in EXAMPLES.glob("[0-9]*.py"))])
def test_example_runs(name, tfds_dir):
  env = dict(os.environ, JPRUNE_EXAMPLE_SMOKE="1", JPRUNE_NO_PROGRESS="1", TFDS_DATA_DIR=str(tfds_dir),
             PYTHONPATH=str(EXAMPLES.parent))
  res = subprocess.run([sys.executable, name], cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert any(ch.isdigit() for ch in res.stdout.splitlines()[-1]), res.stdout[-2000:]   # it reported its numbers
