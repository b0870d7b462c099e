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

A third, per run (`split_cpu`, from `--config.cpu_devices`): the host CPU as several JAX devices,
data parallel. XLA:CPU runs a batched matmul (attention's q k^T and p v: one small product per image
and head) on one thread, while dense matmuls use every core; a second device runs its own attention
products on the other core. It pays when small attention products are a large part of the step
(the Fashion-MNIST ViT, 50 tokens, batch 256, on 2 cores: training x1.06-1.08, inference x1.19),
not for ViT-Ti/S at 224 (x0.99, x0.98): `scripts/benchmark.py model --cpu_devices 2`.

A fourth, per run and on any backend (`use_compilation_cache`, from
`--config.compilation_cache_dir`): JAX's persistent compilation cache, so that a job started again
loads its compiled steps instead of compiling them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

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
