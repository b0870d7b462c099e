"""The architecture a flat parameter dict describes: module fields, class count, input size.

Google's `.npz` files carry almost everything in their shapes: the patch size, channels and width in
`embedding/kernel` [ph, pw, C, D], the heads in `query/kernel` [D, heads, D/heads], the depth in the
number of `encoderblock_{i}`, the MLP width, the classifier (`cls` -> token, `MAPHead_0` -> map, else
gap), `pre_logits` and the class count in `head`. Only the image aspect ratio (a square grid is
assumed from the position-embedding length) and a fixed position embedding's kind are not there.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vit_jax.checkpoints.posemb import square_grid

POSEMB_KEY = 'Transformer/posembed_input/pos_embedding'
# Size fields: a model config (`--model NAME`) that disagrees with the parameters is an error. The
# classifier and representation_size always come from the parameters (a registry name fixes the size
# of a model, not its head: Google's i21k files have `pre_logits`, their fine-tuned ones do not).
_SIZE_FIELDS = ('patch_size', 'hidden_size', 'num_layers', 'num_heads', 'mlp_dim')
_BLOCK = re.compile(r'^Transformer/encoderblock_(\d+)/')


def _hw(v: Any) -> tuple[int, int]:
  return (int(v), int(v)) if np.ndim(v) == 0 else (int(v[0]), int(v[1]))


@dataclasses.dataclass
class Architecture:
  """A model description: `model_config` holds VisionTransformer fields (and optionally 'name').

  image_size is (height, width) in pixels; channels the input channels of the patch embedding.
  """
  model_config: dict[str, Any]
  num_classes: Optional[int]
  image_size: tuple[int, int]
  channels: int = 3

  @property
  def patch_hw(self) -> tuple[int, int]:
    return _hw(self.model_config['patch_size'])

  @property
  def grid(self) -> tuple[int, int]:
    """(gh, gw) patches."""
    (h, w), (ph, pw) = self.image_size, self.patch_hw
    return h // ph, w // pw

  @property
  def num_prefix(self) -> int:
    return 1 if self.model_config.get('classifier', 'token') == 'token' else 0

  def fixed_posemb(self) -> Optional[np.ndarray]:
    """[1, prefix + gh*gw, D] float32 values of a `sincos2d` or `none` position embedding, None for
    `learned`: how a target with only learned embeddings expresses this model at this image size."""
    kind = self.model_config.get('posemb', 'learned')
    if kind == 'learned':
      return None
    d = self.model_config['hidden_size']
    if kind == 'sincos2d':
      from vit_jax.models.vit import sincos_2d  # pylint: disable=import-outside-toplevel
      grid = sincos_2d(*self.grid, d)
    else:
      grid = np.zeros((1, self.grid[0] * self.grid[1], d), np.float32)
    return np.concatenate([np.zeros((1, self.num_prefix, d), np.float32), grid], axis=1)

  def create_model(self, **overrides: Any):
    """The `VisionTransformer` (imports the model package lazily)."""
    from vit_jax.models import create_model  # pylint: disable=import-outside-toplevel
    return create_model(self.model_config, self.num_classes, **overrides)

  def to_meta(self) -> dict[str, Any]:
    """A JSON-able dict (`from_meta` inverts it)."""
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.model_config.items()}
    return {'model_config': cfg, 'num_classes': self.num_classes,
            'image_size': list(self.image_size), 'channels': self.channels}

  @classmethod
  def from_meta(cls, meta: Mapping[str, Any]) -> 'Architecture':
    cfg = dict(meta['model_config'])
    if isinstance(cfg.get('patch_size'), list):
      cfg['patch_size'] = tuple(cfg['patch_size'])
    return cls(cfg, meta.get('num_classes'), _hw(meta['image_size']), int(meta.get('channels', 3)))


def infer_architecture(flat: Mapping[str, np.ndarray], *,
                       model_config: Optional[Mapping[str, Any]] = None,
                       image_size: Optional[Sequence[int] | int] = None,
                       posemb: Optional[str] = None) -> Architecture:
  """Reads the architecture off a flat parameter dict in this project's unscanned layout.

  Args:
    flat: '/'-joined unscanned paths -> arrays (or anything with `.shape`).
    model_config: a registry config (`--model NAME`) or other VisionTransformer fields; fields the
      parameters determine must agree with it (a ValueError names the field and both values), and
      fields they don't (dropout, dtype, posemb kind) are taken from it; the classifier and
      representation_size always follow the parameters.
    image_size: (h, w) or an int; required for non-square grids or without learned posembs.
    posemb: the position-embedding kind when the parameters hold none ('sincos2d' or 'none').
  """
  if 'embedding/kernel' not in flat:
    raise ValueError('not a ViT parameter set: no `embedding/kernel`')
  ph, pw, channels, hidden = flat['embedding/kernel'].shape
  depth = 1 + max((int(m.group(1)) for k in flat if (m := _BLOCK.match(k))), default=-1)
  if depth == 0:
    raise ValueError('no `Transformer/encoderblock_{i}` parameters')
  att = 'Transformer/encoderblock_0/MultiHeadDotProductAttention_1'
  heads = flat[f'{att}/query/kernel'].shape[1]
  mlp_dim = flat['Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'].shape[1]
  if any(k.startswith('MAPHead_0/') for k in flat):
    classifier = 'map'
  elif 'cls' in flat:
    classifier = 'token'
  else:
    classifier = 'gap'
  rep = int(flat['pre_logits/kernel'].shape[1]) if 'pre_logits/kernel' in flat else None
  num_classes = int(flat['head/kernel'].shape[1]) if 'head/kernel' in flat else None
  found = dict(patch_size=ph if ph == pw else (ph, pw), hidden_size=int(hidden), num_layers=depth,
               num_heads=int(heads), mlp_dim=int(mlp_dim), classifier=classifier,
               representation_size=rep)

  cfg = dict(model_config or {})
  wrong = []
  for field in _SIZE_FIELDS:
    if cfg.get(field) is not None:
      want, have = cfg[field], found[field]
      if field == 'patch_size':
        want, have = _hw(want), _hw(have)
      if want != have:
        wrong.append(f'{field}={found[field]!r} (the config has {cfg[field]!r})')
  if wrong:
    raise ValueError(f'the checkpoint does not match the model config {cfg.get("name", "")!r}: it '
                     f'has {", ".join(wrong)}')
  cfg.update(found)

  has_posemb = POSEMB_KEY in flat
  if has_posemb:
    if cfg.get('posemb', 'learned') != 'learned':
      raise ValueError(f'the checkpoint has learned position embeddings but the model config has '
                       f'posemb={cfg["posemb"]!r}')
    cfg['posemb'] = 'learned'
  else:
    kind = posemb or cfg.get('posemb')
    if kind in (None, 'learned'):
      if kind == 'learned':
        raise ValueError(f'the model config has posemb=learned but the checkpoint has no {POSEMB_KEY}')
      kind = 'sincos2d'  # big_vision's fixed default; the file cannot tell it from 'none'.
    cfg['posemb'] = kind

  prefix = 1 if classifier == 'token' else 0
  if image_size is not None:
    size = _hw(image_size)
    if size[0] % ph or size[1] % pw:
      raise ValueError(f'image size {size} is not a multiple of the patch size {(ph, pw)}')
    if has_posemb:
      n = flat[POSEMB_KEY].shape[1] - prefix
      if (size[0] // ph) * (size[1] // pw) != n:
        raise ValueError(f'image size {size} gives a {size[0] // ph}x{size[1] // pw} grid, but the '
                         f'position embeddings hold {n} patches')
  elif has_posemb:
    gh, gw = square_grid(flat[POSEMB_KEY].shape[1] - prefix)
    size = (gh * ph, gw * pw)
  else:
    raise ValueError('the checkpoint has no learned position embeddings, so its image size is '
                     'unknown: give it (image_size)')
  return Architecture(cfg, num_classes, size, int(channels))
