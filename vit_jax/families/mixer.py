"""The MLP-Mixer family (Tolstikhin et al., 2021): sizes, FLOPs, architecture from shapes,
token-mixing adaptation and the descriptor. Its interop (timm key maps, Google's `.npz` layout
checks) is `mixer_interop.py`.

Our flat parameters ('/'-joined paths of `vit_jax.models.mixer.MlpMixer`) *are* Google's released
Mixer `.npz` layout, so those files load as they are:
  stem/{kernel [ph, pw, C_in, D], bias}
  MixerBlock_{i}/LayerNorm_0, token_mixing/Dense_{0,1}, LayerNorm_1, channel_mixing/Dense_{0,1}
  pre_head_layer_norm/{scale, bias}, head/{kernel [D, classes], bias}
The token-mixing kernels are [S, tokens_mlp_dim]: parameters fix the token count S = (H/p)(W/p).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vit_jax.families import resample
from vit_jax.families.base import ACTIVATIONS, Architecture, Family, Flat, check_sizes
from vit_jax.models import mixer as mixer_models
from vit_jax.shapes import hw

# The paper's Table 1 sizes (patch, blocks L, hidden C, tokens MLP D_S, channels MLP D_C). Parameter
# counts at 224 px with 1000 classes equal timm 1.0.31's `mixer_*_224` (tests/test_mixer.py).
_S, _B = dict(hidden_dim=512, tokens_mlp_dim=256, channels_mlp_dim=2048, num_blocks=8), dict(
    hidden_dim=768, tokens_mlp_dim=384, channels_mlp_dim=3072, num_blocks=12)
_L = dict(hidden_dim=1024, tokens_mlp_dim=512, channels_mlp_dim=4096, num_blocks=24)
MODELS: dict[str, dict[str, Any]] = {
    'Mixer-S_16': dict(_S, patch_size=16),    # 18,528,264
    'Mixer-S_32': dict(_S, patch_size=32),    # 19,104,624
    'Mixer-B_16': dict(_B, patch_size=16),    # 59,880,472
    'Mixer-B_32': dict(_B, patch_size=32),    # 60,293,428
    'Mixer-L_16': dict(_L, patch_size=16),    # 208,196,168
    'Mixer-L_32': dict(_L, patch_size=32),    # 206,939,264
    'Mixer-testing': dict(patch_size=4, num_blocks=2, hidden_dim=32, tokens_mlp_dim=16,
                          channels_mlp_dim=64),
}
SIZE_FIELDS = ('patch_size', 'num_blocks', 'hidden_dim', 'tokens_mlp_dim', 'channels_mlp_dim')
TOKEN_KERNEL = 'MixerBlock_0/token_mixing/Dense_0/kernel'
# Megatron tensor parallelism: both MLPs split their hidden units, Dense_0 [in, hidden] column
# parallel, Dense_1 [hidden, out] row parallel (one all-reduce per MLP). Stem and head replicated.
TENSOR_RULES = (
    (r'(token|channel)_mixing/Dense_0/kernel$', (None, 'tensor')),
    (r'(token|channel)_mixing/Dense_0/bias$', ('tensor',)),
    (r'(token|channel)_mixing/Dense_1/kernel$', ('tensor', None)),
    (r'(^|/)(stem|head)/kernel$', ()),
)
BLOCK = re.compile(r'^MixerBlock_(\d+)/')


def count_blocks(keys: Sequence[str], pattern: re.Pattern) -> int:
  """How many blocks `pattern` (its group 1: the block index) finds among the keys; a ValueError
  unless they are numbered 0..n-1 without gaps."""
  found = sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})
  if found != list(range(len(found))):
    raise ValueError(f'Mixer blocks are not numbered 0..{len(found) - 1}: {found}')
  return len(found)


def grid(fields: Mapping[str, Any], image_size: Any) -> tuple[int, int]:
  """(gh, gw) patches of an image; a ValueError if the size is not a multiple of the patch."""
  (h, w), (ph, pw) = hw(image_size), hw(fields['patch_size'])
  if h <= 0 or w <= 0 or h % ph or w % pw:
    raise ValueError(f'image size {(h, w)} must be a positive multiple of the Mixer patch size '
                     f'{(ph, pw)} (model.patch_size)')
  return h // ph, w // pw


def check_image_size(fields: Mapping[str, Any], image_size: Any, num_tokens: int) -> None:
  """Raises a ValueError unless `image_size` gives the `num_tokens` the parameters were built for."""
  gh, gw = grid(fields, image_size)
  if gh * gw != num_tokens:
    (h, w), (ph, pw) = hw(image_size), hw(fields['patch_size'])
    raise ValueError(
        f'the Mixer parameters mix {num_tokens} tokens, but {h}x{w} px images give {gh * gw} '
        f'({gh}x{gw} patches of {ph}x{pw} px); the token-mixing MLP is tied to the token count, so '
        f'use the image size the parameters were built for (a grid of {num_tokens} patches)')


def is_mixer(keys: Any) -> bool:
  """True for a flat Mixer parameter set (ours / Google's npz)."""
  return 'stem/kernel' in keys and TOKEN_KERNEL in keys


def infer_fields(flat: Mapping[str, Any]) -> tuple[dict[str, Any], int, Optional[int], int]:
  """Reads (size fields, num_tokens, num_classes, channels) off a flat Mixer parameter dict."""
  if not is_mixer(flat):
    raise ValueError(f'not an MLP-Mixer parameter set: no `stem/kernel` and `{TOKEN_KERNEL}`')
  ph, pw, channels, d = np.shape(flat['stem/kernel'])
  num_tokens, t = np.shape(flat[TOKEN_KERNEL])
  fields = dict(patch_size=int(ph) if ph == pw else (int(ph), int(pw)),
                num_blocks=count_blocks(list(flat), BLOCK), hidden_dim=int(d),
                tokens_mlp_dim=int(t),
                channels_mlp_dim=int(np.shape(flat['MixerBlock_0/channel_mixing/Dense_0/kernel'])[1]))
  num_classes = int(np.shape(flat['head/kernel'])[1]) if 'head/kernel' in flat else None
  return fields, int(num_tokens), num_classes, int(channels)


# ---------- the descriptor ----------

def forward_macs(fields: Mapping[str, Any], num_classes: Optional[int], image_size: Any,
                 channels: int = 3) -> int:
  """Stem conv + per block 2*S*D_S*C (token MLP) + 2*S*C*D_C (channel MLP) + head."""
  (ph, pw), (gh, gw) = hw(fields['patch_size']), grid(fields, image_size)
  s, c = gh * gw, fields['hidden_dim']
  block = 2 * s * fields['tokens_mlp_dim'] * c + 2 * s * c * fields['channels_mlp_dim']
  return int(s * ph * pw * channels * c + fields['num_blocks'] * block + c * (num_classes or 0))


class MixerFamily(Family):
  """MLP-Mixer: Google's names; the token-mixing MLPs tie it to a token count."""
  name = 'mixer'
  models = MODELS
  head_prefixes = ('head/',)
  stem_kernel = 'stem/kernel'
  tensor_rules = TENSOR_RULES
  test_model = 'Mixer-testing'
  default_resize = 'none'  # another token count is an error unless a resampling is asked for
  inspect_note = 'a Mixer mixes tokens with MLPs: it has no attention maps and no position embedding'
  _FIXED = ('its token-mixing MLPs hold a weight per token position, so the token count and order '
            'are fixed: no patches can be dropped and no prompt tokens added')
  lacks = {'keep': _FIXED, 'prompts': _FIXED,
           'token_mask': 'its module takes no token inputs (a mask embedding is not implemented)',
           'token_map': 'its module returns no token map (use features=True for the patch grid)'}

  def module_class(self) -> type:
    return mixer_models.MlpMixer

  def validate(self, fields, image_size) -> None:
    if fields.get('act') is not None and fields['act'] not in ACTIVATIONS:
      raise ValueError(f'model.act {fields["act"]!r} is not one of {ACTIVATIONS}')
    grid(fields, image_size)
    for key in SIZE_FIELDS[1:]:
      if int(fields[key]) <= 0:
        raise ValueError(f'model.{key} must be positive, got {fields[key]}')

  def forward_macs(self, fields, num_classes, image_size, channels=3) -> int:
    return forward_macs(fields, num_classes, image_size, channels)

  def summary_rows(self, fields, image_size) -> list[str]:
    gh, gw = grid(fields, image_size)
    return [f'tokens: {gh}x{gw} patches (the token-mixing MLP is tied to {gh * gw}), width '
            f'{fields["hidden_dim"]}, {fields["num_blocks"]} blocks, MLPs {fields["tokens_mlp_dim"]}'
            f' (tokens) / {fields["channels_mlp_dim"]} (channels)']

  def matches(self, flat) -> bool:
    return is_mixer(flat)

  def infer(self, flat, *, model_config=None, image_size=None) -> Architecture:
    """Everything is in the shapes but the aspect ratio: a square grid of the token count is
    assumed unless `image_size` is given (which must give that token count)."""
    found, tokens, num_classes, channels = infer_fields(flat)
    cfg = dict(model_config or {})
    check_sizes(found, cfg, SIZE_FIELDS, cfg.get('name', ''))
    cfg.update(found)
    if image_size is not None:
      size = hw(image_size)
      check_image_size(cfg, size, tokens)
    else:
      (gh, gw), (ph, pw) = resample.square_grid(tokens), hw(cfg['patch_size'])
      size = (gh * ph, gw * pw)
    return Architecture(cfg, num_classes, size, channels, family=self.name)

  def adapt(self, src, target, src_arch, target_fields, image_size, method, report) -> Flat:
    """The token-mixing MLPs are tied to the token count. Another count is an error unless a
    resampling is asked for (`--config.posemb_resize=bilinear|bicubic`): then the token axis of
    every `token_mixing` kernel and bias is resampled over the patch grid like an image, and the
    first kernel is scaled by S/S' so that its sum over S' tokens keeps its size."""
    if TOKEN_KERNEL not in src or TOKEN_KERNEL not in target:
      return src
    have, want = np.shape(src[TOKEN_KERNEL])[0], np.shape(target[TOKEN_KERNEL])[0]
    if have == want:
      return src
    if method not in resample.METHODS:
      raise ValueError(
          f'the checkpoint\'s token-mixing MLP mixes {have} tokens, the model at image size '
          f'{image_size} has {want}; a Mixer is tied to its token count: use the image size the '
          'checkpoint was trained at, or ask for a resampling of the token-mixing weights with '
          '--config.posemb_resize=bilinear (or bicubic)')
    old = (grid(src_arch.model_config, src_arch.image_size)
           if src_arch is not None and src_arch.family == self.name
           else resample.square_grid(have))
    new = (grid(target_fields, image_size) if image_size is not None
           else resample.square_grid(want))
    if old[0] * old[1] != have or new[0] * new[1] != want:
      raise ValueError(f'cannot place {have} -> {want} tokens on patch grids {old} -> {new}')
    out = dict(src)
    for key in [k for k in src if '/token_mixing/' in k]:
      value = np.asarray(src[key])
      if key.endswith('Dense_0/kernel'):    # [S, T]: the token axis first
        grid_ = value.reshape(*old, -1)
        value = resample.resample_grid(grid_, new, method).reshape(want, -1) * (have / want)
      elif key.endswith('Dense_1/kernel'):  # [T, S]
        grid_ = value.T.reshape(*old, -1)
        value = resample.resample_grid(grid_, new, method).reshape(want, -1).T
      elif key.endswith('Dense_1/bias'):    # [S]
        value = resample.resample_grid(value.reshape(*old, 1), new, method).reshape(want)
      else:
        continue
      out[key] = np.ascontiguousarray(value.astype(np.asarray(src[key]).dtype))
      report.reshaped.append((key, tuple(np.shape(src[key])), tuple(value.shape)))
    report.notes.append(f'token-mixing MLPs resampled from a {old[0]}x{old[1]} to a '
                        f'{new[0]}x{new[1]} patch grid ({method})')
    return out


FAMILY = MixerFamily()
