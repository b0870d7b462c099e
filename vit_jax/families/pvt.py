"""The PVT v2 family: registered sizes, FLOPs, tensor-parallel rules, architecture from shapes and
the descriptor. Its interop (the key map to and from timm's `pvt_v2_*` state dicts) is
`pvt_interop.py`.

Our parameter paths mirror timm's module names ('stages_1/blocks_0/attn/q', ...): attention kernels
keep the heads explicit (q [D, H, K], kv [D, 2, H, K], proj [H, K, D]), convs are HWIO (the
depth-wise conv [3, 3, 1, C]).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vit_jax.families.base import Architecture, Family, check_sizes
from vit_jax.models import pvt as pvt_models
from vit_jax.shapes import hw

# The fields PVT v2 b1-b5 share (and the defaults where a config omits them).
B_WIDE = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
               sr_ratios=(8, 4, 2, 1), linear=False)

# Model fields of each registered name (timm's pvt_v2_b* at 224 px, 1000 classes: the parameter
# counts in the comments are timm's and ours).
MODELS: dict[str, dict[str, Any]] = {
    'PVTv2-b0': dict(B_WIDE, embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),  # 3,666,760
    'PVTv2-b1': dict(B_WIDE, depths=(2, 2, 2, 2)),  # 14,009,000
    'PVTv2-b2': dict(B_WIDE, depths=(3, 4, 6, 3)),  # 25,362,856
    'PVTv2-b2_li': dict(B_WIDE, depths=(3, 4, 6, 3), linear=True),  # 22,553,512
    'PVTv2-b3': dict(B_WIDE, depths=(3, 4, 18, 3)),  # 45,238,696
    'PVTv2-b4': dict(B_WIDE, depths=(3, 8, 27, 3)),  # 62,556,072
    'PVTv2-b5': dict(B_WIDE, depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)),  # 81,956,008
    # A small PVT for Fashion-MNIST / CIFAR-size inputs (32 px): four stages of 8x8 ... 1x1 tokens,
    # about as many parameters as ViT-Mini_4 (configs/fashion_mnist_pvt.py).
    'PVTv2-mini': dict(B_WIDE, embed_dims=(32, 64, 96, 128), depths=(2, 2, 2, 2),
                       num_heads=(1, 2, 3, 4), mlp_ratios=(4, 4, 4, 4)),
    # For tests: 32x32 (or larger) images; every stage map >= its reduction ratio at 32 px.
    'PVTv2-tiny': dict(B_WIDE, embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1),
                       num_heads=(1, 1, 2, 2), mlp_ratios=(2, 2, 2, 2)),
}
_BLOCK = re.compile(r'^stages_(\d+)/blocks_(\d+)/')

# The model fields that define the architecture (what timm's constructor takes as well).
ARCH_FIELDS = ('embed_dims', 'depths', 'num_heads', 'mlp_ratios', 'sr_ratios', 'linear')


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
  srs = fields.get('sr_ratios', B_WIDE['sr_ratios'])
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
    srs = fields.get('sr_ratios', B_WIDE['sr_ratios'])
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
    srs = fields.get('sr_ratios', B_WIDE['sr_ratios'])
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


FAMILY = PvtFamily()
