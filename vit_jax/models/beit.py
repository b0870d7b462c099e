"""BEiT / BEiT v2 (Bao et al., 2022; Peng et al., 2022) as timm's `Beit`, in Flax linen.

A ViT whose blocks each add a learned relative position bias to the attention logits (one table per
block, `vit_jax.models.relpos`), with LayerScale, q and v biases without a k bias, usually no
absolute position table, and the mean of the patch tokens under `fc_norm` as the image feature.
The forward pass is `vit_jax.models.eva.Backbone`'s; parameter names as there (`block_{i}/attn/
relative_position_bias_table`, `gamma_1`, ...), the MLP being `mlp/fc1`, `mlp/fc2` (GELU).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from vit_jax.models.eva import Backbone


class Beit(Backbone):
  """BEiT: `Backbone`'s fields; a class token always, relative position tables in every block,
  no absolute table by default (`posemb='none'`, BEiT v2), GELU MLP."""
  posemb: str = 'none'

  def prefix_tokens(self, d: int) -> list[jax.Array]:
    return [self.param('cls', nn.initializers.normal(0.02), (1, 1, d), self.param_dtype)]

  def block_options(self) -> dict[str, Any]:
    return dict(mlp='gelu', rel_pos=True)
