"""Collectives and matmul FLOPs of a compiled (SPMD-partitioned, per-device) HLO module, read from
its text (`analyze`).

For every all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute this counts how
often it runs per step (a collective inside a `while` body, e.g. of a scanned layer stack or of
gradient accumulation, runs trip-count times), its per-device buffer size and the group it spans,
and estimates the bytes each device sends with the bandwidth-optimal (ring) algorithms:

  all-reduce of S bytes over n devices   2 (n - 1) / n * S
  all-gather to S bytes                  (n - 1) / n * S
  reduce-scatter to S bytes              (n - 1) * S        (the input is n * S)
  all-to-all of S bytes                  (n - 1) / n * S
  collective-permute of S bytes          S  (0 when every pair is a device to itself)

Async pairs (`all-gather-start` / `-done`) are counted once, at the `-done`, whose shape is the
result; ops wrapped in `async-start` computations are found in the wrapped computation.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Optional

import numpy as np

KINDS = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1,
          'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4, 's32': 4, 'u32': 4, 'f64': 8,
          's64': 8, 'u64': 8, 'c64': 8, 'c128': 16}
_HEADER = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*)?\{\s*$')
_OP = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(' + '|'.join(KINDS) +
                 r')(-start|-done)?\(')
_ARRAY = re.compile(r'\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]')
_CALLS = re.compile(r'\b(?:body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


@dataclasses.dataclass
class Collective:
  kind: str
  count: int = 0           # executions per step
  buffer_bytes: float = 0  # per device, summed over executions (the result's size)
  sent_bytes: float = 0    # per device, summed over executions (ring estimate above)


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape string, tuples summed: 'f32[8,16]{1,0}' -> 512."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in _BYTES:
      total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
  return total


def group_size(line: str, num_devices: int) -> int:
  """Devices in one replica group of a collective line (every format XLA prints)."""
  m = re.search(r'replica_groups=\{\{([^}]*)\}', line)
  if m:
    return max(1, len([v for v in m.group(1).split(',') if v.strip()]))
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=', line)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\].*?\}?\s*\{([^}]*)\}", line)
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    named = re.findall(r"'([^']+)'", m.group(2))
    if named and all(n in sizes for n in named):
      return math.prod(int(sizes[n]) for n in named)
  return num_devices  # replica_groups={} (all devices) or a format not known here


def _sent(kind: str, size: float, n: int, line: str) -> float:
  if kind == 'all-reduce':
    return 2 * (n - 1) / n * size
  if kind in ('all-gather', 'all-to-all'):
    return (n - 1) / n * size
  if kind == 'reduce-scatter':
    return (n - 1) * size
  pairs = re.findall(r'\{(\d+),(\d+)\}', line.split('source_target_pairs=', 1)[-1])
  moving = [p for p in pairs if p[0] != p[1]]
  return size if moving or not pairs else 0.0


def _computations(text: str) -> tuple[dict[str, list[str]], Optional[str]]:
  comps: dict[str, list[str]] = {}
  entry, current = None, None
  for line in text.splitlines():
    if not line.startswith((' ', '\t')):
      m = _HEADER.match(line)
      if m:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
        continue
      if line.startswith('}'):
        current = None
        continue
    if current is not None:
      comps[current].append(line)
  return comps, entry


def _trip_count(line: str, comps: dict[str, list[str]]) -> int:
  """Iterations of a `while`: XLA's known_trip_count when printed (CPU), else read from the
  condition `counter < N` that JAX's scan / fori loops compile to (counter from 0 by 1; TPU)."""
  m = _TRIP.search(line)
  if m:
    return int(m.group(1))
  cond = re.search(r'condition=%?([\w.\-]+)', line)
  body = comps.get(cond.group(1), []) if cond else []
  consts = [int(c) for l in body for c in re.findall(r'[su]32\[\]\S*\s+constant\((\d+)\)', l)]
  if len(consts) == 1 and any('direction=LT' in l for l in body):
    return consts[0]
  return 1


def _weights(comps: dict[str, list[str]], entry: str, loops: bool = True,
             fusions: bool = True) -> dict[str, float]:
  """Executions per step of every computation reachable from the entry (while bodies times their
  trip count unless not `loops`; fused computations unless not `fusions`; never reducers)."""
  weight: dict[str, float] = collections.defaultdict(float)

  def visit(name: str, times: float, depth: int = 0) -> None:
    if name not in comps or depth > 64:
      return
    weight[name] += times
    for line in comps[name]:
      trip = _trip_count(line, comps) if loops and ' while(' in line else 1
      if not fusions and ' fusion(' in line:
        continue
      callees = _CALLS.findall(line)
      for group in _BRANCHES.findall(line):
        callees += [c.strip().lstrip('%') for c in group.split(',') if c.strip()]
      reducers = re.findall(r'to_apply=%?([\w.\-]+)', line)
      for callee in callees:
        if callee in reducers:
          continue  # reducers hold neither collectives nor matmuls
        body = f'body=%{callee}' in line or f'body={callee}' in line
        visit(callee, times * (trip if body else 1), depth + 1)

  visit(entry, 1.0)
  return weight


def _name_of(line: str) -> str:
  return line.split('=', 1)[0].strip().split()[-1].lstrip('%')


def _operands(line: str, op: str) -> list[str]:
  """Names of an instruction's operands: 'dot(%a, %b)' or 'dot(f32[2]{0} %a, ...)' -> ['a', 'b']."""
  inner = line.split(f' {op}(', 1)[1]
  depth, end = 0, len(inner)
  for i, ch in enumerate(inner):
    depth += ch in '([{'
    depth -= ch in ')]}'
    if depth < 0:
      end = i
      break
  return [t.strip().split()[-1].lstrip('%') for t in re.split(r',\s*(?![^\[{]*[\]}])',
                                                              inner[:end]) if t.strip()]


def _dims(shape: str) -> list[int]:
  m = _ARRAY.search(shape)
  return [int(d) for d in m.group(2).split(',') if d] if m else []


def _matmul_flops(line: str, shapes: dict[str, str]) -> float:
  """2 x multiply-adds of one dot or convolution instruction (0 for anything else)."""
  m = re.match(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(\S+)\s+(dot|convolution)\(', line)
  if not m:
    return 0.0
  out = math.prod(_dims(m.group(1)))
  ops = _operands(line, m.group(2))
  if m.group(2) == 'dot':
    lhs = _dims(shapes.get(ops[0], '')) if ops else []
    dims = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', line)
    k = math.prod(lhs[int(d)] for d in dims.group(1).split(',') if d) if dims and lhs else 1
    return 2.0 * out * k
  labels = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', line)
  lhs = _dims(shapes.get(ops[0], '')) if ops else []
  kernel = _dims(shapes.get(ops[1], '')) if len(ops) > 1 else []
  if not labels or not lhs or not kernel:
    return 0.0
  lhs_l, ker_l, out_l = labels.groups()
  out_dims = _dims(m.group(1))
  k_in = kernel[ker_l.index('i')]
  spatial = sorted(c for c in lhs_l if c.isdigit())
  taps, out_spatial = 1, 1
  for axis, d in enumerate(spatial):
    o = out_dims[out_l.index(d)]
    taps *= _real_taps(line, axis, lhs[lhs_l.index(d)], o)
    out_spatial *= o
  # Every output element: its window's real (not padding, not dilation) input taps x k_in.
  return 2.0 * out / max(out_spatial, 1) * taps * k_in


def _window_attr(line: str, key: str, axis: int, default: int) -> int:
  m = re.search(rf'\b{key}=([\d_x]+)', line)
  if not m:
    return default
  parts = m.group(1).split('x')
  return int(parts[axis].split('_')[0]) if axis < len(parts) else default


def _real_taps(line: str, axis: int, extent: int, out_extent: int) -> int:
  """Window positions that meet a real input element, summed over the output positions of one
  spatial axis of a convolution (XLA writes batched matmuls and transposed convolutions as
  convolutions whose windows run over padding or a dilated input)."""
  size = _window_attr(line, 'size', axis, 1)
  stride = _window_attr(line, 'stride', axis, 1)
  pad = _window_attr(line, 'pad', axis, 0)
  lhs_dilate = _window_attr(line, 'lhs_dilate', axis, 1)
  rhs_dilate = _window_attr(line, 'rhs_dilate', axis, 1)
  pos = (np.arange(out_extent)[:, None] * stride + np.arange(size)[None, :] * rhs_dilate - pad)
  dilated = (extent - 1) * lhs_dilate + 1
  real = (pos >= 0) & (pos < dilated) & (pos % lhs_dilate == 0)
  return int(real.sum())


_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$')
_ARRAY_LAYOUT = re.compile(r'\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\](\{[^}]*\})?')
# Instructions that move no HBM bytes themselves (control flow, aliases, wrappers, markers).
_NO_TRAFFIC = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'while', 'call',
               'conditional', 'after-all', 'partition-id', 'replica-id', 'async-start',
               'async-update', 'async-done', 'copy-start', 'add-dependency', 'opt-barrier'}


def hbm_bytes(shape: str) -> float:
  """Bytes of a shape string that live in HBM: arrays whose layout names another memory space
  (TPU's `S(1)`: on-chip VMEM) are left out."""
  total = 0.0
  for dtype, dims, layout in _ARRAY_LAYOUT.findall(shape):
    if dtype in _BYTES and not re.search(r'S\([1-9]', layout or ''):
      total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
  return total


@dataclasses.dataclass
class Analysis:
  """What `analyze` reads from a compiled module (one device, one step).

  collectives: {kind: Collective}; flops: dot and convolution FLOPs, loops unrolled; flops_once:
  the same with every loop body counted once (as `cost_analysis()` counts); ops: [N, 3] array of
  (executions, matmul FLOPs, HBM bytes read and written) per executed instruction (a fusion with
  its fused matmuls), for a per-operation roofline."""
  collectives: dict[str, Collective]
  flops: float
  flops_once: float
  ops: np.ndarray

  @property
  def hbm_bytes(self) -> float:
    return float((self.ops[:, 0] * self.ops[:, 2]).sum()) if len(self.ops) else 0.0

  def op_seconds(self, peak_flops: float, hbm_bw: float) -> float:
    """Sum over instructions of max(FLOPs / peak, bytes / bandwidth), times executions."""
    if not len(self.ops):
      return 0.0
    w, f, b = self.ops.T
    return float((w * np.maximum(f / peak_flops, b / hbm_bw)).sum())


def analyze(text: str, num_devices: int) -> Analysis:
  """Collectives, matmul FLOPs and per-instruction traffic of one device's compiled module.

  The FLOPs count every dot and convolution (2 x multiply-adds) times its executions: unlike
  `cost_analysis()`, which counts a loop body once, this counts a scanned layer stack or the
  accumulation loop trip-count times, and it leaves out elementwise work (not at MXU peak). HBM
  bytes of an instruction are its operands' and result's (a fusion's internals stay on chip)."""
  out = {k: Collective(k) for k in KINDS}
  comps, entry = _computations(text)
  if entry is None:
    return Analysis(out, 0.0, 0.0, np.zeros((0, 3)))
  weight = _weights(comps, entry)
  once = _weights(comps, entry, loops=False)
  executed = _weights(comps, entry, fusions=False)
  starts, shapes = {}, {}  # async start name -> its line (groups); instruction name -> shape
  for lines in comps.values():
    for line in lines:
      d = _INSTR.match(line)
      if d:
        shapes[d.group(1)] = d.group(2)
      m = _OP.match(line)
      if m and m.group(3) == '-start':
        starts[_name_of(line)] = line
  flops = flops_once = 0.0
  fused: dict[str, float] = {}  # matmul FLOPs inside each computation (for fusions)
  for name, lines in comps.items():
    fused[name] = sum(_matmul_flops(l, shapes) for l in lines
                      if ' dot(' in l or ' convolution(' in l)
  for name, times in weight.items():
    flops += times * fused[name]
    flops_once += once.get(name, 0.0) * fused[name]
  ops = []
  for name, times in executed.items():
    for line in comps[name]:
      d = _INSTR.match(line)
      if d is None:
        continue
      op = d.group(3)
      m = _OP.match(line)
      if m:
        if m.group(3) != '-start':
          _count_collective(out[m.group(2)], m, line, starts, times, num_devices)
        continue
      if op in _NO_TRAFFIC or (op == 'custom-call' and not d.group(4).startswith('%')):
        continue
      if op == 'copy-done':  # an asynchronous copy between HBM and on-chip memory
        ops.append((times, 0.0, shape_bytes(d.group(2))))
        continue
      f = 0.0
      if op in ('dot', 'convolution'):
        f = _matmul_flops(line, shapes)
      elif op == 'fusion':
        callee = _callee(line)
        f = _fused_flops(callee, comps, fused) if callee else 0.0
      ops.append((times, f, _traffic(line, d, op, shapes, comps)))
  return Analysis(out, flops, flops_once, np.array(ops, dtype=np.float64).reshape(-1, 3))


_PARAM = re.compile(r'parameter\((\d+)\)')
_FUSION_CALL = re.compile(r'calls=%?([\w.\-]+)')
# Inside a fusion these move no bytes of their own: views, and a copy, which is computed element by
# element like the rest, so a slice of its result reads only that slice of its operand.
_PASS_THROUGH = ('bitcast', 'reshape', 'get-tuple-element', 'copy')


def _callee(line: str) -> Optional[str]:
  """The fused computation a fusion instruction calls."""
  m = _FUSION_CALL.search(line)
  return m.group(1) if m else None


def _traffic(line: str, d: re.Match, op: str, shapes: dict[str, str],
             comps: dict[str, list[str]]) -> float:
  """HBM bytes an instruction reads and writes: its operands and result, except where only a slice
  moves. A dynamic-slice reads its result's bytes; a dynamic-update-slice updates its buffer in
  place (reads and writes the update only). Inside a fusion (nested ones included), a parameter
  seen only through dynamic-slices is read slice by slice, and an output that is an in-place update
  writes the update. A scanned layer stack's loop body is made of these: counted whole, each of L
  iterations would move all L layers' saved activations."""
  operands = _operands(line, op)
  if op == 'dynamic-slice':
    return 2 * hbm_bytes(d.group(2))
  if op == 'dynamic-update-slice' and len(operands) > 1:
    return 2 * hbm_bytes(shapes.get(operands[1], ''))
  full = hbm_bytes(d.group(2)) + sum(hbm_bytes(shapes.get(o, '')) for o in operands)
  callee = _callee(line) if op == 'fusion' else None
  if callee not in comps:
    return full
  body = _Fused(comps, callee)
  total = body.written(body.root) if body.root in body.instrs else hbm_bytes(d.group(2))
  for i, outer in enumerate(operands):
    whole = hbm_bytes(shapes.get(outer, ''))
    sliced = body.param_read(i)
    total += whole if sliced is None else min(sliced, whole)
  return min(total, full)


class _Fused:
  """A fused computation's instructions and their users, for `_traffic`."""

  def __init__(self, comps: dict[str, list[str]], name: str, depth: int = 0):
    self.comps, self.depth = comps, depth
    self.instrs: dict[str, tuple[str, str, list[str], str]] = {}  # name -> (shape, op, args, line)
    self.users: dict[str, list[str]] = {}
    self.params: dict[int, str] = {}
    self.root = None
    for l in comps.get(name, []):
      m = _INSTR.match(l)
      if m is None:
        continue
      inst, shape, kind = m.group(1), m.group(2), m.group(3)
      args = _operands(l, kind) if kind not in ('parameter', 'constant') else []
      self.instrs[inst] = (shape, kind, args, l)
      for a in args:
        self.users.setdefault(a, []).append(inst)
      p = _PARAM.search(l) if kind == 'parameter' else None
      if p:
        self.params[int(p.group(1))] = inst
      if l.lstrip().startswith('ROOT'):
        self.root = inst

  def param_read(self, index: int) -> Optional[float]:
    name = self.params.get(index)
    return None if name is None else self.read(name)

  def read(self, name: str, depth: int = 0) -> Optional[float]:
    """Bytes of `name` read when every use is a slice or an in-place buffer; None if some use
    reads all of it (the computation's result included: what uses it is outside)."""
    if name == self.root:
      return None
    total = 0.0
    for u in self.users.get(name, []):
      shape, kind, args, line = self.instrs[u]
      if kind in _PASS_THROUGH and depth < 8:
        sub = self.read(u, depth + 1)
      elif kind == 'dynamic-slice' and args and args[0] == name:
        sub = hbm_bytes(shape)
      elif kind == 'dynamic-update-slice' and args and args[0] == name:
        sub = 0.0  # the buffer updated in place: only the update is written (see `written`)
      elif kind == 'fusion' and self.depth < 4:
        callee = _callee(line)
        inner = _Fused(self.comps, callee, self.depth + 1) if callee else None
        subs = [inner.param_read(i) if inner else None for i, a in enumerate(args) if a == name]
        sub = None if any(x is None for x in subs) else sum(subs)
      else:
        sub = None
      if sub is None:
        return None
      total += sub
    return total

  def written(self, name: str, depth: int = 0) -> float:
    shape, kind, args, _ = self.instrs[name]
    if kind == 'tuple' and depth < 8:
      return sum(self.written(a, depth + 1) for a in args if a in self.instrs)
    if kind in ('bitcast', 'reshape') and args and args[0] in self.instrs and depth < 8:
      return self.written(args[0], depth + 1)
    if (kind == 'dynamic-update-slice' and len(args) > 1 and args[1] in self.instrs and
        self._is_parameter(args[0])):  # in place: the buffer came in, only the update changes
      return hbm_bytes(self.instrs[args[1]][0])
    return hbm_bytes(shape)

  def _is_parameter(self, name: str, depth: int = 0) -> bool:
    """Whether `name` is an incoming buffer: a parameter, a view of one, or a nested fusion that
    works in place on one (`output_to_operand_aliasing` to its first operand)."""
    shape, kind, args, line = self.instrs.get(name, ('', '', [], ''))
    aliased = kind == 'fusion' and 'output_to_operand_aliasing={{}: (0,' in line
    if (kind in ('bitcast', 'reshape', 'get-tuple-element') or aliased) and args and depth < 8:
      return self._is_parameter(args[0], depth + 1)
    return kind == 'parameter'


def _fused_flops(name: str, comps: dict[str, list[str]], fused: dict[str, float],
                 depth: int = 0) -> float:
  """Matmul FLOPs of a fused computation, nested fusions included."""
  total = fused.get(name, 0.0)
  for line in comps.get(name, []) if depth < 16 else []:
    if ' fusion(' in line:
      callee = _callee(line)
      if callee:
        total += _fused_flops(callee, comps, fused, depth + 1)
  return total


def _count_collective(c: Collective, m, line: str, starts: dict[str, str], times: float,
                      num_devices: int) -> None:
  size = shape_bytes(m.group(1))
  if m.group(3) == '-done':
    operand = re.search(r'-done\(%?([\w.\-]+)', line)
    line = starts.get(operand.group(1), line) if operand else line
  n = group_size(line, num_devices)
  c.count += int(round(times))
  c.buffer_bytes += times * size
  c.sent_bytes += times * _sent(c.kind, size, n, line)


def collectives(text: str, num_devices: int) -> dict[str, Collective]:
  """{kind: Collective} per step for the HLO module `text` (compiled.as_text()), over
  `num_devices`; kinds that never occur are present with count 0."""
  return analyze(text, num_devices).collectives
