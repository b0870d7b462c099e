"""The step every benchmark times: a training config (the base recipe, `vit_jax.configs.common`,
with the benchmark's model, batch, image size and optimizer) built by
`vit_jax.train.build.build_training`, the same assembly of mesh, model, optimizer, state shardings
and jitted steps that training and `vit_jax.plan` use. A benchmark never builds a step by hand.
"""
from __future__ import annotations

import ast
from typing import Any, Mapping, Optional, Sequence

import ml_collections


def parse_sets(sets: Sequence[str]) -> dict[str, Any]:
  """`--set FIELD=VALUE` arguments -> {field: value}; values are Python literals where they parse
  (`num_layers=6`, `remat=True`, `depths=(2,2,6,2)`), else strings (`attention_impl=xla`)."""
  out = {}
  for item in sets:
    if '=' not in item:
      raise ValueError(f'--set {item!r}: use FIELD=VALUE, e.g. --set num_layers=6')
    key, value = item.split('=', 1)
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def bench_config(model: str, *, image_size: int, channels: int, batch: int,
                 optimizer: str = 'sgd', dtype: str = 'float32',
                 fields: Optional[Mapping[str, Any]] = None, base_lr: float = 1e-3,
                 total_steps: int = 10_000, warmup_steps: int = 0) -> ml_collections.ConfigDict:
  """The training config of a benchmark: the base recipe's keys, with

  model: a registered name, `fields` its overrides (`config.model.FIELD`); image_size in pixels
  (square), channels 1 or 3; batch: the global batch; optimizer 'sgd' (momentum 0.9, no weight
  decay) or 'adam' (decoupled weight decay 0.1), both clipped at global norm 1 with a cosine
  schedule from `base_lr` over `total_steps` after `warmup_steps`; dtype: the computation dtype
  ('float32', 'bfloat16' or 'auto' as training). Data parallel over the devices given to `build`.
  """
  from vit_jax.configs import common  # pylint: disable=import-outside-toplevel
  c = common.get_config()
  c.model = common.model_config(model)
  for key, value in (fields or {}).items():
    if key not in c.model:
      raise ValueError(f'--set {key}: not a model field of any family; fields: '
                       f'{sorted(k for k in c.model if k != "name")}')
    c.model[key] = value
  c.image_size, c.channels = image_size, channels
  c.batch_size, c.eval_batch_size, c.accum_steps = batch, batch, 1
  c.optimizer = optimizer
  c.momentum = 0.9
  c.weight_decay = 0.1 if optimizer == 'adam' else 0.0
  c.grad_clip_norm = 1.0
  c.base_lr, c.total_steps, c.warmup_steps = base_lr, total_steps, warmup_steps
  c.lr_decay = 'cosine'
  c.dtype = dtype
  c.mesh = (('data', -1), ('fsdp', 1), ('tensor', 1))
  return c


def build(config: ml_collections.ConfigDict, num_classes: int, devices: int = 1):
  """`build_training(config, num_classes)` on the first `devices` devices (data parallel): on a
  CPU host split by `runtime.split_cpu`, as `--config.cpu_devices` trains; an accelerator is
  benchmarked on one device."""
  import jax  # pylint: disable=import-outside-toplevel
  from vit_jax.train import build as build_lib  # pylint: disable=import-outside-toplevel
  if jax.default_backend() != 'cpu':
    devices = 1
  if config.batch_size % devices:
    raise ValueError(f'batch {config.batch_size} does not split over {devices} devices')
  return build_lib.build_training(config, num_classes, devices=jax.devices()[:devices])


def live_state(built) -> Any:
  """The initial TrainState of `built`, created in its shardings as training creates it."""
  from vit_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  config = built.config
  state, shardings = state_lib.create_train_state(
      built.model, built.tx, built.input_shape, config.seed, built.mesh, use_ema=built.use_ema,
      fsdp_min_size=config.fsdp_min_size, tensor_rules=built.family.tensor_rules)
  assert shardings == built.shardings  # the layout the jitted steps were built for
  return state


def random_batch(built, seed: int = 0) -> dict[str, Any]:
  """One training batch as the loader yields it, on the mesh: {'image': f32 [B, H, W, C] uniform in
  [-1, 1], 'labels': one-hot f32 [B, K]}."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from vit_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  b, k = built.config.batch_size, built.num_classes
  images = rng.uniform(-1, 1, (b, *built.input_shape[1:])).astype(np.float32)
  labels = np.eye(k, dtype=np.float32)[rng.integers(0, k, b)]
  return jax.device_put({'image': images, 'labels': labels},
                        sharding_lib.batch_sharding(built.mesh))
