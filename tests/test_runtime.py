"""vit_jax/runtime.py: the XLA:CPU flags added at import and the host allocator tuning."""
import os
import subprocess
import sys

from vit_jax import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_are_added_once_and_the_users_own_value_wins():
  assert runtime.with_defaults('') == '--xla_cpu_experimental_ynn_fusion_type='
  mine = '--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=dot'
  assert runtime.with_defaults(mine) == mine
  once = runtime.with_defaults('--xla_dump_to=/tmp/x')
  assert once == '--xla_dump_to=/tmp/x --xla_cpu_experimental_ynn_fusion_type='
  assert runtime.with_defaults(once) == once


def _child(code: str, **env: str) -> str:
  clean = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'VIT_JAX_CPU_TUNING')}
  out = subprocess.run([sys.executable, '-c', code], env=dict(clean, PYTHONPATH=ROOT, **env),
                       capture_output=True, text=True, timeout=120, check=True)
  return out.stdout.strip().splitlines()[-1]


def test_importing_the_package_sets_the_flags_before_the_backend_starts():
  code = ('import os, vit_jax, jax; jax.numpy.ones(2).block_until_ready(); '
          'print(repr(os.environ.get("XLA_FLAGS", "")))')
  assert _child(code) == repr('--xla_cpu_experimental_ynn_fusion_type=')
  assert _child(code, XLA_FLAGS='--xla_cpu_experimental_ynn_fusion_type=dot') == repr(
      '--xla_cpu_experimental_ynn_fusion_type=dot')
  assert _child(code, VIT_JAX_CPU_TUNING='0') == repr('')


def test_too_late_is_detected_and_changes_nothing():
  code = ('import os, jax; jax.numpy.ones(2).block_until_ready(); from vit_jax import runtime; '
          'print(runtime.backend_started(), runtime.set_xla_defaults(), '
          'repr(os.environ.get("XLA_FLAGS", "")))')
  assert _child(code) == "True False ''"


def test_host_allocator_is_tuned_on_cpu_only(monkeypatch):
  monkeypatch.setattr(runtime, '_tuned', False)
  runtime.tune_for_backend('tpu')
  assert not runtime._tuned  # pylint: disable=protected-access
  monkeypatch.setenv('VIT_JAX_CPU_TUNING', '0')
  assert not runtime.tune_host_allocator()
  monkeypatch.delenv('VIT_JAX_CPU_TUNING')
  if sys.platform.startswith('linux'):  # glibc: mallopt returns 1 for both settings
    runtime.tune_for_backend('cpu')
    assert runtime._tuned and runtime.tune_host_allocator()  # pylint: disable=protected-access


def test_an_untested_jaxlib_gets_no_flags(monkeypatch):
  monkeypatch.setattr(runtime, 'JAXLIB_TESTED', ((0, 1),))
  monkeypatch.setattr(runtime, 'backend_started', lambda: False)
  monkeypatch.setenv('XLA_FLAGS', '')
  assert not runtime.set_xla_defaults() and os.environ['XLA_FLAGS'] == ''
