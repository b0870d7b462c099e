"""Throughput benchmarks: `python scripts/benchmark.py MODE ...` in a checkout is
`vit-jax benchmark MODE ...` (`python -m vit_jax.benchmark MODE ...`); the modes and their
protocols are in vit_jax/benchmark/."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vit_jax.benchmark.__main__ import main  # noqa: E402  pylint: disable=wrong-import-position

if __name__ == '__main__':
  sys.exit(main())
