"""The ViT family's interop (`INTEROP`): timm `VisionTransformer` <-> Google's names, numpy only.

timm (PyTorch: Linear weights [out, in], conv kernels OIHW): patch_embed.proj, cls_token, reg_token,
pos_embed, blocks.{i}.{norm1, attn.qkv (q, k, v fused, heads-major), attn.proj, ls1.gamma, norm2,
mlp.fc1, mlp.fc2, ls2.gamma}, norm (or fc_norm after pooling), head, and for global_pool='map'
attn_pool.{latent, q, kv, proj, norm, mlp.fc1, mlp.fc2}. timm's own registered names (DeiT III,
DINOv2, SigLIP, ...) save only the arguments given on top of their defaults, so the reader takes
registers, LayerScale, fc_norm and the position table's prefix rows from the weights.
Hugging Face's `ViTForImageClassification` names are mapped in `vit_hf_interop.py`, DINOv2's (with
and without registers) in `vit_dinov2_hf_interop.py`, SigLIP's image tower in
`vit_siglip_hf_interop.py`, and `vit_hf_interop.hf_target` picks the one a model needs. Google's
`.npz` is the family's own file layout (`VitInterop.npz_keys_ok` checks a tree is in it).

The block, head and whole-transformer maps are public so that the DeiT and hybrid interops reuse
them (`blocks_to_timm`, `blocks_from_timm`, `transformer_from_timm`, `timm_vit_args`, ...).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from vit_jax.families import vit as vit_family
from vit_jax.families import vit_dinov2_hf_interop, vit_hf_interop, vit_siglip_hf_interop
from vit_jax.families.base import IMAGENET, SIGNED_UNIT, Architecture, Family, Flat
from vit_jax.families.interop import (Interop, conv_from_torch, conv_to_torch, dense_from_torch,
                                      dense_to_torch, fused_to_torch, ln_from_torch, ln_to_torch,
                                      split_from_torch, timm_pretrained_cfg)
from vit_jax.families.vit import POSEMB_KEY
from vit_jax.shapes import hw

TIMM_GELU = {'gelu_tanh': 'gelu_tanh', 'gelu': 'gelu'}
_TIMM_TANH = ('gelu_tanh', 'gelu_pytorch_tanh')
_TIMM_SIZES = {(192, 12, 3): 'tiny', (384, 12, 6): 'small', (768, 12, 12): 'base',
               (1024, 24, 16): 'large', (1280, 32, 16): 'huge'}
_TIMM_REGISTERED = ('vit_tiny_patch16_224', 'vit_small_patch16_224', 'vit_small_patch32_224',
                    'vit_base_patch8_224', 'vit_base_patch16_224', 'vit_base_patch32_224',
                    'vit_large_patch16_224', 'vit_large_patch32_224', 'vit_huge_patch14_224')
HEADS_BY_NAME = {'tiny': 3, 'small': 6, 'base': 12, 'large': 16, 'huge': 16, 'little': 5}
# Registered names here -> timm's architecture of the same network (what `--to timm` declares).
TIMM_ARCHITECTURES = {
    'DeiT3-S_16': 'deit3_small_patch16_224', 'DeiT3-B_16': 'deit3_base_patch16_224',
    'DINOv2-S_14': 'vit_small_patch14_dinov2', 'DINOv2-S_14-reg4': 'vit_small_patch14_reg4_dinov2',
    'DINOv2-B_14-reg4': 'vit_base_patch14_reg4_dinov2',
    'SigLIP-B_16': 'vit_base_patch16_siglip_224',
    'SigLIP-B_16-gap': 'vit_base_patch16_siglip_gap_224',
    'ViT-Little_16-reg4-gap': 'vit_little_patch16_reg4_gap_256', 'FlexiViT-S': 'flexivit_small'}


# ---------- timm ----------

def check_timm_expressible(fields: Mapping[str, Any]) -> None:
  if fields.get('representation_size'):
    raise ValueError(
        f'timm\'s VisionTransformer has no pre-logits layer, but this model has one '
        f'(representation_size={fields["representation_size"]}): fine-tune or load it with '
        '`keep_pre_logits=False` to drop it, or export with `--to npz`')
  d, m = fields['hidden_size'], fields['mlp_dim']
  if int(d * (m / d)) != m:
    raise ValueError(f'timm builds an MLP of int(D * mlp_ratio) units; mlp_dim={m} is not reachable '
                     f'from hidden_size={d}')


def blocks_to_timm(flat: Mapping[str, np.ndarray], depth: int, out: Flat) -> None:
  """Transformer blocks (with LayerScale where present) and the final norm, ours -> timm."""
  for i in range(depth):
    b = f'Transformer/encoderblock_{i}'
    ln_to_torch(flat, f'{b}/LayerNorm_0', out, f'blocks.{i}.norm1')
    fused_to_torch(flat, f'{b}/MultiHeadDotProductAttention_1', ('query', 'key', 'value'), out,
                   f'blocks.{i}.attn.qkv')
    dense_to_torch(flat, f'{b}/MultiHeadDotProductAttention_1/out', out, f'blocks.{i}.attn.proj')
    ln_to_torch(flat, f'{b}/LayerNorm_2', out, f'blocks.{i}.norm2')
    dense_to_torch(flat, f'{b}/MlpBlock_3/Dense_0', out, f'blocks.{i}.mlp.fc1')
    dense_to_torch(flat, f'{b}/MlpBlock_3/Dense_1', out, f'blocks.{i}.mlp.fc2')
    for ours, theirs in (('LayerScale_1', 'ls1'), ('LayerScale_3', 'ls2')):
      if f'{b}/{ours}/scale' in flat:
        out[f'blocks.{i}.{theirs}.gamma'] = flat[f'{b}/{ours}/scale']
  if 'Transformer/encoder_norm/scale' in flat:
    ln_to_torch(flat, 'Transformer/encoder_norm', out, 'norm')
  if 'fc_norm/scale' in flat:
    ln_to_torch(flat, 'fc_norm', out, 'fc_norm')


def blocks_from_timm(sd: Flat, num_heads: int, d: int, out: Flat) -> None:
  """Transformer blocks and the final norm, timm -> ours (popping what it uses)."""
  depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r'blocks\.(\d+)\.', k))),
                  default=-1)
  for i in range(depth):
    b, t = f'Transformer/encoderblock_{i}', f'blocks.{i}'
    att = f'{b}/MultiHeadDotProductAttention_1'
    ln_from_torch(sd, f'{t}.norm1', out, f'{b}/LayerNorm_0')
    split_from_torch(sd, f'{t}.attn.qkv', ('query', 'key', 'value'), num_heads, out, att)
    dense_from_torch(sd, f'{t}.attn.proj', out, f'{att}/out', (num_heads, d // num_heads, d))
    ln_from_torch(sd, f'{t}.norm2', out, f'{b}/LayerNorm_2')
    dense_from_torch(sd, f'{t}.mlp.fc1', out, f'{b}/MlpBlock_3/Dense_0')
    dense_from_torch(sd, f'{t}.mlp.fc2', out, f'{b}/MlpBlock_3/Dense_1')
    for ours, theirs in (('LayerScale_1', 'ls1'), ('LayerScale_3', 'ls2')):
      if f'{t}.{theirs}.gamma' in sd:
        out[f'{b}/{ours}/scale'] = sd.pop(f'{t}.{theirs}.gamma')
  if 'norm.weight' in sd and 'fc_norm.weight' in sd:
    raise ValueError('the timm model normalises both before and after pooling (norm and fc_norm): '
                     'not expressible by this project\'s ViT, which has one or the other')
  if 'norm.weight' in sd:
    ln_from_torch(sd, 'norm', out, 'Transformer/encoder_norm')
  elif 'fc_norm.weight' in sd:
    ln_from_torch(sd, 'fc_norm', out, 'fc_norm')
  else:
    raise ValueError('the timm model has no final norm (final_norm=False): not expressible by this '
                     'project\'s ViT')


def map_head_to_timm(flat, out: Flat) -> None:
  att = 'MAPHead_0/MultiHeadDotProductAttention_0'
  out['attn_pool.latent'] = flat['MAPHead_0/probe']
  fused_to_torch(flat, att, ('query',), out, 'attn_pool.q')
  fused_to_torch(flat, att, ('key', 'value'), out, 'attn_pool.kv')
  dense_to_torch(flat, f'{att}/out', out, 'attn_pool.proj')
  ln_to_torch(flat, 'MAPHead_0/LayerNorm_0', out, 'attn_pool.norm')
  dense_to_torch(flat, 'MAPHead_0/MlpBlock_0/Dense_0', out, 'attn_pool.mlp.fc1')
  dense_to_torch(flat, 'MAPHead_0/MlpBlock_0/Dense_1', out, 'attn_pool.mlp.fc2')


def map_head_from_timm(sd: Flat, num_heads: int, d: int, out: Flat) -> None:
  att = 'MAPHead_0/MultiHeadDotProductAttention_0'
  out['MAPHead_0/probe'] = sd.pop('attn_pool.latent')
  split_from_torch(sd, 'attn_pool.q', ('query',), num_heads, out, att)
  split_from_torch(sd, 'attn_pool.kv', ('key', 'value'), num_heads, out, att)
  dense_from_torch(sd, 'attn_pool.proj', out, f'{att}/out', (num_heads, d // num_heads, d))
  ln_from_torch(sd, 'attn_pool.norm', out, 'MAPHead_0/LayerNorm_0')
  dense_from_torch(sd, 'attn_pool.mlp.fc1', out, 'MAPHead_0/MlpBlock_0/Dense_0')
  dense_from_torch(sd, 'attn_pool.mlp.fc2', out, 'MAPHead_0/MlpBlock_0/Dense_1')


def timm_vit_args(arch: Architecture) -> dict[str, Any]:
  """`timm.create_model` keyword arguments of the transformer part of this network.

  With dynamic_img_size, timm resamples the table bicubically (antialiased): equal to ours at
  other sizes only for dynamic_resize='bicubic' (at the built size there is nothing to resample).
  A `posemb_grid` other than the image's becomes timm's img_size (the table's size)."""
  cfg = arch.model_config
  check_timm_expressible(cfg)
  pool = {'token': 'token', 'gap': 'avg', 'map': 'map'}[cfg['classifier']]
  img_size = list(arch.image_size)
  if cfg.get('posemb_grid') is not None:
    (gh, gw), (ph, pw) = hw(cfg['posemb_grid']), hw(cfg['patch_size'])
    img_size = [gh * ph, gw * pw]
  return dict(
      img_size=img_size, in_chans=arch.channels, num_classes=arch.num_classes or 0,
      global_pool=pool, class_token=cfg['classifier'] == 'token',
      reg_tokens=int(cfg.get('num_registers') or 0), init_values=cfg.get('layer_scale'),
      # Without fc_norm our `gap` normalises every token with encoder_norm and then averages:
      # timm's `norm` before the pool, not its default `fc_norm` after it.
      fc_norm=bool(cfg.get('fc_norm')), embed_dim=cfg['hidden_size'], depth=cfg['num_layers'],
      num_heads=cfg['num_heads'], mlp_ratio=cfg['mlp_dim'] / cfg['hidden_size'], qkv_bias=True,
      act_layer=TIMM_GELU[cfg.get('act', 'gelu_tanh')],
      pos_embed='none' if cfg.get('posemb') == 'none' else 'learn',
      no_embed_class=bool(cfg.get('no_embed_class')),
      dynamic_img_size=bool(cfg.get('dynamic_img_size')))  # timm's LayerNorm eps is 1e-6, as ours.


def to_timm(flat: Mapping[str, np.ndarray], arch: Architecture) -> tuple[Flat, dict[str, Any]]:
  """(timm state dict, timm Hub config.json) of a ViT; `model_args` rebuild exactly this network."""
  cfg = arch.model_config
  args = timm_vit_args(arch)
  ph, pw = hw(cfg['patch_size'])
  args['patch_size'] = ph if ph == pw else [ph, pw]
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  out: Flat = {'patch_embed.proj.weight': conv_to_torch(flat['embedding/kernel']),
               'patch_embed.proj.bias': flat['embedding/bias']}
  if 'cls' in flat:
    out['cls_token'] = flat['cls']
  if 'registers' in flat:
    out['reg_token'] = flat['registers']
  grid = vit_family.FAMILY.grid(cfg, arch.image_size)
  pe = flat.get(POSEMB_KEY, vit_family.fixed_posemb(cfg, grid, vit_family.FAMILY.table_prefix(cfg)))
  if pe is not None and cfg.get('posemb') != 'none':
    out['pos_embed'] = pe
  blocks_to_timm(flat, cfg['num_layers'], out)
  if cfg['classifier'] == 'map':
    map_head_to_timm(flat, out)
  if 'head/kernel' in flat:
    dense_to_torch(flat, 'head', out, 'head')
  size = _TIMM_SIZES.get((cfg['hidden_size'], cfg['num_layers'], cfg['num_heads']))
  name = TIMM_ARCHITECTURES.get(cfg.get('name'), f'vit_{size}_patch{ph}_224')
  known = name in _TIMM_REGISTERED or name in TIMM_ARCHITECTURES.values()
  config = dict(architecture=name if known else 'vit_base_patch16_224',
                num_classes=args['num_classes'], num_features=cfg['hidden_size'],
                global_pool=args['global_pool'], model_args=args,
                pretrained_cfg=timm_pretrained_cfg(arch, args['num_classes']))
  return {k: np.ascontiguousarray(v) for k, v in out.items()}, config


def timm_act(args: Mapping[str, Any]) -> str:
  """timm's act_layer (absent: nn.GELU, the exact form) -> ours."""
  return 'gelu_tanh' if args.get('act_layer') in _TIMM_TANH else 'gelu'


def timm_norm(config: Mapping[str, Any], architecture: str) -> tuple[tuple, tuple]:
  """The checkpoint's declared input normalisation (pretrained_cfg), else the family's default."""
  pcfg = config.get('pretrained_cfg') or {}
  if pcfg.get('mean') and pcfg.get('std'):
    return tuple(pcfg['mean']), tuple(pcfg['std'])
  return IMAGENET if architecture.startswith('deit') or 'dinov2' in architecture else SIGNED_UNIT


def timm_num_heads(config: Mapping[str, Any]) -> int:
  args = config.get('model_args') or {}
  m = re.match(r'(?:vit|deit3?)_([a-z]+)_', config.get('architecture', ''))
  heads = args.get('num_heads') or (HEADS_BY_NAME.get(m.group(1)) if m else None)
  if heads is None:
    raise ValueError('timm fuses q/k/v, so the head count is not in the weights; give it '
                     '(`--model NAME`, or a config.json with model_args.num_heads)')
  return int(heads)


def refuse_fc_norm(keys: Any) -> None:
  """A ValueError when a timm state dict normalises after pooling (`fc_norm`): the hybrid's reader
  (the ViT's expresses it with its fc_norm field)."""
  if any(k.startswith('fc_norm.') for k in keys):
    raise ValueError('the timm model normalises after pooling (`fc_norm`); this project\'s gap '
                     'normalises every token before averaging (timm fc_norm=False): not expressible')


def transformer_from_timm(sd: Flat, num_heads: int, what: str = "this project's ViT") -> Flat:
  """The transformer of a timm ViT (patch embedding, class token, position table, blocks, final
  norm, MAP head, head) -> ours, popping what it uses; anything left is a ValueError naming it and
  `what` could not express it."""
  out: Flat = {'embedding/kernel': conv_from_torch(sd.pop('patch_embed.proj.weight')),
               'embedding/bias': sd.pop('patch_embed.proj.bias')}
  if 'cls_token' in sd:
    out['cls'] = sd.pop('cls_token')
  if 'reg_token' in sd:
    out['registers'] = sd.pop('reg_token')
  if 'pos_embed' in sd:
    out[POSEMB_KEY] = sd.pop('pos_embed')
  d = out['embedding/kernel'].shape[-1]
  blocks_from_timm(sd, num_heads, d, out)
  if 'attn_pool.latent' in sd:
    map_head_from_timm(sd, num_heads, d, out)
  if 'head.weight' in sd:
    dense_from_torch(sd, 'head', out, 'head')
  if sd:
    raise ValueError(f'timm parameters {what} cannot express: {sorted(sd)}')
  return out


def from_timm(state: Mapping[str, np.ndarray], config: Mapping[str, Any], family: Family
              ) -> tuple[Flat, Architecture, list[str]]:
  """A timm ViT state dict and its config.json -> (flat, architecture, notes); `family` (the ViT's
  descriptor or a subclass's, e.g. DeiT's) infers the architecture."""
  args = dict(config.get('model_args') or {})
  sd = {k: np.asarray(v) for k, v in state.items()}
  num_heads = timm_num_heads(config)
  notes: list[str] = []
  out = transformer_from_timm(sd, num_heads)
  architecture = config.get('architecture', '')
  fields: dict[str, Any] = {'act': timm_act(args)}
  if args.get('pos_embed') == 'none':
    fields['posemb'] = 'none'
  if 'no_embed_class' in args:  # else read off the table's rows (`infer`)
    fields['no_embed_class'] = bool(args['no_embed_class'])
  if 'Transformer/encoderblock_0/LayerScale_1/scale' in out:  # its start is not in the weights
    fields['layer_scale'] = args.get('init_values') or (
        1e-6 if architecture.startswith('deit3') else vit_family.DINO_LS)
  if args.get('dynamic_img_size'):  # resample the table as timm does, to give its logits
    fields.update(dynamic_img_size=True, dynamic_resize='bicubic')
  if 'vit_jax' in config:  # Written here: keep the registry name and options.
    fields = {**config['vit_jax'].get('model_config', {}), **fields, 'posemb': None}
    fields = {k: v for k, v in fields.items() if v is not None}
    if POSEMB_KEY in out:
      fields['posemb'] = 'learned'  # Fixed kinds were written as values of pos_embed.
  valid = set(family.field_names()) | {'name'}  # a DeiT has none of the later ViTs' options
  fields = {k: v for k, v in fields.items() if k in valid}
  size = args.get('img_size')
  if fields.get('posemb_grid') is not None and size is not None:
    size = (config.get('vit_jax') or {}).get('image_size')  # img_size was the table's
  arch = family.infer(out, model_config=fields, image_size=size)
  arch.mean, arch.std = timm_norm(config, architecture)
  return out, arch, notes


# ---------- Google's .npz ----------

_NPZ_BLOCK_MODULES = ('LayerNorm_0', 'MultiHeadDotProductAttention_1', 'LayerNorm_2', 'MlpBlock_3')


def npz_keys_ok(flat: Mapping[str, Any]) -> list[str]:
  """Keys of a ViT flat dict outside Google's npz layout: scanned blocks, modules Google's
  encoder blocks do not have (LayerScale), registers and fc_norm."""
  bad = []
  for key in flat:
    if key.startswith(('Transformer/encoderblock/', 'registers', 'fc_norm/')):
      bad.append(key)
    elif (m := re.match(r'^Transformer/encoderblock_\d+/([^/]+)/', key)) and (
        m.group(1) not in _NPZ_BLOCK_MODULES):
      bad.append(key)
  return bad


# ---------- the interop ----------

# hf_target's answer -> the module holding that transformers class's names.
_HF_MODULES = {'vit': vit_hf_interop, 'dinov2': vit_dinov2_hf_interop,
               'siglip': vit_siglip_hf_interop}


class VitInterop(Interop):
  """The ViT's timm `VisionTransformer`, Hugging Face `ViTForImageClassification` and Google npz."""
  # timm's non-distilled DeiTs and its FlexiViTs are plain ViTs.
  timm_prefixes = ('vit_', 'deit_', 'deit3_', 'flexivit_')
  hf_model_types = tuple(t for m in (vit_hf_interop, vit_dinov2_hf_interop, vit_siglip_hf_interop)
                         for t in m.MODEL_TYPES)
  writes_npz = True

  def reads_timm(self, architecture, keys) -> bool:
    if any(k.startswith('patch_embed.backbone.') for k in keys) or 'dist_token' in keys:
      return False  # the hybrid's and DeiT's
    # timm's VisionTransformer has one q/k/v bias and no relative tables, and no name of it has
    # '_rope': those are timm's Eva and Beit (the eva and beit families).
    if '_rope' in architecture or any(k.endswith(('attn.q_bias', 'attn.q_proj.weight',
                                                   'attn.relative_position_bias_table'))
                                      for k in keys):
      return False
    if architecture:
      return architecture.startswith(self.timm_prefixes)
    return 'patch_embed.proj.weight' in keys and not any(k.startswith(('layers.', 'stages.'))
                                                          for k in keys)

  def to_timm(self, flat, arch):
    return to_timm(flat, arch)

  def from_timm(self, state, config):
    return from_timm(state, config, self.family)

  def to_hf(self, flat, arch):
    """The transformers class that expresses the ViT exactly (`vit_hf_interop.hf_target`)."""
    target = vit_hf_interop.hf_target(arch.model_config)
    return _HF_MODULES[target].to_hf(flat, arch)

  def from_hf(self, state, config):
    model_type = config.get('model_type', 'vit')
    for module in _HF_MODULES.values():
      if model_type in module.MODEL_TYPES:
        return module.from_hf(state, config)
    raise ValueError(f'Hugging Face model_type {model_type!r} is not a ViT this project reads')

  def npz_keys_ok(self, flat) -> list[str]:
    return npz_keys_ok(flat)


INTEROP = VitInterop(vit_family.FAMILY)
