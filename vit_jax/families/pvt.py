"""The PVT v2 family: registered sizes and the key map to and from timm's `pvt_v2_*` state dicts.

Our parameter paths mirror timm's module names, so names map one to one ('stages_1/blocks_0/attn/q'
<-> 'stages.1.blocks.0.attn.q'); only layouts differ: Dense kernels are [in, out] (timm [out, in]),
attention kernels keep the heads explicit (q [D, H, K], kv [D, 2, H, K], proj [H, K, D]), convs are
HWIO (timm OIHW; the depth-wise conv [3, 3, 1, C] vs [C, 1, 3, 3]), LayerNorm's `scale` is `weight`.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vit_jax.families.base import IMAGENET, Architecture, Family, check_sizes, hw
from vit_jax.models import pvt as pvt_models

_B_WIDE = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
               sr_ratios=(8, 4, 2, 1), linear=False)

# Model fields of each registered name (timm's pvt_v2_b* at 224 px, 1000 classes: the parameter
# counts in the comments are timm's and ours).
MODELS: dict[str, dict[str, Any]] = {
    'PVTv2-b0': dict(_B_WIDE, embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),  # 3,666,760
    'PVTv2-b1': dict(_B_WIDE, depths=(2, 2, 2, 2)),  # 14,009,000
    'PVTv2-b2': dict(_B_WIDE, depths=(3, 4, 6, 3)),  # 25,362,856
    'PVTv2-b2_li': dict(_B_WIDE, depths=(3, 4, 6, 3), linear=True),  # 22,553,512
    'PVTv2-b3': dict(_B_WIDE, depths=(3, 4, 18, 3)),  # 45,238,696
    'PVTv2-b4': dict(_B_WIDE, depths=(3, 8, 27, 3)),  # 62,556,072
    'PVTv2-b5': dict(_B_WIDE, depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)),  # 81,956,008
    # A small PVT for Fashion-MNIST / CIFAR-size inputs (32 px): four stages of 8x8 ... 1x1 tokens,
    # about as many parameters as ViT-Mini_4 (configs/fashion_mnist_pvt.py).
    'PVTv2-mini': dict(_B_WIDE, embed_dims=(32, 64, 96, 128), depths=(2, 2, 2, 2),
                       num_heads=(1, 2, 3, 4), mlp_ratios=(4, 4, 4, 4)),
    # For tests: 32x32 (or larger) images; every stage map >= its reduction ratio at 32 px.
    'PVTv2-tiny': dict(_B_WIDE, embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1),
                       num_heads=(1, 1, 2, 2), mlp_ratios=(2, 2, 2, 2)),
}
# timm architecture name -> our fields.
TIMM_NAMES: dict[str, dict[str, Any]] = {
    'pvt_v2_b0': MODELS['PVTv2-b0'], 'pvt_v2_b1': MODELS['PVTv2-b1'],
    'pvt_v2_b2': MODELS['PVTv2-b2'], 'pvt_v2_b2_li': MODELS['PVTv2-b2_li'],
    'pvt_v2_b3': MODELS['PVTv2-b3'], 'pvt_v2_b4': MODELS['PVTv2-b4'],
    'pvt_v2_b5': MODELS['PVTv2-b5'],
}

_BLOCK = re.compile(r'^stages_(\d+)/blocks_(\d+)/')

# Every parameter name of timm's PyramidVisionTransformerV2.
_TIMM_KEY = re.compile(
    r'^(patch_embed\.(proj|norm)|stages\.\d+\.(downsample\.(proj|norm)|norm|blocks\.\d+\.'
    r'(norm1|norm2|attn\.(q|kv|proj|sr|norm)|mlp\.(fc1|dwconv|fc2)))|head)\.(weight|bias)$')

# The model fields that define the architecture (what timm's constructor takes as well).
ARCH_FIELDS = ('embed_dims', 'depths', 'num_heads', 'mlp_ratios', 'sr_ratios', 'linear')


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
  args['mlp_ratios'] = tuple(float(r) for r in args.get('mlp_ratios', _B_WIDE['mlp_ratios']))
  return args


def _heads(fields: Mapping[str, Any], stage: int) -> int:
  return int(fields.get('num_heads', _B_WIDE['num_heads'])[stage])


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
    v = np.asarray(value.detach().cpu().numpy() if hasattr(value, 'detach') else value)
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


def _check_stages(keys: Sequence[str], pattern: re.Pattern, what: str) -> tuple[int, ...]:
  """Blocks per stage from parameter names; a ValueError when stages or blocks have gaps."""
  found: dict[int, set[int]] = {}
  for k in keys:
    if (m := pattern.match(k)):
      found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
  if sorted(found) != list(range(len(found))) or not found:
    raise ValueError(f'{what} has PVT stages {sorted(found)}, not 0..n-1')
  for s, blocks in found.items():
    if sorted(blocks) != list(range(len(blocks))):
      raise ValueError(f'{what}: stage {s} blocks are not numbered from 0: {sorted(blocks)}')
  return tuple(len(found[s]) for s in range(len(found)))


def found_fields(flat: Mapping[str, Any]) -> dict[str, Any]:
  """The architecture fields our flat parameters determine (everything but dropout and act).

  sr_ratios are read from the reduction convs of the non-linear variant; the linear variant's 1x1
  convs (which stage 3 has too) identify it, and its sr_ratios are unused.
  """
  if 'patch_embed/proj/kernel' not in flat or 'stages_0/blocks_0/attn/q/kernel' not in flat:
    raise ValueError('not a PVT v2 parameter set: no `patch_embed/proj/kernel` and '
                     '`stages_0/blocks_0/attn/q/kernel`')
  depths = _check_stages(list(flat), _BLOCK, 'the parameters')
  dims, heads, ratios, srs = [], [], [], []
  linear = False
  for s in range(len(depths)):
    att = f'stages_{s}/blocks_0/attn'
    d, h, _ = np.shape(flat[f'{att}/q/kernel'])
    hidden = np.shape(flat[f'stages_{s}/blocks_0/mlp/fc1/kernel'])[1]
    dims.append(int(d))
    heads.append(int(h))
    r = hidden / d
    ratios.append(int(r) if float(r).is_integer() else float(r))
    sr = np.shape(flat[f'{att}/sr/kernel'])[0] if f'{att}/sr/kernel' in flat else 1
    linear |= f'{att}/sr/kernel' in flat and sr == 1
    srs.append(int(sr))
  out = dict(embed_dims=tuple(dims), depths=depths, num_heads=tuple(heads),
             mlp_ratios=tuple(ratios), linear=linear)
  if not linear:
    out['sr_ratios'] = tuple(srs)
  return out


def forward_macs(fields: Mapping[str, Any], num_classes: Optional[int],
                 image_size: tuple[int, int], channels: int = 3) -> int:
  """Multiply-accumulates of one image's forward pass: convolutions and matmuls (the adaptive pool,
  norms, softmax and activations are not counted)."""
  dims, depths = fields['embed_dims'], fields['depths']
  srs = fields.get('sr_ratios', _B_WIDE['sr_ratios'])
  linear = fields.get('linear', False)
  macs, prev = 0, channels
  for i, ((h, w), d) in enumerate(zip(pvt_models.stage_sizes(*hw(image_size), len(depths)), dims)):
    n = h * w
    macs += n * (49 if i == 0 else 9) * prev * d  # overlapping patch embedding, 7x7 / 3x3
    m = int(d * fields['mlp_ratios'][i])
    if linear:
      s = pvt_models.POOL_SIZE ** 2
      reduce = s * d * d  # 1x1 conv on the pooled 7x7 map
    elif srs[i] > 1:
      s = (h // srs[i]) * (w // srs[i])
      reduce = s * srs[i] ** 2 * d * d
    else:
      s, reduce = n, 0
    block = 2 * n * d * d + reduce + 2 * s * d * d + 2 * n * s * d + 2 * n * d * m + 9 * n * m
    macs += depths[i] * block
    prev = d
  return int(macs + dims[-1] * (num_classes or 0))


def exact_multiple(num_stages: int, sr_ratios: Sequence[int], linear: bool) -> int:
  """The image-size step at which every stage map is exactly H / 2^(i+2) and, unless linear, a
  multiple of its reduction ratio (32 for the default ratios)."""
  step = 2 ** (num_stages + 1)
  if not linear:
    for i, sr in enumerate(sr_ratios):
      step = math.lcm(step, 2 ** (i + 2) * int(sr))
  return step


# Megatron tensor parallelism (specs of each parameter): q [D, H, K] and kv [D, 2, H, K] split the
# heads, proj [H, K, D] too (row parallel); fc1 splits its hidden units (column parallel), the
# depth-wise conv [3, 3, 1, M] acts per channel so it keeps fc1's split, fc2 [M, D] is row parallel.
# Heads that do not divide the tensor axis (PVT's 1 and 5) are replicated by `sharding` with a
# warning. Patch embeddings, reduction convs and the head stay replicated under `tensor`.
TENSOR_RULES = (
    (r'attn/q/kernel$', (None, 'tensor', None)),
    (r'attn/q/bias$', ('tensor', None)),
    (r'attn/kv/kernel$', (None, None, 'tensor', None)),
    (r'attn/kv/bias$', (None, 'tensor', None)),
    (r'attn/proj/kernel$', ('tensor', None, None)),
    (r'mlp/fc1/kernel$', (None, 'tensor')),
    (r'mlp/fc1/bias$', ('tensor',)),
    (r'mlp/dwconv/kernel$', (None, None, None, 'tensor')),
    (r'mlp/dwconv/bias$', ('tensor',)),
    (r'mlp/fc2/kernel$', ('tensor', None)),
    (r'(^|/)(patch_embed|downsample)/proj/kernel$', ()),
    (r'attn/sr/kernel$', ()),
    (r'(^|/)head/kernel$', ()),
)


class PvtFamily(Family):
  """PVT v2 (`vit_jax.models.pvt`): no position embeddings, so nothing depends on the resolution."""
  name = 'pvt'
  models = MODELS
  head_prefixes = ('head/',)
  stem_kernel = 'patch_embed/proj/kernel'
  tensor_rules = TENSOR_RULES
  timm_prefixes = ('pvt_v2',)
  test_model = 'PVTv2-tiny'
  test_image_size = 32
  inspect_note = ('PVT v2 attends from every token to a spatially reduced key map, per stage: it '
                  'has no global attention map over one token grid, no class token and no '
                  'position embedding')
  _HIER = ('its overlapping patch embeddings and spatially reduced attention need the full grid and '
           'return a coarser map per stage, so patches cannot be dropped or masked one by one, no '
           'prompt tokens fit the grid, and no per-patch token map comes out')
  lacks = dict.fromkeys(('keep', 'prompts', 'token_map', 'token_mask'), _HIER)

  def module_class(self) -> type:
    return pvt_models.PyramidVisionTransformerV2

  def validate(self, fields: Mapping[str, Any], image_size: tuple[int, int]) -> None:
    if fields.get('act') is not None and fields['act'] not in pvt_models.ACTS:
      raise ValueError(f'model.act {fields["act"]!r} is not one of {pvt_models.ACTS}')
    n = len(fields['depths'])
    for key in ('embed_dims', 'num_heads', 'mlp_ratios', 'sr_ratios'):
      if key in fields and len(fields[key]) != n:
        raise ValueError(f'model.{key} has {len(fields[key])} entries but model.depths has {n}')
    for i, (d, h) in enumerate(zip(fields['embed_dims'], fields['num_heads'])):
      if d % h:
        raise ValueError(f'model.embed_dims[{i}]={d} is not divisible by model.num_heads[{i}]={h}')
    h, w = hw(image_size)
    srs = fields.get('sr_ratios', _B_WIDE['sr_ratios'])
    linear = bool(fields.get('linear', False))
    pvt_models.check_image_size(h, w, srs, linear)
    step = exact_multiple(n, srs, linear)
    if h % step or w % step:
      raise ValueError(
          f'image_size {(h, w)} is not a multiple of {step}: a PVT v2 config is held to exact '
          f'pyramids (stage maps H/4 ... H/{2 ** (n + 1)}, each a multiple of its spatial-reduction '
          'ratio, so no convolution drops edge rows); the module itself also runs other sizes '
          'with ceil-sized maps, as timm does')

  def forward_macs(self, fields, num_classes, image_size, channels=3) -> int:
    return forward_macs(fields, num_classes, hw(image_size), channels)

  def summary_rows(self, fields, image_size) -> list[str]:
    srs = fields.get('sr_ratios', _B_WIDE['sr_ratios'])
    rows = []
    for i, (h, w) in enumerate(pvt_models.stage_sizes(*hw(image_size), len(fields['depths']))):
      kv = ('7x7 pooled' if fields.get('linear') else
            f'{h // srs[i]}x{w // srs[i]}' if srs[i] > 1 else 'all')
      rows.append(f'stage {i}: {h}x{w} tokens, width {fields["embed_dims"][i]}, '
                  f'{fields["depths"][i]} blocks of {fields["num_heads"][i]} heads, '
                  f'keys/values {kv}')
    return rows

  def matches(self, flat) -> bool:
    return 'patch_embed/proj/kernel' in flat and 'stages_0/blocks_0/attn/q/kernel' in flat

  def infer(self, flat, *, model_config=None, image_size=None) -> Architecture:
    """Reads the architecture off the shapes. The parameters do not depend on the resolution, so
    the image size is the one given, else 224 (timm's)."""
    found = found_fields(flat)
    cfg = dict(model_config or {})
    check_sizes(found, cfg, ARCH_FIELDS, cfg.get('name', ''))
    cfg.update(found)
    num_classes = int(np.shape(flat['head/kernel'])[1]) if 'head/kernel' in flat else None
    channels = int(np.shape(flat[self.stem_kernel])[2])
    return Architecture(cfg, num_classes, hw(image_size if image_size is not None else 224),
                        channels, family=self.name)

  # ---- timm ----
  def reads_timm(self, architecture, keys) -> bool:
    if architecture:
      return architecture.startswith(self.timm_prefixes)
    return 'patch_embed.proj.weight' in keys and 'stages.0.blocks.0.attn.q.weight' in keys

  def to_timm(self, flat, arch):
    # pylint: disable-next=import-outside-toplevel
    from vit_jax.families.vit_interop import timm_pretrained_cfg
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
    fields = self.normalize_fields(fields)
    if np.ndim(fields['num_heads']) == 0:
      fields['num_heads'] = (int(fields['num_heads']),) * 4
    flat = from_timm(state, fields)
    size = args.get('img_size') or (config.get('pretrained_cfg') or {}).get('input_size', [0])[1:]
    arch = self.infer(flat, model_config=fields, image_size=size or None)
    pcfg = config.get('pretrained_cfg') or {}
    if pcfg.get('mean') and pcfg.get('std'):
      arch.mean, arch.std = tuple(pcfg['mean']), tuple(pcfg['std'])
    elif arch.channels == 3:  # timm's pvt_v2 default_cfg
      arch.mean, arch.std = IMAGENET
    return flat, arch, []


FAMILY = PvtFamily()
