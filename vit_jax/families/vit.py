"""The ViT family: "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2021), Google's names.

The file layout is Google's released one: `embedding`, `cls`, `Transformer/posembed_input/
pos_embedding`, `Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1,
LayerNorm_2, MlpBlock_3}`, `Transformer/encoder_norm`, `MAPHead_0`, `pre_logits`, `head`. A module
with `scan=True` stacks the blocks as `Transformer/encoderblock` with a leading [L] axis (big_vision);
`to_file_layout` / `to_module_layout` convert. The family's interop (timm, Hugging Face, Google's
npz) is `vit_interop.py` (its timm maps shared with the hybrid and DeiT families) with
`vit_hf_interop.py`; this module imports neither.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any, Mapping, Optional

import numpy as np

from vit_jax.families import resample
from vit_jax.families.base import Architecture, Family, Flat, aux_attention_fn, check_sizes
from vit_jax.models import resize
from vit_jax.models import tokens as tokens_lib
from vit_jax.models import vit as vit_models
from vit_jax.shapes import hw

POSEMB_KEY = 'Transformer/posembed_input/pos_embedding'
BLOCK = re.compile(r'^Transformer/encoderblock_(\d+)/')

# size: (hidden_size D, num_layers L, num_heads, mlp_dim); the paper's Table 1 plus small CPU models.
SIZES = {
    'Ti': (192, 12, 3, 768), 'S': (384, 12, 6, 1536), 'B': (768, 12, 12, 3072),
    'L': (1024, 24, 16, 4096), 'H': (1280, 32, 16, 5120),
    'Mini': (128, 6, 4, 256), 'Micro': (96, 4, 3, 192),
    'Little': (320, 14, 5, 1792),  # timm's vit_little (mlp_ratio 5.6)
}


def vit_fields(size: str, patch: int, **extra: Any) -> dict[str, Any]:
  d, layers, heads, mlp = SIZES[size]
  return dict(patch_size=patch, hidden_size=d, num_layers=layers, num_heads=heads, mlp_dim=mlp,
              classifier='token', posemb='learned', representation_size=None, **extra)


MODELS: dict[str, dict[str, Any]] = {
    f'ViT-{size}_{patch}': vit_fields(size, patch)
    for size, patch in (('Ti', 16), ('S', 16), ('S', 32), ('B', 16), ('B', 32), ('B', 8),
                        ('L', 16), ('L', 32), ('H', 14), ('Mini', 4), ('Mini', 7), ('Micro', 4),
                        ('Micro', 7))}
# Google's `testing` config at patch 4: a 2-layer width-32 model for unit tests.
MODELS['ViT-testing'] = dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                             classifier='token', posemb='learned', representation_size=None)
# The ViTs people load today, as fields of this family (models/vit.py), each under timm's name's
# counterpart; parameters at 1000 classes and timm's input size (DINOv2 518, ViT-Little 256).
DINO_LS = 1e-5  # timm's init_values of DINOv2 and its sbb ViTs; DeiT III's is 1e-6
MODELS.update({
    # deit3_{small,base}_patch16_224: LayerScale, no position embedding on the class token.
    'DeiT3-S_16': vit_fields('S', 16, act='gelu', layer_scale=1e-6, no_embed_class=True),
    'DeiT3-B_16': vit_fields('B', 16, act='gelu', layer_scale=1e-6, no_embed_class=True),
    # vit_{small,base}_patch14[_reg4]_dinov2: LayerScale; with registers, no_embed_class.
    'DINOv2-S_14': vit_fields('S', 14, act='gelu', layer_scale=DINO_LS),
    'DINOv2-S_14-reg4': vit_fields('S', 14, act='gelu', layer_scale=DINO_LS, num_registers=4,
                                   no_embed_class=True),
    'DINOv2-B_14-reg4': vit_fields('B', 14, act='gelu', layer_scale=DINO_LS, num_registers=4,
                                   no_embed_class=True),
    # vit_base_patch16_siglip[_gap]_224: no class token; attention pooling or the mean. big_vision's
    # GELU is the tanh form (timm's port uses the exact one; a checkpoint says which).
    'SigLIP-B_16': {**vit_fields('B', 16), 'classifier': 'map'},
    'SigLIP-B_16-gap': {**vit_fields('B', 16), 'classifier': 'gap'},
    # flexivit_small (Beyer et al., 2023): one model for all patch sizes. Stored at patch 16 and
    # 240 px (timm's 15x15 table, no row for the class token: big_vision adds the position
    # embedding before prepending it); another patch size is a PI-resize of the kernel
    # (`models/resize.py`), at transfer or at call time (`patch_size=`). big_vision's GELU, the
    # tanh form, as SigLIP's.
    'FlexiViT-S': vit_fields('S', 16, no_embed_class=True),
    # vit_little_patch16_reg4_gap_256: registers, the mean of the patches, then fc_norm.
    'ViT-Little_16-reg4-gap': {**vit_fields('Little', 16, act='gelu', layer_scale=DINO_LS,
                                            num_registers=4, no_embed_class=True, fc_norm=True),
                               'classifier': 'gap'},
})

SIZE_FIELDS = ('patch_size', 'hidden_size', 'num_layers', 'num_heads', 'mlp_dim')
# Fields of the later ViTs that a parameter set shows (present or absent).
VARIANT_FIELDS = ('num_registers', 'fc_norm', 'layer_scale')

# Megatron tensor parallelism (specs of the unscanned parameter; a scanned [L] axis is skipped):
# q/k/v kernels [D, heads, K] and biases [heads, K] split heads; out [heads, K, D] splits heads;
# MLP Dense_0 [D, M] splits M (column parallel), Dense_1 [M, D] splits M (row parallel). The patch
# embedding, position table, head and pre-logits stay replicated under `tensor` (FSDP shards them).
TENSOR_RULES = (
    (r'MultiHeadDotProductAttention_\d+/(query|key|value)/kernel$', (None, 'tensor', None)),
    (r'MultiHeadDotProductAttention_\d+/(query|key|value)/bias$', ('tensor', None)),
    (r'MultiHeadDotProductAttention_\d+/out/kernel$', ('tensor', None, None)),
    (r'MlpBlock_\d+/Dense_0/kernel$', (None, 'tensor')),
    (r'MlpBlock_\d+/Dense_0/bias$', ('tensor',)),
    (r'MlpBlock_\d+/Dense_1/kernel$', ('tensor', None)),
    (r'(^|/)(embedding|pre_logits|head(_dist)?)/kernel$', ()),
    (r'(^|/)pos_embedding$', ()),
    # Small by design: [1, R, D] registers and [D] LayerScale vectors, replicated deliberately.
    (r'(^|/)registers$', ()),
    (r'LayerScale_\d+/scale$', ()),
)


def transformer_macs(n: int, d: int, m: int, layers: int) -> int:
  """MACs of `layers` pre-LN blocks over n tokens of width d with an MLP of m units."""
  return layers * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)


def head_macs(fields: Mapping[str, Any], n: int, num_classes: Optional[int], heads: int = 1) -> int:
  """Pooling head (MAP), pre-logits and classifier head(s) MACs."""
  d, m = fields['hidden_size'], fields['mlp_dim']
  macs = 0
  if fields.get('classifier') == 'map':
    macs += 2 * d * d + 2 * n * d * d + 2 * n * d + 2 * d * m
  width = d
  if fields.get('representation_size'):
    macs += d * fields['representation_size']
    width = fields['representation_size']
  return macs + heads * width * (num_classes or 0)


def unstack_blocks(tree: Any) -> Any:
  """Scanned -> unscanned: `Transformer/encoderblock` [L, ...] -> `encoderblock_{i}`."""
  enc = dict(tree.get('Transformer', {}))
  if 'encoderblock' not in enc:
    return tree
  import jax  # pylint: disable=import-outside-toplevel
  stacked = enc.pop('encoderblock')
  depth = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(depth):
    enc[f'encoderblock_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return {**tree, 'Transformer': enc}


def stack_blocks(tree: Any) -> Any:
  """Unscanned -> scanned: `encoderblock_{0..L-1}` stacked into `Transformer/encoderblock`."""
  import jax  # pylint: disable=import-outside-toplevel
  enc = dict(tree.get('Transformer', {}))
  indices = sorted(int(k.rsplit('_', 1)[1]) for k in enc if re.fullmatch(r'encoderblock_\d+', k))
  if not indices:
    return tree
  if indices != list(range(len(indices))):
    raise ValueError(f'encoder blocks are not numbered 0..{len(indices) - 1}: {indices}')
  blocks = [enc.pop(f'encoderblock_{i}') for i in indices]
  stack = np.stack if isinstance(jax.tree.leaves(blocks[0])[0], np.ndarray) else jax.numpy.stack
  enc['encoderblock'] = jax.tree.map(lambda *xs: stack(xs), *blocks)
  return {**tree, 'Transformer': enc}


def fixed_posemb(fields: Mapping[str, Any], grid: tuple[int, int], prefix: int) -> Optional[np.ndarray]:
  """[1, prefix + gh*gw, D] values of a `sincos2d` or `none` position embedding (None for learned):
  how a target with only learned embeddings expresses this model at this grid."""
  kind = fields.get('posemb', 'learned')
  if kind == 'learned':
    return None
  d = fields['hidden_size']
  pe = (vit_models.sincos_2d(*grid, d) if kind == 'sincos2d'
        else np.zeros((1, grid[0] * grid[1], d), np.float32))
  return np.concatenate([np.zeros((1, prefix, d), np.float32), pe], axis=1)


class VitFamily(Family):
  """The plain ViT (and the transformer half of the hybrid and DeiT families)."""
  name = 'vit'
  models = MODELS
  head_prefixes = ('head/',)
  optional_prefixes = ('pre_logits/', 'MAPHead_0/', 'cls', 'registers', 'fc_norm/', POSEMB_KEY)
  stem_kernel = 'embedding/kernel'
  pre_logits_prefix = 'pre_logits/'
  tensor_rules = TENSOR_RULES
  layout_fields = ('scan',)
  test_model = 'ViT-testing'
  num_tokens = 1  # prefix tokens a 'token' classifier adds (DeiT: 2)
  capabilities = (tokens_lib.TOKEN_MASK, tokens_lib.KEEP, tokens_lib.PROMPTS, tokens_lib.TOKEN_MAP)
  intermediate_unit = 'blocks'
  call_time_size = 'dynamic_img_size'
  # The conv over pixel patches that a transfer to another patch size PI-resizes (FlexiViT); the
  # hybrid's `embedding` sits on the ResNet's feature map instead (None there).
  patch_kernel: Optional[str] = 'embedding/kernel'

  def module_class(self) -> type:
    return vit_models.VisionTransformer

  def patch_hw(self, fields: Mapping[str, Any]) -> tuple[int, int]:
    return hw(fields['patch_size'])

  def num_prefix(self, fields: Mapping[str, Any]) -> int:
    """Prefix tokens: the class token(s) of a 'token' classifier, then the registers."""
    cls = self.num_tokens if fields.get('classifier', 'token') == 'token' else 0
    return cls + int(fields.get('num_registers') or 0)

  def table_prefix(self, fields: Mapping[str, Any]) -> int:
    """Rows of the learned position table before its grid (0 with no_embed_class)."""
    return 0 if fields.get('no_embed_class') else self.num_prefix(fields)

  def _takes(self, field: str) -> bool:
    return field in self.module_class().__dataclass_fields__

  def grid(self, fields: Mapping[str, Any], image_size: Any) -> tuple[int, int]:
    (h, w), (ph, pw) = hw(image_size), self.patch_hw(fields)
    return h // ph, w // pw

  def validate(self, fields: Mapping[str, Any], image_size: tuple[int, int]) -> None:
    for key, allowed in (('classifier', vit_models.CLASSIFIERS), ('posemb', vit_models.POSEMBS),
                         ('act', vit_models.ACTIVATIONS)):
      if fields.get(key) is not None and fields[key] not in allowed:
        raise ValueError(f'model.{key} {fields[key]!r} is not one of {allowed}')
    (h, w), (ph, pw) = hw(image_size), self.patch_hw(fields)
    if h <= 0 or w <= 0 or h % ph or w % pw:
      raise ValueError(f'image_size {(h, w)} must be a positive multiple of the patch size '
                       f'{(ph, pw)} (model.patch_size)')
    if fields['hidden_size'] % fields['num_heads']:
      raise ValueError(f'model.hidden_size {fields["hidden_size"]} is not divisible by '
                       f'model.num_heads {fields["num_heads"]}')
    if fields.get('dynamic_resize', 'bilinear') not in vit_models.RESIZE_METHODS:
      raise ValueError(f'model.dynamic_resize {fields["dynamic_resize"]!r} is not one of '
                       f'{vit_models.RESIZE_METHODS}')
    if int(fields.get('num_registers') or 0) < 0:
      raise ValueError(f'model.num_registers {fields["num_registers"]} must be >= 0')
    if fields.get('layer_scale') is not None and not float(fields['layer_scale']) > 0:
      raise ValueError(f'model.layer_scale {fields["layer_scale"]!r}: LayerScale starts at a '
                       'positive value (1e-5, 1e-6), or None for none')

  def forward_macs(self, fields, num_classes, image_size, channels=3) -> int:
    (ph, pw), (gh, gw) = self.patch_hw(fields), self.grid(fields, image_size)
    d = fields['hidden_size']
    n = gh * gw + self.num_prefix(fields)
    macs = gh * gw * ph * pw * channels * d
    macs += transformer_macs(n, d, fields['mlp_dim'], fields['num_layers'])
    # A MAP head attends over the patch tokens only (registers and class token left out).
    return int(macs + head_macs(fields, gh * gw, num_classes, self.num_heads_out(fields)))

  def num_heads_out(self, fields: Mapping[str, Any]) -> int:
    del fields
    return 1

  def summary_rows(self, fields, image_size) -> list[str]:
    gh, gw = self.grid(fields, image_size)
    rows = [f'tokens: {gh}x{gw} patches + {self.num_prefix(fields)} prefix, width '
            f'{fields["hidden_size"]}, {fields["num_layers"]} blocks of {fields["num_heads"]} heads']
    extra = [what for what, on in (
        (f'{fields.get("num_registers")} registers', fields.get('num_registers')),
        (f'LayerScale (init {fields.get("layer_scale")})', fields.get('layer_scale') is not None),
        ('position embedding on the patches only', fields.get('no_embed_class')),
        ('final norm after pooling (fc_norm)', fields.get('fc_norm')),
        (f'any image size at call time ({fields.get("dynamic_resize", "bilinear")})',
         fields.get('dynamic_img_size'))) if on]
    return rows + ([f'variant: {", ".join(extra)}'] if extra else [])

  # ---- reading parameter trees ----
  def matches(self, flat) -> bool:
    return ('embedding/kernel' in flat and any(BLOCK.match(k) for k in flat)
            and 'conv_root/kernel' not in flat and 'dist_token' not in flat)

  def to_file_layout(self, tree):
    return unstack_blocks(tree)

  def to_module_layout(self, tree, fields):
    return stack_blocks(tree) if fields.get('scan') else tree

  def found_fields(self, flat: Mapping[str, Any]) -> dict[str, Any]:
    """The fields a flat dict determines (sizes, classifier, pre-logits)."""
    if 'embedding/kernel' not in flat:
      raise ValueError(f'not a {self.name} parameter set: no `embedding/kernel`')
    ph, pw, _, hidden = flat['embedding/kernel'].shape
    depth = 1 + max((int(m.group(1)) for k in flat if (m := BLOCK.match(k))), default=-1)
    if depth == 0:
      raise ValueError('no `Transformer/encoderblock_{i}` parameters')
    block = 'Transformer/encoderblock_0'
    heads = flat[f'{block}/MultiHeadDotProductAttention_1/query/kernel'].shape[1]
    mlp_dim = flat[f'{block}/MlpBlock_3/Dense_0/kernel'].shape[1]
    classifier = ('map' if any(k.startswith('MAPHead_0/') for k in flat)
                  else 'token' if 'cls' in flat else 'gap')
    rep = int(flat['pre_logits/kernel'].shape[1]) if 'pre_logits/kernel' in flat else None
    found = dict(patch_size=int(ph) if ph == pw else (int(ph), int(pw)), hidden_size=int(hidden),
                 num_layers=depth, num_heads=int(heads), mlp_dim=int(mlp_dim),
                 classifier=classifier, representation_size=rep)
    # The later ViTs' options, read off their parameters (the LayerScale start is not in them).
    variant = dict(num_registers=int(flat['registers'].shape[1]) if 'registers' in flat else 0,
                   fc_norm='fc_norm/scale' in flat,
                   layer_scale=DINO_LS if f'{block}/LayerScale_1/scale' in flat else None)
    if not variant['fc_norm'] and 'Transformer/encoder_norm/scale' not in flat:
      raise ValueError('the parameters have neither a final norm (Transformer/encoder_norm) nor '
                       'one after pooling (fc_norm)')
    # Only where present: a Google ViT's fields stay as they were.
    for key, value in variant.items():
      if value and not self._takes(key):
        raise ValueError(f'the {self.name} family has no {key}, but the parameters do')
      if value:
        found[key] = value
    return found

  def infer(self, flat, *, model_config=None, image_size=None) -> Architecture:
    """Reads the architecture off the shapes: everything but the image aspect ratio (a square grid
    is assumed from the position table), a fixed position embedding's kind (sincos2d assumed; the
    file cannot tell it from 'none') and LayerScale's starting value (the config's, else 1e-5).
    Whether the table has rows for the prefix tokens (no_embed_class) is read off its row count
    (given an image size, else from which count leaves a square grid)."""
    found = self.found_fields(flat)
    cfg = dict(model_config or {})
    check_sizes(found, cfg, SIZE_FIELDS + self.extra_size_fields, cfg.get('name', ''))
    if found.get('layer_scale') is not None and cfg.get('layer_scale') is not None:
      found['layer_scale'] = cfg['layer_scale']
    for key in VARIANT_FIELDS:  # the parameters decide: what they lack, the config cannot add
      if key not in found and cfg.get(key):
        cfg.pop(key)
    cfg.update(found)
    has_posemb = POSEMB_KEY in flat
    if has_posemb:
      if cfg.get('posemb', 'learned') != 'learned':
        raise ValueError(f'the checkpoint has learned position embeddings but the model config has '
                         f'posemb={cfg["posemb"]!r}')
      cfg['posemb'] = 'learned'
    else:
      if cfg.get('posemb') == 'learned':
        raise ValueError(f'the model config has posemb=learned but the checkpoint has no {POSEMB_KEY}')
      cfg['posemb'] = cfg.get('posemb') or 'sincos2d'
    ph, pw = self.patch_hw(cfg)
    size = hw(image_size) if image_size is not None else None
    if size is not None and (size[0] % ph or size[1] % pw):
      raise ValueError(f'image size {size} is not a multiple of the patch size {(ph, pw)}')
    if has_posemb:
      table_grid = self._read_table(flat[POSEMB_KEY].shape[1], cfg, size)
      size = size or (table_grid[0] * ph, table_grid[1] * pw)
    elif size is None:
      raise ValueError('the checkpoint has no learned position embeddings, so its image size is '
                       'unknown: give it (image_size)')
    return Architecture(cfg, self.num_classes_of(flat), size,
                        int(flat[self.stem_kernel].shape[2]), family=self.name)

  def _read_table(self, rows: int, cfg: dict[str, Any], size: Optional[tuple[int, int]]
                  ) -> tuple[int, int]:
    """The learned table's grid (`posemb_grid`, else the image's, else a square); whether its
    `rows` include the prefix tokens' sets cfg['no_embed_class'] (rows for them first, as Google's
    and the paper's tables, when both would fit)."""
    prefix = self.num_prefix(cfg)
    if not prefix or not self._takes('no_embed_class'):
      choices = [False]
    elif cfg.get('no_embed_class') is not None:
      choices = [bool(cfg['no_embed_class'])]
    else:
      choices = [False, True]
    known = (hw(cfg['posemb_grid']) if cfg.get('posemb_grid') is not None
             else self.grid(cfg, size) if size is not None else None)
    for no_embed in choices:
      n = rows - (0 if no_embed else prefix)
      grid = known or ((math.isqrt(n),) * 2 if n > 0 and math.isqrt(n) ** 2 == n else None)
      if grid and grid[0] * grid[1] == n:
        cfg.pop('no_embed_class', None)
        if no_embed:
          cfg['no_embed_class'] = True
        return grid
    what = f'the {known[0]}x{known[1]} grid of image size {size}' if known else 'a square grid'
    counts = ' or '.join(str(0 if c else prefix) for c in choices)
    raise ValueError(f'the position embeddings hold {rows} rows: not {what} after {counts} '
                     'prefix rows')

  extra_size_fields: tuple[str, ...] = ()

  def num_classes_of(self, flat: Mapping[str, Any]) -> Optional[int]:
    return int(flat['head/kernel'].shape[1]) if 'head/kernel' in flat else None

  # ---- transfer ----
  def adapt(self, src, target, src_arch, target_fields, image_size, method, report) -> Flat:
    """Position embeddings: a learned table dropped for a fixed target, prefix rows added or
    dropped when the classifier changes, the grid resampled to the target's (`method`); the patch
    kernel PI-resized to the target's patch size (FlexiViT; `resize.patch_method(method)`)."""
    src = dict(src)
    key = self.patch_kernel
    if key and key in src and key in target:
      src[key] = self._adapt_patch_kernel(src[key], tuple(target[key].shape), method, report)
    if POSEMB_KEY in src and POSEMB_KEY not in target:
      report.dropped.append(POSEMB_KEY)
      msg = (f'the target has posemb={target_fields.get("posemb")!r}: the checkpoint\'s learned '
             'position embeddings are not used (fixed ones are recomputed)')
      report.notes.append(msg)
      logging.warning(msg)
      src.pop(POSEMB_KEY)
    if POSEMB_KEY in target and POSEMB_KEY in src:
      src[POSEMB_KEY] = self._adapt_posemb(src, target, src_arch, target_fields, image_size,
                                           method, report)
    elif POSEMB_KEY in target:
      msg = ('the checkpoint has no learned position embeddings (a fixed or no position embedding):'
             ' the target\'s learned ones start from their initialisation')
      report.notes.append(msg)
      logging.warning(msg)
    return src

  def _adapt_posemb(self, src, target, src_arch, target_fields, image_size, method, report):
    pe = np.asarray(src[POSEMB_KEY])
    want = tuple(target[POSEMB_KEY].shape)
    old_prefix = self._src_table_prefix(src, src_arch)
    new_prefix = self.table_prefix({**target_fields, 'classifier': (
        'token' if 'cls' in target else 'gap')})
    if pe.shape[-1] != want[-1]:
      raise ValueError(f'{POSEMB_KEY}: the checkpoint has shape {tuple(pe.shape)}, the model '
                       f'{want}; the widths differ, which cannot be adapted')
    if tuple(pe.shape) == want and old_prefix == new_prefix:
      return pe
    old_grid = None
    if src_arch is not None and src_arch.family == self.name:
      old_grid = self.grid(src_arch.model_config, src_arch.image_size)
      if old_grid[0] * old_grid[1] != pe.shape[1] - old_prefix:
        old_grid = None
    old_grid = old_grid or resample.square_grid(pe.shape[1] - old_prefix)
    new_grid = (self.grid(target_fields, image_size) if image_size is not None and
                target_fields.get('patch_size') else resample.square_grid(want[1] - new_prefix))
    if new_grid[0] * new_grid[1] + new_prefix != want[1]:
      raise ValueError(f'image size {image_size} does not match the model\'s {want[1]} position '
                       'embeddings')
    if old_prefix != new_prefix:
      # Rows of other prefix tokens (a class token, registers, or none: no_embed_class) do not
      # carry over; the target's prefix rows, if any, start from its initialisation.
      dropped = ('dropped (all zero: no position embedding for those tokens, as the model)'
                 if not np.any(pe[:, :old_prefix]) else 'dropped')
      report.notes.append(f'{POSEMB_KEY}: {old_prefix} prefix rows in the checkpoint, '
                          f'{new_prefix} in the model: ' + (dropped if not new_prefix else
                                                            'the model\'s from its initialisation'))
      pe = np.concatenate([np.asarray(target[POSEMB_KEY])[:, :new_prefix].astype(pe.dtype),
                           pe[:, old_prefix:]], axis=1)
    out = resample.resample_posemb(pe, new_grid, num_prefix=new_prefix, old_grid=old_grid,
                                   method=method)
    if tuple(old_grid) != tuple(new_grid):
      report.reshaped.append((POSEMB_KEY, tuple(src[POSEMB_KEY].shape), tuple(out.shape)))
      report.notes.append(f'{POSEMB_KEY}: grid {old_grid[0]}x{old_grid[1]} -> '
                          f'{new_grid[0]}x{new_grid[1]} ({method})')
    return out

  def _adapt_patch_kernel(self, kernel, want: tuple[int, ...], method: str, report):
    """[ph, pw, C, D] -> the target's [ph', pw', C, D] by FlexiViT's PI-resize, so that a patch
    resized to the new size embeds as the old patch did; other differences (width, channels) are
    left to the generic transfer (which sums colour channels for a grey-scale target)."""
    kernel = np.asarray(kernel)
    if kernel.ndim != 4 or len(want) != 4 or kernel.shape[:2] == want[:2]:
      return kernel
    how = resize.patch_method(method)
    out = resize.pi_resize_kernel(kernel, want[:2], how)
    report.reshaped.append((self.patch_kernel, tuple(kernel.shape), tuple(out.shape)))
    report.notes.append(f'{self.patch_kernel}: patch {kernel.shape[0]}x{kernel.shape[1]} -> '
                        f'{want[0]}x{want[1]} (PI-resize, {how})')
    return out

  def _src_table_prefix(self, src: Flat, src_arch: Optional[Architecture]) -> int:
    """Prefix rows of a checkpoint's table: from its architecture, else class token and registers
    (with rows, as Google's and the paper's tables)."""
    if src_arch is not None and src_arch.family == self.name:
      return self.table_prefix(src_arch.model_config)
    registers = int(src['registers'].shape[1]) if 'registers' in src else 0
    return (self.num_tokens if 'cls' in src else 0) + registers

  # ---- inspection (vit_jax.eval.attention) ----
  def token_layout(self, arch):
    fields = arch.model_config
    return self.num_prefix(fields), self.grid(fields, arch.image_size), self.patch_hw(fields)

  def reads_class_token(self, arch):
    # Registers are prefix tokens that no pooling reads ('gap' and 'map' pool the patches).
    return arch.model_config.get('classifier', 'token') == 'token'

  def attention_fn(self, arch):
    return aux_attention_fn(arch)

  def position_table(self, flat, arch):
    _, (gh, gw), _ = self.token_layout(arch)
    prefix = self.table_prefix(arch.model_config)
    kind = arch.model_config.get('posemb', 'learned')
    if kind == 'learned':
      pe = np.asarray(flat[POSEMB_KEY], np.float32)[0, prefix:]
    elif kind == 'none':
      raise NotImplementedError(f'a position embedding is not defined for this {self.name} model: '
                                "it has posemb='none'")
    else:
      pe = fixed_posemb(arch.model_config, (gh, gw), prefix)[0, prefix:]
    if pe.shape[0] != gh * gw:
      raise ValueError(f'{POSEMB_KEY} holds {pe.shape[0]} patch rows, not the {gh}x{gw} grid of '
                       f'image size {arch.image_size}')
    return kind, pe.reshape(gh, gw, -1)


FAMILY = VitFamily()
