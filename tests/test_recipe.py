"""Recipes (`jprune.recipe`): the commented example loads, trains with exact per-entry targets on each entry's own
schedule, and anything wrong in a recipe is one line naming the entry and the key."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jprune as jp
from jprune import recipe as R

EXAMPLE = Path(__file__).parents[1] / "examples" / "recipe.toml"
SHAPES = {"Dense_0": (784, 300), "Dense_1": (300, 100), "Dense_2": (100, 10)}


def _lenet300_like():
  rng = np.random.default_rng(0)
  params = {k: {"kernel": jnp.asarray(rng.standard_normal(s) * 0.05, jnp.float32),
                "bias": jnp.zeros(s[1], jnp.float32)} for k, s in SHAPES.items()}
  x = jnp.asarray(rng.standard_normal((64, 784)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 64))

  def loss_fn(p):
    h = x
    for k in SHAPES:
      h = h @ p[k]["kernel"] + p[k]["bias"][None]
      h = jax.nn.relu(h) if k != "Dense_2" else h
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()
  return params, loss_fn


def test_example_recipe_loads_with_defaults_filled_in():
  r = R.load(str(EXAMPLE))
  assert [e.where for e in r.entries] == ["^Dense_0/kernel$", "^Dense_1/kernel$", "^Dense_2/kernel$"]
  d0, d1, d2 = r.entries
  assert (d0.criterion, d0.target, d0.granularity, d0.scope) == ("magnitude", 0.95, "unstructured", "layer")
  assert d0.schedule == {"kind": "polynomial", "begin": 0, "end": 300, "every": 30}
  assert (d1.criterion, d1.ema, d1.target, d1.schedule["begin"]) == ("taylor", 0.9, 0.8, 100)
  assert (d2.granularity, d2.target, d2.schedule) == ("2:4", 0.5, {"kind": "one_shot", "at": 50})
  assert r.reaches_target_at() == 300
  assert "| `^Dense_2/kernel$` | magnitude | 2:4 |" in r.markdown()


def test_recipe_trains_each_entry_on_its_own_schedule_to_its_exact_target():
  params, loss_fn = _lenet300_like()
  tx = R.load(str(EXAMPLE)).pruned(optax.adam(1e-3))
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(loss_fn)(p)
    with jax.numpy_dtype_promotion("standard"):   # optax's Adam mixes Python floats and int32
      u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  kept = lambda m: float(np.mean(np.asarray(m)))
  for t in range(301):
    params, state = step(params, state)
    m = jp.masks_of(state)                      # every entry's masks in one tree
    if t == 49:
      assert kept(m["Dense_2"]["kernel"]) == 1.0 and kept(m["Dense_1"]["kernel"]) == 1.0
      assert kept(m["Dense_0"]["kernel"]) < 1.0  # the first entry starts at step 0
    if t == 50:
      assert kept(m["Dense_2"]["kernel"]) == 0.5 and kept(m["Dense_1"]["kernel"]) == 1.0   # one-shot at 50
    if t == 119:
      assert kept(m["Dense_1"]["kernel"]) == 1.0   # begins at 100 at sparsity 0 (the polynomial's start) ...
    if t == 120:
      assert kept(m["Dense_1"]["kernel"]) < 1.0    # ... and prunes at its first update after
  m = jp.masks_of(state)
  for name, target in (("Dense_0", 0.95), ("Dense_1", 0.8)):
    n = np.prod(SHAPES[name])
    assert int(np.sum(~np.asarray(m[name]["kernel"]))) == round(target * n)   # exact count per leaf
  groups = np.asarray(m["Dense_2"]["kernel"]).reshape(25, 4, 10)            # 2:4 along the input axis
  assert np.all(groups.sum(axis=1) == 2)
  for name in SHAPES:                                # pruned weights are exactly zero; biases were not selected
    w, mk = np.asarray(params[name]["kernel"]), np.asarray(m[name]["kernel"])
    assert np.all(w[~mk] == 0) and np.all(w[mk] != 0)
    assert np.asarray(m[name]["bias"]).shape == ()


def test_masks_of_combines_nested_pruning_states():
  params = {"a": {"kernel": jnp.arange(1.0, 9.0)}, "b": {"kernel": jnp.arange(1.0, 9.0)[::-1]}}
  inner = jp.pruned(optax.sgd(0.0), schedule=jp.constant(0.25), where="^a/")
  tx = jp.pruned(inner, schedule=jp.constant(0.75), where="^b/")
  _, state = tx.update(params, tx.init(params), params)
  m = jp.masks_of(state)
  assert np.asarray(m["a"]["kernel"]).tolist() == [False, False] + [True] * 6
  assert np.asarray(m["b"]["kernel"]).tolist() == [True, True] + [False] * 6


BASE = '''
[defaults]
schedule = { kind = "constant" }
'''


@pytest.mark.parametrize("text, message", [
    ("[[prune]]\nwhere = 'x'\ntarget = 0.5\nschedule = { kind = 'constant' }\nfoo = 1", "#1: unknown key(s) ['foo']"),
    (BASE + "[[prune]]\ntarget = 0.5", "#1: needs `where`"),
    (BASE + "[[prune]]\nwhere = 'x'", "#1: needs `target`"),
    (BASE + "[[prune]]\nwhere = 'x'\ntarget = 1.5", "target must be a number in [0, 1), got 1.5"),
    (BASE + "[[prune]]\nwhere = 'x'\ntarget = 0.9\ngranularity = '2:4'", "2:4 prunes 0.5 of every group of 4"),
    (BASE + "[[prune]]\nwhere = 'x'\ntarget = 0.5\ncriterion = 'l1'", "criterion 'l1' is not one of"),
    (BASE + "[[prune]]\nwhere = 'x'\ntarget = 0.5\ncriterion = 'magnitude'\nema = 0.9", "ema applies to"),
    ("[[prune]]\nwhere = 'x'\ntarget = 0.5", "#1: needs a schedule"),
    ("[[prune]]\nwhere = 'x'\ntarget = 0.5\nschedule = { kind = 'cosine' }", "schedule kind 'cosine' is not one of"),
    ("[[prune]]\nwhere = 'x'\ntarget = 0.5\nschedule = { kind = 'polynomial', begin = 5, end = 5 }",
     "schedule: polynomial needs 0 <= begin < end"),
    ("[[prune]]\nwhere = 'x'\ntarget = 0.5\nschedule = { kind = 'one_shot', step = 5 }", "takes ['at'], not ['step']"),
    ("[[prune]]\nwhere = 'x'\nschedule = { kind = 'iterative', levels = [0.5, 0.8], every = 10 }\ntarget = 0.9",
     "target 0.9 differs from the last iterative level 0.8"),
    ("prune = 3", "no [[prune]] entries"),
    ("[[prune]\nwhere = 'x'", "not valid TOML"),
    ("version = 2\n" + BASE + "[[prune]]\nwhere = 'x'\ntarget = 0.5", "version 2 is not supported"),
    (BASE + "[[prune]]\nwhere = 'x'\ntarget = 0.5\nscope = 'global'\ndistribution = 'erk'", "needs scope = \"layer\""),
])
def test_a_wrong_recipe_is_one_line_naming_the_entry(text, message):
  with pytest.raises(R.RecipeError) as e:
    R.loads(text)
  assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("entries, message", [
    ("where = '^Dense_0/'\ntarget = 0.5\n[[prune]]\nwhere = 'kernel'\ntarget = 0.5",
     "Dense_0/kernel is selected by [[prune]] #1 and #2"),
    ("where = '^Conv_'\ntarget = 0.5", "[[prune]] #1 (where = '^Conv_'): selection '^Conv_' matched no float leaf"),
    ("where = '^Dense_2/kernel$'\ngranularity = '3:7'", "[[prune]] #1:"),
])
def test_recipe_checks_the_params_at_init(entries, message):
  params, _ = _lenet300_like()
  r = R.loads(BASE + "[[prune]]\n" + entries)
  with pytest.raises(R.RecipeError) as e:
    r.pruned(optax.sgd(0.1)).init(params)
  assert message in str(e.value), str(e.value)


def test_cli_recipe_refuses_options_it_sets_and_schedules_longer_than_the_run(tmp_path, capsys):
  from test_cli import write_idx
  from jprune import cli
  idx = write_idx(tmp_path / "idx", n_train=256, n_test=64)
  base = ["run", "--data-dir", str(idx), "--recipe", str(EXAMPLE), "--out", str(tmp_path / "o"), "--no-progress"]
  assert cli.main([*base, "--sparsity", "0.5", "--granularity", "2:4"]) != 0
  err = capsys.readouterr().err
  assert "--recipe sets the criterion" in err and "drop --sparsity, --granularity." in err
  assert len(err.strip().splitlines()) == 1
  assert cli.main([*base, "--finetune-epochs", "2", "--batch-size", "32"]) != 0   # 16 steps < step 300
  err = capsys.readouterr().err
  assert "reach their targets at step 300, but fine-tuning runs 16 steps" in err
  assert not list((tmp_path / "o").glob("dense-*"))       # refused before any training
  # a recipe that fits the run: trained, reported, each kernel at its entry's exact target
  short = tmp_path / "short.toml"
  short.write_text(EXAMPLE.read_text().replace("end = 300, every = 30", "end = 12, every = 4")
                   .replace("begin = 100, end = 300, every = 20", "begin = 4, end = 12, every = 4")
                   .replace("at = 50", "at = 2"))
  base[base.index(str(EXAMPLE))] = str(short)
  with jax.numpy_dtype_promotion("standard"):
    assert cli.main([*base, "--epochs", "1", "--finetune-epochs", "2", "--batch-size", "32"]) == 0, \
        capsys.readouterr().err[-2000:]
  import json
  m = json.loads((tmp_path / "o" / "metrics.json").read_text())
  rows = {r["path"]: r for r in m["summary"]["leaves"]}
  for name, target in (("Dense_0", 0.95), ("Dense_1", 0.8), ("Dense_2", 0.5)):
    n = int(np.prod(SHAPES[name]))
    assert rows[f"{name}/kernel"]["kept"] == n - round(target * n)
  assert "| `^Dense_1/kernel$` | taylor | unstructured |" in (tmp_path / "o" / "report.md").read_text()
  assert [p.name.startswith("prune-recipe-") for p in (tmp_path / "o").glob("prune-*")] == [True]
