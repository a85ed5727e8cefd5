"""Shared helpers for benchmarks: timing, device description, JSON results."""

import json
import os
import sys
import platform
import time

import jax

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def device_info() -> dict:
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__, "machine": platform.machine()}


def timeit(fn, *args, repeats: int = 5, warmup: int = 1) -> float:
  """Median seconds of a jitted `fn(*args)` (blocked on), after `warmup` calls."""
  from jprune.report import latency
  return latency(fn, *args, repeats=repeats, warmup=warmup)


def interleaved(cases: dict, rounds: int = 3, block: int = 5) -> dict:
  """Median seconds of each jitted `fn(*args)` in `cases` {name: (fn, args)}, timed in alternating blocks.

  Each round times every candidate `block` times back to back (after one untimed call, so each runs warm, as
  in a loop), candidate after candidate; several rounds keep drifts of a shared machine out of the ratios.
  """
  times = {name: [] for name in cases}
  for _ in range(rounds):
    for name, (fn, args) in cases.items():
      jax.block_until_ready(fn(*args))
      for _ in range(block):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times[name].append(time.perf_counter() - t0)
  return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def write(name: str, payload: dict) -> str:
  os.makedirs(RESULTS, exist_ok=True)
  payload = dict(payload, device=device_info(), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                 command="python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]))
  suffix = "" if payload["device"]["platform"] == "cpu" else "_" + payload["device"]["platform"]
  path = os.path.join(RESULTS, f"{name}{suffix}.json")
  with open(path, "w") as f:
    json.dump(payload, f, indent=2)
  return path
