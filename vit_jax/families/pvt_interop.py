"""The PVT v2 family's interop (`INTEROP`): the key map to and from timm's `pvt_v2_*`, numpy only.

Our parameter paths mirror timm's module names, so names map one to one ('stages_1/blocks_0/attn/q'
<-> 'stages.1.blocks.0.attn.q'); only layouts differ: Dense kernels are [in, out] (timm [out, in]),
attention kernels keep the heads explicit (q [D, H, K], kv [D, 2, H, K], proj [H, K, D]), convs are
HWIO (timm OIHW; the depth-wise conv [3, 3, 1, C] vs [C, 1, 3, 3]), LayerNorm's `scale` is `weight`.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from vit_jax.families import pvt as pvt_family
from vit_jax.families.base import IMAGENET
from vit_jax.families.interop import Interop, timm_pretrained_cfg, to_numpy
from vit_jax.families.pvt import ARCH_FIELDS, B_WIDE, MODELS

# timm architecture name -> our fields.
TIMM_NAMES: dict[str, dict[str, Any]] = {
    'pvt_v2_b0': MODELS['PVTv2-b0'], 'pvt_v2_b1': MODELS['PVTv2-b1'],
    'pvt_v2_b2': MODELS['PVTv2-b2'], 'pvt_v2_b2_li': MODELS['PVTv2-b2_li'],
    'pvt_v2_b3': MODELS['PVTv2-b3'], 'pvt_v2_b4': MODELS['PVTv2-b4'],
    'pvt_v2_b5': MODELS['PVTv2-b5'],
}
# Every parameter name of timm's PyramidVisionTransformerV2.
_TIMM_KEY = re.compile(
    r'^(patch_embed\.(proj|norm)|stages\.\d+\.(downsample\.(proj|norm)|norm|blocks\.\d+\.'
    r'(norm1|norm2|attn\.(q|kv|proj|sr|norm)|mlp\.(fc1|dwconv|fc2)))|head)\.(weight|bias)$')


def fields_from_timm_name(arch: str) -> dict[str, Any]:
  """Model fields of a timm architecture name ('pvt_v2_b2', 'pvt_v2_b2_li.in1k', ...)."""
  base = arch.split('.')[0]
  if base not in TIMM_NAMES:
    raise ValueError(f'{arch!r} is not a PVT v2 architecture; known: {sorted(TIMM_NAMES)}')
  return dict(TIMM_NAMES[base])


def timm_model_args(fields: Mapping[str, Any]) -> dict[str, Any]:
  """Keyword arguments that make timm's `PyramidVisionTransformerV2` match `fields`."""
  args = {k: (tuple(fields[k]) if isinstance(fields[k], (list, tuple)) else fields[k])
          for k in ARCH_FIELDS if k in fields}
  args['mlp_ratios'] = tuple(float(r) for r in args.get('mlp_ratios', B_WIDE['mlp_ratios']))
  return args


def _heads(fields: Mapping[str, Any], stage: int) -> int:
  return int(fields.get('num_heads', B_WIDE['num_heads'])[stage])


def _module_to_timm(path: str) -> str:
  return re.sub(r'(stages|blocks)_(\d+)', r'\1.\2', path).replace('/', '.')


def _module_from_timm(name: str) -> str:
  return re.sub(r'(stages|blocks)\.(\d+)', r'\1_\2', name).replace('.', '/')


def _stage(path: str) -> int:
  m = re.match(r'stages[._](\d+)', path)
  return int(m.group(1)) if m else 0


def _is_attn_dense(module: str) -> bool:
  """The attention's q / kv / proj (heads explicit here), as opposed to convs and plain Dense."""
  parts = module.split('/')
  return len(parts) >= 2 and parts[-2] == 'attn' and parts[-1] in ('q', 'kv', 'proj')


def to_timm(flat: Mapping[str, np.ndarray], fields: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our flat params ('/'-joined paths) -> timm state dict (names and PyTorch layouts)."""
  out = {}
  for path, value in flat.items():
    v = np.array(value)  # an owning, writable copy: torch.from_numpy warns on read-only arrays
    module, leaf = path.rsplit('/', 1)
    last = module.rsplit('/', 1)[-1]
    name = _module_to_timm(module)
    if leaf == 'scale':
      out[f'{name}.weight'] = v
    elif leaf == 'bias':
      out[f'{name}.bias'] = v.reshape(-1)
    elif leaf != 'kernel':
      raise ValueError(f'unexpected PVT parameter {path!r}')
    elif _is_attn_dense(module) and last == 'proj':  # [H, K, D] -> [D, H*K]
      out[f'{name}.weight'] = np.ascontiguousarray(v.reshape(-1, v.shape[-1]).T)
    elif v.ndim == 4 and not _is_attn_dense(module):
      # conv HWIO -> OIHW (the depth-wise [3, 3, 1, C] -> [C, 1, 3, 3] too)
      out[f'{name}.weight'] = np.ascontiguousarray(v.transpose(3, 2, 0, 1))
    else:  # Dense [in, out] / q [D, H, K] / kv [D, 2, H, K] -> [out, in]
      out[f'{name}.weight'] = np.ascontiguousarray(v.reshape(v.shape[0], -1).T)
  return out


def from_timm(state: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """timm state dict (torch tensors or arrays) -> our flat params ('/'-joined paths)."""
  unknown = sorted(k for k in state if not _TIMM_KEY.match(k))
  if unknown:
    raise ValueError(f'timm keys that are not part of a PVT v2: {unknown[:5]}')
  flat = {}
  for key, value in state.items():
    v = to_numpy(value)
    name, leaf = key.rsplit('.', 1)
    module = _module_from_timm(name)
    last = module.rsplit('/', 1)[-1]
    heads = _heads(fields, _stage(name))
    in_attn = _is_attn_dense(module)
    if leaf == 'bias':
      if in_attn and last != 'proj':
        v = v.reshape((2,) * (last == 'kv') + (heads, -1))
      flat[f'{module}/bias'] = v
    elif last.startswith('norm'):
      flat[f'{module}/scale'] = v
    elif v.ndim == 4:
      flat[f'{module}/kernel'] = np.ascontiguousarray(v.transpose(2, 3, 1, 0))
    elif in_attn and last == 'proj':  # [D, H*K] -> [H, K, D]
      flat[f'{module}/kernel'] = np.ascontiguousarray(v.T.reshape(heads, -1, v.shape[0]))
    elif in_attn:  # [(2*)H*K, D] -> [D, (2,) H, K]
      split = (2,) * (last == 'kv') + (heads, -1)
      flat[f'{module}/kernel'] = np.ascontiguousarray(v.T.reshape((v.shape[1],) + split))
    else:
      flat[f'{module}/kernel'] = np.ascontiguousarray(v.T)
  return flat


# ---------- the interop ----------

class PvtInterop(Interop):
  """PVT v2 <-> timm's `PyramidVisionTransformerV2`; no Hugging Face or npz counterpart here."""
  timm_prefixes = ('pvt_v2',)

  def reads_timm(self, architecture, keys) -> bool:
    if architecture:
      return architecture.startswith(self.timm_prefixes)
    return 'patch_embed.proj.weight' in keys and 'stages.0.blocks.0.attn.q.weight' in keys

  def to_timm(self, flat, arch):
    cfg = arch.model_config
    if cfg.get('act', 'gelu') != 'gelu':
      raise ValueError(f'timm\'s PVT v2 always uses the exact GELU, but this model has act='
                       f'{cfg["act"]!r}; timm could not reproduce its logits')
    args = {k: list(v) if isinstance(v, tuple) else v for k, v in timm_model_args(cfg).items()}
    num_classes = arch.num_classes or 0
    args.update(in_chans=arch.channels, num_classes=num_classes)
    arch_fields = {k: tuple(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k]
                   for k in ARCH_FIELDS if k in cfg}
    name = next((t for t, known in TIMM_NAMES.items()
                 if all(known[k] == v for k, v in arch_fields.items())), 'pvt_v2_b0')
    config = dict(architecture=name, num_classes=num_classes, num_features=cfg['embed_dims'][-1],
                  global_pool='avg', model_args=args,
                  pretrained_cfg=timm_pretrained_cfg(arch, num_classes))
    return to_timm({k: np.asarray(v, np.float32) for k, v in flat.items()}, cfg), config

  def from_timm(self, state, config):
    keys = set(state)
    if 'patch_embed1.proj.weight' in keys:
      raise ValueError('this is the original PVT v2 layout (patch_embed1, block1, ...); load it '
                       'with timm once (its checkpoint_filter_fn renames it) and save the state '
                       'dict')
    args = dict(config.get('model_args') or {})
    fields: dict[str, Any] = {}
    architecture = config.get('architecture', '')
    if architecture.split('.')[0] in TIMM_NAMES:
      fields.update(fields_from_timm_name(architecture))
    if 'vit_jax' in config:  # Written here: keep the registry name and options.
      fields.update(config['vit_jax'].get('model_config', {}))
    fields.update({k: args[k] for k in ARCH_FIELDS if args.get(k) is not None})
    if 'num_heads' not in fields:
      raise ValueError('timm fuses the heads of q and kv, so the head count is not in the weights; '
                       'give it (`--model NAME`, or a config.json with model_args.num_heads)')
    fields = self.family.normalize_fields(fields)
    if np.ndim(fields['num_heads']) == 0:
      fields['num_heads'] = (int(fields['num_heads']),) * 4
    flat = from_timm(state, fields)
    size = args.get('img_size') or (config.get('pretrained_cfg') or {}).get('input_size', [0])[1:]
    arch = self.family.infer(flat, model_config=fields, image_size=size or None)
    pcfg = config.get('pretrained_cfg') or {}
    if pcfg.get('mean') and pcfg.get('std'):
      arch.mean, arch.std = tuple(pcfg['mean']), tuple(pcfg['std'])
    elif arch.channels == 3:  # timm's pvt_v2 default_cfg
      arch.mean, arch.std = IMAGENET
    return flat, arch, []


INTEROP = PvtInterop(pvt_family.FAMILY)
