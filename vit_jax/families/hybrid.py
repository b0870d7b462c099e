"""The hybrid ResNet + ViT family (Dosovitskiy et al., 2021, §3.1): sizes and timm key maps.

Our flat parameters (`vit_jax.models.hybrid.HybridVisionTransformer`) *are* Google's hybrid `.npz`
layout (R50+ViT-B_16.npz, the augreg R_Ti_16 / R26_S_32 / R50_L_32 files), which timm's own `.npz`
loader reads too:
  conv_root/kernel [7, 7, C, w], gn_root/{scale, bias},
  block{i}/unit{j}/{conv1, gn1, conv2, gn2, conv3, gn3, conv_proj, gn_proj} (1-based, no conv bias),
  embedding/{kernel [p, p, C_f, D], bias}, then the ViT (`cls`, `Transformer/...`, `head`).
timm 1.0.31 (`vision_transformer_hybrid.py`) names the ResNet `patch_embed.backbone.`:
  stem.conv, stem.norm, stages.{i}.blocks.{j}.{conv1, norm1, ..., downsample.conv, downsample.norm}
  (0-based), or, root only (`vit_tiny_r_s16_p8_*`), conv and norm directly under the backbone; then
  `patch_embed.proj` and the ViT's names (the ViT family's maps in vit_interop.py).
timm's hybrids use the exact GELU ('gelu'); Google's files were trained with 'gelu_tanh'.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vit_jax.families import vit_interop
from vit_jax.families.base import Architecture, hw
from vit_jax.families.vit import (BLOCK, POSEMB_KEY, TENSOR_RULES, VitFamily, head_macs,
                                  transformer_macs, vit_fields)
from vit_jax.models import hybrid as hybrid_models
from vit_jax.models import resnet
from vit_jax.models import tokens as tokens_lib

Flat = dict[str, np.ndarray]

# Google's names. R+ViT-Ti_16 is root-only with 8x8 patches on the /4 map: an effective patch of 32
# (a 7x7 grid at 224) whatever its name says. Counts at 224 px, 1000 classes, equal timm 1.0.31's.
MODELS: dict[str, dict[str, Any]] = {
    'R+ViT-Ti_16': vit_fields('Ti', 8, resnet_layers=(), resnet_width=64),           # 6,337,704
    'R26+ViT-S_32': vit_fields('S', 1, resnet_layers=(2, 2, 2, 2), resnet_width=64),  # 36,431,912
    'R50+ViT-B_16': vit_fields('B', 1, resnet_layers=(3, 4, 9), resnet_width=64),     # 98,659,112
    'R50+ViT-L_32': vit_fields('L', 1, resnet_layers=(3, 4, 6, 3), resnet_width=64),  # 328,994,856
    # CPU tests: two one-unit stages of the narrowest GroupNorm-able width (32), an effective /8.
    'R+ViT-testing': dict(patch_size=1, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                          classifier='token', posemb='learned', representation_size=None,
                          resnet_layers=(1, 1), resnet_width=32),
}
# timm 1.0.31's registered hybrids of this kind: size, ResNet depth, stride, patch on the map.
_TIMM_NAME = re.compile(r'^vit_(tiny|small|base|large)_r(\d*)_s(\d+)(?:_p(\d+))?_(\d+)$')
_TIMM_SIZES = {'tiny': 'Ti', 'small': 'S', 'base': 'B', 'large': 'L'}
_TIMM_RESNETS = {('', 16): (), ('26', 32): (2, 2, 2, 2), ('50', 16): (3, 4, 9),
                 ('50', 32): (3, 4, 6, 3)}
TIMM_BACKBONE = 'patch_embed.backbone.'
_RESNET_KEY = re.compile(r'^(conv_root|gn_root|block\d+)/')
_UNIT = re.compile(r'^block(\d+)/unit(\d+)/')
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


def split_resnet(flat: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(the ResNet's entries, the ViT's entries) of a hybrid flat dict."""
  resnet = {k: v for k, v in flat.items() if _RESNET_KEY.match(k)}
  return resnet, {k: v for k, v in flat.items() if k not in resnet}


def resnet_fields_of(flat: Mapping[str, Any]) -> dict[str, Any]:
  """`resnet_layers` and `resnet_width` read off a hybrid flat dict's keys and shapes."""
  if 'conv_root/kernel' not in flat:
    raise ValueError('not a hybrid parameter set: no `conv_root/kernel`')
  units: dict[int, int] = {}
  for k in flat:
    if m := _UNIT.match(k):
      units[int(m.group(1))] = max(units.get(int(m.group(1)), 0), int(m.group(2)))
  if sorted(units) != list(range(1, len(units) + 1)):
    raise ValueError(f'ResNet blocks are not numbered block1..block{len(units)}: {sorted(units)}')
  return dict(resnet_layers=tuple(units[i] for i in sorted(units)),
              resnet_width=int(flat['conv_root/kernel'].shape[-1]))


def _check_resnet(found: Mapping[str, Any], fields: Mapping[str, Any]) -> None:
  for key in ('resnet_layers', 'resnet_width'):
    want = fields.get(key)
    if want is not None and (tuple(want) if key == 'resnet_layers' else want) != found[key]:
      raise ValueError(f'the parameters have {key}={found[key]!r} but the fields say {want!r}')


# ---------- the ResNet: ours <-> timm ----------

def _conv_to_torch(w: Any) -> np.ndarray:
  return vit_interop.conv_to_torch(np.asarray(w, np.float32))


_conv_from_torch = vit_interop.conv_from_torch


def resnet_to_timm(flat: Mapping[str, Any]) -> Flat:
  """The ResNet entries of a hybrid flat dict -> timm's `patch_embed.backbone.*` names."""
  layers = resnet_fields_of(flat)['resnet_layers']
  root = TIMM_BACKBONE + ('stem.' if layers else '')
  out: Flat = {f'{root}conv.weight': _conv_to_torch(flat['conv_root/kernel']),
               f'{root}norm.weight': np.asarray(flat['gn_root/scale'], np.float32),
               f'{root}norm.bias': np.asarray(flat['gn_root/bias'], np.float32)}
  for key, value in flat.items():
    if not (m := _UNIT.match(key)):
      continue
    module, leaf = key[m.end():].split('/')
    theirs = dict(_UNIT_NAMES)[module]
    stem = f'{TIMM_BACKBONE}stages.{int(m.group(1)) - 1}.blocks.{int(m.group(2)) - 1}.{theirs}'
    if leaf == 'kernel':
      out[f'{stem}.weight'] = _conv_to_torch(value)
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
  out: Flat = {'conv_root/kernel': _conv_from_torch(sd.pop(f'{root}conv.weight')),
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
      out[f'{stem}/kernel'] = _conv_from_torch(value)
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
  _check_resnet(resnet_fields_of(flat), fields)
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


def _vit_from_timm(sd: Flat, num_heads: int) -> Flat:
  """The transformer half of a timm hybrid (popping what it uses) -> ours."""
  out: Flat = {'embedding/kernel': vit_interop.conv_from_torch(sd.pop('patch_embed.proj.weight')),
               'embedding/bias': sd.pop('patch_embed.proj.bias')}
  if 'cls_token' in sd:
    out['cls'] = sd.pop('cls_token')
  if 'pos_embed' in sd:
    out[POSEMB_KEY] = sd.pop('pos_embed')
  d = out['embedding/kernel'].shape[-1]
  vit_interop.blocks_from_timm(sd, num_heads, d, out)
  if 'attn_pool.latent' in sd:
    vit_interop.map_head_from_timm(sd, num_heads, d, out)
  if 'head.weight' in sd:
    vit_interop.dense_from_torch(sd, 'head', out, 'head')
  if sd:
    raise ValueError(f'timm parameters the hybrid ViT cannot express: {sorted(sd)}')
  return out


def from_timm(state: Mapping[str, Any], fields: Mapping[str, Any]) -> Flat:
  """A timm hybrid state dict -> our flat params (= Google's npz layout); `fields` gives the head
  count (timm fuses q, k, v) and is checked against the ResNet found."""
  state = {k: (v.detach().cpu().numpy() if hasattr(v, 'detach') else np.asarray(v))
           for k, v in state.items()}
  out = resnet_from_timm(state)
  _check_resnet(resnet_fields_of(out), fields)
  sd = {k: v for k, v in state.items() if not k.startswith(TIMM_BACKBONE)}
  out.update(_vit_from_timm(sd, int(fields['num_heads'])))
  return out


# ---------- the family ----------

def resnet_macs(fields: Mapping[str, Any], image_size: Sequence[int], channels: int = 3
                ) -> tuple[int, tuple[int, int], int]:
  """(conv MACs of the ResNet for one image, its output map (h, w), its output channels)."""
  ceil = lambda n, s: -(-n // s)
  width, layers = int(fields.get('resnet_width', 64)), tuple(fields.get('resnet_layers', ()))
  h, w = (ceil(n, 2) for n in hw(image_size))
  macs = h * w * 49 * channels * width
  h, w, cin = ceil(h, 2), ceil(w, 2), width  # max-pool
  for i, units in enumerate(layers):
    mid = width * 2 ** i
    for j in range(units):
      s = 2 if i > 0 and j == 0 else 1
      ho, wo = ceil(h, s), ceil(w, s)
      macs += h * w * cin * mid + ho * wo * 9 * mid * mid + ho * wo * mid * 4 * mid
      if cin != 4 * mid or s != 1:
        macs += ho * wo * cin * 4 * mid  # conv_proj
      h, w, cin = ho, wo, 4 * mid
  return macs, (h, w), cin


class HybridFamily(VitFamily):
  """ResNet + ViT: the ViT family's transformer, tables and key maps, plus the ResNet."""
  name = 'hybrid'
  models = MODELS
  stem_kernel = 'conv_root/kernel'
  # The ResNet (12% of R50+ViT-B_16's parameters, 39% of R26+ViT-S_32's) stays replicated under
  # `tensor` (FSDP still shards it): split output channels would make every GroupNorm and the next
  # conv gather the activations again, for little compute saved at these widths.
  tensor_rules = TENSOR_RULES + ((r'^(conv_root|gn_root|block\d+)/', ()),)
  timm_prefixes = ('vit_tiny_r_', 'vit_small_r26_', 'vit_base_r26_', 'vit_base_r50_',
                   'vit_large_r50_')
  hf_model_types = ()
  test_model = 'R+ViT-testing'
  test_image_size = 32
  extra_size_fields = ('resnet_layers', 'resnet_width')
  capabilities = (tokens_lib.PROMPTS, tokens_lib.TOKEN_MAP)
  _LEAK = ("the ResNet stem's receptive field spans neighbouring patches, so a masked or dropped "
           "patch's pixels still reach the encoder through the tokens next to it")
  lacks = {tokens_lib.TOKEN_MASK: _LEAK, tokens_lib.KEEP: _LEAK}

  def module_class(self) -> type:
    return hybrid_models.HybridVisionTransformer

  def patch_hw(self, fields: Mapping[str, Any]) -> tuple[int, int]:
    """The effective patch: input pixels per token (feature stride x the patch on the map)."""
    s = resnet.feature_stride(tuple(fields.get('resnet_layers', ())))
    ph, pw = hw(fields['patch_size'])
    return s * ph, s * pw

  def validate(self, fields, image_size) -> None:
    super().validate(fields, image_size)
    resnet.check_width(int(fields.get('resnet_width', 64)))
    if any(int(n) < 1 for n in fields.get('resnet_layers', ())):
      raise ValueError(f'model.resnet_layers {tuple(fields["resnet_layers"])}: every stage needs at '
                       'least one unit')

  def forward_macs(self, fields, num_classes, image_size, channels=3) -> int:
    macs, (fh, fw), cf = resnet_macs(fields, image_size, channels)
    ph, pw = hw(fields['patch_size'])
    gh, gw = fh // ph, fw // pw
    d = fields['hidden_size']
    n = gh * gw + self.num_prefix(fields)
    macs += gh * gw * ph * pw * cf * d
    macs += transformer_macs(n, d, fields['mlp_dim'], fields['num_layers'])
    return int(macs + head_macs(fields, n, num_classes))

  def summary_rows(self, fields, image_size) -> list[str]:
    _, (fh, fw), cf = resnet_macs(fields, image_size)
    layers = tuple(fields.get('resnet_layers', ()))
    return [f'ResNet: root width {fields.get("resnet_width", 64)}, units per stage {layers}: a '
            f'{fh}x{fw}x{cf} feature map (stride {resnet.feature_stride(layers)}), patch '
            f'{hw(fields["patch_size"])} on it'] + super().summary_rows(fields, image_size)

  def matches(self, flat) -> bool:
    return 'conv_root/kernel' in flat and 'embedding/kernel' in flat and any(
        BLOCK.match(k) for k in flat)

  def found_fields(self, flat) -> dict[str, Any]:
    return {**super().found_fields(flat), **resnet_fields_of(flat)}

  # ---- interop ----
  def reads_timm(self, architecture, keys) -> bool:
    if architecture:
      return bool(_TIMM_NAME.match(architecture.split('.')[0]))
    return any(k in keys for k in (f'{TIMM_BACKBONE}stem.conv.weight', f'{TIMM_BACKBONE}conv.weight'))

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
    config.update(architecture=name, model_args=args, pretrained_cfg=vit_interop.timm_pretrained_cfg(
        arch, args['num_classes'], first_conv=TIMM_BACKBONE + ('stem.conv' if layers else 'conv')))
    return state, config

  def from_timm(self, state, config):
    args = dict(config.get('model_args') or {})
    architecture = config.get('architecture', '')
    sd = {k: (v.detach().cpu().numpy() if hasattr(v, 'detach') else np.asarray(v))
          for k, v in state.items()}
    if any(k.startswith('fc_norm.') for k in sd):
      raise ValueError('the timm model normalises after pooling (`fc_norm`); this project\'s gap '
                       'normalises every token before averaging (timm fc_norm=False): not expressible')
    out = resnet_from_timm(sd)
    vit_sd = {k: v for k, v in sd.items() if not k.startswith(TIMM_BACKBONE)}
    out.update(_vit_from_timm(vit_sd, vit_interop.timm_num_heads(config)))
    fields: dict[str, Any] = {'act': vit_interop.timm_act(args)}
    if 'vit_jax' in config:  # Written here: keep the registry name and options.
      fields = {k: v for k, v in {**config['vit_jax'].get('model_config', {}), **fields}.items()
                if v is not None and k != 'posemb'}
      if POSEMB_KEY in out:
        fields['posemb'] = 'learned'  # Fixed kinds were written as values of pos_embed.
    arch = self.infer(out, model_config=fields, image_size=args.get('img_size'))
    arch.mean, arch.std = vit_interop.timm_norm(config, architecture)
    return out, arch, []

  def to_hf(self, flat, arch):
    raise ValueError('the hybrid family has no Hugging Face counterpart that this project writes '
                     '(HF\'s vit-hybrid uses a BiT backbone of other names); export with `--to timm`'
                     ' or `--to npz`')

  def from_hf(self, state, config):
    raise ValueError('the hybrid family reads no Hugging Face checkpoints (HF\'s vit-hybrid uses a '
                     'BiT backbone of other names)')

  # ---- inspection: attention maps and position table are the ViT's (tokens of the effective patch)
  inspect_note = ("its `embedding` is a conv on the ResNet's feature map, not on pixels (attention "
                  'rollout, attention distance and position-embedding similarity do apply)')

  def patch_filters(self, flat, arch):
    # `stem_kernel` is the ResNet root here: pixel filters, but not the patch embedding.
    raise self._undefined('a linear embedding of pixel patches')


# Our ResNet (width 64) -> the timm entry that builds it (every size field is then a model_arg).
_TIMM_ENTRIES = {(): 'vit_tiny_r_s16_p8_224', (2, 2, 2, 2): 'vit_small_r26_s32_224',
                 (3, 4, 9): 'vit_base_r50_s16_224', (3, 4, 6, 3): 'vit_large_r50_s32_224'}

FAMILY = HybridFamily()
