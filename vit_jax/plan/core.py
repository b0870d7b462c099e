"""A plan: the real train step of a config, compiled ahead of time for a topology, and what the
compiler says about it (memory per chip, FLOPs, collectives) with a roofline estimate of its speed.

`make_plan(config, topology)` builds the run with `vit_jax.train.build.build_training` (the function
`train_and_evaluate` calls), lowers its jitted train step for the abstract state and batch
(ShapeDtypeStructs carrying shardings: no parameter is allocated anywhere) and compiles it for the
topology's devices. Memory per chip:
  parameters, optimizer state, EMA, step/rng, batch, teacher, frozen parameters (an objective that
  freezes a backbone): from the shardings of the abstract
    arguments (the bytes of one device's shards: what the live arrays would occupy);
  arguments, outputs not aliased to arguments (the state is donated), temporaries and code: from
    the compiled executable's `memory_analysis()`; total = arguments + outputs - aliased +
    temporaries + code, compared with the chip's HBM.
FLOPs per chip are the dots and convolutions of the partitioned (per-device) program, every loop
(scanned layers, accumulation) counted trip-count times (`hlo.analyze`; XLA's `cost_analysis()`,
printed too, counts a loop body once); the family's analytic count (3 x forward MACs x 2 per
image: forward and a backward of twice its cost) is printed beside them: the ratio is 1 for a plain
step and 4/3 with remat (the forward runs twice). Roofline: every executed instruction (a fusion
with its matmuls) takes max(its FLOPs at bf16 peak, its operands' and result's HBM bytes at HBM
bandwidth); their sum, times executions, is the compute-and-memory time; the step is the larger
of that and the collectives' bytes at ICI bandwidth (collectives overlapped with compute). MFU uses
the analytic FLOPs (remat's recomputation is not useful work).
"""
from __future__ import annotations

import copy
import dataclasses
import glob
import gzip
import hashlib
import math
import os
import re
import tempfile
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from vit_jax.plan import hlo
from vit_jax.plan import topologies as topo_lib
from vit_jax.shapes import hw
from vit_jax.train import build as build_lib

# Class counts of datasets a plan may name without their files being here.
KNOWN_CLASSES = {'imagenet2012': 1000, 'imagenet21k': 21843, 'imagenet22k': 21841, 'cifar10': 10,
                 'cifar100': 100, 'fashion_mnist': 10, 'digits': 10, 'mnist': 10,
                 'oxford_iiit_pet': 37, 'oxford_flowers102': 102, 'food101': 101}


def num_classes_of(config: ml_collections.ConfigDict, given: Optional[int] = None) -> int:
  """The class count a run of `config` would have: given, a well-known dataset's, or read from the
  dataset (which must then be present)."""
  if given:
    return int(given)
  if config.dataset in KNOWN_CLASSES:
    return KNOWN_CLASSES[config.dataset]
  from vit_jax import data  # pylint: disable=g-import-not-at-top
  try:
    return int(data.dataset_info(config.dataset, data_dir=config.data_dir)[0])
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'cannot read the class count of dataset {config.dataset!r} here ({e}); '
                     'pass --num_classes') from e


def tree_bytes_per_device(tree: Any) -> float:
  """Bytes one device holds of a tree of sharded arrays or ShapeDtypeStructs (the largest over
  devices; NamedShardings of divisible dimensions give every device the same shard shape)."""
  total = 0.0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


@dataclasses.dataclass
class Plan:
  """Everything `format_plan` prints; bytes are per chip, times in seconds."""
  topology: topo_lib.Topology
  model: str
  family: str
  batch_size: int
  accum_steps: int
  mesh: dict[str, int]
  remat: Optional[bool]
  dtype: str
  memory: dict[str, float]
  flops_per_chip: float        # matmuls and convolutions of the compiled program, loops unrolled
  cost_flops_per_chip: float   # XLA's cost_analysis() (all ops; a loop body counted once)
  analytic_flops_per_step: float
  bytes_accessed_per_chip: float  # HBM bytes the instructions read and write, loops unrolled
  cost_bytes_per_chip: float      # XLA's cost_analysis() 'bytes accessed'
  collectives: dict[str, hlo.Collective]
  compile_seconds: float
  fingerprint: str
  oom: str = ''  # the compiler's out-of-memory message when it refused (FLOPs then uncompiled)
  ops: Any = None  # hlo.Analysis.ops: (executions, FLOPs, HBM bytes) per instruction

  @property
  def chips(self) -> int:
    return self.topology.chips

  @property
  def fits(self) -> bool:
    return not self.oom and self.memory['total'] <= self.topology.chip.hbm_bytes

  @property
  def ici_bytes_per_chip(self) -> float:
    return sum(c.sent_bytes for c in self.collectives.values())

  @property
  def times(self) -> dict[str, float]:
    chip = self.topology.chip
    t = {'compute': self.flops_per_chip / chip.peak_flops,
         'hbm': self.bytes_accessed_per_chip / chip.hbm_bw,
         'collectives': self.ici_bytes_per_chip / chip.ici_bw}
    if self.ops is not None and len(self.ops):
      w, f, b = self.ops.T
      t['ops'] = float((w * np.maximum(f / chip.peak_flops, b / chip.hbm_bw)).sum())
    else:  # nothing compiled: the totals' roofline
      t['ops'] = max(t['compute'], t['hbm'])
    t['step'] = max(t['ops'], t['collectives'])
    return t

  @property
  def images_per_second(self) -> float:
    """0 when nothing was compiled (the compiler refused the program: no step time)."""
    step = self.times['step']
    return self.batch_size / step if step > 0 else 0.0

  @property
  def mfu(self) -> float:
    step = self.times['step']
    return self.analytic_flops_per_step / (
        step * self.chips * self.topology.chip.peak_flops) if step > 0 else 0.0

  def mesh_str(self) -> str:
    return 'x'.join(f'{a}{n}' for a, n in self.mesh.items() if n > 1) or 'one device'


def with_overrides(config: ml_collections.ConfigDict, **values: Any) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted keys set: with_overrides(c, **{'model.remat': True})."""
  out = copy.deepcopy(config)
  with out.unlocked():
    for key, value in values.items():
      node = out
      *parents, leaf = key.split('.')
      for p in parents:
        node = node[p]
      node[leaf] = value
  return out


def make_plan(config: ml_collections.ConfigDict, topology: topo_lib.Topology, *,
              num_classes: Optional[int] = None, devices: Optional[list] = None,
              teacher_model: Optional[str] = None, hlo_path: Optional[str] = None) -> Plan:
  """Compiles `config`'s train step for `topology` and measures it (see the module docstring).

  devices: the topology's devices when already at hand (`topologies.devices(topology)`).
  teacher_model: plan distillation with this registered architecture as the teacher.
  hlo_path: also write the compiled module's text there (gzip), to analyse again without compiling.
  """
  devices = devices if devices is not None else topo_lib.devices(topology)
  classes = num_classes_of(config, num_classes)
  t0 = time.time()
  built = build_lib.build_training(config, classes, devices=devices, abstract=True,
                                   teacher_model=teacher_model)
  lowered = built.lower()
  fingerprint = hashlib.sha256(lowered.as_text().encode()).hexdigest()[:16]
  dump = tempfile.TemporaryDirectory(prefix='vit_jax_plan_hlo_')
  try:
    # The compiler also writes the optimised module's text, which the analysis reads:
    # `compiled.as_text()` re-reads the module from its serialised form, which XLA refuses for
    # some programs (MAE's and MPP's gathers on TPU: "async-update instruction should have 1
    # operands but sees 3").
    compiled, oom = lowered.compile(compiler_options={'xla_dump_to': dump.name,
                                                      'xla_dump_hlo_as_text': True}), ''
  except Exception as e:  # pylint: disable=broad-except
    # libtpu refuses a program that cannot fit ("CompileTimeHbmOom"): that is an answer, not an
    # error. Anything else is.
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    compiled, oom = None, str(e).splitlines()[0]
  seconds = time.time() - t0

  state = built.abstract_state
  mem = {'parameters': tree_bytes_per_device(state.params),
         'optimizer': tree_bytes_per_device(state.opt_state),
         'ema': tree_bytes_per_device(state.ema_params) if state.ema_params is not None else 0.0,
         'step_rng': tree_bytes_per_device((state.step, state.rng)),
         'batch': tree_bytes_per_device(built.abstract_batch()),
         'teacher': tree_bytes_per_device(built.extras.get('teacher')),
         'frozen': tree_bytes_per_device(built.extras.get('frozen'))}
  if compiled is not None:
    ma = compiled.memory_analysis()
    mem['arguments'] = float(ma.argument_size_in_bytes)
    mem['outputs'] = float(ma.output_size_in_bytes - ma.alias_size_in_bytes)
    mem['temporaries'] = float(ma.temp_size_in_bytes)
    mem['code'] = float(ma.generated_code_size_in_bytes)
    cost = compiled.cost_analysis()
    per_chip = 1
  else:  # the state from its shardings, the temporaries the compiler asked for
    mem['arguments'] = sum(mem.values())
    mem.update(outputs=0.0, temporaries=oom_temporaries(oom), code=0.0)
    cost = lowered.cost_analysis()  # of the whole (unpartitioned) program
    per_chip = len(devices)
  mem['total'] = mem['arguments'] + mem['outputs'] + mem['temporaries'] + mem['code']
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  size = hw(config.image_size)
  macs = built.family.forward_macs(built.fields, classes, size, config.channels)
  # The objective's forward (MAE: the encoder on the visible patches plus its decoder).
  analytic = 3 * 2 * built.objective.analytic_macs(macs) * config.batch_size
  # Frozen extras (a teacher) run forward only.
  analytic += 2 * built.objective.frozen_macs(classes, size, config.channels) * config.batch_size
  text = _compiled_text(compiled, dump.name) if compiled else ''
  dump.cleanup()
  if hlo_path and text:
    with gzip.open(hlo_path, 'wt') as f:
      f.write(text)
  a = hlo.analyze(text, len(devices))
  cost_flops = float(cost.get('flops', 0.0)) / per_chip
  cost_bytes = float(cost.get('bytes accessed', 0.0)) / per_chip
  return Plan(topology, config.model.name, built.family.name, config.batch_size,
              config.accum_steps, {a: int(n) for a, n in built.mesh.shape.items()},
              built.fields.get('remat'), jax.numpy.dtype(built.model.dtype).name,
              mem, a.flops or cost_flops, cost_flops, float(analytic), a.hbm_bytes or cost_bytes,
              cost_bytes, a.collectives, seconds, fingerprint, oom, a.ops)


def _compiled_text(compiled: Any, dump_dir: str) -> str:
  """The compiled module's HLO text: the compiler's own dump of it (the largest module written:
  the step), else `as_text()`."""
  found = glob.glob(os.path.join(dump_dir, '*after_optimizations.txt'))
  if found:
    with open(max(found, key=os.path.getsize)) as f:
      return f.read()
  return compiled.as_text()


def oom_temporaries(message: str) -> float:
  """Bytes of temporaries an out-of-memory compile error says the program needed (inf when the
  message has no figure): '... HLO temporaries (52.47G) exceeds available HBM (15.75G)'."""
  m = re.search(r'temporaries \(([\d.]+)([KMGT]?)\)', message) or re.search(
      r'Used ([\d.]+)([KMGT]?) of', message)
  if not m:
    return math.inf
  return float(m.group(1)) * 2 ** (10 * ' KMGT'.index(m.group(2) or ' '))


def _gib(b: float) -> str:
  """Bytes with a binary prefix, right-aligned: '  12.35 GiB', '  61.2 KiB'."""
  for shift, unit in ((30, 'GiB'), (20, 'MiB'), (10, 'KiB')):
    if abs(b) >= 2 ** shift:
      return f'{b / 2 ** shift:8.2f} {unit}'
  return f'{b:8.0f} B  '


def _si(v: float, unit: str) -> str:
  for scale, prefix in ((1e15, 'P'), (1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(v) >= scale:
      return f'{v / scale:.3g} {prefix}{unit}'
  return f'{v:.3g} {unit}'


def format_plan(plan: Plan) -> str:
  """The plan as the CLI prints it; the last line is `fits: yes` or `fits: no`."""
  chip, m, t = plan.topology.chip, plan.memory, plan.times
  lines = [
      f'plan: {plan.model} ({plan.family}) batch {plan.batch_size}'
      f'{f" in {plan.accum_steps} micro-batches" if plan.accum_steps > 1 else ""}, '
      f'{plan.dtype}, remat {"on" if plan.remat else "off"}, on {plan.topology.name} ({plan.chips} x {chip.name}), '
      f'mesh {plan.mesh_str()}',
      f'compiled in {plan.compile_seconds:.1f} s; step fingerprint {plan.fingerprint}',
      *([f'the compiler refused: {plan.oom}', '(FLOPs below: the unpartitioned program / chips; '
         'no collectives)'] if plan.oom else []),
      '', 'memory per chip:']
  for key in ('parameters', 'optimizer', 'ema', 'step_rng', 'batch', 'teacher', 'frozen'):
    if m.get(key) or key in ('parameters', 'optimizer', 'batch'):
      lines.append(f'  {key:<24}{_gib(m.get(key, 0.0))}')
  from_shardings = sum(m.get(k, 0.0) for k in ('parameters', 'optimizer', 'ema', 'step_rng',
                                               'batch', 'teacher', 'frozen'))
  lines += [f'  {"arguments (compiled)":<24}{_gib(m["arguments"])}   (from shardings: '
            f'{_gib(from_shardings).strip()})',
            f'  {"outputs (not donated)":<24}{_gib(m["outputs"])}',
            f'  {"temporaries":<24}{_gib(m["temporaries"])}',
            f'  {"code":<24}{_gib(m["code"])}',
            f'  {"total":<24}{_gib(m["total"])}   of {_gib(chip.hbm_bytes).strip()} HBM '
            f'({100 * m["total"] / chip.hbm_bytes:.1f}%)',
            '', 'compute:',
            f'  FLOPs per chip per step  {_si(plan.flops_per_chip, "FLOP")} (compiled matmuls '
            f'and convolutions; XLA cost analysis: {_si(plan.cost_flops_per_chip, "FLOP")})',
            f'  FLOPs per step           {_si(plan.flops_per_chip * plan.chips, "FLOP")} '
            f'(compiled) vs {_si(plan.analytic_flops_per_step, "FLOP")} (analytic 3 x forward; '
            f'ratio {plan.flops_per_chip * plan.chips / max(plan.analytic_flops_per_step, 1):.2f})',
            f'  HBM bytes per chip       {_si(plan.bytes_accessed_per_chip, "B")} (instructions\' '
            f'operands and results; XLA cost analysis: {_si(plan.cost_bytes_per_chip, "B")})',
            '', 'collectives per step (per chip):']
  for c in plan.collectives.values():
    if c.count:
      lines.append(f'  {c.kind:<20}{c.count:6d} ops  buffers {_si(c.buffer_bytes, "B"):>9}  '
                   f'sent ~{_si(c.sent_bytes, "B"):>9}')
  if not any(c.count for c in plan.collectives.values()):
    lines.append('  none')
  lines += ['', f'roofline ({chip.name}: {_si(chip.peak_flops, "FLOP/s")} bf16, HBM '
                f'{_si(chip.hbm_bw, "B/s")}, ICI {_si(chip.ici_bw, "B/s")} per chip; '
                f'{chip.source}):',
            f'  totals: compute {t["compute"] * 1e3:.2f} ms, HBM {t["hbm"] * 1e3:.2f} ms, '
            f'collectives {t["collectives"] * 1e3:.2f} ms',
            f'  per instruction max(compute, HBM), summed: {t["ops"] * 1e3:.2f} ms; with the '
            f'collectives overlapped: step ~ {t["step"] * 1e3:.2f} ms',
            f'  {plan.images_per_second:,.0f} images/s, MFU {100 * plan.mfu:.1f}% '
            '(analytic FLOPs / (step x chips x peak))',
            '', f'fits: {"yes" if plan.fits else "no"}']
  return '\n'.join(lines)
