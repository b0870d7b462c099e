"""Throughput benchmarks. One subcommand per mode; the last line printed is `<mode>: <rate> <unit>`.

  python scripts/benchmark.py data                    2,000 JPEGs of 500x375 -> Inception crop at 224
  python scripts/benchmark.py data --workers 1        ... with one worker process (grain)
  python scripts/benchmark.py data --source fashion_mnist --size 28 --augment pad_crop_flip

Modes register themselves with `@mode(name)`: a function that adds its arguments to a parser and
returns the function that runs it.

  python scripts/benchmark.py step --model ViT-Mini_7 --variants explicit,xla,remat --torch
                                                      train-step img/s side by side, as ratios
  python scripts/benchmark.py step --variants auto,cpu2   ... 1 vs 2 JAX devices on the CPU

  python scripts/benchmark.py model --model ViT-Ti_16 --compare timm,hf
                          one registered model (any family): train and inference img/s, GFLOP/image,
                          MFU, compile time and peak memory, against timm / Hugging Face in PyTorch
                          (scripts/bench_model.py has the protocol)
  python scripts/benchmark.py loop --config configs/quickstart.py --steps 400
                          the training loop's img/s (metrics.jsonl) against its bare train step
  python scripts/benchmark.py tokens --model ViT-B_16 --sizes 224,448,896 [--time]
                          train-step memory (and time) against tokens: plain, remat, fused, both
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Callable

# Python < 3.13's resource tracker reports the shared-memory batches grain workers had prefetched
# when the run stops as "leaked" (it then frees them). Keep that noise after the last line away;
# the tracker process inherits this interpreter's warning options.
sys.warnoptions.append('ignore::UserWarning:multiprocessing.resource_tracker')

MODES: dict[str, Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], None]]] = {}


def mode(name: str):
  """Registers `fn(parser) -> run(args)` as the subcommand `name`."""
  def register(fn):
    MODES[name] = fn
    return fn
  return register


def make_jpeg_folder(root: str, count: int, width: int, height: int, classes: int = 10,
                     seed: int = 0) -> str:
  """`count` JPEGs (quality 90) of smooth colour fields plus noise in root/<class>/, like photos.

  Pure noise would decode slower than real photographs and flat colour faster; this is between.
  """
  import numpy as np
  from PIL import Image
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:2 * height, 0:2 * width].astype(np.float32)
  fields = []
  for _ in range(8):  # a few large colour fields; each image is a shifted window plus noise
    c = rng.uniform(0, 1, (3, 3))
    fields.append(np.stack([
        127 + 100 * np.sin(xx / (20 + 40 * c[i, 0]) + 6 * c[i, 1]) * np.cos(yy / (15 + 50 * c[i, 2]))
        for i in range(3)], axis=-1).astype(np.int16))
  for k in range(count):
    y, x = rng.integers(0, height), rng.integers(0, width)
    window = fields[k % len(fields)][y:y + height, x:x + width]
    noise = rng.integers(-12, 13, (height, width, 1), dtype=np.int16)
    img = np.clip(window + noise, 0, 255).astype(np.uint8)
    folder = os.path.join(root, f'class_{k % classes:02d}')
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(img).save(os.path.join(folder, f'{k:05d}.jpg'), quality=90)
  return root


def cpu_seconds() -> float:
  """CPU time of this process and its live multiprocessing children (grain workers), in seconds."""
  import multiprocessing
  total = time.process_time()
  tick = os.sysconf('SC_CLK_TCK')
  for child in multiprocessing.active_children():
    try:
      with open(f'/proc/{child.pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    except (OSError, IndexError, ValueError):
      pass
  return total


@mode('data')
def data_mode(parser: argparse.ArgumentParser):
  """Input pipeline: read, decode, augment and batch training images through train_iterator."""
  parser.add_argument('--workers', type=int, default=os.cpu_count() or 1,
                      help='decoding workers (default: one per core)')
  parser.add_argument('--worker-type', default='process', choices=('thread', 'process'),
                      help='grain worker processes (default) or threads in this process')
  parser.add_argument('--images', type=int, default=2000, help='JPEGs to generate')
  parser.add_argument('--width', type=int, default=500)
  parser.add_argument('--height', type=int, default=375)
  parser.add_argument('--size', type=int, default=224, help='output image size')
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--augment', default='inception_crop')
  parser.add_argument('--source', default=None,
                      help='a dataset name or folder instead of generated JPEGs (e.g. fashion_mnist)')
  parser.add_argument('--data-dir', default=None)
  parser.add_argument('--channels', type=int, default=None,
                      help='default: 1 for fashion_mnist / digits, else 3')
  parser.add_argument('--seconds', type=float, default=None,
                      help='measure for this long instead of one pass over the images')

  def run(args: argparse.Namespace):
    from vit_jax import data
    with tempfile.TemporaryDirectory(prefix='vit_jax-bench-') as tmp:
      name = args.source
      if name is None:
        t0 = time.perf_counter()
        name = make_jpeg_folder(os.path.join(tmp, 'images'), args.images, args.width, args.height)
        print(f'generated {args.images} JPEGs of {args.width}x{args.height} in '
              f'{time.perf_counter() - t0:.1f}s', flush=True)
      # Every generated image trains (held_out=0); a named dataset keeps its own default.
      held_out = 0.0 if args.source is None else None
      source = data.get_source(name, data_dir=args.data_dir, split='train', held_out=held_out)
      channels = args.channels or (1 if name in ('fashion_mnist', 'digits') else 3)
      it = data.train_iterator(source, image_size=args.size, channels=channels,
                               global_batch_size=args.batch_size, seed=0, augment=args.augment,
                               num_classes=source.num_classes, workers=args.workers, prefetch=2,
                               worker_type=args.worker_type)
      for _ in range(max(1, args.workers if args.worker_type == 'process' else 1)):
        next(it)  # warm-up: threads / worker processes started, first permutation made
      steps = max(1, len(source) // args.batch_size)
      t0, c0, done = time.perf_counter(), cpu_seconds(), 0
      while True:
        batch = next(it)
        done += len(batch['image'])
        elapsed = time.perf_counter() - t0
        if (args.seconds is None and done >= steps * args.batch_size) or (
            args.seconds is not None and elapsed >= args.seconds):
          break
      cpu = cpu_seconds() - c0
      it.close()
      rate = done / elapsed
      print(f'{source!r}: {done} images at {args.size}px, augment={args.augment}, '
            f'workers={args.workers} ({args.worker_type}), batch={args.batch_size}, {elapsed:.2f}s; '
            f'skipped {it.skipped_images}')
      # Images per CPU-second is the per-core rate, and stays meaningful on a machine shared with
      # other jobs, where the wall-clock rate depends on how much CPU the others leave.
      print(f'cpu: {cpu:.2f} CPU-s used, {done / cpu:.0f} img/s per busy core; '
            f'load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')
      print(f'data: {rate:.0f} img/s')

  return run


STEP_VARIANTS = {
    # name: (VisionTransformer overrides, description); `cpu_devices` is not a model field: the
    # host CPU is split into that many JAX devices and the batch is split over them.
    'auto': ({}, "the registry's fields (attention_impl='auto', one device)"),
    'explicit': ({'attention_impl': 'explicit'}, 'attention softmax in plain jnp'),
    'cpu2': ({'cpu_devices': 2}, 'host CPU as 2 JAX devices, data parallel (--config.cpu_devices=2)'),
    'xla': ({'attention_impl': 'xla'}, 'jax.nn.dot_product_attention, implementation xla'),
    'cudnn': ({'attention_impl': 'cudnn'}, 'jax.nn.dot_product_attention, implementation cudnn'),
    'remat': ({'remat': True}, 'blocks recomputed in the backward pass'),
    'scan': ({'scan': True}, 'nn.scan over blocks'),
    'bf16': ({'dtype': 'bfloat16'}, 'bfloat16 computation, float32 parameters'),
}


def _time_jax_step(model_name, overrides, size, channels, batch, steps, num_classes):
  """img/s of the real jitted train step (Adam recipe, donated state) on random data, as
  `build_training` builds it for training (vit_jax.benchmark.steps)."""
  import jax
  from vit_jax.benchmark import steps as steps_lib
  fields = dict(overrides)
  devices = fields.pop('cpu_devices', 1)
  if devices > 1 and jax.default_backend() != 'cpu':
    raise SystemExit('the cpu_devices variants split a CPU host; this backend is '
                     f'{jax.default_backend()}')
  dtype = fields.pop('dtype', 'float32')
  config = steps_lib.bench_config(model_name, image_size=size, channels=channels, batch=batch,
                                  optimizer='adam', dtype=dtype, fields=fields, warmup_steps=100)
  built = steps_lib.build(config, num_classes, devices)
  state, batch_ = steps_lib.live_state(built), steps_lib.random_batch(built)
  train_step = built.train_step
  for _ in range(3):  # compile and warm up
    state, metrics = train_step(state, batch_)
  jax.block_until_ready(metrics)
  t = time.perf_counter()
  for _ in range(steps):
    state, metrics = train_step(state, batch_)
  jax.block_until_ready(metrics)
  return steps * batch / (time.perf_counter() - t)


def _time_torch_step(model_name, size, channels, batch, steps, num_classes):
  """img/s of the same architecture as Hugging Face's PyTorch ViT, AdamW + clipping; None if no torch."""
  try:
    import torch
    import transformers
  except ImportError:
    return None
  from vit_jax.families import registry
  cfg = registry.get_model_config(model_name)
  torch.manual_seed(0)
  model = transformers.ViTForImageClassification(transformers.ViTConfig(
      hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim, image_size=size,
      patch_size=cfg.patch_size, num_channels=channels, num_labels=num_classes,
      hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0))
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
  x = torch.rand(batch, channels, size, size) * 2 - 1
  y = torch.randint(0, num_classes, (batch,))

  def one():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
  for _ in range(3):
    one()
  t = time.perf_counter()
  for _ in range(steps):
    one()
  return steps * batch / (time.perf_counter() - t)


@mode('step')
def step_mode(parser: argparse.ArgumentParser):
  """Train-step throughput of variants side by side (and PyTorch's ViT when torch is installed)."""
  parser.add_argument('--model', default='ViT-Mini_7')
  parser.add_argument('--size', type=int, default=28)
  parser.add_argument('--channels', type=int, default=1)
  parser.add_argument('--batch-size', type=int, default=256)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--num-classes', type=int, default=10)
  parser.add_argument('--variants', default='auto,explicit',
                      help=f'comma-separated, the first is the baseline: {", ".join(STEP_VARIANTS)}')
  parser.add_argument('--torch', action='store_true', help='also time PyTorch (transformers) ViT')

  def run(args):
    names = args.variants.split(',')
    unknown = [n for n in names if n not in STEP_VARIANTS]
    if unknown:
      raise SystemExit(f'unknown variants {unknown}; choose from {list(STEP_VARIANTS)}')
    cpu_devices = max(STEP_VARIANTS[n][0].get('cpu_devices', 1) for n in names)
    from vit_jax import runtime  # pylint: disable=import-outside-toplevel
    runtime.split_cpu(cpu_devices)  # before any JAX backend starts; other variants use device 0
    rates = {}
    for name in names:
      rates[name] = _time_jax_step(args.model, STEP_VARIANTS[name][0], args.size, args.channels,
                                   args.batch_size, args.steps, args.num_classes)
    if args.torch:
      r = _time_torch_step(args.model, args.size, args.channels, args.batch_size, args.steps,
                           args.num_classes)
      if r is None:
        print('torch: not installed (scripts/test.sh installs it into .venv)')
      else:
        rates['pytorch'] = r
    base = rates[names[0]]
    print(f'{args.model} at {args.size}x{args.size}x{args.channels}, batch {args.batch_size}, '
          f'{args.steps} timed steps')
    for name, r in rates.items():
      desc = STEP_VARIANTS[name][1] if name in STEP_VARIANTS else 'transformers ViT, AdamW'
      print(f'  {name:10s} {r:9.1f} img/s  x{r / base:5.2f}   {desc}')
    print(f'step: {base:.1f} img/s')
  return run


@mode('model')
def model_mode(parser: argparse.ArgumentParser):
  """One registered model's train step and inference, optionally against timm / HF PyTorch."""
  from vit_jax.benchmark import model as bench_model  # pylint: disable=import-outside-toplevel
  bench_model.add_arguments(parser)
  return bench_model.run


@mode('loop')
def loop_mode(parser: argparse.ArgumentParser):
  """The training loop's img/s (metrics.jsonl) against its bare jitted train step."""
  from vit_jax.benchmark import loop as bench_loop  # pylint: disable=import-outside-toplevel
  bench_loop.add_arguments(parser)
  return bench_loop.run


@mode('tokens')
def tokens_mode(parser: argparse.ArgumentParser):
  """Train-step peak memory (and time) against the token count, with/without remat and fusion."""
  from vit_jax.benchmark import tokens as bench_sweep  # pylint: disable=import-outside-toplevel
  bench_sweep.add_arguments(parser)
  return bench_sweep.run


def main(argv: list[str] | None = None) -> int:
  from vit_jax import cli  # pylint: disable=import-outside-toplevel
  # The examples above name the checkout's entry; the parser shows the module (or `vit-jax`) form.
  parser = cli.parser('vit_jax.benchmark',
                      __doc__.replace('python scripts/benchmark.py', 'python -m vit_jax.benchmark'))
  sub = parser.add_subparsers(dest='command', required=True, metavar='MODE')
  runners = {}
  for name, add in MODES.items():
    runners[name] = add(sub.add_parser(name, help=(add.__doc__ or '').strip() or None))
  args = parser.parse_args(argv)
  runners[args.command](args)
  return 0


if __name__ == '__main__':
  sys.exit(main())
