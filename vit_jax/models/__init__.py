"""Pure Flax linen models, one file per family. Imports nothing else of vit_jax; parameter names here
are a file format. Building a model by name goes through `vit_jax.families.registry`."""
from __future__ import annotations

from vit_jax.models.attention import MultiHeadDotProductAttention, dot_product_attention
from vit_jax.models.vit import ACTIVATIONS, CLASSIFIERS, POSEMBS, VisionTransformer, num_prefix_tokens

__all__ = ['ACTIVATIONS', 'CLASSIFIERS', 'POSEMBS', 'MultiHeadDotProductAttention',
           'VisionTransformer', 'dot_product_attention', 'num_prefix_tokens']
