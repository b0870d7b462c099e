"""The DeiT family (Touvron et al., 2021): a ViT with a distillation token and a second head.

File layout: the ViT's (`vit.py`) plus `dist_token` [1, 1, D] and `head_dist/{kernel, bias}`; the
position table has two prefix rows (class, distillation), then the patches. timm's
`VisionTransformerDistilled` state dict is the ViT's (`vit_interop.py` block maps) plus `dist_token`
and `head_dist`. Hugging Face's exact counterpart would be `DeiTForImageClassificationWithTeacher`
(not `ViTForImageClassification`, which has no distillation head); this project does not write or
read it (see `DeitFamily.to_hf`). Distillation training itself is in `vit_jax.train.step`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from vit_jax.families import vit_interop
from vit_jax.families.base import IMAGENET, Flat, hw
from vit_jax.families.vit import (BLOCK, POSEMB_KEY, SIZES, TENSOR_RULES, VitFamily, fixed_posemb)
from vit_jax.models import deit as deit_models
from vit_jax.models import tokens as tokens_lib


def deit_fields(size: str, patch: int) -> dict[str, Any]:
  d, layers, heads, mlp = SIZES[size]
  return dict(patch_size=patch, hidden_size=d, num_layers=layers, num_heads=heads, mlp_dim=mlp,
              classifier='token', posemb='learned', act='gelu')


# Parameter counts at 224 px, 1000 classes: timm's `deit_*_distilled_patch16_224`.
MODELS: dict[str, dict[str, Any]] = {
    'DeiT-Ti_16-distilled': deit_fields('Ti', 16),    # 5,910,800
    'DeiT-S_16-distilled': deit_fields('S', 16),      # 22,436,432
    'DeiT-B_16-distilled': deit_fields('B', 16),      # 87,338,192
    # The quickstart ViT-Mini_7's size (width 128, 6 layers, 4 heads, MLP 256) for Fashion-MNIST.
    'DeiT-Mini_7-distilled': deit_fields('Mini', 7),
    'DeiT-testing': dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                         classifier='token', posemb='learned', act='gelu'),
}
_TIMM_NAMES = {(192, 12, 3): 'deit_tiny_distilled_patch16_224',
               (384, 12, 6): 'deit_small_distilled_patch16_224',
               (768, 12, 12): 'deit_base_distilled_patch16_224'}
DIST_KEY = 'dist_token'


class DeitFamily(VitFamily):
  """DeiT: the ViT descriptor with two prefix tokens and two heads."""
  name = 'deit'
  models = MODELS
  head_prefixes = ('head/', 'head_dist/')
  optional_prefixes = ('cls', DIST_KEY, POSEMB_KEY)
  pre_logits_prefix = None
  tensor_rules = TENSOR_RULES  # `head(_dist)?` is already in the ViT's rules
  timm_prefixes = ('deit_',)
  hf_model_types = ()
  writes_npz = False  # Google released no DeiT; its .npz layout has no distillation token.
  num_tokens = 2
  test_model = 'DeiT-testing'
  capabilities = VitFamily.capabilities + (tokens_lib.TWO_HEADS,)
  test_image_size = 16

  def module_class(self) -> type:
    return deit_models.DistilledVisionTransformer

  def validate(self, fields, image_size) -> None:
    super().validate(fields, image_size)
    if fields.get('classifier', 'token') != 'token':
      raise ValueError(f'model.classifier {fields["classifier"]!r}: a DeiT classifies its class '
                       "and distillation tokens, so it must be 'token'")

  def num_heads_out(self, fields: Mapping[str, Any]) -> int:
    del fields
    return 2

  def summary_rows(self, fields, image_size) -> list[str]:
    return super().summary_rows(fields, image_size) + [
        'heads: head (class token) and head_dist (distillation token); inference averages them']

  # ---- reading parameter trees ----
  def matches(self, flat) -> bool:
    return ('embedding/kernel' in flat and DIST_KEY in flat and any(BLOCK.match(k) for k in flat)
            and 'conv_root/kernel' not in flat)

  def found_fields(self, flat) -> dict[str, Any]:
    found = super().found_fields(flat)
    if found['classifier'] != 'token':  # (`dist_token` is checked by `matches`)
      raise ValueError('not a DeiT parameter set: it has no class token `cls`')
    if found.pop('representation_size') is not None:
      raise ValueError('a DeiT has no pre-logits layer, but the parameters hold `pre_logits`')
    return found

  # ---- interop ----
  def reads_timm(self, architecture, keys) -> bool:
    """timm's distilled DeiTs: a `deit_*` name (or none) and a `dist_token` in the state."""
    return DIST_KEY in keys and (not architecture or architecture.startswith(self.timm_prefixes))

  def to_timm(self, flat, arch):
    """(VisionTransformerDistilled state dict, config.json). Fixed position embeddings are written
    as their values (timm's distilled model always holds a learned table): they read back as
    learned."""
    # The module's default GELU is the exact one; vit_interop's default is the ViT's (tanh).
    cfg = {'act': 'gelu', **arch.model_config}
    args = vit_interop.timm_vit_args(dataclasses.replace(arch, model_config=cfg))
    ph, pw = hw(cfg['patch_size'])
    args.update(patch_size=ph if ph == pw else [ph, pw], pos_embed='learn')
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    pe = flat.get(POSEMB_KEY)
    if pe is None:
      pe = fixed_posemb({**cfg, 'posemb': cfg.get('posemb') or 'none'},
                        self.grid(cfg, arch.image_size), self.num_tokens)
    out: Flat = {'patch_embed.proj.weight': vit_interop.conv_to_torch(flat['embedding/kernel']),
                 'patch_embed.proj.bias': flat['embedding/bias'], 'cls_token': flat['cls'],
                 DIST_KEY: flat[DIST_KEY], 'pos_embed': pe}
    vit_interop.blocks_to_timm(flat, cfg['num_layers'], out)
    for head in ('head', 'head_dist'):
      if f'{head}/kernel' in flat:
        vit_interop.dense_to_torch(flat, head, out, head)
    name = _TIMM_NAMES.get((cfg['hidden_size'], cfg['num_layers'], cfg['num_heads']))
    name = name if name and (ph, pw) == (16, 16) else 'deit_base_distilled_patch16_224'
    config = dict(architecture=name, num_classes=args['num_classes'],
                  num_features=cfg['hidden_size'], global_pool='token', model_args=args,
                  pretrained_cfg=vit_interop.timm_pretrained_cfg(
                      arch, args['num_classes'], classifier=['head', 'head_dist']))
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
      vit_interop.dense_from_torch(sd, 'head_dist', extra, 'head_dist')
    flat, arch, notes = vit_interop.from_timm(sd, {**config, 'model_args': args}, self)
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


FAMILY = DeitFamily()
