"""Prints a model's layer table (or every parameter path), its forward GFLOPs and parameter count.

    python -m vit_jax.summary --model ViT-B_16 --num_classes 1000 --image_size 224 [--params]

Nothing is allocated: shapes come from `jax.eval_shape`, so ViT-H/14 answers in seconds. The last line
is `params: <count>`.
"""
from __future__ import annotations

import math
import re
import sys
from typing import Any, Optional, Sequence

from absl import app, flags
import jax
import jax.numpy as jnp

from configs import models as model_registry
from vit_jax.models import create_model, num_prefix_tokens
from vit_jax.models import params as params_lib


def param_shapes(model, image_size: Sequence[int], channels: int = 3) -> dict[str, Any]:
  """The model's `params` tree as ShapeDtypeStructs, for an input of [1, H, W, channels]."""
  x = jax.ShapeDtypeStruct((1, *image_size, channels), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)['params']


def forward_macs(model, image_size: Sequence[int], channels: int = 3) -> int:
  """Multiply-accumulates of one forward pass for one image (matmuls and convolutions only).

  Counted analytically from the architecture; LayerNorm, softmax, GELU and additions (under 1% for
  ViT-B) are left out, as in the figures the papers and timm report.
  """
  ph, pw = model.patch_hw
  h, w = image_size
  n_patch = (h // ph) * (w // pw)
  n = n_patch + num_prefix_tokens(model.classifier)
  d, m, layers = model.hidden_size, model.mlp_dim, model.num_layers
  macs = n_patch * ph * pw * channels * d  # patch embedding
  per_block = 4 * n * d * d + 2 * n * n * d + 2 * n * d * m  # qkv+out, qk^T and av, MLP
  macs += layers * per_block
  if model.classifier == 'map':
    macs += 2 * d * d + 2 * n * d * d + 2 * n * d + 2 * d * m  # probe q/out, k/v over tokens, MLP
  width = d
  if model.representation_size:
    macs += d * model.representation_size
    width = model.representation_size
  if model.num_classes:
    macs += width * model.num_classes
  return int(macs)


# Rank of each path component in forward order; unknown names sort after, by their numeric suffix.
_RANK = {n: i for i, n in enumerate((
    'embedding', 'cls', 'Transformer', 'posembed_input', 'encoderblock', 'encoder_norm', 'MAPHead_0',
    'probe', 'pre_logits', 'head', 'query', 'key', 'value', 'out', 'Dense_0', 'Dense_1'))}


def _forward_order(path: str) -> list:
  """Sort key that lists parameters in the order the forward pass uses them (block 2 before 10)."""
  key = []
  for part in path.split('/'):
    m = re.match(r'^(.*?)_(\d+)$', part)
    base, num = (m.group(1), int(m.group(2))) if m else (part, -1)
    if part in _RANK:
      key.append((_RANK[part], -1, part))
    elif base in _RANK:
      key.append((_RANK[base], num, part))
    else:
      key.append((len(_RANK), num, part))
  return key


def ordered(shapes: dict[str, Any]) -> dict[str, Any]:
  """Flattened parameters in forward order."""
  flat = params_lib.flatten(shapes)
  return {k: flat[k] for k in sorted(flat, key=_forward_order)}


def _module_rows(shapes: dict[str, Any]) -> list[tuple[str, str, int]]:
  """(module path, parameter shapes, count) per module that owns parameters directly."""
  rows: dict[str, list] = {}
  for path, leaf in ordered(shapes).items():
    module, name = path.rsplit('/', 1) if '/' in path else ('', path)
    rows.setdefault(module or '(root)', []).append((name, leaf.shape))
  out = []
  for module, entries in rows.items():
    desc = ', '.join(f'{n}{list(s)}' for n, s in entries)
    out.append((module, desc, sum(math.prod(s) for _, s in entries)))
  return out


def summarize(model_name: str, num_classes: Optional[int], image_size: Sequence[int],
              list_params: bool = False, channels: int = 3, **overrides: Any) -> str:
  """The text `python -m vit_jax.summary` prints."""
  model = create_model(model_registry.get_model_config(model_name), num_classes, **overrides)
  shapes = param_shapes(model, image_size, channels)
  lines = [f'model: {model_name}  image: {image_size[0]}x{image_size[1]}x{channels}  '
           f'classes: {num_classes}  classifier: {model.classifier}  posemb: {model.posemb}']
  if list_params:
    for path, leaf in ordered(shapes).items():
      lines.append(f'{path:<72} {str(tuple(leaf.shape)):>20} {leaf.dtype}')
  else:
    rows = _module_rows(shapes)
    width = max(len(r[0]) for r in rows)
    lines.append(f'{"module":<{width}}  {"params":>12}  shapes')
    for module, desc, n in rows:
      lines.append(f'{module:<{width}}  {n:>12,}  {desc}')
  macs = forward_macs(model, image_size, channels)
  lines.append(f'forward: {2 * macs / 1e9:.2f} GFLOPs per image ({macs / 1e9:.2f} GMACs)')
  lines.append(f'params: {params_lib.count(shapes)}')
  return '\n'.join(lines)


FLAGS = flags.FLAGS
flags.DEFINE_string('model', 'ViT-B_16', 'registered model name (configs/models.py)')
flags.DEFINE_integer('num_classes', 1000, 'classes of the head; 0 for no head')
flags.DEFINE_list('image_size', ['224'], 'H or H,W in pixels')
flags.DEFINE_integer('channels', 3, 'input channels')
flags.DEFINE_bool('params', False, 'list every parameter path with its shape')


def main(argv: Sequence[str]) -> None:
  del argv
  size = [int(s) for s in FLAGS.image_size]
  size = size * 2 if len(size) == 1 else size
  try:
    print(summarize(FLAGS.model, FLAGS.num_classes or None, size, FLAGS.params, FLAGS.channels))
  except (KeyError, ValueError) as e:
    sys.exit(f'error: {e.args[0] if e.args else e}')


if __name__ == '__main__':
  app.run(main)
