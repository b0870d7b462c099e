"""The EVA family (EVA-02 and timm's RoPE ViTs, `vit_jax.models.eva.Eva`) and what it shares with
BEiT (`families/beit.py`): the descriptor of a `Backbone` model.

File layout (ours, '/'-joined): patch_embed/{kernel, bias}, cls, reg, pos_embed, block_{i}/{norm1,
attn/{qkv/kernel, q_bias, v_bias, norm, relative_position_bias_table, proj}, gamma_1, norm2,
mlp/{fc1_g, fc1_x | fc1, norm, fc2}, gamma_2}, norm, fc_norm, head. The timm key maps are in
`eva_interop.py`. Rotary embeddings are no parameters: they follow from the fields (`rope`,
`rope_ref_grid`) and the image size, so moving a checkpoint to another resolution moves them by
itself; the learned table, where there is one, is resampled (bicubic, as timm). Hugging Face
transformers has no EVA-02 (`eva_interop.py` refuses the export with that reason).
"""
from __future__ import annotations

import logging
import re
from typing import Any, Mapping

import numpy as np

from vit_jax.families import resample
from vit_jax.families.base import Architecture, Family, Flat, aux_attention_fn, check_sizes
from vit_jax.models import eva as eva_models
from vit_jax.models import tokens as tokens_lib
from vit_jax.shapes import hw

BLOCK = re.compile(r'^block_(\d+)/')
QKV = 'block_0/attn/qkv/kernel'
TABLE = 'relative_position_bias_table'
SIZE_FIELDS = ('patch_size', 'hidden_size', 'num_layers', 'num_heads', 'mlp_dim')

_EVA02 = dict(patch_size=14, num_layers=12, classifier='gap', class_token=True, posemb='learned',
              rope=True, rope_ref_grid=(16, 16), mlp='swiglu')
MODELS: dict[str, dict[str, Any]] = {
    # timm `eva02_tiny_patch14_224` (5,695,144 parameters at 224 with 1000 classes) and
    # `eva02_small_patch14_224` (22,006,120): SwiGLU of 8/3 D units, RoPE over a 16x16 grid.
    'EVA02-Ti_14': dict(_EVA02, hidden_size=192, num_heads=3, mlp_dim=512),
    'EVA02-S_14': dict(_EVA02, hidden_size=384, num_heads=6, mlp_dim=1024),
    # timm `vit_base_patch16_rope_reg1_gap_256` (86,425,576 at 256): a plain ViT-B/16 with RoPE
    # instead of a position table, one register, LayerScale and the mean of the patches.
    'ViT-B_16-rope-reg1-gap': dict(
        patch_size=16, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, classifier='gap',
        class_token=False, num_registers=1, posemb='none', rope=True, rope_ref_grid=(16, 16),
        mlp='gelu', layer_scale=1e-5),
    # Unit tests at 16 px: every option at once (class token, a register, table, RoPE, SwiGLU,
    # LayerScale).
    'EVA-testing': dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                        classifier='gap', class_token=True, num_registers=1, posemb='learned',
                        rope=True, rope_ref_grid=(4, 4), mlp='swiglu', layer_scale=0.1),
}

# Megatron tensor parallelism: the fused q/k/v kernel [D, 3, H, K], the q/v biases [H, K], BEiT's
# tables [rows, H] and the projection [H, K, D] split heads; the MLP's input kernels [D, M] split M
# (column parallel), fc2 [M, D] too (row parallel). Patch embedding, position table, registers and
# head stay replicated under `tensor` (FSDP shards them).
TENSOR_RULES = (
    (r'attn/qkv/kernel$', (None, None, 'tensor', None)),
    (r'attn/[qv]_bias$', ('tensor', None)),
    (rf'attn/{TABLE}$', (None, 'tensor')),
    (r'attn/proj/kernel$', ('tensor', None, None)),
    (r'mlp/fc1(_g|_x)?/kernel$', (None, 'tensor')),
    (r'mlp/fc1(_g|_x)?/bias$', ('tensor',)),
    (r'mlp/fc2/kernel$', ('tensor', None)),
    (r'^(patch_embed|head)/kernel$', ()),
    (r'^(pos_embed|reg)$', ()),
)


def num_blocks(keys) -> int:
  found = sorted({int(m.group(1)) for k in keys if (m := BLOCK.match(k))})
  if found != list(range(len(found))):
    raise ValueError(f'blocks are not numbered 0..{len(found) - 1}: {found}')
  return len(found)


class BackboneFamily(Family):
  """What the EVA and BEiT descriptors share: sizes, FLOPs, reading shapes, transfer, inspection."""
  head_prefixes = ('head/',)
  stem_kernel = 'patch_embed/kernel'
  tensor_rules = TENSOR_RULES
  default_resize = 'bicubic'  # timm's, for the learned table
  intermediate_unit = 'blocks'
  call_time_size = 'dynamic_img_size'
  capabilities = (tokens_lib.TOKEN_MASK, tokens_lib.KEEP, tokens_lib.PROMPTS, tokens_lib.TOKEN_MAP)
  lacks = {tokens_lib.TWO_HEADS: 'it has one head (no distillation token)'}
  test_image_size = 16

  # ---- fields ----
  def normalize_fields(self, fields):
    out = super().normalize_fields(fields)
    for key in ('rope_ref_grid', 'posemb_grid'):
      if out.get(key) is not None:
        out[key] = hw(out[key])
    return out

  def num_prefix(self, fields: Mapping[str, Any]) -> int:
    raise NotImplementedError

  def grid(self, fields: Mapping[str, Any], image_size: Any) -> tuple[int, int]:
    (h, w), (ph, pw) = hw(image_size), hw(fields['patch_size'])
    return h // ph, w // pw

  def mlp_matrices(self, fields: Mapping[str, Any]) -> int:
    return 2

  def validate(self, fields, image_size) -> None:
    if fields.get('classifier', 'gap') not in eva_models.CLASSIFIERS:
      raise ValueError(f'model.classifier {fields["classifier"]!r} is not one of '
                       f'{eva_models.CLASSIFIERS}')
    (h, w), (ph, pw) = hw(image_size), hw(fields['patch_size'])
    if h <= 0 or w <= 0 or h % ph or w % pw:
      raise ValueError(f'image_size {(h, w)} must be a positive multiple of the patch size '
                       f'{(ph, pw)} (model.patch_size)')
    if fields['hidden_size'] % fields['num_heads']:
      raise ValueError(f'model.hidden_size {fields["hidden_size"]} is not divisible by '
                       f'model.num_heads {fields["num_heads"]}')

  # ---- counting ----
  def forward_macs(self, fields, num_classes, image_size, channels=3) -> int:
    """Patch embedding, per block q/k/v + projection 4*T*D^2, q k^T and attention x v 2*T^2*D, the
    MLP (2 or 3 matrices of D x M per token), and the head."""
    (ph, pw), (gh, gw) = hw(fields['patch_size']), self.grid(fields, image_size)
    d, m, layers = fields['hidden_size'], fields['mlp_dim'], fields['num_layers']
    t = gh * gw + self.num_prefix(fields)
    macs = gh * gw * ph * pw * channels * d
    macs += layers * (4 * t * d * d + 2 * t * t * d + self.mlp_matrices(fields) * t * d * m)
    return int(macs + d * (num_classes or 0))

  def summary_rows(self, fields, image_size) -> list[str]:
    gh, gw = self.grid(fields, image_size)
    return [f'tokens: {gh}x{gw} patches + {self.num_prefix(fields)} prefix, width '
            f'{fields["hidden_size"]}, {fields["num_layers"]} blocks of {fields["num_heads"]} '
            f'heads; {self.position_summary(fields, (gh, gw))}']

  def position_summary(self, fields: Mapping[str, Any], grid: tuple[int, int]) -> str:
    raise NotImplementedError

  # ---- reading parameter trees ----
  def found_fields(self, flat: Mapping[str, Any]) -> dict[str, Any]:
    """The fields the shapes determine (sizes, prefix tokens, norms, LayerScale, MLP kind)."""
    if 'patch_embed/kernel' not in flat or QKV not in flat:
      raise ValueError(f'not a {self.name} parameter set: no `patch_embed/kernel` and `{QKV}`')
    ph, pw, _, d = np.shape(flat['patch_embed/kernel'])
    _, _, heads, _ = np.shape(flat[QKV])
    swiglu = 'block_0/mlp/fc1_g/kernel' in flat
    mlp_dim = np.shape(flat['block_0/mlp/fc1_g/kernel' if swiglu else 'block_0/mlp/fc1/kernel'])[1]
    out = dict(patch_size=int(ph) if ph == pw else (int(ph), int(pw)), hidden_size=int(d),
               num_layers=num_blocks(flat), num_heads=int(heads), mlp_dim=int(mlp_dim),
               posemb='learned' if 'pos_embed' in flat else 'none',
               qkv_bias='block_0/attn/q_bias' in flat)
    if 'block_0/gamma_1' not in flat:
      out['layer_scale'] = None
    return out

  def infer(self, flat, *, model_config=None, image_size=None) -> Architecture:
    """Reads the sizes and options off the shapes; what they cannot say (RoPE's options, a
    LayerScale's initial value) comes from `model_config`. The image size: given, else the square
    grid of the learned table, else RoPE's reference grid."""
    found = self.found_fields(flat)
    cfg = dict(model_config or {})
    check_sizes(found, cfg, SIZE_FIELDS, cfg.get('name', ''))
    if 'layer_scale' not in found and not cfg.get('layer_scale'):
      found['layer_scale'] = 1e-5  # only the initialisation depends on it
    # The classifier: the config's, else the one the norms imply (fc_norm: the mean of the patches).
    has_fc = 'fc_norm/scale' in flat
    found['classifier'] = cfg.get('classifier') or ('gap' if has_fc else 'token')
    found['fc_norm'] = None if has_fc == (found['classifier'] == 'gap') else has_fc
    cfg.update(found)
    cfg = self.normalize_fields(cfg)
    ph, pw = hw(cfg['patch_size'])
    if image_size is None:
      if 'pos_embed' in flat:
        rows = np.shape(flat['pos_embed'])[1] - self.table_prefix(cfg)
        grid = cfg.get('posemb_grid') or resample.square_grid(rows)
      elif cfg.get('rope_ref_grid'):
        grid = cfg['rope_ref_grid']
      else:
        raise ValueError('the checkpoint has no position table, so its image size is unknown: give '
                         'it (image_size)')
      image_size = (grid[0] * ph, grid[1] * pw)
    size = hw(image_size)
    self.validate(cfg, size)
    num_classes = int(np.shape(flat['head/kernel'])[1]) if 'head/kernel' in flat else None
    channels = int(np.shape(flat['patch_embed/kernel'])[2])
    return Architecture(cfg, num_classes, size, channels, family=self.name)

  def table_prefix(self, fields: Mapping[str, Any]) -> int:
    """Rows of the learned table that belong to prefix tokens."""
    return self.num_prefix(fields)

  # ---- transfer ----
  def adapt(self, src, target, src_arch, target_fields, image_size, method, report) -> Flat:
    """The learned table resampled to the target's grid (`method`; 'timm' tables: bicubic)."""
    src = dict(src)
    if 'pos_embed' in src and 'pos_embed' in target and src['pos_embed'].shape != target[
        'pos_embed'].shape:
      pe, want = np.asarray(src['pos_embed']), tuple(target['pos_embed'].shape)
      prefix = self.table_prefix(target_fields)
      old = None
      if src_arch is not None and src_arch.family == self.name:
        old = src_arch.model_config.get('posemb_grid') or self.grid(src_arch.model_config,
                                                                   src_arch.image_size)
      old = old or resample.square_grid(pe.shape[1] - prefix)
      new = (self.grid(target_fields, image_size) if image_size is not None
             else resample.square_grid(want[1] - prefix))
      how = method if method in resample.METHODS else 'bicubic'
      out = resample.resample_posemb(pe, new, num_prefix=prefix, old_grid=old, method=how)
      report.reshaped.append(('pos_embed', tuple(pe.shape), tuple(out.shape)))
      report.notes.append(f'pos_embed: grid {old[0]}x{old[1]} -> {new[0]}x{new[1]} ({how})')
      src['pos_embed'] = out
    return src

  # ---- inspection ----
  inspect_note = 'its position embedding is rotary (no table)'

  def token_layout(self, arch):
    fields = arch.model_config
    return (self.num_prefix(fields), self.grid(fields, arch.image_size),
            hw(fields['patch_size']))

  def reads_class_token(self, arch) -> bool:
    return arch.model_config.get('classifier', 'gap') == 'token'

  def attention_fn(self, arch):
    return aux_attention_fn(arch)

  def position_table(self, flat, arch):
    if 'pos_embed' not in flat:
      raise NotImplementedError(f'a position table is not defined for this {self.name} model: '
                                + self.inspect_note)
    gh, gw = self.grid(arch.model_config, arch.image_size)
    pe = np.asarray(flat['pos_embed'], np.float32)[0, self.table_prefix(arch.model_config):]
    if pe.shape[0] != gh * gw:
      raise ValueError(f'pos_embed holds {pe.shape[0]} patch rows, not the {gh}x{gw} grid of '
                       f'image size {arch.image_size}')
    return 'learned', pe.reshape(gh, gw, -1)


class EvaFamily(BackboneFamily):
  """EVA-02 and RoPE ViTs (`vit_jax.models.eva.Eva`)."""
  name = 'eva'
  models = MODELS
  test_model = 'EVA-testing'

  def module_class(self) -> type:
    return eva_models.Eva

  def num_prefix(self, fields) -> int:
    return int(fields.get('class_token', True)) + int(fields.get('num_registers', 0))

  def table_prefix(self, fields) -> int:
    return 0 if fields.get('no_embed_class', False) else self.num_prefix(fields)

  def mlp_matrices(self, fields) -> int:
    return 3 if fields.get('mlp', 'swiglu') == 'swiglu' else 2

  def validate(self, fields, image_size) -> None:
    super().validate(fields, image_size)
    if fields.get('mlp', 'swiglu') not in eva_models.MLPS:
      raise ValueError(f'model.mlp {fields["mlp"]!r} is not one of {eva_models.MLPS}')
    if fields.get('classifier', 'gap') == 'token' and not fields.get('class_token', True):
      raise ValueError("model.classifier='token' needs model.class_token=True")
    if fields.get('rope', True) and (fields['hidden_size'] // fields['num_heads']) % 4:
      raise ValueError(f'rotary position embedding needs a head dim divisible by 4; '
                       f'model.hidden_size / model.num_heads = '
                       f'{fields["hidden_size"] // fields["num_heads"]}')

  def position_summary(self, fields, grid) -> str:
    parts = []
    if fields.get('posemb', 'learned') == 'learned':
      parts.append('learned position table')
    if fields.get('rope', True):
      ref = fields.get('rope_ref_grid')
      parts.append('rotary embedding' + (f' scaled to the {ref[0]}x{ref[1]} reference grid'
                                         if ref else ''))
    regs = fields.get('num_registers', 0)
    return ', '.join(parts or ['no position embedding']) + (f'; {regs} register(s)' if regs
                                                              else '')

  def matches(self, flat) -> bool:
    return QKV in flat and f'block_0/attn/{TABLE}' not in flat

  def found_fields(self, flat):
    out = super().found_fields(flat)
    out.update(class_token='cls' in flat,
               num_registers=int(np.shape(flat['reg'])[1]) if 'reg' in flat else 0,
               mlp='swiglu' if 'block_0/mlp/fc1_g/kernel' in flat else 'gelu',
               mlp_norm='block_0/mlp/norm/scale' in flat,
               attn_norm='block_0/attn/norm/scale' in flat)
    return out

  def adapt(self, src, target, src_arch, target_fields, image_size, method, report) -> Flat:
    src = super().adapt(src, target, src_arch, target_fields, image_size, method, report)
    if target_fields.get('rope', True) and image_size is not None:
      gh, gw = self.grid(target_fields, image_size)
      ref = target_fields.get('rope_ref_grid')
      old_ref = (src_arch.model_config.get('rope_ref_grid') if src_arch is not None
                 and src_arch.family == self.name else None)
      if ref:
        note = (f'rotary embedding: the {gh}x{gw} grid\'s coordinates scaled to the reference grid '
                f'{ref[0]}x{ref[1]} (rope_ref_grid)')
      else:
        note = f'rotary embedding: {gh}x{gw} integer coordinates (no rope_ref_grid)'
      if old_ref and (not ref or hw(old_ref) != hw(ref)):
        note += f'; the checkpoint was made with rope_ref_grid={tuple(hw(old_ref))}'
        logging.warning(note)
      report.notes.append(note)
    return src


FAMILY = EvaFamily()
