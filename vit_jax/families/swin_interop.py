"""The Swin family's interop (`INTEROP`): timm key maps and config translation, numpy only.

Our flat layout ('/'-joined paths of `vit_jax.models.swin.SwinTransformer`) and timm 1.0.31's
`SwinTransformer` state dict (PyTorch: Linear weights [out, in], conv weights OIHW):
  patch_embed/{kernel [p, p, C_in, D], bias}   <-> patch_embed.proj.{weight, bias}
  patch_norm/{scale, bias}                     <-> patch_embed.norm.{weight, bias}
  stage_{s}/downsample/norm, reduction          <-> layers.{s}.downsample.norm, reduction (s >= 1)
  stage_{s}/block_{b}/norm1, norm2              <-> layers.{s}.blocks.{b}.norm1, norm2
  stage_{s}/block_{b}/attn/qkv [C, 3, heads, K] <-> layers.{s}.blocks.{b}.attn.qkv [3C, C]
  stage_{s}/block_{b}/attn/proj [heads, K, C]   <-> layers.{s}.blocks.{b}.attn.proj [C, C]
  stage_{s}/block_{b}/attn/relative_position_bias_table  (same [(2M-1)^2, heads] layout)
  stage_{s}/block_{b}/mlp/fc1, fc2              <-> layers.{s}.blocks.{b}.mlp.fc1, fc2
  norm, head                                    <-> norm, head.fc
timm keeps `relative_position_index` and `attn_mask` as non-persistent buffers: they are not in its
state dict, and here they are numpy constants of the module, not parameters.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vit_jax.families import swin as swin_family
from vit_jax.families.base import IMAGENET, Flat
from vit_jax.families.interop import Interop, timm_pretrained_cfg, to_numpy
from vit_jax.families.swin import BLOCK, MODELS, SIZE_FIELDS, TABLE, count_stage_blocks
from vit_jax.shapes import hw

# timm's size names -> our registered models of those sizes.
_TIMM_SIZES = {'tiny': MODELS['Swin-T'], 'small': MODELS['Swin-S'], 'base': MODELS['Swin-B'],
               'large': MODELS['Swin-L']}
_TIMM_BLOCK = re.compile(r'^layers\.(\d+)\.blocks\.(\d+)\.')
_TIMM_NAME = re.compile(r'^swin_(tiny|small|base|large)_patch(\d+)_window(\d+)_(\d+)$')
# (our sub-module path inside a block, timm's, kind): see `_pairs`.
_BLOCK_NAMES = (('norm1', 'norm1', 'norm'), ('attn/qkv', 'attn.qkv', 'qkv'),
                ('attn/proj', 'attn.proj', 'proj'), ('norm2', 'norm2', 'norm'),
                ('mlp/fc1', 'mlp.fc1', 'dense'), ('mlp/fc2', 'mlp.fc2', 'dense'))


def fields_from_timm_name(arch: str) -> dict[str, Any]:
  """Our fields for a timm name such as 'swin_tiny_patch4_window7_224' (a '.tag' is allowed)."""
  m = _TIMM_NAME.match(arch.split('.', 1)[0])
  if not m:
    raise ValueError(f'{arch!r} is not a timm Swin name of the form '
                     'swin_{tiny,small,base,large}_patch{P}_window{M}_{size}')
  return dict(_TIMM_SIZES[m.group(1)], patch_size=int(m.group(2)), window_size=int(m.group(3)),
              act='gelu')


def timm_name(fields: Mapping[str, Any]) -> str:
  """The timm entry of the same size, else Swin-T's (model_args set the sizes either way)."""
  key = lambda f: (f['embed_dim'], tuple(f['depths']), tuple(f['num_heads']))
  size = {key(ref): name for name, ref in _TIMM_SIZES.items()}.get(key(fields), 'tiny')
  return f'swin_{size}_patch4_window7_224'


def timm_model_args(fields: Mapping[str, Any], num_classes: Optional[int], image_size: Any,
                    channels: int = 3) -> dict[str, Any]:
  """JSON-able `timm.create_model('swin_tiny_patch4_window7_224', **args)` arguments."""
  h, w = hw(image_size)
  window = fields.get('window_size', 7)
  return dict(img_size=[h, w], patch_size=int(fields['patch_size']), in_chans=channels,
              num_classes=num_classes or 0, embed_dim=int(fields['embed_dim']),
              depths=list(fields['depths']), num_heads=list(fields['num_heads']),
              window_size=window if np.ndim(window) == 0 else list(window),
              mlp_ratio=float(fields.get('mlp_ratio', 4.0)))


def _check_depths(found: Sequence[int], fields: Mapping[str, Any], what: str) -> None:
  if tuple(found) != tuple(fields['depths']):
    raise ValueError(f'{what} holds Swin stages of {tuple(found)} blocks, the fields say '
                     f'depths={tuple(fields["depths"])}')


def _pairs(depths: Sequence[int], head: bool) -> list[tuple[str, str, str]]:
  """(our module path, timm's, kind) of every parameterised module, kind in conv / norm / dense /
  reduction (no bias) / qkv / proj / table."""
  out = [('patch_embed', 'patch_embed.proj', 'conv'), ('patch_norm', 'patch_embed.norm', 'norm')]
  for s, depth in enumerate(depths):
    if s > 0:
      out += [(f'stage_{s}/downsample/norm', f'layers.{s}.downsample.norm', 'norm'),
              (f'stage_{s}/downsample/reduction', f'layers.{s}.downsample.reduction', 'reduction')]
    for b in range(depth):
      ours, theirs = f'stage_{s}/block_{b}', f'layers.{s}.blocks.{b}'
      out += [(f'{ours}/attn/{TABLE}', f'{theirs}.attn.{TABLE}', 'table')]
      out += [(f'{ours}/{o}', f'{theirs}.{t}', kind) for o, t, kind in _BLOCK_NAMES]
  return out + [('norm', 'norm', 'norm')] + ([('head', 'head.fc', 'dense')] if head else [])


def to_timm(flat: Mapping[str, np.ndarray], fields: Mapping[str, Any]) -> Flat:
  """Our flat parameters -> a timm `SwinTransformer` state dict (numpy, same dtypes, contiguous)."""
  _check_depths(count_stage_blocks(list(flat), BLOCK), fields, 'the parameters')
  out: Flat = {}
  for ours, theirs, kind in _pairs(fields['depths'], 'head/kernel' in flat):
    if kind == 'table':
      out[theirs] = np.asarray(flat[ours])
      continue
    if kind == 'norm':
      out[f'{theirs}.weight'] = np.asarray(flat[f'{ours}/scale'])
    else:
      k = np.asarray(flat[f'{ours}/kernel'])
      # HWIO -> OIHW; qkv [C, 3, heads, K] -> [C, 3C]; proj [heads, K, C] -> [C, C]; -> [out, in].
      k = (k.transpose(3, 2, 0, 1) if kind == 'conv' else
           (k.reshape(-1, k.shape[-1]) if kind == 'proj' else k.reshape(k.shape[0], -1)).T)
      out[f'{theirs}.weight'] = np.ascontiguousarray(k)
    if kind != 'reduction':
      out[f'{theirs}.bias'] = np.asarray(flat[f'{ours}/bias']).reshape(-1)
  return out


def is_timm_swin(keys: Sequence[str]) -> bool:
  """True for a timm 1.0 `SwinTransformer` state dict (not Swin V2, which has `logit_scale`)."""
  keys = set(keys)
  return ('patch_embed.proj.weight' in keys and f'layers.0.blocks.0.attn.{TABLE}' in keys
          and 'layers.0.blocks.0.attn.logit_scale' not in keys)


def from_timm(state: Mapping[str, Any], fields: Mapping[str, Any]) -> Flat:
  """A timm `SwinTransformer` state dict (numpy arrays or torch tensors) -> our flat parameters.

  Non-persistent buffers (relative_position_index, attn_mask), if a file holds them, are skipped.
  A ValueError names keys that are not a Swin's or that these fields would leave unused. The
  original Microsoft layout (downsample at the end of a stage) is not read: use timm to load it.
  """
  state = {k: to_numpy(v) for k, v in state.items()
           if not k.endswith(('relative_position_index', 'attn_mask'))}
  if not is_timm_swin(list(state)):
    raise ValueError('not a timm SwinTransformer state dict: no `patch_embed.proj.weight` and '
                     f'`layers.0.blocks.0.attn.{TABLE}` (Swin V2 is not supported)')
  if 'layers.0.downsample.reduction.weight' in state:
    raise ValueError('this is the original Swin layout (patch merging at the end of each stage); '
                     'load it with timm once (its checkpoint_filter_fn renames it) and save again')
  _check_depths(count_stage_blocks(list(state), _TIMM_BLOCK), fields, 'the timm state dict')
  out: Flat = {}
  heads = 0
  for ours, theirs, kind in _pairs(fields['depths'], 'head.fc.weight' in state):
    if kind == 'table':
      out[ours] = state[theirs]
      heads = state[theirs].shape[1]  # The table comes first in each block.
      continue
    w = state[f'{theirs}.weight']
    b = state.get(f'{theirs}.bias')
    if kind == 'norm':
      out[f'{ours}/scale'] = w
    elif kind == 'conv':
      out[f'{ours}/kernel'] = np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    elif kind == 'qkv':
      out[f'{ours}/kernel'] = np.ascontiguousarray(w.T.reshape(w.shape[1], 3, heads, -1))
      b = b.reshape(3, heads, -1)
    elif kind == 'proj':
      out[f'{ours}/kernel'] = np.ascontiguousarray(w.T.reshape(heads, -1, w.shape[0]))
    else:
      out[f'{ours}/kernel'] = np.ascontiguousarray(w.T)
    if kind != 'reduction':
      out[f'{ours}/bias'] = b
  unused = sorted(set(state) - set(to_timm(out, fields)))
  if unused:
    raise ValueError(f'timm keys that are not part of this SwinTransformer: {unused[:5]}')
  return out


# ---------- the interop ----------

class SwinInterop(Interop):
  """Swin <-> timm 1.0's `SwinTransformer`; no Hugging Face or npz counterpart here."""
  timm_prefixes = ('swin_',)

  def reads_timm(self, architecture, keys) -> bool:
    if architecture:
      return architecture.startswith(self.timm_prefixes)
    return is_timm_swin(list(keys))

  def to_timm(self, flat, arch):
    cfg = arch.model_config
    if cfg.get('act', 'gelu') != 'gelu':
      raise ValueError(f'timm\'s Swin always uses the exact GELU, but this model has act='
                       f'{cfg["act"]!r}; timm could not reproduce its logits')
    num_classes = arch.num_classes or 0
    args = timm_model_args(cfg, num_classes, arch.image_size, arch.channels)
    pretrained_cfg = timm_pretrained_cfg(arch, num_classes, classifier='head.fc')
    config = dict(architecture=timm_name(cfg), num_classes=num_classes,
                  num_features=cfg['embed_dim'] * 2 ** (len(cfg['depths']) - 1),
                  global_pool='avg', model_args=args, pretrained_cfg=pretrained_cfg)
    return to_timm({k: np.asarray(v, np.float32) for k, v in flat.items()}, cfg), config

  def from_timm(self, state, config):
    args = dict(config.get('model_args') or {})
    architecture = config.get('architecture', '').split('.')[0]
    fields: dict[str, Any] = {}
    if _TIMM_NAME.match(architecture):
      fields.update(fields_from_timm_name(architecture))
    if 'vit_jax' in config:  # Written here: keep the registry name and options.
      fields.update(config['vit_jax'].get('model_config', {}))
    window = args.get('window_size')
    if window is not None and (np.ndim(window) == 2 or (np.ndim(window) == 1 and len(window) > 2)):
      if any(np.any(np.asarray(w) != np.asarray(window[0])) for w in window):  # per stage
        raise ValueError(f'timm model with per-stage windows {window}: this project\'s Swin has '
                         'one window size for all stages')
      window = window[0]
    if window is not None:
      fields['window_size'] = window if np.ndim(window) == 0 else tuple(window)
    fields.update({k: args[k] for k in SIZE_FIELDS + ('mlp_ratio',) if args.get(k) is not None})
    fields['depths'] = tuple(count_stage_blocks(list(state), _TIMM_BLOCK))
    fields = self.family.normalize_fields(fields)
    flat = from_timm(state, fields)
    size = args.get('img_size') or (config.get('pretrained_cfg') or {}).get('input_size', [0])[1:]
    if not size and _TIMM_NAME.match(architecture):
      size = int(architecture.rsplit('_', 1)[1])  # swin_..._224
    arch = self.family.infer(flat, model_config=fields, image_size=size or None)
    pcfg = config.get('pretrained_cfg') or {}
    if pcfg.get('mean') and pcfg.get('std'):
      arch.mean, arch.std = tuple(pcfg['mean']), tuple(pcfg['std'])
    elif arch.channels == 3:  # timm's Swin default_cfg
      arch.mean, arch.std = IMAGENET
    return flat, arch, []


INTEROP = SwinInterop(swin_family.FAMILY)
