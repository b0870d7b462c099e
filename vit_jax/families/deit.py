"""The DeiT family (Touvron et al., 2021): a ViT with a distillation token and a second head.

File layout: the ViT's (`vit.py`) plus `dist_token` [1, 1, D] and `head_dist/{kernel, bias}`; the
position table has two prefix rows (class, distillation), then the patches. timm's
`VisionTransformerDistilled` state dict, mapped in `deit_interop.py`, is the ViT's plus `dist_token`
and `head_dist`. Distillation training itself is in `vit_jax.train.step`.
"""
from __future__ import annotations

from typing import Any, Mapping

from vit_jax.families.vit import BLOCK, POSEMB_KEY, SIZES, TENSOR_RULES, VitFamily
from vit_jax.models import deit as deit_models
from vit_jax.models import tokens as tokens_lib


def deit_fields(size: str, patch: int) -> dict[str, Any]:
  d, layers, heads, mlp = SIZES[size]
  return dict(patch_size=patch, hidden_size=d, num_layers=layers, num_heads=heads, mlp_dim=mlp,
              classifier='token', posemb='learned', act='gelu')


# Parameter counts at 224 px, 1000 classes: timm's `deit_*_distilled_patch16_224`.
MODELS: dict[str, dict[str, Any]] = {
    'DeiT-Ti_16-distilled': deit_fields('Ti', 16),    # 5,910,800
    'DeiT-S_16-distilled': deit_fields('S', 16),      # 22,436,432
    'DeiT-B_16-distilled': deit_fields('B', 16),      # 87,338,192
    # The quickstart ViT-Mini_7's size (width 128, 6 layers, 4 heads, MLP 256) for Fashion-MNIST.
    'DeiT-Mini_7-distilled': deit_fields('Mini', 7),
    'DeiT-testing': dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                         classifier='token', posemb='learned', act='gelu'),
}
DIST_KEY = 'dist_token'


class DeitFamily(VitFamily):
  """DeiT: the ViT descriptor with two prefix tokens and two heads."""
  name = 'deit'
  models = MODELS
  head_prefixes = ('head/', 'head_dist/')
  optional_prefixes = ('cls', DIST_KEY, POSEMB_KEY)
  pre_logits_prefix = None
  tensor_rules = TENSOR_RULES  # `head(_dist)?` is already in the ViT's rules
  num_tokens = 2
  test_model = 'DeiT-testing'
  capabilities = VitFamily.capabilities + (tokens_lib.TWO_HEADS,)
  test_image_size = 16

  def module_class(self) -> type:
    return deit_models.DistilledVisionTransformer

  def validate(self, fields, image_size) -> None:
    super().validate(fields, image_size)
    if fields.get('classifier', 'token') != 'token':
      raise ValueError(f'model.classifier {fields["classifier"]!r}: a DeiT classifies its class '
                       "and distillation tokens, so it must be 'token'")

  def num_heads_out(self, fields: Mapping[str, Any]) -> int:
    del fields
    return 2

  def summary_rows(self, fields, image_size) -> list[str]:
    return super().summary_rows(fields, image_size) + [
        'heads: head (class token) and head_dist (distillation token); inference averages them']

  # ---- reading parameter trees ----
  def matches(self, flat) -> bool:
    return ('embedding/kernel' in flat and DIST_KEY in flat and any(BLOCK.match(k) for k in flat)
            and 'conv_root/kernel' not in flat)

  def found_fields(self, flat) -> dict[str, Any]:
    found = super().found_fields(flat)
    if found['classifier'] != 'token':  # (`dist_token` is checked by `matches`)
      raise ValueError('not a DeiT parameter set: it has no class token `cls`')
    if found.pop('representation_size') is not None:
      raise ValueError('a DeiT has no pre-logits layer, but the parameters hold `pre_logits`')
    return found


FAMILY = DeitFamily()
