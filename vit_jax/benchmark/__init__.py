"""Throughput benchmarks, one module per mode: `vit-jax benchmark MODE` (`python -m
vit_jax.benchmark MODE`, `python scripts/benchmark.py MODE` in a checkout).

  data    the input pipeline (__main__.py)        step    train-step variants side by side
  model   one model against timm / Hugging Face   loop    the training loop against its bare step
  tokens  train-step memory and time against the token count

Every step timed here is built by `vit_jax.train.build.build_training`, as training builds it.
"""
from __future__ import annotations

import os
import site

# The folder that holds the vit_jax package: a checkout, or an environment's site-packages.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker_env(**extra: str) -> dict[str, str]:
  """os.environ (plus `extra`) for a benchmark's worker process (`python -m vit_jax.benchmark.*`):
  a checkout's folder goes on PYTHONPATH, so that the worker imports the same vit_jax as this
  process; an installed package needs nothing (and site-packages ahead of the standard library on
  PYTHONPATH could shadow it)."""
  env = dict(os.environ, **extra)
  installed = {os.path.realpath(p) for p in site.getsitepackages() + [site.getusersitepackages()]}
  if os.path.realpath(ROOT) not in installed:
    env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, env.get('PYTHONPATH')) if p)
  return env
