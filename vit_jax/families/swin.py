"""The Swin Transformer family: registry sizes, FLOPs, tensor-parallel rules, architecture from
shapes, window-table adaptation and the `SwinFamily` descriptor (`FAMILY`). Its interop (the timm
key maps) is `swin_interop.py`; the relative-position table resampling is in `resample.py`.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vit_jax.families.base import Architecture, Family, Flat, check_sizes
from vit_jax.families.resample import resize_relative_position_bias, window_of_table
from vit_jax.models import swin as swin_models
from vit_jax.shapes import hw

_T = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_S = dict(_T, depths=(2, 2, 18, 2))
_B = dict(_S, embed_dim=128, num_heads=(4, 8, 16, 32))
_L = dict(_S, embed_dim=192, num_heads=(6, 12, 24, 48))
# Parameter counts at 224 px (Swin-B_384: 384 px) with 1000 classes equal timm 1.0.31's
# `swin_*_patch4_window{7,12}_{224,384}` (tests/test_swin.py).
MODELS: dict[str, dict[str, Any]] = {
    'Swin-T': dict(_T),                        # 28,288,354
    'Swin-S': dict(_S),                        # 49,606,258
    'Swin-B': dict(_B),                        # 87,768,224
    'Swin-L': dict(_L),                        # 196,532,476
    'Swin-B_384': dict(_B, window_size=12),    # 87,903,584 at 384 px
    # For Fashion-MNIST / CIFAR-size inputs: patch 2 and window 4 at 32 px (16x16, 8x8, 4x4 token
    # maps), about as many parameters as ViT-Mini_4 (configs/fashion_mnist_swin.py).
    'Swin-Mini': dict(patch_size=2, window_size=4, embed_dim=48, depths=(2, 2, 2),
                      num_heads=(3, 6, 12)),
    # Two stages of width 16/32 at patch 2: for unit tests at 16-32 px.
    'Swin-testing': dict(patch_size=2, window_size=4, embed_dim=16, depths=(2, 2),
                         num_heads=(1, 2)),
}
SIZE_FIELDS = ('patch_size', 'embed_dim', 'depths', 'num_heads')
TABLE = 'relative_position_bias_table'
# A block's parameters: stage_{s}/block_{b}/... (both 0-based).
BLOCK = re.compile(r'^stage_(\d+)/block_(\d+)/')


# ---------- reading shapes ----------

def count_stage_blocks(keys: Sequence[str], pattern: re.Pattern) -> list[int]:
  """Blocks per stage that `pattern` (groups: stage, block) finds among the keys; a ValueError
  unless stages and the blocks of each are numbered from 0 without gaps."""
  found: dict[int, set[int]] = {}
  for k in keys:
    if m := pattern.match(k):
      found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
  if sorted(found) != list(range(len(found))):
    raise ValueError(f'Swin stages are not numbered 0..{len(found) - 1}: {sorted(found)}')
  depths = []
  for s in range(len(found)):
    if sorted(found[s]) != list(range(len(found[s]))):
      raise ValueError(f'Swin stage {s} blocks are not numbered from 0: {sorted(found[s])}')
    depths.append(len(found[s]))
  return depths


def infer_fields(flat: Mapping[str, Any]) -> tuple[dict[str, Any], Optional[int], int]:
  """(size fields, num_classes, channels) of our flat Swin parameters; window_size is stage 0's
  table's (square windows assumed; a stage-0 map smaller than the window would have shrunk it)."""
  if 'patch_embed/kernel' not in flat or f'stage_0/block_0/attn/{TABLE}' not in flat:
    raise ValueError(f'not a Swin parameter set: no `patch_embed/kernel` and '
                     f'`stage_0/block_0/attn/{TABLE}`')
  p, _, channels, d = np.shape(flat['patch_embed/kernel'])
  depths = count_stage_blocks(list(flat), BLOCK)
  heads = tuple(int(np.shape(flat[f'stage_{s}/block_0/attn/{TABLE}'])[1])
                for s in range(len(depths)))
  window = window_of_table(int(np.shape(flat[f'stage_0/block_0/attn/{TABLE}'])[0]))
  hidden = np.shape(flat['stage_0/block_0/mlp/fc1/kernel'])[1]
  fields = dict(patch_size=int(p), embed_dim=int(d), depths=tuple(depths), num_heads=heads,
                window_size=window, mlp_ratio=float(hidden) / float(d))
  num_classes = int(np.shape(flat['head/kernel'])[1]) if 'head/kernel' in flat else None
  return fields, num_classes, int(channels)


# ---------- counting ----------

def forward_macs(fields: Mapping[str, Any], num_classes: Optional[int], image_size: Any,
                 channels: int = 3) -> int:
  """Multiply-accumulates of one image's forward pass (convolutions and matmuls).

  Window attention runs on the padded map (hp x wp tokens, as timm computes it): per block
  qkv + proj 4*C^2 and q k^T + attention x v 2*N*C per token (N = tokens per window); the MLP
  2*C*m per unpadded token; patch merging 4C * 2C per output token.
  """
  p, d = int(fields['patch_size']), int(fields['embed_dim'])
  depths = tuple(fields['depths'])
  grids = swin_models.stage_grids(hw(image_size), p, len(depths))
  ratio = float(fields.get('mlp_ratio', 4.0))
  macs = grids[0][0] * grids[0][1] * p * p * channels * d
  for s, ((h, w), depth) in enumerate(zip(grids, depths)):
    c = d * 2 ** s
    if s > 0:
      macs += h * w * (2 * c) * c  # 4 * (c/2) inputs -> c outputs
    (wh, ww), _ = swin_models.stage_windows((h, w), fields.get('window_size', 7))
    padded = (-(-h // wh) * wh) * (-(-w // ww) * ww)
    macs += depth * (padded * (4 * c * c + 2 * wh * ww * c) + h * w * 2 * c * int(c * ratio))
  return int(macs + d * 2 ** (len(depths) - 1) * (num_classes or 0))


# ---------- the family descriptor ----------

# Megatron tensor parallelism: q/k/v kernels [C, 3, heads, K] and the bias table [rows, heads]
# split heads, proj [heads, K, C] too (row parallel); fc1 [C, M] splits M, fc2 [M, C] too. The
# patch embedding, merging reductions and head stay replicated under `tensor`.
TENSOR_RULES = (
    (r'attn/qkv/kernel$', (None, None, 'tensor', None)),
    (r'attn/qkv/bias$', (None, 'tensor', None)),
    (r'attn/proj/kernel$', ('tensor', None, None)),
    (rf'attn/{TABLE}$', (None, 'tensor')),
    (r'mlp/fc1/kernel$', (None, 'tensor')),
    (r'mlp/fc1/bias$', ('tensor',)),
    (r'mlp/fc2/kernel$', ('tensor', None)),
    (r'(^|/)(patch_embed|reduction|head)/kernel$', ()),
)


def stage_tables(fields: Mapping[str, Any], image_size: Any) -> list[tuple[int, int]]:
  """The (wh, ww) window whose bias table each stage's blocks hold at this image size."""
  grids = swin_models.stage_grids(hw(image_size), int(fields['patch_size']),
                                  len(fields['depths']))
  return [swin_models.stage_windows(g, fields.get('window_size', 7))[0] for g in grids]


class SwinFamily(Family):
  """Swin Transformer (`vit_jax.models.swin`): window tables depend on the image size."""
  name = 'swin'
  models = MODELS
  head_prefixes = ('head/',)
  stem_kernel = 'patch_embed/kernel'
  tensor_rules = TENSOR_RULES
  test_model = 'Swin-testing'
  test_image_size = 32
  default_resize = 'bicubic'  # the Swin authors' and timm's choice for the bias tables
  inspect_note = ('Swin attends within shifted local windows with a relative position bias: it has '
                  'no global attention map, class token or absolute position embedding')
  _HIER = ('its windows and patch merging need the full patch grid and return a coarser map per '
           'stage, so patches cannot be dropped, no prompt tokens fit a window, and no per-patch '
           'token map comes out')
  lacks = dict.fromkeys(('keep', 'prompts', 'token_map', 'token_mask'), _HIER)

  def module_class(self) -> type:
    return swin_models.SwinTransformer

  def validate(self, fields: Mapping[str, Any], image_size: tuple[int, int]) -> None:
    swin_models.check_fields(fields['embed_dim'], fields['depths'], fields['num_heads'],
                             fields.get('window_size', 7), fields.get('act') or 'gelu')
    swin_models.stage_grids(hw(image_size), int(fields['patch_size']), len(fields['depths']))

  def forward_macs(self, fields, num_classes, image_size, channels=3) -> int:
    return forward_macs(fields, num_classes, image_size, channels)

  def summary_rows(self, fields, image_size) -> list[str]:
    rows = []
    grids = swin_models.stage_grids(hw(image_size), int(fields['patch_size']),
                                    len(fields['depths']))
    for s, ((h, w), depth, heads) in enumerate(zip(grids, fields['depths'], fields['num_heads'])):
      (wh, ww), (sh, sw) = swin_models.stage_windows((h, w), fields.get('window_size', 7))
      pad = ', padded' if h % wh or w % ww else ''
      rows.append(f'stage {s}: {h}x{w} tokens, width {fields["embed_dim"] * 2 ** s}, {depth} '
                  f'blocks of {heads} heads, windows {wh}x{ww} shifted by {sh}x{sw}{pad}')
    return rows

  # ---- reading parameter trees ----
  def matches(self, flat) -> bool:
    return 'patch_embed/kernel' in flat and f'stage_0/block_0/attn/{TABLE}' in flat

  def infer(self, flat, *, model_config=None, image_size=None) -> Architecture:
    """Reads the sizes off the shapes. The window is the config's, else stage 0's table's; without
    an image size, the one whose last stage is one window (224 for window 7, 384 for 12), or the
    size a shrunken last-stage table implies. Tables that do not fit the size are a ValueError."""
    found, num_classes, channels = infer_fields(flat)
    cfg = dict(model_config or {})
    check_sizes(found, cfg, SIZE_FIELDS, cfg.get('name', ''))
    window = cfg.get('window_size') or found['window_size']
    cfg.update(found, window_size=window)
    last = len(found['depths']) - 1
    if image_size is None:
      rows = int(np.shape(flat[f'stage_{last}/block_0/attn/{TABLE}'])[0])
      side = min(window_of_table(rows), min(hw(window)))
      image_size = side * found['patch_size'] * 2 ** last
    size = hw(image_size)
    self.validate(cfg, size)
    for s, (wh, ww) in enumerate(stage_tables(cfg, size)):
      rows = int(np.shape(flat[f'stage_{s}/block_0/attn/{TABLE}'])[0])
      if rows != (2 * wh - 1) * (2 * ww - 1):
        raise ValueError(f'stage {s}: the bias tables hold {rows} offsets, but window_size '
                         f'{window} at {size[0]}x{size[1]} px gives {wh}x{ww} windows '
                         f'({(2 * wh - 1) * (2 * ww - 1)} offsets); give the image size or '
                         'window the checkpoint was built for')
    return Architecture(cfg, num_classes, size, channels, family=self.name)

  # ---- transfer ----
  def check_transfer(self, src_arch, target_fields, image_size) -> None:
    if image_size is not None and target_fields.get('patch_size'):
      self.validate(target_fields, image_size)

  def adapt(self, src, target, src_arch, target_fields, image_size, method, report) -> Flat:
    """Relative position bias tables resized (`method`) to the target's window at its size."""
    src = dict(src)
    new_windows = old_windows = None
    if image_size is not None and target_fields.get('patch_size'):
      new_windows = stage_tables(target_fields, image_size)
    if src_arch is not None and src_arch.family == self.name:
      old_windows = stage_tables(src_arch.model_config, src_arch.image_size)
    resized = 0
    for key in target:
      if not key.endswith(TABLE) or key not in src or src[key].shape == target[key].shape:
        continue
      s = int(BLOCK.match(key).group(1))
      old = old_windows[s] if old_windows else window_of_table(src[key].shape[0])
      new = new_windows[s] if new_windows else window_of_table(target[key].shape[0])
      if src[key].shape[1] != target[key].shape[1]:
        continue  # Different head counts: the generic shape check reports it.
      value = resize_relative_position_bias(src[key], old, new, method)
      report.reshaped.append((key, tuple(src[key].shape), tuple(value.shape)))
      src[key], resized = value, resized + 1
    if resized:
      report.notes.append(f'relative position bias tables resized to the new windows ({method})')
    return src


FAMILY = SwinFamily()
