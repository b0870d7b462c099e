"""Process-wide settings that make runs faster: XLA:CPU's steps (measured in `scripts/benchmark.py`)
and, on any backend, the start of a job run again (the compilation cache, last below).

Two settings, both about the CPU backend (accelerators are unaffected):

1. XLA flags, added to `XLA_FLAGS` when `vit_jax` is imported (`set_xla_defaults`), which must
   happen before JAX starts its backend (importing jax is fine; creating an array is too late):
   - `--xla_cpu_experimental_ynn_fusion_type=` (empty: no fusion kinds) keeps XLA from routing
     float32 matmul fusions to YNNPACK; XLA's own dot emitter was faster for every ViT shape measured
     (inference x1.3-2.1, training x1.0-1.2 on the 2-core machine).
   A flag already in the user's `XLA_FLAGS` wins: only flags not named there are added. XLA aborts
   on a flag it does not know, so they are added only for the jaxlib releases they were measured
   with (JAXLIB_TESTED).

2. The host allocator (`tune_host_allocator`, called by the trainer and the benchmark once the
   backend is known to be the CPU): XLA:CPU allocates its temporary buffers afresh on every run of a
   program. glibc serves blocks above its mmap threshold (at most 32 MiB, whatever
   `GLIBC_TUNABLES` asks) with a fresh `mmap` and returns them with `munmap` on free, so every step
   page-faults its whole working set in again (a quarter of the CPU time in the kernel, measured).
   `mallopt(M_MMAP_MAX, 0)` serves them from the heap instead, and `M_TRIM_THRESHOLD` -1 (never
   trim) keeps freed memory mapped for the next step (inference x1.6 alone on the Fashion-MNIST
   model). A bounded threshold is not enough: the arena of a ViT-S/16 train step at batch 32 is
   3 GiB, and any threshold mallopt accepts (an int) is below that. The process keeps its peak
   heap, which the next step needs anyway. glibc only; a no-op elsewhere.

`VIT_JAX_CPU_TUNING=0` turns both off (to measure without them, or to debug).

A third, per run (`split_cpu`, from `--config.cpu_devices`; `cpu_devices_for` picks the count when
it is 0, the default): the host CPU as several JAX devices, data parallel. XLA:CPU runs a batched
matmul (attention's q k^T and p v: one small product per image and head) on one thread, while dense
matmuls use every core; a second device runs its own attention products on the other core. It pays
when small attention products are a large part of the step (the Fashion-MNIST ViT, 50 tokens, batch
256, on 2 cores: training x1.06-1.20, inference x1.19-1.38), not for ViT-Ti/S at 224 (x0.99, x0.98)
nor for 16 tokens (x0.92-1.00): `auto_cpu_devices` has the rule and the figures.

The CPU itself is named by `cpu_info` / `describe_cpu` (benchmarks print it next to their figures).

A fourth, per run and on any backend (`use_compilation_cache`, from
`--config.compilation_cache_dir`): JAX's persistent compilation cache, so that a job started again
loads its compiled steps instead of compiling them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from typing import Any, Optional, Sequence

CPU_XLA_FLAGS = (('xla_cpu_experimental_ynn_fusion_type', ''),)
JAXLIB_TESTED = ((0, 10),)  # (major, minor) releases that know every flag above
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER = -1  # mallopt(M_TRIM_THRESHOLD, -1): trimming off (glibc's documented value)
_tuned = False


def enabled() -> bool:
  return os.environ.get('VIT_JAX_CPU_TUNING', '1').strip().lower() not in ('0', 'false', 'no', 'off')


def with_defaults(xla_flags: str, defaults: tuple[tuple[str, str], ...] = CPU_XLA_FLAGS) -> str:
  """`xla_flags` with every (name, value) of `defaults` it does not name appended."""
  flags = xla_flags.split()
  for name, value in defaults:
    if not any(f.lstrip('-').split('=', 1)[0] == name for f in flags):
      flags.append(f'--{name}={value}')
  return ' '.join(flags)


def jaxlib_tested() -> bool:
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    major, minor = (int(v) for v in metadata.version('jaxlib').split('.')[:2])
  except Exception:  # pylint: disable=broad-except
    return False
  return (major, minor) in JAXLIB_TESTED


def backend_started() -> bool:
  """Whether JAX has created a backend in this process (flags set now would be ignored)."""
  bridge = sys.modules.get('jax._src.xla_bridge')
  return bool(getattr(bridge, '_backends', None))


def set_xla_defaults() -> bool:
  """Adds CPU_XLA_FLAGS to os.environ['XLA_FLAGS'] unless disabled or too late; True if they are
  in effect for this process's backend."""
  if not enabled() or backend_started() or not jaxlib_tested():
    return False
  os.environ['XLA_FLAGS'] = with_defaults(os.environ.get('XLA_FLAGS', ''))
  return True


def split_cpu(count: int) -> bool:
  """Makes the CPU backend `count` JAX devices (0 or 1: JAX's default, one). Must run before any
  JAX backend starts; an explicit --xla_force_host_platform_device_count in XLA_FLAGS (the tests'
  way of faking 8 devices) wins. Accelerator backends are unaffected. True when it took effect."""
  if count <= 1 or 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    return False
  if backend_started():
    raise RuntimeError(f'cpu_devices={count} must be set before JAX starts a backend')
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_num_cpu_devices', int(count))
  return True


def cpu_info(path: str = '/proc/cpuinfo') -> dict[str, Any]:
  """The host CPU as benchmarks name it and the CPU settings key on it (Linux: /proc/cpuinfo).

  {'model': the `model name` line (e.g. 'AMD EPYC', 'Intel(R) Xeon(R) Platinum 8488C'; a virtual
  machine may hide the exact part), 'vendor' ('AuthenticAMD', 'GenuineIntel', ...), 'family' and
  'model_number' (ints; None when unknown), 'isa' (the widest x86 vector extension: 'avx512', 'avx2',
  'avx' or '', else the machine's architecture, e.g. 'aarch64'), 'cores' (the CPUs this process may
  run on)}.
  """
  fields: dict[str, str] = {}
  try:
    with open(path) as f:
      for line in f:
        if not line.strip():
          break  # the first processor's block describes them all
        key, _, value = line.partition(':')
        fields[key.strip()] = value.strip()
  except OSError:
    pass
  flags = set(fields.get('flags', '').split())
  isa = next((name for name, flag in (('avx512', 'avx512f'), ('avx2', 'avx2'), ('avx', 'avx'))
              if flag in flags), '' if flags else platform.machine())
  number = lambda key: int(fields[key]) if fields.get(key, '').isdigit() else None
  try:
    cores = len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    cores = os.cpu_count() or 1
  return {'model': fields.get('model name') or platform.processor() or 'unknown CPU',
          'vendor': fields.get('vendor_id', ''), 'family': number('cpu family'),
          'model_number': number('model'), 'isa': isa, 'cores': cores}


def describe_cpu(info: Optional[dict[str, Any]] = None) -> str:
  """One line naming the CPU, e.g. 'AMD EPYC (AuthenticAMD family 26 model 2, avx512, 2 cores)'."""
  info = info or cpu_info()
  ident = ' '.join(str(x) for x in (
      info['vendor'], info['family'] is not None and f'family {info["family"]}',
      info['model_number'] is not None and f'model {info["model_number"]}') if x)
  parts = [p for p in (ident, info['isa'], f'{info["cores"]} cores') if p]
  return f'{info["model"]} ({", ".join(parts)})'


# The automatic choice of `cpu_devices` (`auto_cpu_devices`). XLA:CPU runs a batched matmul on one
# thread; attention's q k^T and p v are one such product per image and head. Where those products
# are small and a large part of the step, a second device (its own program on its own core) runs
# them side by side. Measured, data parallel over 2 devices against 1 on 2 cores:
#   ViT-Mini_4 at 28 px (50 tokens, 32-wide heads, 50*50*32 = 80k MACs a product, attention 9.8% of
#     the dense FLOPs), batch 256: train x1.06-1.08, infer x1.19 (Intel Xeon); train x1.20, infer
#     x1.38 (AMD EPYC, under load); its 4-block version x1.04 (Intel);
#   ViT-Mini_7 at 28 px (16 tokens, 3.1%), batch 256: x1.00 (Intel), x0.92 (AMD, under load);
#   ViT-Ti/16, ViT-S/16 at 224 (197 tokens, 64-wide heads: 2.5M MACs a product), batch 32: x0.99,
#     x0.98 (Intel).
SMALL_PRODUCT_MACS = 2 ** 18   # tokens^2 x head width: at most this is a "small" attention product
MIN_ATTENTION_SHARE = 0.05     # attention products' FLOPs / the dense layers', per token
MIN_DEVICE_BATCH = 64          # every device keeps at least this many images of each batch


def auto_cpu_devices(*, tokens: int, head_dim: int, width: int, mlp_dim: int,
                     batch_sizes: Sequence[int], cores: int) -> int:
  """JAX devices to split a `cores`-core host into for a ViT-like model (1: no split).

  tokens: sequence length (prefix + patches); head_dim: width / heads; width, mlp_dim: the blocks'
  widths; batch_sizes: every batch the devices must share evenly (train, micro-batch, eval).
  Splits (into as many devices as cores, fewer when a batch would not divide or fall below
  MIN_DEVICE_BATCH a device) only where attention's products are small and a large share of the
  step; see the measurements above.
  """
  share = 2 * tokens / (4 * width + 2 * mlp_dim)  # q k^T + p v against q, k, v, out and the MLP
  if cores < 2 or tokens * tokens * head_dim > SMALL_PRODUCT_MACS or share < MIN_ATTENTION_SHARE:
    return 1
  for n in range(cores, 1, -1):
    if all(b % n == 0 and b // n >= MIN_DEVICE_BATCH for b in batch_sizes):
      return n
  return 1


def cpu_devices_for(config: Any, multiprocess: bool = False) -> int:
  """The CPU device count a training config runs with: `config.cpu_devices` when set (> 0), else
  (0, the default) `auto_cpu_devices` from its model's shapes and this host's cores; 1 for several
  processes, and for families without global self-attention. Reads the config only (no backend)."""
  asked = int(config.get('cpu_devices', 0) or 0)
  if asked > 0 or multiprocess:
    return max(asked, 1)
  from vit_jax.families import registry  # pylint: disable=import-outside-toplevel
  from vit_jax.families.base import Architecture  # pylint: disable=import-outside-toplevel
  try:
    family, fields = registry.resolve(config.model)
    arch = Architecture(fields, None, config.image_size, config.channels, family.name)
    prefix, (gh, gw), _ = family.token_layout(arch)
    width, heads, mlp = (int(fields[k]) for k in ('hidden_size', 'num_heads', 'mlp_dim'))
  except (NotImplementedError, KeyError, TypeError, ValueError):
    return 1  # no global attention over one token sequence (Swin, PVT, Mixer): no measured gain
  batch = int(config.batch_size)
  sizes = [batch, batch // max(int(config.get('accum_steps', 1) or 1), 1),
           int(config.get('eval_batch_size', 0) or 0) or batch]
  return auto_cpu_devices(tokens=prefix + gh * gw, head_dim=width // heads, width=width,
                          mlp_dim=mlp, batch_sizes=sizes, cores=cpu_info()['cores'])


def use_compilation_cache(path: str) -> bool:
  """Keeps compiled programs in `path` (JAX's persistent compilation cache) and reads them back
  on the next start of the same program, config and JAX version. '' leaves JAX's own setting (the
  JAX_COMPILATION_CACHE_DIR variable). True when `path` was set. Any backend; before the first
  compile."""
  if not path:
    return False
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir', path)
  return True


def tune_host_allocator() -> bool:
  """glibc: serve large blocks from the heap and keep freed memory mapped (see the module
  docstring). Idempotent; True when the allocator is tuned."""
  global _tuned
  if _tuned:
    return True
  if not enabled() or not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (musl has no mallopt)
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  _tuned = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER))
  return _tuned


def tune_for_backend(backend: str) -> bool:
  """What the trainer calls once it knows its backend: the allocator tuning on 'cpu' only (on
  accelerator hosts large host buffers, e.g. checkpoint copies, should go back to the OS).
  True when the allocator is tuned."""
  return backend == 'cpu' and tune_host_allocator()
