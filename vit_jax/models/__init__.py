"""Pure Flax linen models. Imports nothing else of vit_jax; parameter names here are a file format."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from vit_jax.models.attention import MultiHeadDotProductAttention, dot_product_attention
from vit_jax.models.vit import CLASSIFIERS, POSEMBS, VisionTransformer, num_prefix_tokens

# Fields of a model config that are not VisionTransformer attributes.
_NON_MODULE_FIELDS = ('name',)


def create_model(model_config: Mapping[str, Any], num_classes: Optional[int],
                 **overrides: Any) -> VisionTransformer:
  """Builds a VisionTransformer from a model config (see configs/models.py) and keyword overrides.

  Raises a ValueError naming unknown fields and the valid ones.
  """
  fields = {k: v for k, v in dict(model_config).items() if k not in _NON_MODULE_FIELDS}
  fields.update(overrides)
  valid = set(VisionTransformer.__dataclass_fields__) - {'parent', 'name', 'num_classes'}
  unknown = sorted(set(fields) - valid)
  if unknown:
    raise ValueError(f'unknown model field(s) {unknown}; valid fields: {sorted(valid)}')
  return VisionTransformer(num_classes=num_classes, **fields)


__all__ = ['CLASSIFIERS', 'POSEMBS', 'MultiHeadDotProductAttention', 'VisionTransformer',
           'create_model', 'dot_product_attention', 'num_prefix_tokens']
