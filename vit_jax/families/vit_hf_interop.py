"""The ViT family's Hugging Face interop: which transformers class expresses a ViT (`hf_target`:
ViT, DINOv2 or SigLIP, whose maps are `vit_dinov2_hf_interop.py` and `vit_siglip_hf_interop.py`),
and `ViTForImageClassification` <-> Google's names, numpy only (`vit_interop.VitInterop.to_hf` /
`from_hf` call it).

Hugging Face (the names every released ViT on the Hub uses): vit.embeddings.{cls_token,
position_embeddings, patch_embeddings.projection}, vit.encoder.layer.{i}.{layernorm_before,
attention.attention.{query,key,value}, attention.output.dense, layernorm_after, intermediate.dense,
output.dense}, vit.layernorm, classifier. Reading also takes transformers 5's in-memory names and bare
`ViTModel` checkpoints.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from vit_jax.families import vit as vit_family
from vit_jax.families.base import Architecture, Flat
from vit_jax.families.interop import (conv_from_torch, conv_to_torch, dense_from_torch,
                                      dense_to_torch, ln_from_torch, ln_to_torch)
from vit_jax.families.vit import POSEMB_KEY
from vit_jax.shapes import hw

MODEL_TYPES = ('vit',)
HF_TANH = ('gelu_pytorch_tanh', 'gelu_new', 'gelu_fast', 'gelu_python_tanh')
_V5_RENAMES = ((r'^vit\.layers\.(\d+)\.', r'vit.encoder.layer.\1.'),
               (r'\.attention\.([qkv])_proj\.', None),  # -> .attention.attention.{query,key,value}.
               (r'\.attention\.o_proj\.', '.attention.output.dense.'),
               (r'\.mlp\.fc1\.', '.intermediate.dense.'), (r'\.mlp\.fc2\.', '.output.dense.'))
_QKV = {'q': 'query', 'k': 'key', 'v': 'value'}


def hf_target(fields: Mapping[str, Any]) -> str:
  """The transformers architecture that expresses this ViT exactly: 'vit'
  (`ViTForImageClassification`; a table without a class row gets a zero one), 'dinov2'
  (`Dinov2[WithRegisters]Model` / `...ForImageClassification`: LayerScale or registers, with a
  class token) or 'siglip' (`SiglipVisionModel` / `SiglipForImageClassification`: no class token, mean or
  attention pooling). A ValueError naming what transformers lacks otherwise."""
  if fields.get('representation_size'):
    raise ValueError(
        'Hugging Face\'s ViT, DINOv2 and SigLIP classifiers have no pre-logits layer, but this '
        f'model has one (representation_size={fields["representation_size"]}); neither has timm. '
        'Drop it when fine-tuning (`keep_pre_logits=False`) or export with `--to npz`.')
  later = [f'{k}={fields[k]!r}' for k in ('layer_scale', 'num_registers') if fields.get(k)]
  missing = []
  if fields.get('fc_norm'):
    missing.append('a norm after pooling (fc_norm=True: transformers\' ViT, DINOv2 and SigLIP '
                   'normalise every token before pooling)')
  if fields['classifier'] != 'token' and later:
    missing.append(f'{" and ".join(later)} without a class token (classifier='
                   f'{fields["classifier"]!r}: Dinov2WithRegisters always reads a class token, '
                   'SigLIP has no LayerScale or registers)')
  if missing:
    raise ValueError(f'transformers has no ViT with {"; nor with ".join(missing)}. Export with '
                     '`--to timm`, which expresses it')
  if fields['classifier'] == 'token':  # (no_embed_class alone: ViT's table with a zero class row)
    return 'dinov2' if later else 'vit'
  return 'siglip'


def check_hf_expressible(fields: Mapping[str, Any]) -> None:
  """ValueError unless `ViTForImageClassification` expresses this ViT (see `hf_target`)."""
  if hf_target(fields) != 'vit':
    raise ValueError('this model is not a plain class-token ViT: `ViTForImageClassification` '
                     'cannot express it')


def hf_act(fields: Mapping[str, Any]) -> str:
  """transformers' `hidden_act` of our `act` (the ViT module's default is the tanh form)."""
  return 'gelu' if fields.get('act') == 'gelu' else 'gelu_pytorch_tanh'


def act_from_hf(hidden_act: str) -> str:
  """Our `act` of transformers' `hidden_act`; ValueError for anything but a GELU."""
  if hidden_act not in HF_TANH + ('gelu',):
    raise ValueError(f'hidden_act={hidden_act!r} is neither GELU form this project implements')
  return 'gelu_tanh' if hidden_act in HF_TANH else 'gelu'


def eps_notes(config: Mapping[str, Any], default: float) -> list[str]:
  """A note when the source's LayerNorm epsilon (config.json, else the class's `default`) is not
  this project's 1e-6."""
  eps = config.get('layer_norm_eps', default)
  return [f'the source uses layer_norm_eps={eps}; this project uses 1e-6'] if abs(
      eps - 1e-6) > 1e-12 else []


def check_square(what: str, fields: Mapping[str, Any], image_size: Any) -> None:
  """transformers' DINOv2 and SigLIP keep a square position table and resample it whenever the
  input is not square: a ValueError for a non-square image or patch, or a table grid other than
  the image's (`posemb_grid`)."""
  (h, w), (ph, pw) = hw(image_size), hw(fields['patch_size'])
  if h != w or ph != pw:
    raise ValueError(f'{what} assumes square images and patches (it resamples its position table '
                     f'whenever height != width); this model takes {h}x{w} images in {ph}x{pw} '
                     'patches. Export with `--to timm`, which expresses it')
  grid = fields.get('posemb_grid')
  if grid is not None and tuple(hw(grid)) != (h // ph, w // pw):
    raise ValueError(f'{what} reads its position table at the image size of config.json; this '
                     f'model\'s table is {hw(grid)[0]}x{hw(grid)[1]} but its images are {h}x{w}. '
                     'Resample it to the image size (fine-tune from it at that size) or export '
                     'with `--to timm`')


def to_hf(flat: Mapping[str, np.ndarray], arch: Architecture) -> tuple[Flat, dict[str, Any]]:
  """(ViTForImageClassification state dict, its config.json without labels) of a ViT."""
  cfg = arch.model_config
  check_hf_expressible(cfg)
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  e = 'vit.embeddings'
  out: Flat = {f'{e}.patch_embeddings.projection.weight': conv_to_torch(flat['embedding/kernel']),
               f'{e}.patch_embeddings.projection.bias': flat['embedding/bias'],
               f'{e}.cls_token': flat['cls']}
  # HF always adds position embeddings: fixed kinds are written as their values at this size.
  grid = vit_family.FAMILY.grid(cfg, arch.image_size)
  pe = flat.get(POSEMB_KEY, vit_family.fixed_posemb(cfg, grid, 1))
  if cfg.get('no_embed_class') and POSEMB_KEY in flat:  # a zero row: the class token gets none
    pe = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
  out[f'{e}.position_embeddings'] = pe
  for i in range(cfg['num_layers']):
    b, t = f'Transformer/encoderblock_{i}', f'vit.encoder.layer.{i}'
    att = f'{b}/MultiHeadDotProductAttention_1'
    ln_to_torch(flat, f'{b}/LayerNorm_0', out, f'{t}.layernorm_before')
    for n in ('query', 'key', 'value'):
      dense_to_torch(flat, f'{att}/{n}', out, f'{t}.attention.attention.{n}')
    dense_to_torch(flat, f'{att}/out', out, f'{t}.attention.output.dense')
    ln_to_torch(flat, f'{b}/LayerNorm_2', out, f'{t}.layernorm_after')
    dense_to_torch(flat, f'{b}/MlpBlock_3/Dense_0', out, f'{t}.intermediate.dense')
    dense_to_torch(flat, f'{b}/MlpBlock_3/Dense_1', out, f'{t}.output.dense')
  ln_to_torch(flat, 'Transformer/encoder_norm', out, 'vit.layernorm')
  if 'head/kernel' in flat:
    dense_to_torch(flat, 'head', out, 'classifier')
  ph, pw = hw(cfg['patch_size'])
  h, w = arch.image_size
  config = {
      'architectures': ['ViTForImageClassification'], 'model_type': 'vit',
      'hidden_size': cfg['hidden_size'], 'num_hidden_layers': cfg['num_layers'],
      'num_attention_heads': cfg['num_heads'], 'intermediate_size': cfg['mlp_dim'],
      'hidden_act': hf_act(cfg),
      'layer_norm_eps': 1e-6, 'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0,
      'initializer_range': 0.02, 'qkv_bias': True, 'num_channels': arch.channels,
      'image_size': h if h == w else [h, w], 'patch_size': ph if ph == pw else [ph, pw],
      'encoder_stride': ph, 'dtype': 'float32'}
  return {k: np.ascontiguousarray(v) for k, v in out.items()}, config


def canonical_hf_names(state: Mapping[str, np.ndarray]) -> tuple[Flat, list[str]]:
  """Any ViT state-dict spelling -> the on-disk names with the `vit.` prefix; returns (sd, notes)."""
  notes: list[str] = []
  out: Flat = {}
  for key, value in state.items():
    k = key if key.startswith(('vit.', 'classifier.')) else f'vit.{key}'
    for pattern, repl in _V5_RENAMES:
      if repl is None:
        k = re.sub(pattern, lambda m: f'.attention.attention.{_QKV[m.group(1)]}.', k)
      else:
        k = re.sub(pattern, repl, k)
    if k.startswith('vit.pooler.'):
      notes.append(f'dropped the ViTModel pooler ({key}): the classifier does not use it')
      continue
    out[k] = np.asarray(value)
  return out, notes


def from_hf(state: Mapping[str, np.ndarray], config: Mapping[str, Any]
            ) -> tuple[Flat, Architecture, list[str]]:
  """A ViT(ForImageClassification) state dict and config.json -> (flat, architecture, notes)."""
  num_heads = int(config['num_attention_heads'])
  sd, notes = canonical_hf_names(state)
  sd.pop('vit.embeddings.mask_token', None)
  e = 'vit.embeddings'
  out: Flat = {
      'embedding/kernel': conv_from_torch(sd.pop(f'{e}.patch_embeddings.projection.weight')),
      'embedding/bias': sd.pop(f'{e}.patch_embeddings.projection.bias'),
      'cls': sd.pop(f'{e}.cls_token'), POSEMB_KEY: sd.pop(f'{e}.position_embeddings')}
  d = out['cls'].shape[-1]
  hk = (num_heads, d // num_heads)
  depth = 1 + max((int(m.group(1)) for k in sd
                   if (m := re.match(r'vit\.encoder\.layer\.(\d+)\.', k))), default=-1)
  for i in range(depth):
    b, t = f'Transformer/encoderblock_{i}', f'vit.encoder.layer.{i}'
    att = f'{b}/MultiHeadDotProductAttention_1'
    ln_from_torch(sd, f'{t}.layernorm_before', out, f'{b}/LayerNorm_0')
    for n in ('query', 'key', 'value'):
      dense_from_torch(sd, f'{t}.attention.attention.{n}', out, f'{att}/{n}', (d, *hk), hk)
    dense_from_torch(sd, f'{t}.attention.output.dense', out, f'{att}/out', (*hk, d))
    ln_from_torch(sd, f'{t}.layernorm_after', out, f'{b}/LayerNorm_2')
    dense_from_torch(sd, f'{t}.intermediate.dense', out, f'{b}/MlpBlock_3/Dense_0')
    dense_from_torch(sd, f'{t}.output.dense', out, f'{b}/MlpBlock_3/Dense_1')
  ln_from_torch(sd, 'vit.layernorm', out, 'Transformer/encoder_norm')
  if 'classifier.weight' in sd:
    dense_from_torch(sd, 'classifier', out, 'head')
  if sd:
    raise ValueError(f'Hugging Face ViT parameters this project\'s ViT cannot express: {sorted(sd)}')
  notes += eps_notes(config, 1e-12)
  fields: dict[str, Any] = {'act': act_from_hf(config.get('hidden_act', 'gelu'))}
  if 'vit_jax' in config:
    fields = {**config['vit_jax'].get('model_config', {}), **fields, 'posemb': 'learned'}
    if fields.get('no_embed_class'):  # written with a class row (zero, or one's own): fold it
      out['cls'], out[POSEMB_KEY] = out['cls'] + out[POSEMB_KEY][:, :1], out[POSEMB_KEY][:, 1:]
  size = config.get('image_size', 224)
  arch = vit_family.FAMILY.infer(out, model_config=fields, image_size=size)
  arch.channels = int(config.get('num_channels', 3))
  return out, arch, notes
