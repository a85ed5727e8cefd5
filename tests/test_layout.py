"""The package's layout: a light core, the application apart, old module names still working."""

import ast
import subprocess
import sys
from pathlib import Path

try:
  import tomllib
except ModuleNotFoundError:   # Python 3.10
  import tomli as tomllib

ROOT = Path(__file__).parents[1]
HEAVY = ("orbax", "tensorflow_datasets", "matplotlib", "tqdm", "gguf", "tokenizers")


def test_import_jprune_loads_no_extra_and_submodules_load_on_first_use():
  code = ("import sys, jprune as jp\n"
          f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
          "print(jp.checkpoint.__name__, jp.structured.__name__, jp.llm.__name__, jp.export_sparse.__name__)\n"
          "print('orbax' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
  lines = out.splitlines()
  assert lines[0] == "[]", lines[0]
  assert lines[1] == "jprune.checkpoint jprune.structured jprune.llm export_sparse"
  assert lines[2] == "True"     # jp.checkpoint brought orbax in when it was first used


def test_core_dependencies_are_jax_flax_optax():
  meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  names = {d.split(">")[0].split(";")[0].split("[")[0].strip().lower() for d in meta["dependencies"]}
  assert names == {"jax", "flax", "optax", "numpy", "tomli"}    # numpy comes with jax; tomli only on 3.10
  extras = meta["optional-dependencies"]
  assert {"checkpoint", "app", "llm", "test"} <= set(extras)


def _imports(path: Path) -> set:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
    elif isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
  return names


def test_the_library_never_imports_the_application():
  shims = {"cli.py", "job.py", "train.py", "data.py"}     # old names that forward to jprune.app
  app = {"jprune.app", "jprune.cli", "jprune.job", "jprune.train", "jprune.data"}
  for path in sorted((ROOT / "jprune").rglob("*.py")):
    rel = path.relative_to(ROOT / "jprune")
    if rel.parts[0] == "app" or (len(rel.parts) == 1 and rel.name in shims):
      continue
    bad = {n for n in _imports(path) if any(n == a or n.startswith(a + ".") for a in app)}
    assert not bad, f"{rel} imports the application: {sorted(bad)}"


def test_old_module_names_still_work():
  from jprune import cli, data, job, train
  from jprune.app import cli as app_cli, job as app_job
  assert cli is app_cli and job is app_job and data.__name__ == "jprune.app.data" and train.__name__ == "jprune.app.train"
  from jprune.job import RunConfig
  assert RunConfig is app_job.RunConfig
  res = subprocess.run([sys.executable, "-m", "jprune.cli", "run", "--sparsity", "2"], capture_output=True,
                       text=True, cwd=ROOT)
  assert res.returncode != 0 and res.stderr.strip() == "jprune: error: sparsity must be in [0, 1), got 2.0."
