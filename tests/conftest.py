"""Shared test set-up: quiet JAX logs, the repository root on sys.path, common fixtures."""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# The tests compile hundreds of tiny programs and run each a few times, so LLVM's optimisations cost
# more than they save (tests/test_pvt.py: 140 s -> 78 s). They change the machine code, not the
# program XLA runs; speed is measured in scripts/benchmark.py with the defaults.
# VIT_JAX_TEST_OPTIMIZED=1 compiles the tests as users' runs are compiled.
if os.environ.get('VIT_JAX_TEST_OPTIMIZED') != '1':
  _flags = os.environ.get('XLA_FLAGS', '').split()
  for _flag in ('--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true'):
    if not any(f.split('=')[0] == _flag.split('=')[0] for f in _flags):
      _flags.append(_flag)
  os.environ['XLA_FLAGS'] = ' '.join(_flags)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
