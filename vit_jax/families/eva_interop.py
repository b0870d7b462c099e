"""EVA key maps (the `eva` family's timm interop), numpy only.

Ours (`vit_jax.families.eva`) and timm 1.0's `Eva` state dict (Linear [out, in], conv OIHW):
  patch_embed/{kernel, bias}          <-> patch_embed.proj.{weight, bias}
  cls, reg, pos_embed                 <-> cls_token, reg_token, pos_embed
  block_{i}/norm1, norm2, gamma_{1,2} <-> blocks.{i}.norm1, norm2, gamma_{1,2}
  block_{i}/attn/qkv [D, 3, H, K]     <-> blocks.{i}.attn.qkv.weight [3D, D] (or q_proj, k_proj,
  block_{i}/attn/{q,v}_bias [H, K]        v_proj, read only: EVA-02 B/L); attn.{q,v}_bias (k_bias is
                                          a zero buffer, not in the state dict)
  block_{i}/attn/norm, proj           <-> blocks.{i}.attn.norm, proj
  block_{i}/mlp/fc1_g, fc1_x          <-> blocks.{i}.mlp.fc1 [2M, D], gate rows first (timm's
                                          `GluMlp(gate_last=False)`); with mlp/norm: mlp.fc1_g,
                                          fc1_x, norm (timm's `SwiGLU`)
  block_{i}/mlp/fc1, fc2, norm        <-> blocks.{i}.mlp.fc1, fc2, norm
  norm, fc_norm, head                 <-> norm, fc_norm, head
RoPE has no parameters in either (timm keeps its tables as non-persistent buffers). The block
maps are shared with BEiT (`beit_interop.py`), whose timm blocks have the same names.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import numpy as np

from vit_jax.families import eva as eva_family
from vit_jax.families.base import Architecture, Flat
from vit_jax.families.interop import Interop, timm_architecture, timm_model_args, to_numpy
from vit_jax.shapes import hw

CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
SIGNED = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_EVA02 = dict(patch_size=14, depth=12, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True,
              ref_feat_shape=(16, 16))
_EVA02_BL = dict(_EVA02, qkv_fused=False, scale_mlp=True)
_SBB = dict(img_size=256, patch_size=16, depth=12, qkv_fused=True, qkv_bias=True, init_values=1e-5,
            class_token=False, num_reg_tokens=1, use_rot_pos_emb=True, use_abs_pos_emb=False,
            ref_feat_shape=(16, 16))
# timm 1.0.31's registered arguments of the Eva architectures whose hub checkpoints carry no
# `model_args` (what `timm.create_model(name)` builds), and their default normalisation.
TIMM_ARCHS: dict[str, tuple[dict[str, Any], tuple]] = {
    'eva02_tiny_patch14_224': (dict(_EVA02, img_size=224, embed_dim=192, num_heads=3), CLIP),
    'eva02_small_patch14_224': (dict(_EVA02, img_size=224, embed_dim=384, num_heads=6), CLIP),
    'eva02_tiny_patch14_336': (dict(_EVA02, img_size=336, embed_dim=192, num_heads=3), CLIP),
    'eva02_small_patch14_336': (dict(_EVA02, img_size=336, embed_dim=384, num_heads=6), CLIP),
    'eva02_base_patch14_224': (dict(_EVA02_BL, img_size=224, embed_dim=768, num_heads=12), CLIP),
    'eva02_base_patch14_448': (dict(_EVA02_BL, img_size=448, embed_dim=768, num_heads=12), CLIP),
    'eva02_large_patch14_224': (dict(_EVA02_BL, img_size=224, embed_dim=1024, depth=24,
                                     num_heads=16), CLIP),
    'eva02_large_patch14_448': (dict(_EVA02_BL, img_size=448, embed_dim=1024, depth=24,
                                     num_heads=16), CLIP),
    'vit_medium_patch16_rope_reg1_gap_256': (dict(_SBB, embed_dim=512, num_heads=8), SIGNED),
    'vit_mediumd_patch16_rope_reg1_gap_256': (dict(_SBB, embed_dim=512, depth=20, num_heads=8,
                                                   qkv_bias=False), SIGNED),
    'vit_betwixt_patch16_rope_reg4_gap_256': (dict(_SBB, embed_dim=640, num_heads=10,
                                                   num_reg_tokens=4), SIGNED),
    'vit_base_patch16_rope_reg1_gap_256': (dict(_SBB, embed_dim=768, num_heads=12), SIGNED),
}
TIMM_NAMES = {'EVA02-Ti_14': 'eva02_tiny_patch14_224', 'EVA02-S_14': 'eva02_small_patch14_224',
              'ViT-B_16-rope-reg1-gap': 'vit_base_patch16_rope_reg1_gap_256'}
# Every timm `Eva` model (EVA, EVA-02, timm's and Naver's RoPE ViTs, Perception Encoder) is claimed
# here, so that an option this project lacks is refused by name instead of misread as a plain ViT.
TIMM_NAME = re.compile(r'^(eva02?_|vit_[a-z0-9]+_patch\d+_rope|vit_pe_)')
# timm `Eva` arguments that change nothing here at inference, and those whose other values this
# project does not implement (argument: the value it implements).
_IGNORED = ('drop_rate', 'pos_drop_rate', 'patch_drop_rate', 'proj_drop_rate', 'attn_drop_rate',
            'drop_path_rate', 'head_init_scale', 'in_chans', 'num_classes', 'img_size',
            'rope_shift_coords', 'rope_jitter_coords', 'rope_rescale_coords', 'device', 'dtype',
            'qkv_fused')  # either q/k/v layout is read
_FIXED = dict(num_kv_heads=None, qk_norm=False, swiglu_align_to=0, attn_type='eva',
              attn_only_layer_scale=False, rope_type='cat', rope_grid_offset=0.0,
              rope_grid_indexing='ij', rope_rotate_half=False, rope_mrope_section=None,
              use_post_norm=False, use_pre_transformer_norm=False, attn_pool_num_heads=None,
              attn_pool_mlp_ratio=None, dynamic_img_pad=False, norm_layer=None, attn_head_dim=None,
              gated_attn=False)


# ---------- PyTorch layouts ----------

def _linear_to(flat: Mapping[str, np.ndarray], ours: str, out: Flat, theirs: str) -> None:
  k = np.asarray(flat[f'{ours}/kernel'])
  out[f'{theirs}.weight'] = np.ascontiguousarray(k.reshape(k.shape[0], -1).T if k.ndim == 2
                                                 else k.reshape(-1, k.shape[-1]).T)
  if f'{ours}/bias' in flat:
    out[f'{theirs}.bias'] = np.asarray(flat[f'{ours}/bias']).reshape(-1)


def _linear_from(sd: Flat, theirs: str, out: Flat, ours: str, shape: Optional[tuple] = None):
  w = sd.pop(f'{theirs}.weight').T
  out[f'{ours}/kernel'] = np.ascontiguousarray(w.reshape(shape) if shape else w)
  if f'{theirs}.bias' in sd:
    out[f'{ours}/bias'] = sd.pop(f'{theirs}.bias')


def _norm_to(flat, ours, out, theirs) -> None:
  if f'{ours}/scale' in flat:
    out[f'{theirs}.weight'], out[f'{theirs}.bias'] = flat[f'{ours}/scale'], flat[f'{ours}/bias']


def _norm_from(sd, theirs, out, ours) -> None:
  if f'{theirs}.weight' in sd:
    out[f'{ours}/scale'], out[f'{ours}/bias'] = sd.pop(f'{theirs}.weight'), sd.pop(f'{theirs}.bias')


# ---------- state dicts (shared with BEiT) ----------

def state_to_timm(flat: Mapping[str, np.ndarray], pack_swiglu: bool = True) -> Flat:
  """Our flat parameters (EVA or BEiT) -> timm's state dict (numpy float32, contiguous)."""
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  out: Flat = {'patch_embed.proj.weight': np.ascontiguousarray(
      flat['patch_embed/kernel'].transpose(3, 2, 0, 1)),
      'patch_embed.proj.bias': flat['patch_embed/bias']}
  for ours, theirs in (('cls', 'cls_token'), ('reg', 'reg_token'), ('pos_embed', 'pos_embed')):
    if ours in flat:
      out[theirs] = flat[ours]
  for i in range(eva_family.num_blocks(flat)):
    b, t = f'block_{i}', f'blocks.{i}'
    for n in ('norm1', 'norm2', 'attn/norm', 'mlp/norm'):
      _norm_to(flat, f'{b}/{n}', out, f'{t}.{n.replace("/", ".")}')
    for g in ('gamma_1', 'gamma_2'):
      if f'{b}/{g}' in flat:
        out[f'{t}.{g}'] = flat[f'{b}/{g}']
    qkv = flat[f'{b}/attn/qkv/kernel']
    out[f'{t}.attn.qkv.weight'] = np.ascontiguousarray(qkv.reshape(qkv.shape[0], -1).T)
    for n in ('q_bias', 'v_bias'):
      if f'{b}/attn/{n}' in flat:
        out[f'{t}.attn.{n}'] = flat[f'{b}/attn/{n}'].reshape(-1)
    if f'{b}/attn/{eva_family.TABLE}' in flat:
      out[f'{t}.attn.{eva_family.TABLE}'] = flat[f'{b}/attn/{eva_family.TABLE}']
    _linear_to(flat, f'{b}/attn/proj', out, f'{t}.attn.proj')
    if f'{b}/mlp/fc1_g/kernel' in flat and pack_swiglu:
      out[f'{t}.mlp.fc1.weight'] = np.ascontiguousarray(np.concatenate(
          [flat[f'{b}/mlp/fc1_g/kernel'], flat[f'{b}/mlp/fc1_x/kernel']], axis=1).T)
      out[f'{t}.mlp.fc1.bias'] = np.concatenate([flat[f'{b}/mlp/fc1_g/bias'],
                                                  flat[f'{b}/mlp/fc1_x/bias']])
    else:
      for n in ('fc1', 'fc1_g', 'fc1_x'):
        if f'{b}/mlp/{n}/kernel' in flat:
          _linear_to(flat, f'{b}/mlp/{n}', out, f'{t}.mlp.{n}')
    _linear_to(flat, f'{b}/mlp/fc2', out, f'{t}.mlp.fc2')
  _norm_to(flat, 'norm', out, 'norm')
  _norm_to(flat, 'fc_norm', out, 'fc_norm')
  if 'head/kernel' in flat:
    _linear_to(flat, 'head', out, 'head')
  return out


def state_from_timm(state: Mapping[str, Any], num_heads: int, what: str = 'Eva') -> Flat:
  """timm's `Eva` / `Beit` state dict -> our flat parameters; keys left over are a ValueError."""
  sd = {k: to_numpy(v) for k, v in state.items()
        if not k.endswith(('relative_position_index', 'attn.k_bias'))}
  out: Flat = {'patch_embed/kernel': np.ascontiguousarray(
      sd.pop('patch_embed.proj.weight').transpose(2, 3, 1, 0)),
      'patch_embed/bias': sd.pop('patch_embed.proj.bias')}
  for ours, theirs in (('cls', 'cls_token'), ('reg', 'reg_token'), ('pos_embed', 'pos_embed')):
    if theirs in sd:
      out[ours] = sd.pop(theirs)
  depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r'blocks\.(\d+)\.', k))),
                  default=-1)
  for i in range(depth):
    b, t = f'block_{i}', f'blocks.{i}'
    for n in ('norm1', 'norm2', 'attn/norm', 'mlp/norm'):
      _norm_from(sd, f'{t}.{n.replace("/", ".")}', out, f'{b}/{n}')
    for g in ('gamma_1', 'gamma_2'):
      if f'{t}.{g}' in sd:
        out[f'{b}/{g}'] = sd.pop(f'{t}.{g}')
    if f'{t}.attn.qkv.weight' in sd:
      w = sd.pop(f'{t}.attn.qkv.weight')
      d = w.shape[1]
      out[f'{b}/attn/qkv/kernel'] = np.ascontiguousarray(w.T.reshape(d, 3, num_heads, -1))
      for n in ('q_bias', 'v_bias'):
        if f'{t}.attn.{n}' in sd:
          out[f'{b}/attn/{n}'] = sd.pop(f'{t}.attn.{n}').reshape(num_heads, -1)
    else:  # q_proj / k_proj / v_proj (EVA-02 B and L): one kernel here, q and v biases apart
      ws = [sd.pop(f'{t}.attn.{n}_proj.weight') for n in 'qkv']
      d = ws[0].shape[1]
      out[f'{b}/attn/qkv/kernel'] = np.ascontiguousarray(
          np.stack([x.T.reshape(d, num_heads, -1) for x in ws], axis=1))
      if f'{t}.attn.k_proj.bias' in sd:
        raise ValueError(f'{t}.attn.k_proj has a bias: EVA attention has none on k')
      for n in ('q', 'v'):
        if f'{t}.attn.{n}_proj.bias' in sd:
          out[f'{b}/attn/{n}_bias'] = sd.pop(f'{t}.attn.{n}_proj.bias').reshape(num_heads, -1)
    if f'{t}.attn.{eva_family.TABLE}' in sd:
      out[f'{b}/attn/{eva_family.TABLE}'] = sd.pop(f'{t}.attn.{eva_family.TABLE}')
    _linear_from(sd, f'{t}.attn.proj', out, f'{b}/attn/proj',
                 (num_heads, -1, out['patch_embed/kernel'].shape[-1]))
    packed = (f'{t}.mlp.fc1.weight' in sd and f'{t}.mlp.fc2.weight' in sd
              and sd[f'{t}.mlp.fc1.weight'].shape[0] == 2 * sd[f'{t}.mlp.fc2.weight'].shape[1])
    if packed:  # GluMlp: gate rows first
      w, bias = sd.pop(f'{t}.mlp.fc1.weight'), sd.pop(f'{t}.mlp.fc1.bias')
      m = w.shape[0] // 2
      out[f'{b}/mlp/fc1_g/kernel'] = np.ascontiguousarray(w[:m].T)
      out[f'{b}/mlp/fc1_x/kernel'] = np.ascontiguousarray(w[m:].T)
      out[f'{b}/mlp/fc1_g/bias'], out[f'{b}/mlp/fc1_x/bias'] = bias[:m], bias[m:]
    for n in ('fc1', 'fc1_g', 'fc1_x', 'fc2'):
      if f'{t}.mlp.{n}.weight' in sd:
        _linear_from(sd, f'{t}.mlp.{n}', out, f'{b}/mlp/{n}')
  _norm_from(sd, 'norm', out, 'norm')
  _norm_from(sd, 'fc_norm', out, 'fc_norm')
  if 'head.weight' in sd:
    _linear_from(sd, 'head', out, 'head')
  if sd:
    raise ValueError(f'timm {what} parameters this project\'s model cannot express: '
                     f'{sorted(sd)[:6]}')
  return out


def mlp_ratio(d: int, m: int) -> float:
  """A ratio r with int(d * r) == m (timm's hidden width), the nearest float above m / d."""
  r = m / d
  while int(d * r) < m:
    r = float(np.nextafter(r, np.inf))
  return r


# ---------- the EVA family's timm interop ----------

def reads_timm(architecture: str, keys) -> bool:
  keys = set(keys)
  if any(k.endswith(f'attn.{eva_family.TABLE}') for k in keys):
    return False  # BEiT
  if architecture:
    return bool(TIMM_NAME.match(architecture))
  marks = ('attn.q_bias', 'attn.q_proj.weight', 'mlp.fc1_g.weight')  # no timm ViT has these
  return 'patch_embed.proj.weight' in keys and any(
      k.startswith('blocks.') and k.endswith(marks) for k in keys)


def timm_args(fields: Mapping[str, Any], num_classes: Optional[int], image_size: Any,
              channels: int = 3) -> dict[str, Any]:
  """JSON-able `timm.create_model(<any Eva name>, **args)` arguments of this model: every option
  explicit, so that the named architecture's defaults do not matter."""
  d, m = int(fields['hidden_size']), int(fields['mlp_dim'])
  ph, pw = hw(fields['patch_size'])
  h, w = hw(image_size)
  ref = fields.get('rope_ref_grid')
  args = dict(
      img_size=[h, w], patch_size=ph if ph == pw else [ph, pw], in_chans=channels,
      num_classes=num_classes or 0,
      global_pool={'gap': 'avg', 'token': 'token'}[fields.get('classifier', 'gap')],
      embed_dim=d, depth=int(fields['num_layers']), num_heads=int(fields['num_heads']),
      qkv_bias=bool(fields.get('qkv_bias', True)), qkv_fused=True, mlp_ratio=mlp_ratio(d, m),
      swiglu_mlp=fields.get('mlp', 'swiglu') == 'swiglu', scale_mlp=bool(fields.get('mlp_norm')),
      scale_attn_inner=bool(fields.get('attn_norm')), init_values=fields.get('layer_scale'),
      class_token=bool(fields.get('class_token', True)),
      num_reg_tokens=int(fields.get('num_registers', 0)),
      no_embed_class=bool(fields.get('no_embed_class', False)),
      use_abs_pos_emb=fields.get('posemb', 'learned') == 'learned',
      use_rot_pos_emb=bool(fields.get('rope', True)),
      ref_feat_shape=list(hw(ref)) if ref else None,
      rope_temperature=float(fields.get('rope_temperature', 10_000.0)),
      use_fc_norm=uses_fc_norm(fields))
  if fields.get('dynamic_img_size'):
    args['dynamic_img_size'] = True
  return args


def uses_fc_norm(fields: Mapping[str, Any]) -> bool:
  fc = fields.get('fc_norm')
  return fields.get('classifier', 'gap') == 'gap' if fc is None else bool(fc)


def fields_from_args(args: Mapping[str, Any]) -> dict[str, Any]:
  """Our fields from timm `Eva` arguments (timm's defaults where absent); an argument this project
  does not implement is a ValueError naming it."""
  for key, value in args.items():
    if key in _IGNORED:
      continue
    if key in _FIXED and value is not None and value != _FIXED[key]:
      raise ValueError(f'timm Eva argument {key}={value!r}: this project\'s EVA implements only '
                       f'{key}={_FIXED[key]!r}')
  pool = args.get('global_pool', 'avg')
  if pool not in ('avg', 'token'):
    raise ValueError(f'timm Eva argument global_pool={pool!r}: this project\'s EVA pools by '
                     "'avg' or 'token' only")
  fc_norm = args.get('use_fc_norm')
  post = args.get('use_post_transformer_norm')
  fc = (pool == 'avg') if fc_norm is None else bool(fc_norm)
  if post is not None and bool(post) == fc:
    raise ValueError(f'timm Eva arguments use_post_transformer_norm={post} with fc_norm={fc}: '
                     'this project\'s EVA has exactly one of the final norm and fc_norm')
  ref = args.get('ref_feat_shape')
  d = int(args.get('embed_dim', 768))
  swiglu = bool(args.get('swiglu_mlp', False))
  return dict(
      patch_size=args.get('patch_size', 16), hidden_size=d, num_layers=int(args.get('depth', 12)),
      num_heads=int(args.get('num_heads', 12)), mlp_dim=int(d * float(args.get('mlp_ratio', 4.0))),
      classifier='gap' if pool == 'avg' else 'token',
      fc_norm=None if fc_norm is None or bool(fc_norm) == (pool == 'avg') else bool(fc_norm),
      class_token=bool(args.get('class_token', True)),
      num_registers=int(args.get('num_reg_tokens', 0)),
      no_embed_class=bool(args.get('no_embed_class', False)),
      posemb='learned' if args.get('use_abs_pos_emb', True) else 'none',
      rope=bool(args.get('use_rot_pos_emb', False)),
      rope_ref_grid=tuple(hw(ref)) if ref is not None else None,
      rope_temperature=float(args.get('rope_temperature', 10_000.0)),
      mlp='swiglu' if swiglu else 'gelu', mlp_norm=bool(args.get('scale_mlp', False)),
      attn_norm=bool(args.get('scale_attn_inner', False)),
      qkv_bias=bool(args.get('qkv_bias', True)), layer_scale=args.get('init_values'),
      dynamic_img_size=bool(args.get('dynamic_img_size', False)))


def pretrained_cfg(arch: Architecture, num_classes: int) -> dict[str, Any]:
  return dict(num_classes=num_classes, input_size=[arch.channels, *arch.image_size],
              classifier='head', first_conv='patch_embed.proj', interpolation='bicubic',
              crop_pct=1.0, mean=list(arch.mean), std=list(arch.std))


def to_timm(flat: Mapping[str, np.ndarray], arch: Architecture) -> tuple[Flat, dict[str, Any]]:
  """(timm `Eva` state dict, config.json) of an EVA model."""
  cfg = arch.model_config
  num_classes = arch.num_classes or 0
  args = timm_args(cfg, num_classes, arch.image_size, arch.channels)
  name = TIMM_NAMES.get(cfg.get('name', ''), 'eva02_tiny_patch14_224' if args['class_token']
                        else 'vit_base_patch16_rope_reg1_gap_256')
  config = dict(architecture=name, num_classes=num_classes, num_features=int(cfg['hidden_size']),
                global_pool=args['global_pool'], model_args=args,
                pretrained_cfg=pretrained_cfg(arch, num_classes))
  return state_to_timm(flat, pack_swiglu=not cfg.get('mlp_norm')), config


def from_timm(state: Mapping[str, Any], config: Mapping[str, Any]
              ) -> tuple[Flat, Architecture, list[str]]:
  """(flat, architecture, notes) of a timm `Eva` checkpoint: its config.json's `model_args` over the
  registered arguments of its `architecture` (`TIMM_ARCHS`) over timm's defaults."""
  args, norm = timm_model_args(config, TIMM_ARCHS)
  fields = fields_from_args(args)
  # The heads of a checkpoint this project wrote are in its vit_jax block too; timm's args win.
  heads = int({**(config.get('vit_jax') or {}).get('model_config', {}), **fields}['num_heads'])
  flat = state_from_timm(state, heads)
  arch = timm_architecture(eva_family.FAMILY, flat, config, args, fields, norm)
  notes = []
  if any(args.get(k) for k in ('rope_shift_coords', 'rope_jitter_coords', 'rope_rescale_coords')):
    notes.append('timm trained it with RoPE coordinate augmentation; fine-tuning here does not '
                 'augment the coordinates')
  return flat, arch, notes


class EvaInterop(Interop):
  """EVA <-> timm 1.0's `Eva`; Hugging Face has no counterpart (refused with the reason)."""
  # For messages; what is claimed is every name TIMM_NAME matches.
  timm_prefixes = ('eva02_', 'eva_', 'vit_pe_', 'vit_small_patch16_rope', 'vit_medium_patch16_rope',
                   'vit_mediumd_patch16_rope', 'vit_betwixt_patch16_rope', 'vit_base_patch16_rope',
                   'vit_large_patch16_rope')

  def reads_timm(self, architecture, keys) -> bool:
    return reads_timm(architecture, keys)

  def to_timm(self, flat, arch):
    return to_timm(flat, arch)

  def from_timm(self, state, config):
    return from_timm(state, config)

  def to_hf(self, flat, arch):
    raise ValueError('Hugging Face transformers (5.23) has no EVA-02 or RoPE ViT architecture, so '
                     'there is nothing to write it as; export with `--to timm` (timm\'s `Eva`)')


INTEROP = EvaInterop(eva_family.FAMILY)
