"""The BEiT family (BEiT, BEiT v2: `vit_jax.models.beit.Beit`): registry sizes and the descriptor.

The file layout is EVA's (`families/eva.py`) with a relative position table in every block's
attention, `block_{i}/attn/relative_position_bias_table` [(2gh-1)(2gw-1)+3, heads], and a GELU MLP.
The tables depend on the patch grid: moving a checkpoint to another resolution resizes them with
timm's scheme (`vit_jax.models.relpos`, method 'timm') unless the config names bicubic or bilinear.
The timm and Hugging Face key maps are in `beit_interop.py`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from vit_jax.families import resample
from vit_jax.families.base import Flat
from vit_jax.families.eva import QKV, TABLE, BackboneFamily
from vit_jax.models import beit as beit_models
from vit_jax.models import relpos

MODELS: dict[str, dict[str, Any]] = {
    # timm `beitv2_base_patch16_224` (86,530,984 parameters at 224 with 1000 classes).
    'BEiTv2-B_16': dict(patch_size=16, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072,
                        classifier='gap', posemb='none', layer_scale=1e-5),
    # Unit tests at 16 px (a 4x4 grid: tables of 7x7 offsets).
    'BEiT-testing': dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                         classifier='gap', posemb='none', layer_scale=0.1),
}


class BeitFamily(BackboneFamily):
  """BEiT / BEiT v2 (`vit_jax.models.beit.Beit`)."""
  name = 'beit'
  models = MODELS
  test_model = 'BEiT-testing'
  default_resize = 'timm'  # the relative tables' (timm's `resize_rel_pos_bias_table`)
  inspect_note = 'its positions are relative (a bias table per block), not an absolute table'

  def module_class(self) -> type:
    return beit_models.Beit

  def num_prefix(self, fields) -> int:
    del fields
    return 1

  def position_summary(self, fields, grid) -> str:
    table = relpos.table_rows(grid)
    pos = ' and a learned position table' if fields.get('posemb', 'none') == 'learned' else ''
    return f'relative position tables of {table} rows per block{pos}'

  def matches(self, flat) -> bool:
    return QKV in flat and f'block_0/attn/{TABLE}' in flat

  def found_fields(self, flat):
    out = super().found_fields(flat)
    if 'block_0/mlp/fc1_g/kernel' in flat or 'block_0/mlp/norm/scale' in flat:
      raise ValueError('a BEiT with a SwiGLU MLP or an MLP norm is not implemented here')
    return out

  def table_grid_of(self, fields, image_size, rows: int) -> tuple[int, int]:
    if fields.get('posemb_grid'):
      return tuple(fields['posemb_grid'])
    if image_size is not None and fields.get('patch_size'):
      return self.grid(fields, image_size)
    return relpos.grid_of_table(rows)

  def adapt(self, src, target, src_arch, target_fields, image_size, method, report) -> Flat:
    """The learned table (if any) as EVA's; every relative table resized to the target's grid."""
    src = super().adapt(src, target, src_arch, target_fields, image_size, method, report)
    resized = 0
    for key in target:
      if not key.endswith(TABLE) or key not in src or src[key].shape == target[key].shape:
        continue
      table = np.asarray(src[key])
      if table.shape[1] != target[key].shape[1]:
        continue  # different head counts: the generic shape check reports it
      old = (self.table_grid_of(src_arch.model_config, src_arch.image_size, table.shape[0])
             if src_arch is not None and src_arch.family == self.name
             else relpos.grid_of_table(table.shape[0]))
      new = self.table_grid_of(target_fields, image_size, target[key].shape[0])
      src[key] = resize_table(table, old, new, method)
      report.reshaped.append((key, tuple(table.shape), tuple(src[key].shape)))
      resized += 1
    if resized:
      report.notes.append(f'relative position tables ({resized}) resized to the new patch grid '
                          f'({method})')
    return src


def resize_table(table: np.ndarray, old: Any, new: Any, method: str = 'timm') -> np.ndarray:
  """A [(2gh-1)(2gw-1)+3, H] table of grid `old` -> grid `new`; the class-token rows unchanged,
  the offsets by `resample.resize_relative_position_bias` ('timm', 'bicubic' or 'bilinear'), the
  method a `dynamic_img_size` call applies as an operator (`vit_jax.models.relpos.resize_table`)."""
  old, new = tuple(old), tuple(new)
  if old == new:
    return table
  extra = relpos.EXTRA_ROWS
  offsets = resample.resize_relative_position_bias(table[:-extra], old, new, method)
  return np.concatenate([offsets.astype(table.dtype), table[-extra:]], axis=0)


FAMILY = BeitFamily()
