"""Prints a model's layer table (or every parameter path), its forward GFLOPs and parameter count.

    python -m vit_jax.summary --model NAME --num_classes 1000 --image_size 224 [--params]

Any registered model of any family (`--model list` prints them). Nothing is allocated: shapes come
from `jax.eval_shape`, so ViT-H/14 answers in seconds. The forward FLOPs are the family's analytic
count; the last line is `params: <count>`.
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from vit_jax import cli
from vit_jax.families import registry
from vit_jax.models import params as params_lib
from vit_jax.shapes import hw


def param_shapes(model, image_size: Sequence[int], channels: int = 3) -> dict[str, Any]:
  """The model's `params` tree as ShapeDtypeStructs, for an input of [1, H, W, channels]."""
  x = jax.ShapeDtypeStruct((1, *image_size, channels), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)['params']


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
  family = registry.family_of(model_name)
  fields = {**registry.get_model_config(model_name), **overrides}
  size = hw(image_size)
  family.validate(fields, size)
  model = family.create(fields, num_classes)
  shapes = param_shapes(model, size, channels)
  lines = [f'model: {model_name}  family: {family.name}  image: {size[0]}x{size[1]}x{channels}  '
           f'classes: {num_classes}']
  lines += family.summary_rows(fields, size)
  if list_params:
    for path, leaf in ordered(shapes).items():
      lines.append(f'{path:<72} {str(tuple(leaf.shape)):>20} {leaf.dtype}')
  else:
    rows = _module_rows(shapes)
    width = max(len(r[0]) for r in rows)
    lines.append(f'{"module":<{width}}  {"params":>12}  shapes')
    for module, desc, n in rows:
      lines.append(f'{module:<{width}}  {n:>12,}  {desc}')
  macs = family.forward_macs(fields, num_classes, size, channels)
  lines.append(f'forward: {2 * macs / 1e9:.2f} GFLOPs per image ({macs / 1e9:.2f} GMACs)')
  lines.append(f'params: {params_lib.count(shapes)}')
  return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = cli.parser('vit_jax.summary', __doc__)
  cli.add_model(p, default='ViT-B_16', help_text="registered model name ('list' prints them)")
  p.add_argument('--num_classes', type=int, default=1000, help='classes of the head; 0 for none')
  cli.add_image_size(p, default='224')
  p.add_argument('--channels', type=int, default=3, help='input channels')
  p.add_argument('--params', action='store_true', help='list every parameter path with its shape')
  args = p.parse_args(argv)
  if args.model == 'list':
    for family in registry.families():
      print(f'{family.name}: {", ".join(registry.names(family.name))}')
    return 0
  return cli.run(lambda: print(summarize(args.model, args.num_classes or None, args.image_size,
                                         args.params, args.channels)) or 0)


if __name__ == '__main__':
  cli.main_entry(main)
