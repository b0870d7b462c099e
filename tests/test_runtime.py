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


def test_cpu_info_reads_the_first_processor(tmp_path):
  cpuinfo = tmp_path / 'cpuinfo'
  cpuinfo.write_text('processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n'
                     'model name\t: AMD EPYC\nflags\t\t: fpu sse avx avx2 avx512f\n\n'
                     'processor\t: 1\nmodel name\t: something else\n')
  info = runtime.cpu_info(str(cpuinfo))
  assert {k: info[k] for k in ('model', 'vendor', 'family', 'model_number', 'isa')} == {
      'model': 'AMD EPYC', 'vendor': 'AuthenticAMD', 'family': 26, 'model_number': 2,
      'isa': 'avx512'}
  assert info['cores'] >= 1
  assert runtime.describe_cpu(info) == (
      f'AMD EPYC (AuthenticAMD family 26 model 2, avx512, {info["cores"]} cores)')
  assert runtime.cpu_info(str(tmp_path / 'missing'))['model']  # never empty


# (tokens, head width, width, MLP) of the models whose 1-vs-2-device figures runtime.py cites.
MINI_4, MINI_7, TI_16 = (50, 32, 128, 256), (16, 32, 128, 256), (197, 64, 192, 768)


def _auto(shape, batch_sizes=(256,), cores=2):
  tokens, head_dim, width, mlp_dim = shape
  return runtime.auto_cpu_devices(tokens=tokens, head_dim=head_dim, width=width, mlp_dim=mlp_dim,
                                  batch_sizes=batch_sizes, cores=cores)


def test_cpu_devices_split_only_where_small_attention_products_dominate():
  assert _auto(MINI_4) == 2            # measured x1.06-1.20
  assert _auto(MINI_7) == 1            # 16 tokens: attention is 3% of the FLOPs; x0.92-1.00
  assert _auto(TI_16, (32,)) == 1      # 197 x 64 products run well on one device; x0.99
  assert _auto(TI_16, (256,)) == 1     # whatever the batch
  assert _auto(MINI_4, cores=1) == 1
  assert _auto(MINI_4, (256, 1000)) == 2
  assert _auto(MINI_4, (96,)) == 1     # 48 images a device is too few
  assert _auto(MINI_4, (256, 100)) == 1  # an eval batch of 100 does not split evenly above 64
  assert _auto(MINI_4, (256,), cores=4) == 4
  assert _auto(MINI_4, (192,), cores=4) == 3


def test_cpu_devices_for_a_config(monkeypatch):
  from vit_jax.configs import fashion_mnist, quickstart  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(runtime, 'cpu_info', lambda: {'cores': 2})
  fm, qs = fashion_mnist.get_config(), quickstart.get_config()
  fm.cpu_devices = 0
  assert runtime.cpu_devices_for(fm) == 2       # 49 tokens of 32-wide heads
  assert runtime.cpu_devices_for(fm, multiprocess=True) == 1
  assert runtime.cpu_devices_for(qs) == 1       # 16 tokens
  qs.cpu_devices = 3
  assert runtime.cpu_devices_for(qs) == 3 and runtime.cpu_devices_for(qs, True) == 3
  fm.model = fm.model.copy_and_resolve_references()
  fm.model.name, fm.model.classifier, fm.model.posemb, fm.model.num_layers = ('Swin-Mini', None,
                                                                               None, None)
  assert runtime.cpu_devices_for(fm) == 1       # no global attention over one sequence
