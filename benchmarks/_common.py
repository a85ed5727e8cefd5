"""Shared helpers for benchmarks: timing, device description, JSON results."""

import json
import os
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


def write(name: str, payload: dict) -> str:
  os.makedirs(RESULTS, exist_ok=True)
  payload = dict(payload, device=device_info(), date=time.strftime("%Y-%m-%d %H:%M:%S"))
  suffix = "" if payload["device"]["platform"] == "cpu" else "_" + payload["device"]["platform"]
  path = os.path.join(RESULTS, f"{name}{suffix}.json")
  with open(path, "w") as f:
    json.dump(payload, f, indent=2)
  return path
