"""`python scripts/benchmark.py model`: one registered model, timed as training uses it, next to
timm's and Hugging Face's PyTorch implementations of the same architecture.

Protocol (the same for every implementation): a fixed in-memory batch of uniform [-1, 1] images and
random labels; train step = forward + softmax cross-entropy + backward + global-norm clipping at 1.0 +
the optimizer update (SGD with momentum 0.9 by default; `--optimizer adam` for Adam with decoupled
weight decay 0.1). Inference = forward only, no gradients. Each implementation runs in its own
process (its own threads and allocator); after warm-up, the processes are asked in turn for one timed
window each (preceded by one untimed iteration), `--repeats` rounds, so that a slow minute of the
machine hits everyone alike; the figure reported is the median window.

Ours is the real jitted step of `vit_jax.train` (donated state, the configured optimizer), compiled
ahead of time so that compile time and the compiled program's memory analysis are reported. The
PyTorch models are this project's own parameters exported through `vit_jax.formats` (timm /
Hugging Face layouts) and loaded by timm / transformers: the architecture is the same by
construction, and the weights are the same too.

`timm-compile` and `hf-compile` are the same PyTorch models under `torch.compile` (the inductor
backend, default mode), the way users who care about speed run them: the model is compiled (for
training, its forward and, through AOTAutograd, its backward; the loss, clipping and optimizer stay
eager, as in the usual `model = torch.compile(model)`), and its first call, which compiles, is timed
apart and reported as its compile time, never inside a timed window.

Every output names the host CPU (`vit_jax.runtime.describe_cpu`) and its float32 matmul peak,
measured here: a 2048^2 float32 matmul in numpy (the parent process, before any worker starts) and
in JAX (our worker). MFU is the achieved model FLOP/s (analytic: the family's forward MACs x 2, x 3
for training) over the best matmul peak measured on this machine (float32 on CPU, bfloat16 on GPU;
the card's datasheet peak is also shown on GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

# Dense bfloat16 datasheet peaks, FLOP/s (no sparsity). H100/H200 SXM: NVIDIA H100 and H200
# datasheets (989.4 TFLOPS bf16 dense; the "1,979" figure is with sparsity). A100: A100 datasheet.
GPU_BF16_PEAK = {'H100': 989.4e12, 'H200': 989.4e12, 'A100': 312e12, 'L4': 121e12}
# PyTorch peers: timm's and Hugging Face's models, eager or under torch.compile (inductor,
# default mode).
TORCH_PEERS = ('timm', 'hf', 'timm-compile', 'hf-compile')


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--model', required=True, help='a registered name (python -m vit_jax.summary --list)')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--channels', type=int, default=3)
  parser.add_argument('--num_classes', type=int, default=1000)
  parser.add_argument('--mode', default='both', choices=('train', 'infer', 'both'))
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--optimizer', default='sgd', choices=('sgd', 'adam'))
  parser.add_argument('--compare', default='',
                      help='comma-separated PyTorch peers: ' + ', '.join(TORCH_PEERS))
  parser.add_argument('--repeats', type=int, default=4, help='timed windows per implementation')
  parser.add_argument('--seconds', type=float, default=6.0, help='target length of one window')
  parser.add_argument('--cpu_devices', type=int, default=0,
                      help='ours on a CPU: the host as N JAX devices, data parallel, as '
                           '--config.cpu_devices=N trains; 0 (default): the count training '
                           'chooses for this model and host (vit_jax/runtime.py: cpu_devices_for)')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='model field override, e.g. --set num_layers=6 --set attention_impl=xla')
  parser.add_argument('--json_out', default=None, help='also write every figure as JSON here')


# ----------------------------------------------------------------------------------------------
# Workers: one process per implementation and task. They print one JSON line when ready, then
# answer `time N` (run N iterations, report seconds) until `quit`.


def resolve_model(name: str, sets: list[str]) -> tuple[Any, dict[str, Any]]:
  """(family, fields) of a registered model with `--set FIELD=VALUE` overrides (values parsed as
  Python literals, else kept as strings)."""
  from vit_jax.benchmark import steps  # pylint: disable=import-outside-toplevel
  from vit_jax.families import registry  # pylint: disable=import-outside-toplevel
  family, fields = registry.resolve(registry.get_model_config(name))
  fields.update(steps.parse_sets(sets))
  return family, fields


def _arch(spec: dict[str, Any]):
  from vit_jax.families.base import Architecture  # pylint: disable=import-outside-toplevel
  family, fields = resolve_model(spec['model'], spec['set'])
  return Architecture(dict(fields), spec['num_classes'], spec['image_size'], spec['channels'],
                      family.name)


def _batch(spec: dict[str, Any]):
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  b, s, c = spec['batch'], spec['image_size'], spec['channels']
  images = rng.uniform(-1, 1, (b, s, s, c)).astype(np.float32)
  labels = rng.integers(0, spec['num_classes'], b)
  return images, labels


def _ours(spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
  """(run(n), info) for this project's jitted train step or inference: the step training builds
  (`vit_jax.benchmark.steps`: `build_training` of a config with this model, batch and optimizer)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from vit_jax import runtime  # pylint: disable=import-outside-toplevel
  from vit_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from vit_jax.benchmark import steps  # pylint: disable=import-outside-toplevel
  arch = _arch(spec)
  images, labels = _batch(spec)
  config = steps.bench_config(spec['model'], image_size=spec['image_size'],
                              channels=spec['channels'], batch=spec['batch'],
                              optimizer=spec['optimizer'], dtype=spec['dtype'],
                              fields=steps.parse_sets(spec['set']))
  # One device, or the CPU split into `cpu_devices` (0: the count training would choose for this
  # model and host); as vit_jax.main does, before the backend starts. An accelerator is not split.
  config.cpu_devices = int(spec.get('cpu_devices', 0))
  cpu_devices = runtime.cpu_devices_for(config)
  runtime.split_cpu(cpu_devices)
  tuned = runtime.tune_for_backend(jax.default_backend())  # as the trainer does (train.build)
  try:
    built = steps.build(config, spec['num_classes'], cpu_devices)
  except ValueError as e:
    raise SystemExit(f'--batch {spec["batch"]}: {e}') from e
  model, devices = built.model, built.mesh.devices.size
  data_sharding = sharding_lib.batch_sharding(built.mesh)
  state = steps.live_state(built)
  t0 = time.perf_counter()
  if spec['task'] == 'train':
    batch = jax.device_put({'image': images, 'labels': np.eye(spec['num_classes'], dtype=np.float32)[labels]},
                           data_sharding)
    compiled = built.train_step.lower(state, batch).compile()
    extras = built.train_step.extras  # the objective's frozen inputs, an argument of the compiled step
    box = [state]

    def run(n: int) -> None:
      for _ in range(n):
        box[0], metrics = compiled(box[0], batch, extras)
      jax.block_until_ready(metrics)
  else:
    x = jax.device_put(images, data_sharding)
    compiled = jax.jit(lambda p, x: model.apply({'params': p}, x)).lower(state.params, x).compile()
    params = state.params

    def run(n: int) -> None:
      for _ in range(n):
        out = compiled(params, x)
      jax.block_until_ready(out)
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes +
            mem.temp_size_in_bytes)
  macs = arch.get_family().forward_macs(arch.model_config, arch.num_classes, arch.image_size,
                                        arch.channels)
  info = {'compile_s': compile_s, 'peak_bytes': peak, 'flops_per_image':
          2 * macs * (3 if spec['task'] == 'train' else 1), 'device': jax.devices()[0].device_kind,
          'backend': jax.default_backend(), 'matmul_peak': _matmul_peak(),
          'xla_flags': os.environ.get('XLA_FLAGS', ''), 'allocator_tuned': tuned,
          'devices': devices}
  return run, info


def _matmul_peak() -> float:
  """Best FLOP/s of a large square matmul here: float32 on CPU, bfloat16 on accelerators."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  cpu = jax.default_backend() == 'cpu'
  n, dtype = (2048, jnp.float32) if cpu else (8192, jnp.bfloat16)
  # Random operands: a GPU's tensor cores draw less power (and clock higher) on ones or zeros.
  a, b = (jax.random.normal(jax.random.PRNGKey(i), (n, n), dtype) for i in range(2))
  f = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(f(a, b))
  reps = 1 if cpu else 10  # a GPU product takes ~1.5 ms: time several per window
  best = float('inf')
  for _ in range(5):
    t = time.perf_counter()
    for _ in range(reps):
      out = f(a, b)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t) / reps)
  return 2 * n ** 3 / best


def numpy_matmul_peak(n: int = 2048, tries: int = 5) -> float:
  """Best FLOP/s of an n x n float32 matmul in numpy (its BLAS, all cores) on this host."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
  a @ b  # pylint: disable=pointless-statement
  best = float('inf')
  for _ in range(tries):
    t = time.perf_counter()
    a @ b  # pylint: disable=pointless-statement
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def host_line(cpu: str, peaks: dict[str, float]) -> str:
  """'host: AMD EPYC (...); float32 matmul peak 438.5 GFLOP/s (JAX), 401.2 (numpy)'."""
  shown = ', '.join(f'{v / 1e9:.1f} GFLOP/s ({k})' for k, v in peaks.items() if v)
  return f'host: {cpu}; float32 matmul peak {shown}' if shown else f'host: {cpu}'


def _torch(spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
  """(run(n), info) for timm's or Hugging Face's model of the same architecture: eager PyTorch, or
  under torch.compile for the `-compile` peers (info['compile_s']: the first, compiling call)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from vit_jax.convert import verify  # pylint: disable=import-outside-toplevel
  from vit_jax.formats import hf as hf_format, timm as timm_format  # pylint: disable=import-outside-toplevel
  from vit_jax.models import params as params_lib  # pylint: disable=import-outside-toplevel
  arch = _arch(spec)
  model = arch.create_model()
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0),
                                      np.zeros((1, *arch.image_size, arch.channels), np.float32)))()
  tree = arch.get_family().to_file_layout(params['params'])
  flat = {k: np.asarray(v) for k, v in params_lib.flatten(tree).items()}
  torch.set_num_threads(os.cpu_count() or 1)
  peer, compiled = spec['impl'].split('-')[0], spec['impl'].endswith('-compile')
  with tempfile.TemporaryDirectory() as tmp:
    if peer == 'timm':
      from vit_jax.convert import torchvision_stub  # pylint: disable=import-outside-toplevel
      torchvision_stub.import_timm()
      timm_format.write_timm(tmp, flat, arch)
      net = verify.load_timm_model(tmp)
      forward = lambda x: net(x)
    else:
      hf_format.write_hf(tmp, flat, arch)
      net = verify.load_hf_model(tmp)
      forward = lambda x: net(pixel_values=x).logits
  # On a CUDA machine PyTorch runs on the GPU with float32 parameters and bfloat16 autocast, as our
  # accelerator default (bf16 compute, f32 parameters); on the CPU bfloat16 means bf16 parameters.
  cuda = torch.cuda.is_available()
  device = torch.device('cuda' if cuda else 'cpu')
  bf16 = spec['dtype'] == 'bfloat16'
  if bf16 and not cuda:
    net = net.to(torch.bfloat16)
  net = net.to(device)
  if compiled:  # `forward` calls `net` by name: from here on, the compiled module (same parameters)
    net = torch.compile(net)
  images, labels = _batch(spec)
  dtype = torch.bfloat16 if bf16 and not cuda else torch.float32
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(dtype).to(device)
  y = torch.from_numpy(labels).to(device)
  if cuda and bf16:
    plain_forward = forward

    def forward(x):
      with torch.autocast('cuda', dtype=torch.bfloat16):
        return plain_forward(x)
  if spec['task'] == 'train':
    net.train()
    if spec['optimizer'] == 'adam':
      opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.1)
    else:
      opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

    def one() -> None:
      opt.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(forward(x).float(), y)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
      opt.step()
  else:
    net.eval()

    def one() -> None:
      with torch.inference_mode():
        forward(x)

  def run(n: int) -> None:
    for _ in range(n):
      one()
    if cuda:
      torch.cuda.synchronize()  # kernels are queued; the window ends when they have run
  info = {'device': torch.cuda.get_device_name() if cuda else 'cpu',
          'backend': 'torch ' + torch.__version__}
  if compiled:  # the first call compiles (forward, and backward for training): timed apart
    t0 = time.perf_counter()
    run(1)
    info['compile_s'] = time.perf_counter() - t0
    info['backend'] += ' torch.compile (inductor, default mode)'
  return run, info


def worker_main(spec: dict[str, Any]) -> None:
  run, info = (_ours if spec['impl'] == 'ours' else _torch)(spec)
  run(2)  # warm-up: first calls allocate, autotune, fill caches
  t = time.perf_counter()
  run(1)
  info['ready'] = True
  info['first_s'] = time.perf_counter() - t
  print(json.dumps(info), flush=True)
  for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == 'quit':
      break
    n = int(cmd[1])
    # One untimed iteration first: a window measures back-to-back steps, as training runs them,
    # not the first step after the other implementations had the machine (that one was up to
    # 1.5x slower for a ViT-S/16 train step here, whichever implementation ran before).
    run(1)
    t = time.perf_counter()
    run(n)
    print(json.dumps({'seconds': time.perf_counter() - t, 'iterations': n}), flush=True)


# ----------------------------------------------------------------------------------------------
# The parent: start workers, interleave windows, print the table.


class _Worker:
  def __init__(self, spec: dict[str, Any]):
    self.spec = spec
    from vit_jax import benchmark  # pylint: disable=import-outside-toplevel
    env = benchmark.worker_env(TF_CPP_MIN_LOG_LEVEL='3', TRANSFORMERS_VERBOSITY='error',
                               HF_HUB_DISABLE_PROGRESS_BARS='1')
    if spec['impl'] != 'ours':
      env['JAX_PLATFORMS'] = 'cpu'  # JAX only makes the weights there; the GPU is PyTorch's
    else:
      # The workers are alive together: JAX's default (75% of the GPU taken at start) would leave
      # PyTorch too little. Half is several times what a benchmarked step needs.
      env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.5')
    self.proc = subprocess.Popen([sys.executable, '-m', 'vit_jax.benchmark.model', '--worker',
                                  json.dumps(spec)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=env)
    self.info: Optional[dict[str, Any]] = None
    self.rates: list[float] = []

  def read(self) -> dict[str, Any]:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'{self.spec["impl"]} {self.spec["task"]} worker exited with '
                         f'{self.proc.wait()} (its error is above)')
    return json.loads(line)

  def ready(self) -> dict[str, Any]:
    self.info = self.read()
    return self.info

  def window(self, seconds: float) -> float:
    n = max(1, round(seconds / max(self.info['first_s'], 1e-6)))
    self.proc.stdin.write(f'time {n}\n')
    self.proc.stdin.flush()
    out = self.read()
    rate = out['iterations'] * self.spec['batch'] / out['seconds']
    self.rates.append(rate)
    return rate

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.write('quit\n')
      self.proc.stdin.close()
      self.proc.wait()


def _measure(spec: dict[str, Any], impls: list[str], repeats: int, seconds: float
             ) -> dict[str, _Worker]:
  """Median img/s per implementation, windows interleaved; workers start one at a time so that
  compilation is not timed against another's."""
  workers = {}
  try:
    for impl in impls:
      w = _Worker(dict(spec, impl=impl))
      w.ready()
      workers[impl] = w
    for _ in range(repeats):
      for w in workers.values():
        w.window(seconds)
  finally:
    for w in workers.values():
      w.close()
  return workers


def run(args: argparse.Namespace) -> dict[str, Any]:
  from vit_jax import runtime  # pylint: disable=import-outside-toplevel
  impls = ['ours'] + [c for c in args.compare.split(',') if c]
  bad = [c for c in impls[1:] if c not in TORCH_PEERS]
  if bad or len(set(impls)) < len(impls):
    raise SystemExit(f'--compare takes each of {", ".join(TORCH_PEERS)} at most once, not '
                     f'{args.compare!r}')
  tasks = ['infer', 'train'] if args.mode == 'both' else [args.mode]
  base = dict(model=args.model, batch=args.batch, image_size=args.image_size,
              channels=args.channels, num_classes=args.num_classes, dtype=args.dtype,
              optimizer=args.optimizer, set=args.set, cpu_devices=args.cpu_devices)
  cpu = runtime.cpu_info()
  peaks = {'numpy': numpy_matmul_peak()}  # here, before any worker runs beside it
  print(f'{args.model} at {args.image_size}x{args.image_size}x{args.channels}, batch {args.batch}, '
        f'{args.dtype}, {args.optimizer} + clip 1.0; median of {args.repeats} interleaved windows '
        f'of ~{args.seconds:.0f}s; {os.cpu_count()} CPUs')
  results: dict[str, Any] = {'config': base, 'tasks': {},
                             'host': {'cpu': runtime.describe_cpu(cpu), **cpu}}
  lines = []
  for task in tasks:
    workers = _measure(dict(base, task=task), impls, args.repeats, args.seconds)
    ours = workers['ours'].info
    rates = {k: statistics.median(w.rates) for k, w in workers.items()}
    flops = ours['flops_per_image']
    if ours['backend'] == 'cpu':  # a property of the machine: the best any worker measured
      peaks['JAX'] = max(peaks.get('JAX', 0.0), ours['matmul_peak'])
      peak = max(peaks.values())
    else:  # an accelerator's bfloat16 peak; numpy's is the host's
      peak = max(peaks.get('accelerator', 0.0), ours['matmul_peak'])
      peaks['accelerator'] = peak
    if task == tasks[0]:
      cpu_peaks = {k: v for k, v in peaks.items() if k != 'accelerator'}
      print(host_line(runtime.describe_cpu(cpu), cpu_peaks))
    achieved = rates['ours'] * flops
    kind = 'float32' if ours['backend'] == 'cpu' else 'bfloat16'
    if task == tasks[0]:
      print(f'ours: XLA_FLAGS="{ours["xla_flags"]}", host allocator tuned: '
            f'{ours["allocator_tuned"]} (vit_jax/runtime.py; VIT_JAX_CPU_TUNING=0 turns both off), '
            f'{ours["devices"]} JAX device(s), data parallel')
    print(f'\n{task}: {"impl":12s} {"img/s":>9s}  {"x ours":>7s}  spread')
    for k, w in workers.items():
      spread = f'{min(w.rates):.1f}-{max(w.rates):.1f}'
      print(f'{task}: {k:12s} {rates[k]:9.1f}  {rates[k] / rates["ours"]:7.2f}  {spread}')
    print(f'{task}: {flops / 1e9:.3f} GFLOP/image (analytic), {achieved / 1e9:.1f} GFLOP/s achieved, '
          f'MFU {achieved / peak:.1%} of the measured {kind} matmul peak {peak / 1e9:.1f} GFLOP/s '
          f'({ours["device"]})')
    datasheet = next((v for k, v in GPU_BF16_PEAK.items() if k in ours['device']), None)
    if datasheet and ours['backend'] == 'gpu':
      print(f'{task}: MFU {achieved / datasheet:.1%} of the {ours["device"]} datasheet bf16 peak '
            f'{datasheet / 1e12:.0f} TFLOP/s')
    mem = ours['peak_bytes']
    print(f'{task}: compile {ours["compile_s"]:.1f}s, peak device memory '
          f'{mem / 2**20:.1f} MiB (compiled memory analysis)' if mem else
          f'{task}: compile {ours["compile_s"]:.1f}s')
    compiles = {k: w.info['compile_s'] for k, w in workers.items() if k != 'ours' and
                w.info.get('compile_s') is not None}
    if compiles:
      print(f'{task}: torch.compile, first call (compiles; outside the timed windows): ' +
            ', '.join(f'{k} {v:.1f}s' for k, v in compiles.items()))
    torch_rates = {k: v for k, v in rates.items() if k != 'ours'}
    if torch_rates:
      best = max(torch_rates, key=torch_rates.get)
      lines.append(f'{task}: {rates["ours"]:.1f} img/s (x{rates["ours"] / torch_rates[best]:.2f} '
                   f'vs the fastest PyTorch, {best} {torch_rates[best]:.1f})')
    else:
      lines.append(f'{task}: {rates["ours"]:.1f} img/s')
    results['tasks'][task] = {'rates': rates, 'windows': {k: w.rates for k, w in workers.items()},
                              'info': ours, 'compile_s': {'ours': ours['compile_s'], **compiles}}
  results['host']['matmul_peak_flops'] = peaks
  print()
  print(host_line(runtime.describe_cpu(cpu), {k: v for k, v in peaks.items()
                                              if k != 'accelerator'}))
  for line in lines:
    print(line)
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == '__main__':
  if len(sys.argv) == 3 and sys.argv[1] == '--worker':
    worker_main(json.loads(sys.argv[2]))
  else:
    raise SystemExit('run it as: python scripts/benchmark.py model --model NAME ...')
