"""`python scripts/benchmark.py tokens`: how the train step's time and memory grow with the token
count, with and without rematerialisation and fused attention.

For each image size (patch fixed, so tokens = (size / patch)^2) and each variant, the real train step
is compiled ahead of time; peak memory comes from the compiled program's memory analysis (no run
needed, so large sizes can be measured on a small machine), and with `--time` a few steps are timed.
Writes `tokens.json` and `tokens.png` (memory and step time against tokens, log-log) into `--out`.

Variants: plain (attention_impl explicit, no remat), remat (blocks recomputed in the backward pass,
policy `--remat_policy`), fused (attention_impl auto: cuDNN flash attention on NVIDIA GPUs, XLA's
fused `dot_product_attention` elsewhere) and fused+remat. Fused attention plus remat is the variant
whose memory should grow linearly in tokens on a GPU: the [T, T] attention matrix is never stored.
On the CPU, XLA's "fused" attention still materialises it, so expect quadratic growth there.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from typing import Any, Optional

VARIANTS = {
    'plain': {'attention_impl': 'explicit', 'remat': False},
    'remat': {'attention_impl': 'explicit', 'remat': True},
    'fused': {'attention_impl': 'auto', 'remat': False},
    'fused+remat': {'attention_impl': 'auto', 'remat': True},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--model', default='ViT-B_16')
  parser.add_argument('--sizes', default='224,448,896', help='comma-separated image sizes')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--dtype', default=None, choices=(None, 'float32', 'bfloat16'),
                      help='default: float32 on CPU, bfloat16 elsewhere')
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--remat_policy', default='nothing_saveable')
  parser.add_argument('--time', action='store_true', help='also time 3 steps per point')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='model field override for every point, e.g. --set scan=True')
  parser.add_argument('--jobs', type=int, default=1,
                      help='points compiled at once (each in its own process); timed steps still '
                           'run one at a time, under a lock')
  parser.add_argument('--out', default='runs/benchmark_tokens')


def measure_point(spec: dict[str, Any]) -> dict[str, Any]:
  """Compile (and optionally time) one train step; runs in a fresh process per point."""
  import jax  # pylint: disable=import-outside-toplevel
  from vit_jax.benchmark import steps  # pylint: disable=import-outside-toplevel
  dtype = spec['dtype'] or ('float32' if jax.default_backend() == 'cpu' else 'bfloat16')
  fields = dict(steps.parse_sets(spec.get('set', [])), **VARIANTS[spec['variant']])
  if fields['remat']:
    fields['remat'] = spec['remat_policy']
  size, batch = spec['size'], spec['batch']
  config = steps.bench_config(spec['model'], image_size=size, channels=3, batch=batch,
                              optimizer='sgd', dtype=dtype, fields=fields, total_steps=1000)
  # Abstract state and batch (`Training.lower`): the point is compiled without allocating
  # parameters, unless it is timed.
  built = steps.build(config, 1000)
  t0 = time.perf_counter()
  compiled = built.lower().compile()
  out = {**spec, 'dtype': dtype, 'compile_s': time.perf_counter() - t0,
         'tokens': (size // built.fields['patch_size']) ** 2}
  mem = compiled.memory_analysis()
  if mem is not None:
    out['peak_bytes'] = (mem.argument_size_in_bytes + mem.output_size_in_bytes -
                         mem.alias_size_in_bytes + mem.temp_size_in_bytes)
    out['temp_bytes'] = mem.temp_size_in_bytes
  if spec['time']:
    with _exclusive(spec.get('lock')):
      out['step_s'] = _time_steps(compiled, built)
  return out


@contextlib.contextmanager
def _exclusive(path: Optional[str]):
  """Holds an flock on `path` (if any): points compile side by side but time one at a time."""
  if not path:
    yield
    return
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _time_steps(compiled, built) -> float:
  """Seconds per train step of `compiled` (built.train_step, compiled): one warm-up step, then the
  mean of 3."""
  import jax  # pylint: disable=import-outside-toplevel
  from vit_jax.benchmark import steps  # pylint: disable=import-outside-toplevel
  state = steps.live_state(built)
  b = steps.random_batch(built)
  extras = built.train_step.extras  # the objective's frozen inputs: an argument once compiled
  state, m = compiled(state, b, extras)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(3):
    state, m = compiled(state, b, extras)
  jax.block_until_ready(m)
  return (time.perf_counter() - t0) / 3


def plot(points: list[dict[str, Any]], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  timed = any('step_s' in p for p in points)
  fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(11 if timed else 6, 4.2), squeeze=False)
  big = max((p.get('peak_bytes', 0) for p in points), default=0) >= 2**30
  unit, scale = ('GiB', 2**30) if big else ('MiB', 2**20)
  for variant in dict.fromkeys(p['variant'] for p in points):
    pts = sorted((p for p in points if p['variant'] == variant and 'peak_bytes' in p),
                 key=lambda p: p['tokens'])
    tokens = [p['tokens'] for p in pts]
    axes[0][0].plot(tokens, [p['peak_bytes'] / scale for p in pts], 'o-', label=variant)
    if timed:
      axes[0][1].plot(tokens, [p.get('step_s', float('nan')) for p in pts], 'o-', label=variant)
  # Guides through the lowest first point: what linear and quadratic growth in tokens would give.
  all_tokens = sorted({p['tokens'] for p in points})
  firsts = [p for p in points if 'peak_bytes' in p and p['tokens'] == all_tokens[0]]
  if firsts and len(all_tokens) > 1:
    t0, m0 = all_tokens[0], min(p['peak_bytes'] for p in firsts) / scale
    for power, style in ((1, ':'), (2, '--')):
      axes[0][0].plot(all_tokens, [m0 * (t / t0) ** power for t in all_tokens], style, color='grey',
                      linewidth=0.8, label=f'∝ tokens{"²" if power == 2 else ""}')
  axes[0][0].set(xscale='log', yscale='log', xlabel='tokens per image',
                 ylabel=f'peak memory of the train step ({unit})', title='memory')
  if timed:
    axes[0][1].set(xscale='log', yscale='log', xlabel='tokens per image',
                   ylabel='seconds per train step', title='step time')
  for ax in axes[0]:
    ax.set_xticks(all_tokens, [str(t) for t in all_tokens])
    ax.minorticks_off()
    ax.grid(True, which='major', alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
  variants = args.variants.split(',')
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    raise SystemExit(f'unknown variants {unknown}; choose from {list(VARIANTS)}')
  os.makedirs(args.out, exist_ok=True)
  from vit_jax import benchmark  # pylint: disable=import-outside-toplevel
  env = benchmark.worker_env(TF_CPP_MIN_LOG_LEVEL='3')
  if args.jobs > 1:
    # Several processes share the accelerator: each takes memory as it needs it instead of JAX's
    # default 75% at start. The figures are the compiled programs' own, so this changes none.
    env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  specs = [dict(model=args.model, size=int(size), batch=args.batch, dtype=args.dtype,
                variant=variant, remat_policy=args.remat_policy, time=args.time, set=args.set,
                lock=os.path.join(os.path.abspath(args.out), 'timing.lock'))
           for size in args.sizes.split(',') for variant in variants]
  print(f'{"variant":12s} {"size":>5s} {"tokens":>7s} {"peak GiB":>9s} {"step s":>8s} {"compile s":>9s}')
  # A fresh process per point: one compile's temporaries never inflate the next one's.
  with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
    results = list(pool.map(lambda spec: _run_point(spec, env), specs))
  points = []
  for spec, (p, error) in zip(specs, results):
    if p is None:
      print(f'{spec["variant"]:12s} {spec["size"]:5d} failed: {error}')
      continue
    points.append(p)
    step = f'{p["step_s"]:8.3f}' if 'step_s' in p else f'{"-":>8s}'
    print(f'{p["variant"]:12s} {p["size"]:5d} {p["tokens"]:7d} {p.get("peak_bytes", 0) / 2**30:9.3f} '
          f'{step} {p["compile_s"]:9.1f}')
  with open(os.path.join(args.out, 'tokens.json'), 'w') as f:
    json.dump(points, f, indent=2)
  if points:
    plot(points, os.path.join(args.out, 'tokens.png'),
         f'{args.model}, batch {args.batch}, {points[0]["dtype"]}: train step vs tokens')
  print(f'tokens: {len(points)} points -> {os.path.join(args.out, "tokens.png")}')
  return points


def _run_point(spec: dict[str, Any], env: dict[str, str]
               ) -> tuple[Optional[dict[str, Any]], Optional[str]]:
  res = subprocess.run([sys.executable, '-m', 'vit_jax.benchmark.tokens', '--point',
                        json.dumps(spec)],
                       capture_output=True, text=True, env=env, check=False)
  if res.returncode:
    return None, ' '.join(res.stderr.strip().splitlines()[-1:])
  point = json.loads(res.stdout.strip().splitlines()[-1])
  point.pop('lock', None)
  return point, None


if __name__ == '__main__':
  if len(sys.argv) == 3 and sys.argv[1] == '--point':
    print(json.dumps(measure_point(json.loads(sys.argv[2]))))
  else:
    raise SystemExit('run it as: python scripts/benchmark.py tokens ...')
