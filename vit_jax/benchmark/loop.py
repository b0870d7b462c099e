"""`python scripts/benchmark.py loop`: the training loop's img/s against its bare train step.

Trains `--config` with `python -m vit_jax.main` for `--steps` steps (no checkpoints until the last
step, evaluation only at the end, no warm-up, a log line every `--log_every` steps), and takes the
median `img_per_s` of `metrics.jsonl` after the first window (which holds the compile). The bare jitted
step of the same model, batch, image size and optimizer is timed with `benchmark.py model`'s
protocol (a fixed in-memory batch) in windows before and after that run; both rates and their ratio
are printed. The loop's extra work (reading and augmenting images, metrics, the finite check,
logging) should cost at most 10%.

  python scripts/benchmark.py loop --config configs/quickstart.py --steps 400
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--config', default='quickstart',
                      help='a recipe name or config file, as vit_jax.main takes it')
  parser.add_argument('--steps', type=int, default=400)
  parser.add_argument('--log_every', type=int, default=50)
  parser.add_argument('--repeats', type=int, default=3, help='timed windows of the bare step')
  parser.add_argument('--seconds', type=float, default=5.0)
  parser.add_argument('--override', action='append', default=[], metavar='--config.KEY=VALUE',
                      help='passed to vit_jax.main as is')


def _bare_spec(workdir: str) -> dict[str, Any]:
  """The `benchmark.py model` spec of the run's model, read from what the run wrote."""
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  step = max(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  with open(os.path.join(workdir, 'checkpoints', str(step), 'meta', 'metadata')) as f:
    arch = json.load(f)['architecture']
  overrides = [f'{k}={v!r}' for k, v in config['model'].items() if k != 'name' and v is not None]
  return dict(model=config['model']['name'], batch=config['batch_size'],
              image_size=arch['image_size'][0], channels=arch['channels'],
              num_classes=arch['num_classes'], optimizer=config['optimizer'],
              dtype=config['dtype'], set=overrides, cpu_devices=config.get('cpu_devices') or 0)


def _train(args: argparse.Namespace, workdir: str, env: dict[str, str]) -> list[float]:
  """Runs the loop; returns the img_per_s of its log windows after the first."""
  cmd = [sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}', f'--config={args.config}',
         f'--config.total_steps={args.steps}', '--config.checkpoint_every=0',
         f'--config.log_every={args.log_every}', '--config.eval_every=0',
         # No warm-up: it does not change the speed, and a run this short cannot hold a long one.
         '--config.warmup_steps=0', '--config.progress=False', *args.override]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if out.returncode:
    raise SystemExit(f'the training run failed:\n{out.stderr[-3000:]}')
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    windows = [json.loads(line).get('img_per_s') for line in f][1:]
  windows = [w for w in windows if w]
  if not windows:
    raise SystemExit(f'--steps {args.steps} gave one log window; use more steps')
  return windows


def run(args: argparse.Namespace) -> dict[str, float]:
  from vit_jax.benchmark import model as bench_model  # pylint: disable=import-outside-toplevel
  from vit_jax import benchmark  # pylint: disable=import-outside-toplevel
  env = benchmark.worker_env(TF_CPP_MIN_LOG_LEVEL='3')
  with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as workdir:
    # A short run first, only to learn the model the config builds; then the bare step is timed
    # before and after the measured run (the machine's speed drifts by several % over minutes).
    _train(argparse.Namespace(**{**vars(args), 'steps': 2 * args.log_every}), first, env)
    spec = _bare_spec(first)
    bare = bench_model._Worker(dict(spec, task='train', impl='ours'))  # pylint: disable=protected-access
    try:
      bare.ready()
      for _ in range(args.repeats):
        bare.window(args.seconds)
      windows = _train(args, workdir, env)
      for _ in range(args.repeats):
        bare.window(args.seconds)
    finally:
      bare.close()
  loop_rate, bare_rate = statistics.median(windows), statistics.median(bare.rates)
  print(f'loop: {args.config}, {args.steps} steps; img_per_s of metrics.jsonl after the first '
        f'window: {", ".join(f"{w:.0f}" for w in windows)}')
  print(f'bare step ({spec["model"]}, batch {spec["batch"]}, {spec["optimizer"]}, '
        f'{" ".join(spec["set"])}), before and after: {", ".join(f"{r:.0f}" for r in bare.rates)}')
  print(f'loop: {loop_rate:.1f} img/s ({loop_rate / bare_rate:.1%} of the bare step, '
        f'{bare_rate:.1f} img/s)')
  return {'loop': loop_rate, 'bare': bare_rate}
