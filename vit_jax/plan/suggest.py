"""`--suggest`: which data x fsdp x tensor mesh, remat setting and accumulation to train with.

Compiling is the cost (minutes for a large model on a big topology), so candidates are first
screened analytically, and only the most promising are compiled:
  candidates  every mesh data x fsdp x tensor over the chips with tensor <= 8 (Megatron splits
              beyond one host's chips rarely pay) that actually splits something on its tensor axis,
              remat off/on (families with a `remat` field), accumulation 1, 2, 4, ... while the
              micro-batch still splits over the batch axes;
  memory      state bytes per chip from the real sharding rules (exact), gradients (and the
              accumulation buffer), and activations: the residuals the backward pass keeps, measured
              by tracing the model's VJP (`jax.eval_shape`, nothing allocated) per image, times the
              micro-batch per chip, divided by the tensor axis, times a factor: XLA keeps far less
              than the traced residuals (ViT-B/16 on v5e: a quarter) and remat needs one block's
              activations on top of the saved ones, so the factor starts at 1/4 (2 with remat) and
              is re-measured from every compiled plan (its temporaries over the traced estimate);
  time        compute 3 x forward FLOPs (x 4/3 with remat) at bf16 peak; gradient all-reduce over
              data, FSDP all-gathers (forward, backward) and reduce-scatter per micro-batch, and a
              rough tensor-parallel activation all-reduce (a third of the residuals), at ICI
              bandwidth; the larger of the two.
Each round compiles the candidate with the best estimated time among those the screen lets fit
(per mesh and remat setting the smallest such accumulation; a mesh whose plan fits is settled, one
whose plan does not fit only tries larger accumulations), re-measures the activation factor, and
the search stops after `top` plans fit or `max_compiles` compiles.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from vit_jax import sharding as sharding_lib
from vit_jax.plan import core
from vit_jax.plan import topologies as topo_lib
from vit_jax.shapes import hw
from vit_jax.train import build as build_lib
from vit_jax.train import optim
from vit_jax.train import state as state_lib

MAX_TENSOR = 8


@dataclasses.dataclass(frozen=True, order=True)
class Candidate:
  data: int
  fsdp: int
  tensor: int
  remat: Optional[bool]
  accum: int

  def overrides(self) -> dict:
    out = {'mesh': (('data', self.data), ('fsdp', self.fsdp), ('tensor', self.tensor)),
           'accum_steps': self.accum}
    if self.remat is not None:
      out['model.remat'] = self.remat
    return out

  def __str__(self) -> str:
    return (f'data{self.data} fsdp{self.fsdp} tensor{self.tensor}, remat {self.remat}, '
            f'accum {self.accum}')


def divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def activation_bytes(config: ml_collections.ConfigDict, num_classes: int, platform: str) -> float:
  """Bytes per image the backward pass keeps (the VJP's residuals), from two traced batch sizes
  (their difference cancels the parameters held as residuals). Shapes only: nothing runs."""
  _, model, _ = build_lib.build_model(config, num_classes, platform)
  shape = (1, *hw(config.image_size), config.channels)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape))['params'])

  def residuals(batch: int) -> float:
    x = jax.ShapeDtypeStruct((batch, *shape[1:]), jnp.float32)
    fn = lambda p, x: jax.vjp(lambda q: model.apply(  # pylint: disable=g-long-lambda
        {'params': q}, x, train=True, rngs={'dropout': jax.random.PRNGKey(0)}), p)[1]
    return sum(math.prod(l.shape) * l.dtype.itemsize
               for l in jax.tree.leaves(jax.eval_shape(fn, params, x)))

  return max(residuals(2) - residuals(1), 0.0)


@dataclasses.dataclass
class _Screen:
  """Per-mesh state bytes and the model's constants the estimates need."""
  state_bytes: dict[tuple[int, int, int], float]
  param_bytes: dict[tuple[int, int, int], float]
  tensor_split: dict[tuple[int, int, int], bool]
  total_param_bytes: float
  activations: dict[Optional[bool], float]
  forward_flops: float  # per image
  factor: dict[Optional[bool], float] = dataclasses.field(
      default_factory=lambda: {None: 0.25, False: 0.25, True: 2.0})


def _screen(config, topology, devices, num_classes) -> tuple[_Screen, list[Candidate]]:
  family, model, fields = build_lib.build_model(config, num_classes, devices[0].platform)
  tx = optim.make_optimizer(config, optim.make_schedule(
      config.base_lr, config.total_steps, config.warmup_steps, config.lr_decay, config.end_lr))
  fn = state_lib.init_fn(model, tx, (1, *hw(config.image_size), config.channels), config.seed,
                         bool(config.ema_decay))
  abstract = jax.eval_shape(fn)
  total_params = sum(math.prod(l.shape) * l.dtype.itemsize
                     for l in jax.tree.leaves(abstract.params))
  n, batch = topology.chips, config.batch_size
  remats = [False, True] if 'remat' in family.field_names() else [None]
  state, params, split, cands = {}, {}, {}, []
  for t in [t for t in divisors(n) if t <= MAX_TENSOR]:
    for f in divisors(n // t):
      d = n // t // f
      mesh = sharding_lib.make_mesh((('data', d), ('fsdp', f), ('tensor', t)), devices)
      shardings = sharding_lib.tree_shardings(abstract, mesh, config.fsdp_min_size,
                                              family.tensor_rules)
      with_sh = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             abstract, shardings)
      key = (d, f, t)
      state[key] = core.tree_bytes_per_device(with_sh)
      params[key] = core.tree_bytes_per_device(with_sh.params)
      split[key] = t == 1 or any('tensor' in str(s.spec) for s in jax.tree.leaves(
          shardings.params, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding)))
      if not split[key]:
        continue
      for remat in remats:
        a = 1
        while batch % a == 0 and (batch // a) % (d * f) == 0:
          cands.append(Candidate(d, f, t, remat, a))
          a *= 2
  acts = {r: activation_bytes(core.with_overrides(config, **{'model.remat': r})
                              if r is not None else config, num_classes, devices[0].platform)
          for r in remats}
  flops = 2 * family.forward_macs(fields, num_classes, hw(config.image_size), config.channels)
  return _Screen(state, params, split, total_params, acts, flops), cands


def estimate(c: Candidate, s: _Screen, config, topology) -> tuple[float, float]:
  """(bytes per chip, seconds per step) of the analytic screen (module docstring)."""
  chip, n, batch = topology.chip, topology.chips, config.batch_size
  key = (c.data, c.fsdp, c.tensor)
  micro_per_chip = batch / c.accum / (c.data * c.fsdp)
  grads = s.param_bytes[key] * (2 if c.accum > 1 else 1)
  acts = s.factor[c.remat] * s.activations[c.remat] * micro_per_chip / c.tensor
  memory = s.state_bytes[key] + grads + acts
  compute = 3 * s.forward_flops * batch / n * (4 / 3 if c.remat else 1) / chip.peak_flops
  p = s.total_param_bytes / c.tensor
  sent = 2 * (c.data - 1) / c.data * p / c.fsdp
  sent += c.accum * 3 * (c.fsdp - 1) / c.fsdp * p
  full = s.activations.get(False, s.activations[c.remat])  # without remat: every activation
  sent += c.accum * 2 * (c.tensor - 1) / c.tensor * full * micro_per_chip / 3
  return memory, max(compute, sent / chip.ici_bw)


def suggest(config: ml_collections.ConfigDict, topology: topo_lib.Topology, *,
            num_classes: Optional[int] = None, teacher_model: Optional[str] = None,
            max_compiles: int = 6, top: int = 3, hlo_dir: Optional[str] = None,
            log: Callable[[str], None] = lambda s: None) -> list[core.Plan]:
  """Compiled plans of the best candidates (see the module docstring), fitting ones first, each
  group by estimated step time. hlo_dir: keep every compiled module's text there."""
  devices = topo_lib.devices(topology)
  classes = core.num_classes_of(config, num_classes)
  screen, cands = _screen(config, topology, devices, classes)
  hbm = topology.chip.hbm_bytes
  group = lambda c: (c.data, c.fsdp, c.tensor, c.remat)
  tried: set[Candidate] = set()
  settled: set[tuple] = set()  # groups with a fitting plan: larger accumulations only slow down
  too_small: dict[tuple, int] = {}  # group -> the largest accumulation that did not fit
  plans: list[core.Plan] = []
  log(f'suggest: {len(cands)} candidates (mesh x remat x accumulation); compiling up to '
      f'{max_compiles}, stopping after {top} that fit')
  while len(plans) < max_compiles and sum(p.fits for p in plans) < top:
    open_ = [c for c in cands if c not in tried and group(c) not in settled
             and c.accum > too_small.get(group(c), 0)]
    scored = [(estimate(c, screen, config, topology), c) for c in open_]
    passing = [((sec, c.accum), c) for (mem, sec), c in scored if mem <= hbm]
    if passing:
      (seconds, _), c = min(passing, key=lambda x: x[0])
    elif scored and not plans:  # nothing passes the screen: try the most frugal one anyway
      (_, seconds), c = min(scored, key=lambda x: x[0][0])
    else:
      break
    tried.add(c)
    cfg = core.with_overrides(config, **c.overrides())
    try:
      path = None
      if hlo_dir:
        path = os.path.join(hlo_dir, f'{config.model.name}_{topology.name}_d{c.data}f{c.fsdp}'
                                     f't{c.tensor}_r{int(bool(c.remat))}_a{c.accum}.hlo.gz')
      plan = core.make_plan(cfg, topology, num_classes=classes, devices=devices,
                            teacher_model=teacher_model, hlo_path=path)
    except ValueError as e:  # e.g. a batch that does not split over this mesh's processes
      log(f'  {c}: skipped ({e})')
      too_small[group(c)] = max(too_small.get(group(c), 0), c.accum)
      continue
    plans.append(plan)
    traced = screen.activations[c.remat] * config.batch_size / c.accum / (c.data * c.fsdp)
    if traced and math.isfinite(plan.memory['temporaries']):
      screen.factor[c.remat] = plan.memory['temporaries'] / (traced / c.tensor)
    if plan.fits:
      settled.add(group(c))
    else:
      too_small[group(c)] = max(too_small.get(group(c), 0), c.accum)
    log(f'  {c}: estimated {seconds * 1e3:.1f} ms; compiled: '
        f'{core._gib(plan.memory["total"]).strip()}, '  # pylint: disable=protected-access
        f'{"fits" if plan.fits else "does not fit"}, step {plan.times["step"] * 1e3:.1f} ms '
        f'({plan.compile_seconds:.0f} s to compile)')
  return sorted(plans, key=lambda p: (not p.fits, p.times['step']))


def format_table(plans: list[core.Plan], topology: topo_lib.Topology) -> str:
  """The compiled candidates, fitting ones first, fastest first; the last line says the pick."""
  head = (f'{"mesh":<28}{"remat":>6}{"accum":>6}{"memory/chip":>14}{"fits":>6}'
          f'{"step ms":>10}{"img/s":>10}{"MFU":>7}')
  lines = [f'suggestions for {topology.name} ({topology.chips} x {topology.chip.name}, '
           f'{core._gib(topology.chip.hbm_bytes).strip()} HBM per chip):', head]  # pylint: disable=protected-access
  for p in plans:
    lines.append(f'{p.mesh_str():<28}{"on" if p.remat else "off":>6}{p.accum_steps:>6}'
                 f'{core._gib(p.memory["total"]):>14}{"yes" if p.fits else "no":>6}'  # pylint: disable=protected-access
                 f'{p.times["step"] * 1e3:>10.1f}{p.images_per_second:>10,.0f}'
                 f'{100 * p.mfu:>6.1f}%')
  fitting = [p for p in plans if p.fits]
  if fitting:
    p = fitting[0]
    lines.append(f'pick: --config.mesh="((\'data\',{p.mesh["data"]}),(\'fsdp\',{p.mesh["fsdp"]}),'
                 f'(\'tensor\',{p.mesh["tensor"]}))" --config.accum_steps={p.accum_steps}'
                 + (f' --config.model.remat={p.remat}' if p.remat is not None else ''))
  else:
    lines.append('pick: none of the compiled candidates fits')
  return '\n'.join(lines)
