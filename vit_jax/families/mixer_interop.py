"""MLP-Mixer key maps: this project's (Google's) names <-> timm 1.0's `MlpMixer`, numpy only.

timm's names (PyTorch: Linear weights [out, in], conv weights OIHW): stem.proj, blocks.{i}.norm1,
blocks.{i}.mlp_tokens.fc1/fc2, blocks.{i}.norm2, blocks.{i}.mlp_channels.fc1/fc2, norm, head. Its
`mixer_*_224` entry points fix the patch size, depth and width, so only the paper's sizes are
expressible as a timm `config.json`.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vit_jax.families.base import Flat, hw

_BLOCK = re.compile(r'^MixerBlock_(\d+)/')
_TIMM_BLOCK = re.compile(r'^blocks\.(\d+)\.')
# Our sub-module path in a block -> timm's.
_BLOCK_NAMES = (('LayerNorm_0', 'norm1'), ('token_mixing/Dense_0', 'mlp_tokens.fc1'),
                ('token_mixing/Dense_1', 'mlp_tokens.fc2'), ('LayerNorm_1', 'norm2'),
                ('channel_mixing/Dense_0', 'mlp_channels.fc1'),
                ('channel_mixing/Dense_1', 'mlp_channels.fc2'))


def _numpy(v: Any) -> np.ndarray:
  """numpy view of an array or a (CPU) torch tensor."""
  return np.asarray(v.detach().cpu().numpy() if hasattr(v, 'detach') else v)


def _count_blocks(keys: Sequence[str], pattern: re.Pattern) -> int:
  found = sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})
  if found != list(range(len(found))):
    raise ValueError(f'Mixer blocks are not numbered 0..{len(found) - 1}: {found}')
  return len(found)


def fields_from_timm_name(arch: str) -> dict[str, Any]:
  """Our fields for a timm name ('mixer_b16_224', '.goog_in21k'-style tags allowed); act is 'gelu'
  because timm's MlpMixer uses the exact GELU whatever weights it holds."""
  from vit_jax.families.mixer import MODELS, TIMM_NAMES  # pylint: disable=import-outside-toplevel
  base = arch.split('.', 1)[0]
  if base not in TIMM_NAMES:
    raise ValueError(f'{arch!r} is not one of timm\'s MLP-Mixer models {sorted(TIMM_NAMES)}')
  return {**MODELS[TIMM_NAMES[base]], 'act': 'gelu'}


def timm_model_args(fields: Mapping[str, Any], num_classes: Optional[int], image_size: Any,
                    channels: int = 3) -> dict[str, Any]:
  """JSON-able `timm.models.mlp_mixer.MlpMixer(**args)` arguments that build these sizes.

  timm derives the MLP widths as int(ratio * hidden_dim); a width that no ratio reaches is an error.
  """
  d, ratios = fields['hidden_dim'], []
  for name in ('tokens_mlp_dim', 'channels_mlp_dim'):
    ratios.append(fields[name] / d)
    if int(ratios[-1] * d) != fields[name]:
      raise ValueError(f'timm builds Mixer MLPs of int(ratio * hidden_dim) units; {name}='
                       f'{fields[name]} is not reachable from hidden_dim={d}')
  (h, w), (ph, pw) = hw(image_size), hw(fields['patch_size'])
  return dict(img_size=[h, w], patch_size=ph if ph == pw else [ph, pw], in_chans=channels,
              num_classes=num_classes or 0, num_blocks=fields['num_blocks'], embed_dim=d,
              mlp_ratio=ratios, global_pool='avg')


def timm_architecture_name(fields: Mapping[str, Any]) -> Optional[str]:
  """timm's registry name with this patch size, depth and width (None if there is none)."""
  from vit_jax.families.mixer import MODELS, TIMM_NAMES  # pylint: disable=import-outside-toplevel
  for timm_name, ours in TIMM_NAMES.items():
    ref = MODELS[ours]
    if hw(ref['patch_size']) == hw(fields['patch_size']) and all(
        ref[k] == fields[k] for k in ('num_blocks', 'hidden_dim')):
      return timm_name
  return None


def timm_create_args(fields: Mapping[str, Any], num_classes: Optional[int], image_size: Any,
                     channels: int = 3) -> tuple[str, dict[str, Any]]:
  """(architecture, kwargs) for `timm.create_model(architecture, **kwargs)`, i.e. timm's Hub
  config.json `architecture` and `model_args`. timm's `mixer_*_224` functions set patch_size,
  num_blocks and embed_dim and reject them as arguments: other sizes are a ValueError."""
  from vit_jax.families.mixer import TIMM_NAMES  # pylint: disable=import-outside-toplevel
  name = timm_architecture_name(fields)
  if name is None:
    raise ValueError(
        f'timm registers MLP-Mixers only at the paper\'s sizes {sorted(TIMM_NAMES)}, not patch_size='
        f'{fields["patch_size"]}, num_blocks={fields["num_blocks"]}, hidden_dim={fields["hidden_dim"]}'
        ': build `timm.models.mlp_mixer.MlpMixer(**timm_model_args(...))` and load the state dict')
  args = timm_model_args(fields, num_classes, image_size, channels)
  for k in ('patch_size', 'num_blocks', 'embed_dim'):
    del args[k]
  return name, args


def to_timm(flat: Mapping[str, np.ndarray], fields: Mapping[str, Any]) -> Flat:
  """Our flat parameters -> a timm `MlpMixer` state dict (numpy, same dtypes, contiguous)."""
  from vit_jax.families.mixer import strip_prefix  # pylint: disable=import-outside-toplevel
  flat = strip_prefix(flat)
  if _count_blocks(list(flat), _BLOCK) != fields['num_blocks']:
    raise ValueError(f'the parameters hold {_count_blocks(list(flat), _BLOCK)} Mixer blocks, the '
                     f'fields say num_blocks={fields["num_blocks"]}')
  out: Flat = {}
  def copy(ours, theirs, linear):
    w = np.asarray(flat[f'{ours}/kernel' if linear else f'{ours}/scale'])
    out[f'{theirs}.weight'] = np.ascontiguousarray(w.T) if linear else w
    out[f'{theirs}.bias'] = np.asarray(flat[f'{ours}/bias'])
  out['stem.proj.weight'] = np.ascontiguousarray(
      np.asarray(flat['stem/kernel']).transpose(3, 2, 0, 1))  # HWIO -> OIHW
  out['stem.proj.bias'] = np.asarray(flat['stem/bias'])
  for i in range(fields['num_blocks']):
    for ours, theirs in _BLOCK_NAMES:
      copy(f'MixerBlock_{i}/{ours}', f'blocks.{i}.{theirs}', 'Dense' in ours)
  copy('pre_head_layer_norm', 'norm', False)
  if 'head/kernel' in flat:
    copy('head', 'head', True)
  return out


def is_timm_mixer(keys: Any) -> bool:
  """True for a timm MlpMixer state dict (not ResMLP/gMLP, which share `stem.proj`)."""
  return 'stem.proj.weight' in keys and 'blocks.0.mlp_tokens.fc1.weight' in keys


def from_timm(state: Mapping[str, Any], fields: Mapping[str, Any]) -> Flat:
  """A timm `MlpMixer` state dict (numpy arrays or torch tensors) -> our flat parameters.

  A ValueError names keys that are not a Mixer's or that these fields would leave unused.
  """
  if not is_timm_mixer(state):
    raise ValueError('not a timm MlpMixer state dict: no `stem.proj.weight` and '
                     '`blocks.0.mlp_tokens.fc1.weight` (ResMLP and gMLP are not supported)')
  if _count_blocks(list(state), _TIMM_BLOCK) != fields['num_blocks']:
    raise ValueError(f'the timm state dict holds {_count_blocks(list(state), _TIMM_BLOCK)} blocks, '
                     f'the fields say num_blocks={fields["num_blocks"]}')
  out: Flat = {}
  def copy(theirs, ours, linear):
    w = _numpy(state[f'{theirs}.weight'])
    out[f'{ours}/kernel' if linear else f'{ours}/scale'] = np.ascontiguousarray(w.T) if linear else w
    out[f'{ours}/bias'] = _numpy(state[f'{theirs}.bias'])
  out['stem/kernel'] = np.ascontiguousarray(_numpy(state['stem.proj.weight']).transpose(2, 3, 1, 0))
  out['stem/bias'] = _numpy(state['stem.proj.bias'])
  for i in range(fields['num_blocks']):
    for ours, theirs in _BLOCK_NAMES:
      copy(f'blocks.{i}.{theirs}', f'MixerBlock_{i}/{ours}', 'Dense' in ours)
  copy('norm', 'pre_head_layer_norm', False)
  if 'head.weight' in state:
    copy('head', 'head', True)
  unused = sorted(set(state) - set(to_timm(out, fields)))
  if unused:
    raise ValueError(f'timm keys that are not part of an MlpMixer: {unused[:5]}')
  return out


def fields_from_timm_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], int, Optional[int],
                                                                 int]:
  """(fields with act='gelu', num_tokens, num_classes, channels) of a timm MlpMixer state dict."""
  if not is_timm_mixer(state):
    raise ValueError('not a timm MlpMixer state dict')
  d, channels, ph, pw = np.shape(state['stem.proj.weight'])
  t, num_tokens = np.shape(state['blocks.0.mlp_tokens.fc1.weight'])
  fields = dict(patch_size=int(ph) if ph == pw else (int(ph), int(pw)),
                num_blocks=_count_blocks(list(state), _TIMM_BLOCK), hidden_dim=int(d),
                tokens_mlp_dim=int(t),
                channels_mlp_dim=int(np.shape(state['blocks.0.mlp_channels.fc1.weight'])[0]),
                act='gelu')
  num_classes = int(np.shape(state['head.weight'])[0]) if 'head.weight' in state else None
  return fields, int(num_tokens), num_classes, int(channels)
