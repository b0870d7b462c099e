"""The MLP-Mixer family's interop (`INTEROP`): timm 1.0's `MlpMixer` and Google's `.npz` (numpy).

timm's names (PyTorch: Linear weights [out, in], conv weights OIHW): stem.proj, blocks.{i}.norm1,
blocks.{i}.mlp_tokens.fc1/fc2, blocks.{i}.norm2, blocks.{i}.mlp_channels.fc1/fc2, norm, head.
timm's MlpMixer has no `.npz` reader (`load_pretrained`) in 1.0.31, always uses the exact GELU (it
runs Google's tanh-GELU checkpoints that way too), and its `mixer_*_224` entry points fix the patch
size, depth and width, so only the paper's sizes are expressible as a timm `config.json`.
Google's released Mixer `.npz` is the family's file layout (`check_npz_layout` checks keys and
shapes against it).
"""
from __future__ import annotations

import logging
import re
from typing import Any, Mapping, Optional

import numpy as np

from vit_jax.families import mixer as mixer_family
from vit_jax.families.base import Flat, check_sizes
from vit_jax.families.interop import Interop, timm_pretrained_cfg, to_numpy
from vit_jax.families.mixer import BLOCK, MODELS, count_blocks
from vit_jax.shapes import hw

# timm's registered Mixers -> ours.
TIMM_NAMES = {f'mixer_{s.lower()}{p}_224': f'Mixer-{s}_{p}' for s in 'SBL' for p in (16, 32)}
_PREFIXES = ('opt/target/', 'params/')
_NPZ_KEY = re.compile(r'^(stem/(kernel|bias)|(pre_head_layer_norm|MixerBlock_\d+/LayerNorm_[01])/'
                      r'(scale|bias)|MixerBlock_\d+/(token|channel)_mixing/Dense_[01]/(kernel|bias)'
                      r'|head/(kernel|bias))$')
_TIMM_BLOCK = re.compile(r'^blocks\.(\d+)\.')
# Our sub-module path in a block -> timm's.
_BLOCK_NAMES = (('LayerNorm_0', 'norm1'), ('token_mixing/Dense_0', 'mlp_tokens.fc1'),
                ('token_mixing/Dense_1', 'mlp_tokens.fc2'), ('LayerNorm_1', 'norm2'),
                ('channel_mixing/Dense_0', 'mlp_channels.fc1'),
                ('channel_mixing/Dense_1', 'mlp_channels.fc2'))


def fields_from_timm_name(arch: str) -> dict[str, Any]:
  """Our fields for a timm name ('mixer_b16_224', '.goog_in21k'-style tags allowed); act is 'gelu'
  because timm's MlpMixer uses the exact GELU whatever weights it holds."""
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
  flat = strip_prefix(flat)
  if count_blocks(list(flat), BLOCK) != fields['num_blocks']:
    raise ValueError(f'the parameters hold {count_blocks(list(flat), BLOCK)} Mixer blocks, the '
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
  if count_blocks(list(state), _TIMM_BLOCK) != fields['num_blocks']:
    raise ValueError(f'the timm state dict holds {count_blocks(list(state), _TIMM_BLOCK)} blocks, '
                     f'the fields say num_blocks={fields["num_blocks"]}')
  out: Flat = {}
  def copy(theirs, ours, linear):
    w = to_numpy(state[f'{theirs}.weight'])
    out[f'{ours}/kernel' if linear else f'{ours}/scale'] = np.ascontiguousarray(w.T) if linear else w
    out[f'{ours}/bias'] = to_numpy(state[f'{theirs}.bias'])
  out['stem/kernel'] = np.ascontiguousarray(
      to_numpy(state['stem.proj.weight']).transpose(2, 3, 1, 0))
  out['stem/bias'] = to_numpy(state['stem.proj.bias'])
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
                num_blocks=count_blocks(list(state), _TIMM_BLOCK), hidden_dim=int(d),
                tokens_mlp_dim=int(t),
                channels_mlp_dim=int(np.shape(state['blocks.0.mlp_channels.fc1.weight'])[0]),
                act='gelu')
  num_classes = int(np.shape(state['head.weight'])[0]) if 'head.weight' in state else None
  return fields, int(num_tokens), num_classes, int(channels)


# ---------- Google's .npz layout ----------

def strip_prefix(flat: Mapping[str, np.ndarray]) -> Flat:
  """Drops a training-state prefix ('opt/target/', 'params/') and the keys outside it."""
  for prefix in _PREFIXES:
    if f'{prefix}stem/kernel' in flat:
      return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  return dict(flat)


def npz_shapes(fields: Mapping[str, Any], num_tokens: int, num_classes: Optional[int],
               channels: int = 3) -> dict[str, tuple[int, ...]]:
  """Every key of Google's Mixer `.npz` for these sizes, with its shape."""
  (ph, pw), d = hw(fields['patch_size']), fields['hidden_dim']
  t, c = fields['tokens_mlp_dim'], fields['channels_mlp_dim']
  shapes = {'stem/kernel': (ph, pw, channels, d), 'stem/bias': (d,),
            'pre_head_layer_norm/scale': (d,), 'pre_head_layer_norm/bias': (d,)}
  for i in range(fields['num_blocks']):
    b = f'MixerBlock_{i}'
    for ln in ('LayerNorm_0', 'LayerNorm_1'):
      shapes[f'{b}/{ln}/scale'] = shapes[f'{b}/{ln}/bias'] = (d,)
    for mlp, width, hidden in (('token_mixing', num_tokens, t), ('channel_mixing', d, c)):
      shapes[f'{b}/{mlp}/Dense_0/kernel'] = (width, hidden)
      shapes[f'{b}/{mlp}/Dense_0/bias'] = (hidden,)
      shapes[f'{b}/{mlp}/Dense_1/kernel'] = (hidden, width)
      shapes[f'{b}/{mlp}/Dense_1/bias'] = (width,)
  if num_classes:
    shapes['head/kernel'], shapes['head/bias'] = (d, num_classes), (num_classes,)
  return shapes


def check_npz_layout(flat: Mapping[str, Any], fields: Mapping[str, Any], num_tokens: int,
                     num_classes: Optional[int], channels: int = 3) -> None:
  """Raises a ValueError naming missing, extra and misshapen keys against Google's layout."""
  want = npz_shapes(fields, num_tokens, num_classes, channels)
  missing, extra = sorted(set(want) - set(flat)), sorted(set(flat) - set(want))
  wrong = [f'{k} {tuple(flat[k].shape)} (expected {want[k]})' for k in sorted(set(want) & set(flat))
           if tuple(flat[k].shape) != want[k]]
  if missing or extra or wrong:
    raise ValueError(f'not Google\'s Mixer .npz layout: missing {missing[:5]}, extra {extra[:5]}, '
                     f'wrong shapes {wrong[:5]}')


# ---------- the interop ----------

class MixerInterop(Interop):
  """MLP-Mixer: a timm counterpart at the paper's sizes, Google's npz, no Hugging Face one."""
  timm_prefixes = ('mixer_',)
  writes_npz = True

  def reads_timm(self, architecture, keys) -> bool:
    return architecture.startswith(self.timm_prefixes) if architecture else is_timm_mixer(keys)

  def to_timm(self, flat, arch):
    cfg = arch.model_config
    name, args = timm_create_args(cfg, arch.num_classes, arch.image_size, arch.channels)
    if cfg.get('act', 'gelu_tanh') != 'gelu':
      logging.warning('timm\'s MlpMixer uses the exact GELU; this model was built with %r, so timm '
                      'logits will differ slightly (as for Google\'s Mixer weights in timm)',
                      cfg.get('act', 'gelu_tanh'))
    state = to_timm(flat, cfg)
    pretrained_cfg = timm_pretrained_cfg(arch, args['num_classes'], first_conv='stem.proj')
    config = dict(architecture=name, num_classes=args['num_classes'],
                  num_features=cfg['hidden_dim'], global_pool='avg', model_args=args,
                  pretrained_cfg=pretrained_cfg)
    return state, config

  def from_timm(self, state, config):
    """Sizes from the shapes (checked against `architecture` when named), act 'gelu' (what timm
    computes), image size from model_args / pretrained_cfg, else the square grid of the tokens."""
    args, pcfg = dict(config.get('model_args') or {}), config.get('pretrained_cfg') or {}
    found = fields_from_timm_state(state)[0]
    architecture = config.get('architecture', '')
    if architecture:
      check_sizes(found, fields_from_timm_name(architecture), ('patch_size', 'num_blocks',
                                                               'hidden_dim'), architecture)
    fields: dict[str, Any] = {'act': 'gelu'}
    notes: list[str] = []
    if 'vit_jax' in config:  # Written here: keep the registry name and options.
      meta = config['vit_jax'].get('model_config', {})
      fields = {**meta, 'act': 'gelu'}
      if meta.get('act', 'gelu_tanh') != 'gelu':
        notes.append(f'act: {meta.get("act", "gelu_tanh")!r} before the timm export; timm runs the '
                     'exact GELU, so it is read back as act=\'gelu\'')
    size = args.get('img_size') or (
        list(pcfg['input_size'][1:]) if pcfg.get('input_size') else None)
    flat = from_timm(state, found)
    arch = self.family.infer(flat, model_config=fields, image_size=size)
    if pcfg.get('mean') and pcfg.get('std'):
      arch.mean, arch.std = tuple(pcfg['mean']), tuple(pcfg['std'])
    return flat, arch, notes

  def npz_keys_ok(self, flat) -> list[str]:
    return [k for k in flat if not _NPZ_KEY.match(k)]


INTEROP = MixerInterop(mixer_family.FAMILY)
