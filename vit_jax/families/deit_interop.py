"""The DeiT family's interop (`INTEROP`): timm's `VisionTransformerDistilled`, numpy only.

timm's state dict is the ViT's (`vit_interop.py` block maps) plus `dist_token` and `head_dist`.
Hugging Face's exact counterpart would be `DeiTForImageClassificationWithTeacher` (not
`ViTForImageClassification`, which has no distillation head); this project does not write or read
it. Google released no DeiT, so there is no `.npz` layout either.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from vit_jax.families import deit as deit_family
from vit_jax.families import vit_interop
from vit_jax.families.base import IMAGENET, Flat
from vit_jax.families.deit import DIST_KEY
from vit_jax.families.interop import (Interop, conv_to_torch, dense_from_torch, dense_to_torch,
                                      timm_pretrained_cfg)
from vit_jax.families.vit import POSEMB_KEY, fixed_posemb
from vit_jax.shapes import hw

# (hidden_size, num_layers, num_heads) -> timm's registered distilled DeiT of those sizes.
TIMM_NAMES = {(192, 12, 3): 'deit_tiny_distilled_patch16_224',
              (384, 12, 6): 'deit_small_distilled_patch16_224',
              (768, 12, 12): 'deit_base_distilled_patch16_224'}


class DeitInterop(Interop):
  """DeiT <-> timm's distilled DeiTs; no Hugging Face or npz counterpart."""
  timm_prefixes = ('deit_',)
  writes_npz = False  # Google released no DeiT; its .npz layout has no distillation token.

  def reads_timm(self, architecture, keys) -> bool:
    """timm's distilled DeiTs: a `deit_*` name (or none) and a `dist_token` in the state."""
    return DIST_KEY in keys and (not architecture or architecture.startswith(self.timm_prefixes))

  def to_timm(self, flat, arch):
    """(VisionTransformerDistilled state dict, config.json). Fixed position embeddings are written
    as their values (timm's distilled model always holds a learned table): they read back as
    learned."""
    family = self.family
    # The module's default GELU is the exact one; vit_interop's default is the ViT's (tanh).
    cfg = {'act': 'gelu', **arch.model_config}
    args = vit_interop.timm_vit_args(dataclasses.replace(arch, model_config=cfg))
    ph, pw = hw(cfg['patch_size'])
    args.update(patch_size=ph if ph == pw else [ph, pw], pos_embed='learn')
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    pe = flat.get(POSEMB_KEY)
    if pe is None:
      pe = fixed_posemb({**cfg, 'posemb': cfg.get('posemb') or 'none'},
                        family.grid(cfg, arch.image_size), family.num_tokens)
    out: Flat = {'patch_embed.proj.weight': conv_to_torch(flat['embedding/kernel']),
                 'patch_embed.proj.bias': flat['embedding/bias'], 'cls_token': flat['cls'],
                 DIST_KEY: flat[DIST_KEY], 'pos_embed': pe}
    vit_interop.blocks_to_timm(flat, cfg['num_layers'], out)
    for head in ('head', 'head_dist'):
      if f'{head}/kernel' in flat:
        dense_to_torch(flat, head, out, head)
    name = TIMM_NAMES.get((cfg['hidden_size'], cfg['num_layers'], cfg['num_heads']))
    name = name if name and (ph, pw) == (16, 16) else 'deit_base_distilled_patch16_224'
    config = dict(architecture=name, num_classes=args['num_classes'],
                  num_features=cfg['hidden_size'], global_pool='token', model_args=args,
                  pretrained_cfg=timm_pretrained_cfg(arch, args['num_classes'],
                                                     classifier=['head', 'head_dist']))
    return {k: np.ascontiguousarray(v) for k, v in out.items()}, config

  def from_timm(self, state, config):
    """A VisionTransformerDistilled state dict + config.json -> (flat, architecture, notes); the
    input normalisation is the pretrained_cfg's, else ImageNet's (every timm DeiT)."""
    args = config.get('model_args') or {}
    if args.get('no_embed_class'):
      raise ValueError('the timm model adds no position embedding to its prefix tokens '
                       '(no_embed_class=True); this project\'s DeiT has rows for both')
    sd = {k: np.asarray(v) for k, v in state.items()}
    extra: Flat = {}
    if DIST_KEY not in sd:
      raise ValueError(f'not a distilled DeiT: the timm state dict has no `{DIST_KEY}`')
    extra[DIST_KEY] = sd.pop(DIST_KEY)
    if 'head_dist.weight' in sd:
      dense_from_torch(sd, 'head_dist', extra, 'head_dist')
    flat, arch, notes = vit_interop.from_timm(sd, {**config, 'model_args': args}, self.family)
    if ('head/kernel' in flat) != ('head_dist/kernel' in extra):
      raise ValueError('the timm DeiT has one of `head` and `head_dist` but not the other')
    flat.update(extra)
    arch.model_config.pop('representation_size', None)
    arch.mean, arch.std = vit_interop.timm_norm(config, 'deit')
    if arch.mean == IMAGENET[0] and not (config.get('pretrained_cfg') or {}).get('mean'):
      notes.append('input normalisation: ImageNet mean/std (timm\'s DeiT default)')
    return flat, arch, notes

  def to_hf(self, flat, arch):
    raise ValueError(
        'Hugging Face\'s ViTForImageClassification has no distillation token or head, so a DeiT '
        'cannot be written as it; the exact counterpart, DeiTForImageClassificationWithTeacher, is '
        'not written by this project. Export with `--to timm` (VisionTransformerDistilled).')

  def from_hf(self, state, config):
    raise ValueError('this project reads no Hugging Face DeiT checkpoints; convert it to timm')

  def npz_keys_ok(self, flat) -> list[str]:
    return [k for k in flat if k == DIST_KEY or k.startswith('head_dist/')]


INTEROP = DeitInterop(deit_family.FAMILY)
