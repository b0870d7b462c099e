"""Topologies a plan compiles for, and the chip figures its estimates use.

  cpu:N          N fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, set before
                 JAX starts: `python -m vit_jax.plan` does it). Needs nothing else; CI uses cpu:8.
  v5e-16, ...    Cloud TPU accelerator types, compiled through libtpu's compile-only devices
                 (`jax.experimental.topologies.get_topology_desc`), which need libtpu installed
                 (`pip install -r requirements-tpu.txt`) but no TPU. v5litepod-N is v5e-N.
  v5e:4x4, ...   libtpu topology strings, passed through as they are.

Cloud TPU names count chips for v5e and v6e (v5e-16 = 16 chips, one TensorCore each) but
TensorCores for v4 and v5p (two per chip, fused into one JAX device, "megacore"): v4-32 and v5p-32
are 16 chips. libtpu spells the chip grid: 2D for v5e/v6e ('v5e:4x4'), 3D for v4/v5p ('v5p:2x2x4').
The slice shapes below are Cloud TPU's default shapes per size (docs.cloud.google.com/tpu/docs/v4,
/v5e, /v5p, /v6e "topologies" tables; the same as MaxText's accelerator_to_spec_map.py).
This module imports JAX only inside `devices()`, so the CLI can set XLA_FLAGS first.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any, Optional

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures. hbm_bytes: memory a program may use; peak_flops: dense bf16 FLOP/s;
  hbm_bw: HBM bytes/s; ici_bw: inter-chip interconnect bytes/s, bidirectional, all links of the
  chip together (the figure Google publishes); source: where the figures come from."""
  name: str
  hbm_bytes: float
  peak_flops: float
  hbm_bw: float
  ici_bw: float
  source: str
  cores_per_chip: int = 1  # TensorCores per chip: the unit of v4/v5p accelerator-type names


CHIPS = {
    # docs.cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, HBM2 32 GiB at 1200 GB/s. The page gives
    # no ICI figure; 6 links x 45 GB/s each way (2 x 270 GB/s) is from "How to Scale Your Model"
    # (jax-ml.github.io/scaling-book/tpus, TPU specs table) and is the least certain number here.
    'v4': Chip('v4', 30.75 * GIB, 275e12, 1200e9, 540e9,
               'cloud.google.com/tpu/docs/v4; ICI: jax-ml scaling-book', cores_per_chip=2),
    # docs.cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, bidirectional
    # ICI 400 GB/s per chip (4 ports). 16 GiB of which 15.75 are usable.
    'v5e': Chip('v5e', 15.75 * GIB, 197e12, 819e9, 400e9, 'cloud.google.com/tpu/docs/v5e'),
    # docs.cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e (of 96 physical; the rest is
    # reserved by the runtime; libtpu allows 95.73) at 2765 GB/s, bidirectional ICI 1200 GB/s/chip.
    'v5p': Chip('v5p', 95.73 * GIB, 459e12, 2765e9, 1200e9, 'cloud.google.com/tpu/docs/v5p',
                cores_per_chip=2),
    # docs.cloud.google.com/tpu/docs/v6e (Trillium): 918 TFLOP/s bf16, 32 GB HBM at 1640 GB/s,
    # bidirectional ICI 800 GB/s per chip. 31.24 GiB usable.
    'v6e': Chip('v6e', 31.24 * GIB, 918e12, 1640e9, 800e9, 'cloud.google.com/tpu/docs/v6e'),
}
ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v5': 'v5p', 'v6': 'v6e', 'trillium': 'v6e'}

# libtpu 0.0.52 refuses to compile a program needing more than (its CompileTimeHbmOom message)
# v4 30.75 GiB, v5e 15.75 GiB, v5p 95.73 GiB, v6e 31.24 GiB per chip: the runtime keeps the rest.
# These are the HBM figures below; the datasheet capacity is in each comment.

# Default slice shapes by chip count (Cloud TPU docs' topology tables).
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
             2048: (8, 16, 16), 4096: (16, 16, 16), 6144: (16, 16, 24)}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
             256: (16, 16)}
TPU_HINT = ('compiling for a TPU topology needs libtpu (no TPU needed): '
            'pip install -r requirements-tpu.txt')


def cpu_chip(num_devices: int) -> Chip:
  """Nominal figures for fake CPU devices: they share the host, so memory is the host's RAM split
  N ways; the speeds are placeholders of the right order for one core, not measurements."""
  try:
    ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    ram = 16 * GIB
  return Chip('cpu', ram / num_devices, 50e9, 10e9, 10e9,
              'nominal: host RAM / N; 50 GFLOP/s, 10 GB/s (no datasheet for fake devices)')


@dataclasses.dataclass(frozen=True)
class Topology:
  """A parsed topology name. platform: 'cpu' or 'tpu'; chips: devices a mesh spans; libtpu_name
  and libtpu_kwargs: what `get_topology_desc` takes (TPU only)."""
  name: str
  platform: str
  chip: Chip
  chips: int
  libtpu_name: Optional[str] = None
  libtpu_kwargs: tuple = ()

  def with_overrides(self, hbm_gib: Optional[float] = None, peak_tflops: Optional[float] = None,
                     ici_gbps: Optional[float] = None) -> 'Topology':
    """The same topology with some chip figures replaced (--hbm_gib, ...)."""
    chip = self.chip
    if hbm_gib is not None:
      chip = dataclasses.replace(chip, hbm_bytes=hbm_gib * GIB, source=chip.source + '; HBM given')
    if peak_tflops is not None:
      chip = dataclasses.replace(chip, peak_flops=peak_tflops * 1e12,
                                 source=chip.source + '; peak given')
    if ici_gbps is not None:
      chip = dataclasses.replace(chip, ici_bw=ici_gbps * 1e9, source=chip.source + '; ICI given')
    return dataclasses.replace(self, chip=chip)


def _wrap(shape: tuple[int, ...]) -> tuple[bool, bool, bool]:
  """Torus wrap-around links: v4/v5p slices of whole 4x4x4 cubes are tori; v5e/v6e wrap a
  dimension of the full 16-chip width (as Cloud TPU and MaxText configure them)."""
  if len(shape) == 3:
    whole = all(d % 4 == 0 for d in shape)
    return (whole, whole, whole)
  return (shape[0] == 16, shape[1] == 16, False)


def parse(name: str) -> Topology:
  """'cpu:8', 'v5e-16', 'v5litepod-16', 'v4-32', 'v5p-256', 'v6e-64' or a libtpu string
  ('v5e:4x4', 'v5p:4x4x8') -> Topology. ValueError naming the accepted forms otherwise."""
  name = name.strip()
  m = re.fullmatch(r'cpu:(\d+)', name)
  if m:
    n = int(m.group(1))
    if n < 1:
      raise ValueError(f'topology {name!r}: cpu:N needs N >= 1')
    return Topology(name, 'cpu', cpu_chip(n), n)
  m = re.fullmatch(r'([a-z0-9]+)-(\d+)', name)
  if m:
    gen, count = ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
    if gen not in CHIPS:
      raise ValueError(f'topology {name!r}: unknown TPU generation {m.group(1)!r}; known: '
                       f'{", ".join(sorted(CHIPS))} (e.g. v5e-16, v5p-256), or cpu:N')
    chip = CHIPS[gen]
    if count % chip.cores_per_chip:
      raise ValueError(f'topology {name!r}: {gen} names count TensorCores, '
                       f'{chip.cores_per_chip} per chip; {count} is not a multiple')
    chips = count // chip.cores_per_chip
    table = SHAPES_3D if chip.cores_per_chip == 2 else SHAPES_2D
    if chips not in table:
      sizes = ', '.join(f'{gen}-{k * chip.cores_per_chip}' for k in sorted(table))
      raise ValueError(f'topology {name!r}: no default {gen} slice of {chips} chips; known: '
                       f'{sizes}, or give the libtpu shape, e.g. {gen}:'
                       f'{"x".join(map(str, table[max(table)]))}')
    return _tpu(name, gen, table[chips])
  m = re.fullmatch(r'([a-z0-9]+):(\d+(?:x\d+)+)', name)
  if m:
    gen = ALIASES.get(m.group(1), m.group(1))
    if gen not in CHIPS:
      raise ValueError(f'topology {name!r}: unknown TPU generation {m.group(1)!r}; known: '
                       f'{", ".join(sorted(CHIPS))}')
    shape = tuple(int(v) for v in m.group(2).split('x'))
    want = 3 if CHIPS[gen].cores_per_chip == 2 else 2
    if len(shape) != want:
      raise ValueError(f'topology {name!r}: {gen} chip grids have {want} dimensions')
    return _tpu(name, gen, shape)
  raise ValueError(f'topology {name!r}: use cpu:N, a Cloud TPU type (v4-32, v5e-16, v5p-256, '
                   f'v6e-64) or a libtpu shape (v5e:4x4, v5p:4x4x8)')


def _tpu(name: str, gen: str, shape: tuple[int, ...]) -> Topology:
  chip = CHIPS[gen]
  kwargs = {'chip_config_name': 'megacore' if chip.cores_per_chip == 2 else 'default',
            'chips_per_host_bounds': (2, 2, 1), 'num_slices': 1, 'wrap': _wrap(shape)}
  return Topology(name, 'tpu', chip, math.prod(shape), f'{gen}:{"x".join(map(str, shape))}',
                  tuple(sorted(kwargs.items())))


def libtpu_available() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def devices(topology: Topology) -> list[Any]:
  """The topology's devices: this process's CPU devices (there must be exactly N: set XLA_FLAGS
  before JAX starts), or libtpu's compile-only TPU devices. ImportError without libtpu."""
  if topology.platform == 'tpu' and not libtpu_available():
    raise ImportError(f'topology {topology.name}: {TPU_HINT}')
  import jax  # pylint: disable=g-import-not-at-top
  if topology.platform == 'cpu':
    found = jax.devices('cpu')
    if len(found) != topology.chips:
      raise ValueError(
          f'topology {topology.name} needs {topology.chips} CPU devices, this process has '
          f'{len(found)}: set XLA_FLAGS=--xla_force_host_platform_device_count={topology.chips} '
          'before JAX starts (python -m vit_jax.plan does)')
    return found
  # Compile-only devices touch no TPU: several plans (or a plan and a test) may load libtpu at once
  # instead of failing on its one-process lockfile.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  found = topologies.get_topology_desc(topology_name=topology.libtpu_name, platform='tpu',
                                       **dict(topology.libtpu_kwargs)).devices
  if len(found) != topology.chips:
    raise ValueError(f'libtpu returned {len(found)} devices for {topology.libtpu_name}, expected '
                     f'{topology.chips}')
  return list(found)
