"""The hybrid ResNet + ViT family (Dosovitskiy et al., 2021, §3.1): sizes, FLOPs, the descriptor.

Our flat parameters (`vit_jax.models.hybrid.HybridVisionTransformer`) *are* Google's hybrid `.npz`
layout (R50+ViT-B_16.npz, the augreg R_Ti_16 / R26_S_32 / R50_L_32 files), which timm's own `.npz`
loader reads too:
  conv_root/kernel [7, 7, C, w], gn_root/{scale, bias},
  block{i}/unit{j}/{conv1, gn1, conv2, gn2, conv3, gn3, conv_proj, gn_proj} (1-based, no conv bias),
  embedding/{kernel [p, p, C_f, D], bias}, then the ViT (`cls`, `Transformer/...`, `head`).
The timm key maps are the family's interop, `hybrid_interop.py`.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from vit_jax.families.vit import (BLOCK, TENSOR_RULES, VitFamily, head_macs, transformer_macs,
                                  vit_fields)
from vit_jax.models import hybrid as hybrid_models
from vit_jax.models import resnet
from vit_jax.models import tokens as tokens_lib
from vit_jax.shapes import hw

# Google's names. R+ViT-Ti_16 is root-only with 8x8 patches on the /4 map: an effective patch of 32
# (a 7x7 grid at 224) whatever its name says. Counts at 224 px, 1000 classes, equal timm 1.0.31's.
MODELS: dict[str, dict[str, Any]] = {
    'R+ViT-Ti_16': vit_fields('Ti', 8, resnet_layers=(), resnet_width=64),           # 6,337,704
    'R26+ViT-S_32': vit_fields('S', 1, resnet_layers=(2, 2, 2, 2), resnet_width=64),  # 36,431,912
    'R50+ViT-B_16': vit_fields('B', 1, resnet_layers=(3, 4, 9), resnet_width=64),     # 98,659,112
    'R50+ViT-L_32': vit_fields('L', 1, resnet_layers=(3, 4, 6, 3), resnet_width=64),  # 328,994,856
    # The quickstart's model (configs/quickstart.py): the ResNet root at width 32 (a 7x7 conv /2
    # and a 3x3 max-pool /2) under four ViT-Mini blocks with 2x2 patches: 16 tokens at 32 px.
    'R+ViT-Mini_2': dict(patch_size=2, hidden_size=128, num_layers=4, num_heads=4, mlp_dim=256,
                         classifier='gap', posemb='sincos2d', representation_size=None,
                         resnet_layers=(), resnet_width=32),
    # CPU tests: two one-unit stages of the narrowest GroupNorm-able width (32), an effective /8.
    'R+ViT-testing': dict(patch_size=1, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                          classifier='token', posemb='learned', representation_size=None,
                          resnet_layers=(1, 1), resnet_width=32),
}
_RESNET_KEY = re.compile(r'^(conv_root|gn_root|block\d+)/')
# A ResNet unit's parameters: block{i}/unit{j}/... (1-based), Google's names.
UNIT = re.compile(r'^block(\d+)/unit(\d+)/')


def split_resnet(flat: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(the ResNet's entries, the ViT's entries) of a hybrid flat dict."""
  resnet = {k: v for k, v in flat.items() if _RESNET_KEY.match(k)}
  return resnet, {k: v for k, v in flat.items() if k not in resnet}


def resnet_fields_of(flat: Mapping[str, Any]) -> dict[str, Any]:
  """`resnet_layers` and `resnet_width` read off a hybrid flat dict's keys and shapes."""
  if 'conv_root/kernel' not in flat:
    raise ValueError('not a hybrid parameter set: no `conv_root/kernel`')
  units: dict[int, int] = {}
  for k in flat:
    if m := UNIT.match(k):
      units[int(m.group(1))] = max(units.get(int(m.group(1)), 0), int(m.group(2)))
  if sorted(units) != list(range(1, len(units) + 1)):
    raise ValueError(f'ResNet blocks are not numbered block1..block{len(units)}: {sorted(units)}')
  return dict(resnet_layers=tuple(units[i] for i in sorted(units)),
              resnet_width=int(flat['conv_root/kernel'].shape[-1]))


def check_resnet_fields(found: Mapping[str, Any], fields: Mapping[str, Any]) -> None:
  """A ValueError when the ResNet fields read off parameters (`resnet_fields_of`) disagree with the
  given fields."""
  for key in ('resnet_layers', 'resnet_width'):
    want = fields.get(key)
    if want is not None and (tuple(want) if key == 'resnet_layers' else want) != found[key]:
      raise ValueError(f'the parameters have {key}={found[key]!r} but the fields say {want!r}')


# ---------- the family ----------

def resnet_macs(fields: Mapping[str, Any], image_size: Sequence[int], channels: int = 3
                ) -> tuple[int, tuple[int, int], int]:
  """(conv MACs of the ResNet for one image, its output map (h, w), its output channels)."""
  ceil = lambda n, s: -(-n // s)
  width, layers = int(fields.get('resnet_width', 64)), tuple(fields.get('resnet_layers', ()))
  h, w = (ceil(n, 2) for n in hw(image_size))
  macs = h * w * 49 * channels * width
  h, w, cin = ceil(h, 2), ceil(w, 2), width  # max-pool
  for i, units in enumerate(layers):
    mid = width * 2 ** i
    for j in range(units):
      s = 2 if i > 0 and j == 0 else 1
      ho, wo = ceil(h, s), ceil(w, s)
      macs += h * w * cin * mid + ho * wo * 9 * mid * mid + ho * wo * mid * 4 * mid
      if cin != 4 * mid or s != 1:
        macs += ho * wo * cin * 4 * mid  # conv_proj
      h, w, cin = ho, wo, 4 * mid
  return macs, (h, w), cin


class HybridFamily(VitFamily):
  """ResNet + ViT: the ViT family's transformer and tables, plus the ResNet."""
  name = 'hybrid'
  models = MODELS
  stem_kernel = 'conv_root/kernel'
  patch_kernel = None  # `embedding` is a 1x1 conv on the ResNet's features: no pixel patches
  # The ResNet (12% of R50+ViT-B_16's parameters, 39% of R26+ViT-S_32's) stays replicated under
  # `tensor` (FSDP still shards it): split output channels would make every GroupNorm and the next
  # conv gather the activations again, for little compute saved at these widths.
  tensor_rules = TENSOR_RULES + ((r'^(conv_root|gn_root|block\d+)/', ()),)
  test_model = 'R+ViT-testing'
  test_image_size = 32
  extra_size_fields = ('resnet_layers', 'resnet_width')
  capabilities = (tokens_lib.PROMPTS, tokens_lib.TOKEN_MAP)
  _LEAK = ("the ResNet stem's receptive field spans neighbouring patches, so a masked or dropped "
           "patch's pixels still reach the encoder through the tokens next to it")
  lacks = {tokens_lib.TOKEN_MASK: _LEAK, tokens_lib.KEEP: _LEAK}

  def module_class(self) -> type:
    return hybrid_models.HybridVisionTransformer

  def patch_hw(self, fields: Mapping[str, Any]) -> tuple[int, int]:
    """The effective patch: input pixels per token (feature stride x the patch on the map)."""
    s = resnet.feature_stride(tuple(fields.get('resnet_layers', ())))
    ph, pw = hw(fields['patch_size'])
    return s * ph, s * pw

  def validate(self, fields, image_size) -> None:
    super().validate(fields, image_size)
    resnet.check_width(int(fields.get('resnet_width', 64)))
    if any(int(n) < 1 for n in fields.get('resnet_layers', ())):
      raise ValueError(f'model.resnet_layers {tuple(fields["resnet_layers"])}: every stage needs at '
                       'least one unit')

  def forward_macs(self, fields, num_classes, image_size, channels=3) -> int:
    macs, (fh, fw), cf = resnet_macs(fields, image_size, channels)
    ph, pw = hw(fields['patch_size'])
    gh, gw = fh // ph, fw // pw
    d = fields['hidden_size']
    n = gh * gw + self.num_prefix(fields)
    macs += gh * gw * ph * pw * cf * d
    macs += transformer_macs(n, d, fields['mlp_dim'], fields['num_layers'])
    return int(macs + head_macs(fields, n, num_classes))

  def summary_rows(self, fields, image_size) -> list[str]:
    _, (fh, fw), cf = resnet_macs(fields, image_size)
    layers = tuple(fields.get('resnet_layers', ()))
    return [f'ResNet: root width {fields.get("resnet_width", 64)}, units per stage {layers}: a '
            f'{fh}x{fw}x{cf} feature map (stride {resnet.feature_stride(layers)}), patch '
            f'{hw(fields["patch_size"])} on it'] + super().summary_rows(fields, image_size)

  def matches(self, flat) -> bool:
    return 'conv_root/kernel' in flat and 'embedding/kernel' in flat and any(
        BLOCK.match(k) for k in flat)

  def found_fields(self, flat) -> dict[str, Any]:
    return {**super().found_fields(flat), **resnet_fields_of(flat)}

  # ---- inspection: attention maps and position table are the ViT's (tokens of the effective patch)
  inspect_note = ("its `embedding` is a conv on the ResNet's feature map, not on pixels (attention "
                  'rollout, attention distance and position-embedding similarity do apply)')

  def patch_filters(self, flat, arch):
    # `stem_kernel` is the ResNet root here: pixel filters, but not the patch embedding.
    raise self._undefined('a linear embedding of pixel patches')


FAMILY = HybridFamily()
