"""The Swin Transformer family: registry sizes, timm key maps, relative-position-bias resizing,
FLOPs, tensor-parallel rules and the `SwinFamily` descriptor (`FAMILY`).

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

import math
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vit_jax.families import resample
from vit_jax.families.base import IMAGENET, Architecture, Family, Flat, check_sizes
from vit_jax.families.base import hw as _hw
from vit_jax.models import swin as swin_models

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
    # Two stages of width 16/32 at patch 2: for unit tests at 16-32 px.
    'Swin-testing': dict(patch_size=2, window_size=4, embed_dim=16, depths=(2, 2),
                         num_heads=(1, 2)),
}
_TIMM_SIZES = {'tiny': _T, 'small': _S, 'base': _B, 'large': _L}
_TIMM_NAME = re.compile(r'^swin_(tiny|small|base|large)_patch(\d+)_window(\d+)_(\d+)$')
SIZE_FIELDS = ('patch_size', 'embed_dim', 'depths', 'num_heads')
TABLE = 'relative_position_bias_table'
_BLOCK = re.compile(r'^stage_(\d+)/block_(\d+)/')
_TIMM_BLOCK = re.compile(r'^layers\.(\d+)\.blocks\.(\d+)\.')
# (our sub-module path inside a block, timm's, kind): see `_pairs`.
_BLOCK_NAMES = (('norm1', 'norm1', 'norm'), ('attn/qkv', 'attn.qkv', 'qkv'),
                ('attn/proj', 'attn.proj', 'proj'), ('norm2', 'norm2', 'norm'),
                ('mlp/fc1', 'mlp.fc1', 'dense'), ('mlp/fc2', 'mlp.fc2', 'dense'))


def _numpy(v: Any) -> np.ndarray:
  """numpy view of an array or a (CPU) torch tensor."""
  return np.asarray(v.detach().cpu().numpy() if hasattr(v, 'detach') else v)


# ---------- resolution ----------

RESIZE_METHODS = ('bicubic', 'bilinear', 'timm')


def _geometric_offsets(src: int, dst: int) -> np.ndarray:
  """Where timm places the `src` source offsets among the `dst` target offsets: outward steps
  growing geometrically so that the outermost source offset lands at the target's edge (BEiT)."""
  half = src // 2
  left, right = 1.01, 1.5
  while right - left > 1e-6:
    q = (left + right) / 2.0
    if (1.0 - q ** half) / (1.0 - q) > dst // 2:
      right = q
    else:
      left = q
  steps = np.cumsum([1.0] + [q ** (i + 1) for i in range(half - 1)]) if half else np.zeros(0)
  return np.concatenate([-steps[::-1], [0.0], steps])


def resize_relative_position_bias(table: np.ndarray, old_window: Any, new_window: Any,
                                  method: str = 'bicubic') -> np.ndarray:
  """Resamples a [(2*wh-1)*(2*ww-1), heads] relative position bias table to a new window.

  The table's rows are a (2*wh-1) x (2*ww-1) grid of offsets (dy, dx) in row-major order; each
  head's grid is resampled like an image.

  Args:
    table: [(2*wh-1)*(2*ww-1), heads].
    old_window, new_window: M or (wh, ww) of the table and of the result.
    method: 'bicubic' (antialiased, half-pixel centres: timm's `resize_rel_pos_bias_table_simple`
      and `vit_jax.families.resample`), 'bilinear' (corner-aligned linear, scipy zoom) or 'timm'
      (timm 1.0's default `resize_rel_pos_bias_table`, used by its Swin checkpoint filter and
      `set_input_size`: the old offsets spread geometrically over the new range, then linear
      interpolation with the edge values held beyond the outermost ones).

  Returns:
    [(2*wh'-1)*(2*ww'-1), heads] in the table's dtype; the table itself when the windows are equal.
  """
  if method not in RESIZE_METHODS:
    raise ValueError(f'relative position bias resize method {method!r} is not one of '
                     f'{RESIZE_METHODS}')
  table = np.asarray(table)
  (oh, ow), (nh, nw) = _hw(old_window), _hw(new_window)
  if table.ndim != 2 or table.shape[0] != (2 * oh - 1) * (2 * ow - 1):
    raise ValueError(f'a relative position bias table of window {(oh, ow)} must be '
                     f'[{(2 * oh - 1) * (2 * ow - 1)}, heads], got {table.shape}')
  if (oh, ow) == (nh, nw):
    return table
  heads = table.shape[1]
  grid = table.reshape(2 * oh - 1, 2 * ow - 1, heads)
  if method != 'timm':
    return resample.resample_grid(grid, (2 * nh - 1, 2 * nw - 1), method).reshape(-1, heads)
  work = grid.astype(np.float64)
  for axis, (src, dst) in enumerate(((2 * oh - 1, 2 * nh - 1), (2 * ow - 1, 2 * nw - 1))):
    xp, x = _geometric_offsets(src, dst), np.arange(-(dst // 2), dst // 2 + 1, dtype=np.float64)
    # Bilinear is separable; np.interp holds the edge values outside [xp[0], xp[-1]] as timm does.
    work = np.apply_along_axis(lambda v, x=x, xp=xp: np.interp(x, xp, v), axis, work)
  return work.reshape(-1, heads).astype(table.dtype)


def window_of_table(rows: int) -> int:
  """M of a square-window table with `rows` = (2M-1)^2 rows; ValueError otherwise."""
  side = math.isqrt(rows)
  if side * side != rows or side % 2 == 0:
    raise ValueError(f'{rows} relative position rows are not (2M-1)^2 for a square window M; '
                     'give the window size explicitly')
  return (side + 1) // 2


# ---------- timm ----------

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
  h, w = _hw(image_size)
  window = fields.get('window_size', 7)
  return dict(img_size=[h, w], patch_size=int(fields['patch_size']), in_chans=channels,
              num_classes=num_classes or 0, embed_dim=int(fields['embed_dim']),
              depths=list(fields['depths']), num_heads=list(fields['num_heads']),
              window_size=window if np.ndim(window) == 0 else list(window),
              mlp_ratio=float(fields.get('mlp_ratio', 4.0)))


def _num_blocks(keys: Sequence[str], pattern: re.Pattern) -> list[int]:
  """Blocks per stage found among the keys, checking both are numbered from 0 without gaps."""
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
  _check_depths(_num_blocks(list(flat), _BLOCK), fields, 'the parameters')
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
  state = {k: _numpy(v) for k, v in state.items()
           if not k.endswith(('relative_position_index', 'attn_mask'))}
  if not is_timm_swin(list(state)):
    raise ValueError('not a timm SwinTransformer state dict: no `patch_embed.proj.weight` and '
                     f'`layers.0.blocks.0.attn.{TABLE}` (Swin V2 is not supported)')
  if 'layers.0.downsample.reduction.weight' in state:
    raise ValueError('this is the original Swin layout (patch merging at the end of each stage); '
                     'load it with timm once (its checkpoint_filter_fn renames it) and save again')
  _check_depths(_num_blocks(list(state), _TIMM_BLOCK), fields, 'the timm state dict')
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


# ---------- reading shapes ----------

def infer_fields(flat: Mapping[str, Any]) -> tuple[dict[str, Any], Optional[int], int]:
  """(size fields, num_classes, channels) of our flat Swin parameters; window_size is stage 0's
  table's (square windows assumed; a stage-0 map smaller than the window would have shrunk it)."""
  if 'patch_embed/kernel' not in flat or f'stage_0/block_0/attn/{TABLE}' not in flat:
    raise ValueError(f'not a Swin parameter set: no `patch_embed/kernel` and '
                     f'`stage_0/block_0/attn/{TABLE}`')
  p, _, channels, d = np.shape(flat['patch_embed/kernel'])
  depths = _num_blocks(list(flat), _BLOCK)
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
  grids = swin_models.stage_grids(_hw(image_size), p, len(depths))
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
  grids = swin_models.stage_grids(_hw(image_size), int(fields['patch_size']),
                                  len(fields['depths']))
  return [swin_models.stage_windows(g, fields.get('window_size', 7))[0] for g in grids]


class SwinFamily(Family):
  """Swin Transformer (`vit_jax.models.swin`): window tables depend on the image size."""
  name = 'swin'
  models = MODELS
  head_prefixes = ('head/',)
  stem_kernel = 'patch_embed/kernel'
  tensor_rules = TENSOR_RULES
  timm_prefixes = ('swin_',)
  test_model = 'Swin-testing'
  test_image_size = 32

  def module_class(self) -> type:
    return swin_models.SwinTransformer

  def validate(self, fields: Mapping[str, Any], image_size: tuple[int, int]) -> None:
    swin_models.check_fields(fields['embed_dim'], fields['depths'], fields['num_heads'],
                             fields.get('window_size', 7), fields.get('act') or 'gelu')
    swin_models.stage_grids(_hw(image_size), int(fields['patch_size']), len(fields['depths']))

  def forward_macs(self, fields, num_classes, image_size, channels=3) -> int:
    return forward_macs(fields, num_classes, image_size, channels)

  def summary_rows(self, fields, image_size) -> list[str]:
    rows = []
    grids = swin_models.stage_grids(_hw(image_size), int(fields['patch_size']),
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
      side = min(window_of_table(rows), min(_hw(window)))
      image_size = side * found['patch_size'] * 2 ** last
    size = _hw(image_size)
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
      s = int(_BLOCK.match(key).group(1))
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

  # ---- timm ----
  def reads_timm(self, architecture, keys) -> bool:
    if architecture:
      return architecture.startswith(self.timm_prefixes)
    return is_timm_swin(list(keys))

  def to_timm(self, flat, arch):
    from vit_jax.families import vit_interop  # pylint: disable=import-outside-toplevel
    cfg = arch.model_config
    if cfg.get('act', 'gelu') != 'gelu':
      raise ValueError(f'timm\'s Swin always uses the exact GELU, but this model has act='
                       f'{cfg["act"]!r}; timm could not reproduce its logits')
    num_classes = arch.num_classes or 0
    args = timm_model_args(cfg, num_classes, arch.image_size, arch.channels)
    pretrained_cfg = vit_interop.timm_pretrained_cfg(arch, num_classes, classifier='head.fc')
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
    fields['depths'] = tuple(_num_blocks(list(state), _TIMM_BLOCK))
    fields = self.normalize_fields(fields)
    flat = from_timm(state, fields)
    size = args.get('img_size') or (config.get('pretrained_cfg') or {}).get('input_size', [0])[1:]
    if not size and _TIMM_NAME.match(architecture):
      size = int(architecture.rsplit('_', 1)[1])  # swin_..._224
    arch = self.infer(flat, model_config=fields, image_size=size or None)
    pcfg = config.get('pretrained_cfg') or {}
    if pcfg.get('mean') and pcfg.get('std'):
      arch.mean, arch.std = tuple(pcfg['mean']), tuple(pcfg['std'])
    elif arch.channels == 3:  # timm's Swin default_cfg
      arch.mean, arch.std = IMAGENET
    return flat, arch, []


FAMILY = SwinFamily()
