"""The hybrid ResNet + ViT of "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2021, §3.1).

    f   = ResNet(x)                      [B, H/s, W/s, C_f]   (vit_jax.models.resnet; s = 4 or more)
    z_0 = ViT patch embedding of f       patches of `patch_size` on the feature map (1x1 for R50+B/16)
    ... = the ViT of vit_jax.models.vit on those tokens, unchanged

Parameter paths are Google's hybrid checkpoints (e.g. `R50+ViT-B_16.npz`), which timm's `.npz`
loader also reads: the ResNet's `conv_root`, `gn_root`, `block{i}/unit{j}/...` at the top level, next
to the ViT's `embedding` (a [p, p, C_f, D] kernel), `cls`, `Transformer/...`, `pre_logits`, `head`.
The effective patch, input pixels per token, is `feature_stride * patch_size`: 16 for R50+ViT-B_16
(3 stages: /16, patch 1), 32 for R26+ViT-S_32, R50+ViT-L_32 (4 stages) and R+ViT-Ti_16 (root only,
/4, then 8x8 patches: Google's and timm's name for it says 16, its grid at 224 is 7x7).
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax

from vit_jax.models import resnet
from vit_jax.models.tokens import TokenInputs
from vit_jax.models.vit import VisionTransformer


class HybridVisionTransformer(VisionTransformer):
  """A ViT whose patch embedding reads a ResNet's feature map instead of the pixels.

  Attributes (besides every VisionTransformer field, which keep their meaning):
    patch_size: the patch of the embedding conv on the feature map (not in pixels).
    resnet_layers: units per ResNet stage, e.g. (3, 4, 9) for R50's first three stages; () keeps
      only the root (7x7 conv, GroupNorm, max-pool).
    resnet_width: the root's channels, 64 x the width factor (a multiple of 32: GroupNorm groups).
  """
  resnet_layers: Sequence[int] = (3, 4, 9)
  resnet_width: int = 64

  @property
  def feature_stride(self) -> int:
    return resnet.feature_stride(self.resnet_layers)

  @property
  def effective_patch_hw(self) -> tuple[int, int]:
    """Input pixels per token, (height, width)."""
    s = self.feature_stride
    ph, pw = self.patch_hw
    return s * ph, s * pw

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False, return_aux: bool = False,
               features: bool = False, tokens: Optional[TokenInputs] = None,
               return_weights: Optional[bool] = None):
    """Classifies images [B, H, W, C] (any C; pixels roughly in [-1, 1]).

    The ResNet's feature map (H and W divided by `feature_stride`, rounded up: 'SAME' padding) must
    be a multiple of `patch_size`; H and W multiples of `effective_patch_hw` always are.
    Arguments and results are VisionTransformer's: logits [B, num_classes]; with return_aux, also
    pre-logits, the token map and attention weights; with features=True, [token map
    [B, H/P, W/P, D]] for the effective patch P. `tokens` edits the tokens the ResNet's features
    make (prompts; masks are refused by the family: see `families/hybrid.py`).
    """
    outputs = resnet.resnet_features(images.astype(self.dtype), width=self.resnet_width,
                                     layers=tuple(self.resnet_layers), dtype=self.dtype,
                                     param_dtype=self.param_dtype)
    x = outputs[-1]
    (_, h, w, _), (fh, fw), (ph, pw) = images.shape, x.shape[1:3], self.patch_hw
    if fh % ph or fw % pw:
      eh, ew = self.effective_patch_hw
      raise ValueError(f'image size {h}x{w} gives a {fh}x{fw} ResNet feature map (stride '
                       f'{self.feature_stride}), not divisible by the patch size {ph}x{pw}: use '
                       f'an image size that is a multiple of {eh}x{ew}')
    return super().__call__(x, train=train, return_aux=return_aux, features=features,
                            tokens=tokens, return_weights=return_weights)
