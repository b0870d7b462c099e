"""The hybrid family's interop (`INTEROP`): timm's ResNet-v2 + ViT hybrids, numpy only.

Our flat parameters *are* Google's hybrid `.npz` layout (the family's file layout; see `hybrid.py`),
which timm's own `.npz` loader reads too. timm 1.0.31 (`vision_transformer_hybrid.py`) names the
ResNet `patch_embed.backbone.`:
  stem.conv, stem.norm, stages.{i}.blocks.{j}.{conv1, norm1, ..., downsample.conv, downsample.norm}
  (0-based), or, root only (`vit_tiny_r_s16_p8_*`), conv and norm directly under the backbone; then
  `patch_embed.proj` and the ViT's names (the ViT interop's maps, `vit_interop.py`).
timm's hybrids use the exact GELU ('gelu'); Google's files were trained with 'gelu_tanh'.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vit_jax.families import hybrid as hybrid_family
from vit_jax.families import vit_interop
from vit_jax.families.base import Architecture, Flat
from vit_jax.families.hybrid import UNIT, check_resnet_fields, resnet_fields_of, split_resnet
from vit_jax.families.interop import conv_from_torch, conv_to_torch, timm_pretrained_cfg, to_numpy
from vit_jax.families.vit import POSEMB_KEY, vit_fields
from vit_jax.models import resnet
from vit_jax.shapes import hw

# timm 1.0.31's registered hybrids of this kind: size, ResNet depth, stride, patch on the map.
_TIMM_NAME = re.compile(r'^vit_(tiny|small|base|large)_r(\d*)_s(\d+)(?:_p(\d+))?_(\d+)$')
_TIMM_SIZES = {'tiny': 'Ti', 'small': 'S', 'base': 'B', 'large': 'L'}
_TIMM_RESNETS = {('', 16): (), ('26', 32): (2, 2, 2, 2), ('50', 16): (3, 4, 9),
                 ('50', 32): (3, 4, 6, 3)}
# Our ResNet (width 64) -> the timm entry that builds it (every size field is then a model_arg).
_TIMM_ENTRIES = {(): 'vit_tiny_r_s16_p8_224', (2, 2, 2, 2): 'vit_small_r26_s32_224',
                 (3, 4, 9): 'vit_base_r50_s16_224', (3, 4, 6, 3): 'vit_large_r50_s32_224'}
TIMM_BACKBONE = 'patch_embed.backbone.'
_TIMM_UNIT = re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.')
# Within a unit: ours <-> timm's.
_UNIT_NAMES = (('conv1', 'conv1'), ('gn1', 'norm1'), ('conv2', 'conv2'), ('gn2', 'norm2'),
               ('conv3', 'conv3'), ('gn3', 'norm3'), ('conv_proj', 'downsample.conv'),
               ('gn_proj', 'downsample.norm'))


def fields_from_timm_name(arch: str) -> dict[str, Any]:
  """Our fields for a timm hybrid name such as 'vit_base_r50_s16_224' (timm's exact GELU)."""
  m = _TIMM_NAME.match(arch.split('.')[0])
  if not m or (m.group(2), int(m.group(3))) not in _TIMM_RESNETS:
    raise ValueError(f'{arch!r} is not one of timm\'s ResNet-v2 hybrid ViTs (vit_tiny_r_s16_p8_*, '
                     'vit_small_r26_s32_*, vit_base_r26_s32_*, vit_base_r50_s16_*, '
                     'vit_large_r50_s32_*)')
  size, depth, stride, patch, _ = m.groups()
  return vit_fields(_TIMM_SIZES[size], int(patch or 1), act='gelu',
                    resnet_layers=_TIMM_RESNETS[(depth, int(stride))], resnet_width=64)


# ---------- the ResNet: ours <-> timm ----------

def resnet_to_timm(flat: Mapping[str, Any]) -> Flat:
  """The ResNet entries of a hybrid flat dict -> timm's `patch_embed.backbone.*` names."""
  layers = resnet_fields_of(flat)['resnet_layers']
  root = TIMM_BACKBONE + ('stem.' if layers else '')
  conv = lambda w: conv_to_torch(np.asarray(w, np.float32))
  out: Flat = {f'{root}conv.weight': conv(flat['conv_root/kernel']),
               f'{root}norm.weight': np.asarray(flat['gn_root/scale'], np.float32),
               f'{root}norm.bias': np.asarray(flat['gn_root/bias'], np.float32)}
  for key, value in flat.items():
    if not (m := UNIT.match(key)):
      continue
    module, leaf = key[m.end():].split('/')
    theirs = dict(_UNIT_NAMES)[module]
    stem = f'{TIMM_BACKBONE}stages.{int(m.group(1)) - 1}.blocks.{int(m.group(2)) - 1}.{theirs}'
    if leaf == 'kernel':
      out[f'{stem}.weight'] = conv(value)
    else:
      out[f'{stem}.{"weight" if leaf == "scale" else "bias"}'] = np.asarray(value, np.float32)
  return out


def resnet_from_timm(state: Mapping[str, Any]) -> Flat:
  """timm's `patch_embed.backbone.*` entries -> our ResNet names; other keys are ignored, a backbone
  key we cannot place is a ValueError."""
  sd = {k[len(TIMM_BACKBONE):]: v for k, v in state.items() if k.startswith(TIMM_BACKBONE)}
  root = 'stem.' if 'stem.conv.weight' in sd else ''
  if f'{root}conv.weight' not in sd:
    raise ValueError('not a timm ResNet-v2 hybrid: no patch_embed.backbone.[stem.]conv.weight '
                     '(timm\'s ResNet-D hybrids such as vit_small_resnet26d_224 are not supported)')
  out: Flat = {'conv_root/kernel': conv_from_torch(sd.pop(f'{root}conv.weight')),
               'gn_root/scale': np.asarray(sd.pop(f'{root}norm.weight')),
               'gn_root/bias': np.asarray(sd.pop(f'{root}norm.bias'))}
  back = {theirs: ours for ours, theirs in _UNIT_NAMES}
  for key in sorted(sd):
    if not (m := _TIMM_UNIT.match(key)):
      continue
    module, leaf = key[m.end():].rsplit('.', 1)
    if module not in back:
      continue
    stem = f'block{int(m.group(1)) + 1}/unit{int(m.group(2)) + 1}/{back[module]}'
    value = sd.pop(key)
    if back[module].startswith('conv'):
      out[f'{stem}/kernel'] = conv_from_torch(value)
    else:
      out[f'{stem}/{"scale" if leaf == "weight" else "bias"}'] = np.asarray(value)
  if sd:
    raise ValueError(f'timm backbone parameters the hybrid ResNet cannot express: {sorted(sd)}')
  return out


# ---------- whole model ----------

def _vit_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
  """The transformer half's fields, the module's defaults filled in."""
  defaults = dict(classifier='token', posemb='learned', representation_size=None, act='gelu_tanh')
  return {**defaults, **{k: v for k, v in fields.items()
                         if not k.startswith('resnet_') and k not in ('name', 'family')}}


def _to_timm(flat: Mapping[str, Any], fields: Mapping[str, Any],
             image_size: Optional[Sequence[int]], num_classes: Optional[int] = None,
             channels: int = 3) -> tuple[Flat, dict[str, Any]]:
  """(timm state dict, the ViT half's timm config) of a hybrid."""
  resnet_part, vit_part = split_resnet(flat)
  check_resnet_fields(resnet_fields_of(flat), fields)
  vit_cfg = _vit_fields(fields)
  p = hw(vit_cfg['patch_size'])
  if image_size is None:
    if vit_cfg.get('posemb', 'learned') != 'learned':
      raise ValueError(f'posemb={vit_cfg["posemb"]!r}: timm stores the position table, which needs '
                       'the image size (give image_size)')
    size = p  # Unused: a learned table is copied as it is.
  else:
    s = resnet.feature_stride(fields.get('resnet_layers', ()))
    size = tuple(-(-int(n) // s) for n in hw(image_size))  # The feature map, 'SAME' rounding.
  # The transformer half is a ViT whose "image" is the feature map.
  vit_arch = Architecture(vit_cfg, num_classes, size, channels=channels)
  state, config = vit_interop.to_timm({k: np.asarray(v) for k, v in vit_part.items()}, vit_arch)
  state.update(resnet_to_timm(resnet_part))
  return state, config


def to_timm(flat: Mapping[str, Any], fields: Mapping[str, Any],
            image_size: Optional[Sequence[int]] = None) -> Flat:
  """Our hybrid flat params -> a timm `vit_*_r*` state dict (float32, contiguous).

  image_size (pixels) is needed only for a fixed (sincos2d/none) position embedding, which timm
  stores as a table.
  """
  return _to_timm(flat, fields, image_size)[0]


def from_timm(state: Mapping[str, Any], fields: Mapping[str, Any]) -> Flat:
  """A timm hybrid state dict -> our flat params (= Google's npz layout); `fields` gives the head
  count (timm fuses q, k, v) and is checked against the ResNet found."""
  state = {k: to_numpy(v) for k, v in state.items()}
  out = resnet_from_timm(state)
  check_resnet_fields(resnet_fields_of(out), fields)
  sd = {k: v for k, v in state.items() if not k.startswith(TIMM_BACKBONE)}
  out.update(vit_interop.transformer_from_timm(sd, int(fields['num_heads']), 'the hybrid ViT'))
  return out


# ---------- the interop ----------

class HybridInterop(vit_interop.VitInterop):
  """The hybrid: timm's `vit_*_r*` (its registered ResNets) and Google's npz (the ViT's checks);
  no Hugging Face counterpart."""
  timm_prefixes = ('vit_tiny_r_', 'vit_small_r26_', 'vit_base_r26_', 'vit_base_r50_',
                   'vit_large_r50_')
  hf_model_types = ()

  def reads_timm(self, architecture, keys) -> bool:
    if architecture:
      return bool(_TIMM_NAME.match(architecture.split('.')[0]))
    return any(k in keys for k in (f'{TIMM_BACKBONE}stem.conv.weight',
                                   f'{TIMM_BACKBONE}conv.weight'))

  def to_timm(self, flat, arch):
    cfg = arch.model_config
    layers, width = tuple(cfg.get('resnet_layers', ())), int(cfg.get('resnet_width', 64))
    name = _TIMM_ENTRIES.get(layers) if width == 64 else None
    if name is None:
      raise ValueError(f'timm builds hybrids only with its registered ResNets (width 64, units '
                       f'{sorted(_TIMM_ENTRIES)}); this model has resnet_layers={layers}, '
                       f'resnet_width={width}: export with `--to npz` (Google\'s layout)')
    state, config = _to_timm(flat, cfg, arch.image_size, arch.num_classes, arch.channels)
    args = dict(config['model_args'], img_size=list(arch.image_size))
    config.update(architecture=name, model_args=args, pretrained_cfg=timm_pretrained_cfg(
        arch, args['num_classes'], first_conv=TIMM_BACKBONE + ('stem.conv' if layers else 'conv')))
    return state, config

  def from_timm(self, state, config):
    args = dict(config.get('model_args') or {})
    architecture = config.get('architecture', '')
    sd = {k: to_numpy(v) for k, v in state.items()}
    vit_interop.refuse_fc_norm(sd)
    out = resnet_from_timm(sd)
    vit_sd = {k: v for k, v in sd.items() if not k.startswith(TIMM_BACKBONE)}
    out.update(vit_interop.transformer_from_timm(vit_sd, vit_interop.timm_num_heads(config),
                                                 'the hybrid ViT'))
    fields: dict[str, Any] = {'act': vit_interop.timm_act(args)}
    if 'vit_jax' in config:  # Written here: keep the registry name and options.
      fields = {k: v for k, v in {**config['vit_jax'].get('model_config', {}), **fields}.items()
                if v is not None and k != 'posemb'}
      if POSEMB_KEY in out:
        fields['posemb'] = 'learned'  # Fixed kinds were written as values of pos_embed.
    arch = self.family.infer(out, model_config=fields, image_size=args.get('img_size'))
    arch.mean, arch.std = vit_interop.timm_norm(config, architecture)
    return out, arch, []

  def to_hf(self, flat, arch):
    raise ValueError('the hybrid family has no Hugging Face counterpart that this project writes '
                     '(HF\'s vit-hybrid uses a BiT backbone of other names); export with '
                     '`--to timm` or `--to npz`')

  def from_hf(self, state, config):
    raise ValueError('the hybrid family reads no Hugging Face checkpoints (HF\'s vit-hybrid uses a '
                     'BiT backbone of other names)')


INTEROP = HybridInterop(hybrid_family.FAMILY)
