"""Optimizer recipes and learning-rate schedules of the ViT paper.

Pre-training (`adam`): Adam b1 0.9, b2 0.999, decoupled weight decay 0.1 (AdamW: the decay is scaled by
the learning rate, so 0.1 at lr 1e-3 shrinks kernels by 1e-4 per step), linear warm-up then linear or
cosine decay, global-norm clipping at 1.0. Fine-tuning (`sgd`): SGD with momentum 0.9, no weight decay,
cosine decay with warm-up, clipping at 1.0. Gradient clipping comes first, as in Google's vit_jax.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]
DECAYS = ('cosine', 'linear', 'rsqrt', 'constant')


def make_schedule(base_lr: float, total_steps: int, warmup_steps: int = 0, decay: str = 'cosine',
                  end_lr: float = 0.0, rsqrt_timescale: int = 10_000) -> Schedule:
  """lr(step) for step in [0, total_steps): linear warm-up from 0 over `warmup_steps`, then `decay`.

  Warm-up reaches `base_lr` at step `warmup_steps`; `cosine` and `linear` reach `end_lr` at
  `total_steps`; `rsqrt` decays as sqrt(timescale / (step - warmup + timescale)); `constant` holds.
  """
  if decay not in DECAYS:
    raise ValueError(f'lr decay {decay!r} is not one of {DECAYS}')
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(f'warmup_steps={warmup_steps} must be within [0, total_steps={total_steps}]')

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    frac = jnp.clip((step - warmup_steps) / max(1, total_steps - warmup_steps), 0.0, 1.0)
    if decay == 'cosine':
      lr = end_lr + (base_lr - end_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    elif decay == 'linear':
      lr = base_lr + (end_lr - base_lr) * frac
    elif decay == 'rsqrt':
      t = jnp.maximum(step - warmup_steps, 0.0)
      lr = base_lr * jnp.sqrt(rsqrt_timescale / (t + rsqrt_timescale))
    else:
      lr = jnp.full((), base_lr, jnp.float32)
    return jnp.asarray(lr * warm, jnp.float32)

  return schedule


def path_mask(params: Any, pattern: str) -> Any:
  """A tree of bools: True where the '/'-joined parameter path fully matches `pattern`."""
  regex = re.compile(pattern)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: bool(regex.fullmatch('/'.join(str(getattr(k, 'key', k)) for k in path))),
      params)


def make_optimizer(config: Mapping[str, Any], schedule: Schedule) -> optax.GradientTransformation:
  """The optimizer named by `config.optimizer` ('adam' or 'sgd').

  Reads: optimizer, grad_clip_norm (0 disables), b1, b2, weight_decay, wd_pattern (which parameter
  paths decay; default kernels only, as big_vision), mu_dtype ('bfloat16' for a bf16 first moment),
  momentum, nesterov.
  """
  name = config['optimizer']
  chain = []
  if config.get('grad_clip_norm'):
    chain.append(optax.clip_by_global_norm(config['grad_clip_norm']))
  if name == 'adam':
    mu_dtype = jnp.dtype(config['mu_dtype']) if config.get('mu_dtype') else None
    chain.append(optax.scale_by_adam(b1=config.get('b1', 0.9), b2=config.get('b2', 0.999),
                                     eps=config.get('eps', 1e-8), mu_dtype=mu_dtype))
    wd = config.get('weight_decay', 0.0)
    if wd:
      pattern = config.get('wd_pattern') or r'.*kernel'
      chain.append(optax.add_decayed_weights(wd, mask=lambda p: path_mask(p, pattern)))
  elif name == 'sgd':
    momentum = config.get('momentum', 0.9)
    if momentum:
      mu_dtype = jnp.dtype(config['mu_dtype']) if config.get('mu_dtype') else None
      chain.append(optax.trace(decay=momentum, nesterov=config.get('nesterov', False),
                               accumulator_dtype=mu_dtype))
    if config.get('weight_decay'):
      raise ValueError('the sgd recipe has no weight decay (the paper fine-tunes without it); '
                       'set --config.weight_decay=0')
  else:
    raise ValueError(f"optimizer {name!r} is not one of ('adam', 'sgd')")
  chain.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*chain)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  """Exponential moving average of parameters: ema <- decay * ema + (1 - decay) * params."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype),
                      ema, params)

