"""Shared test set-up: quiet JAX logs, the repository root on sys.path, common fixtures."""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
# The tests compile hundreds of tiny programs and run each a few times, so LLVM's optimisations cost
# more than they save (tests/test_pvt.py: 140 s -> 78 s). They change the machine code, not the
# program XLA runs; speed is measured in scripts/benchmark.py with the defaults.
# VIT_JAX_TEST_OPTIMIZED=1 compiles the tests as users' runs are compiled.
if os.environ.get('VIT_JAX_TEST_OPTIMIZED') != '1':
  from vit_jax import runtime  # pylint: disable=g-import-not-at-top
  os.environ['XLA_FLAGS'] = runtime.with_defaults(
      os.environ.get('XLA_FLAGS', ''), (('xla_backend_optimization_level', '0'),
                                        ('xla_llvm_disable_expensive_passes', 'true')))
