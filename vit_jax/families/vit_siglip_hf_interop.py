"""The ViT family's SigLIP interop with Hugging Face: `SiglipVisionModel` (the image tower with its
attention-pooling head) and `SiglipForImageClassification` (the mean of the tokens, then a Linear)
<-> Google's names, numpy only (`vit_interop.VitInterop` calls it for a ViT without a class token).

Hugging Face's on-disk names: vision_model.embeddings.{patch_embedding, position_embedding.weight
[N, D]}, vision_model.encoder.layers.{i}.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2,
mlp.fc1, mlp.fc2}, vision_model.post_layernorm, vision_model.head.{probe, attention.in_proj_weight
(q, k, v stacked), attention.in_proj_bias, attention.out_proj, layernorm, mlp.fc1, mlp.fc2},
classifier. transformers 5 saves a bare SiglipVisionModel without the `vision_model.` prefix and
reads both; a whole `SiglipModel` (text tower too) is read for its image tower.

What is exact: classifier='gap' (LayerNorm on every token, then the mean) is
SiglipForImageClassification; classifier='map' is SiglipVisionModel's head, whose pooler_output is
this model's pre-logits. transformers has no classifier on the attention-pooled output, so a MAP
model with a head is refused.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from vit_jax.families import vit as vit_family
from vit_jax.families import vit_hf_interop as vit_hf
from vit_jax.families.base import SIGNED_UNIT, Architecture, Flat
from vit_jax.families.interop import (conv_from_torch, conv_to_torch, dense_from_torch,
                                      dense_to_torch, fused_to_torch, ln_from_torch, ln_to_torch,
                                      split_from_torch)
from vit_jax.families.vit import POSEMB_KEY
from vit_jax.shapes import hw

MODEL_TYPES = ('siglip_vision_model', 'siglip')
V = 'vision_model'
_PROJ = {'query': 'q_proj', 'key': 'k_proj', 'value': 'v_proj', 'out': 'out_proj'}
_MAP = 'MAPHead_0'
_MAP_ATT = f'{_MAP}/MultiHeadDotProductAttention_0'


def to_hf(flat: Mapping[str, np.ndarray], arch: Architecture) -> tuple[Flat, dict[str, Any]]:
  """(SiglipVisionModel or SiglipForImageClassification state dict, its config.json without
  labels): a headless model -> the vision model, with its attention-pooling head for 'map' (its
  pooler_output is this model's pre-logits) and without one for 'gap' (the mean of its last hidden
  state is); a 'gap' model with a head -> the classifier."""
  cfg = arch.model_config
  vit_hf.check_square('Hugging Face\'s SiglipVisionModel', cfg, arch.image_size)
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  headed = 'head/kernel' in flat
  use_head = cfg['classifier'] == 'map'
  if use_head and headed:
    raise ValueError(
        'Hugging Face\'s SiglipForImageClassification averages the patch tokens; it has no MAP '
        '(attention-pooling) head under its classifier, and SiglipVisionModel has that head but no '
        'classifier. Export with `--to timm`, which can express it (or the encoder alone, '
        'num_classes=0, as SiglipVisionModel)')
  grid = vit_family.FAMILY.grid(cfg, arch.image_size)
  pe = flat.get(POSEMB_KEY)
  if pe is None:
    pe = vit_family.fixed_posemb(cfg, grid, 0)
  e = f'{V}.embeddings'
  out: Flat = {f'{e}.patch_embedding.weight': conv_to_torch(flat['embedding/kernel']),
               f'{e}.patch_embedding.bias': flat['embedding/bias'],
               f'{e}.position_embedding.weight': pe[0]}
  for i in range(cfg['num_layers']):
    b, t = f'Transformer/encoderblock_{i}', f'{V}.encoder.layers.{i}'
    ln_to_torch(flat, f'{b}/LayerNorm_0', out, f'{t}.layer_norm1')
    for ours, theirs in _PROJ.items():
      dense_to_torch(flat, f'{b}/MultiHeadDotProductAttention_1/{ours}', out,
                     f'{t}.self_attn.{theirs}')
    ln_to_torch(flat, f'{b}/LayerNorm_2', out, f'{t}.layer_norm2')
    dense_to_torch(flat, f'{b}/MlpBlock_3/Dense_0', out, f'{t}.mlp.fc1')
    dense_to_torch(flat, f'{b}/MlpBlock_3/Dense_1', out, f'{t}.mlp.fc2')
  ln_to_torch(flat, 'Transformer/encoder_norm', out, f'{V}.post_layernorm')
  if use_head:
    h = f'{V}.head'
    out[f'{h}.probe'] = flat[f'{_MAP}/probe']
    fused_to_torch(flat, _MAP_ATT, ('query', 'key', 'value'), out, f'{h}.attention.in_proj')
    out[f'{h}.attention.in_proj_weight'] = out.pop(f'{h}.attention.in_proj.weight')
    out[f'{h}.attention.in_proj_bias'] = out.pop(f'{h}.attention.in_proj.bias')
    dense_to_torch(flat, f'{_MAP_ATT}/out', out, f'{h}.attention.out_proj')
    ln_to_torch(flat, f'{_MAP}/LayerNorm_0', out, f'{h}.layernorm')
    dense_to_torch(flat, f'{_MAP}/MlpBlock_0/Dense_0', out, f'{h}.mlp.fc1')
    dense_to_torch(flat, f'{_MAP}/MlpBlock_0/Dense_1', out, f'{h}.mlp.fc2')
  if headed:
    dense_to_torch(flat, 'head', out, 'classifier')
  (size, _), (ph, _) = hw(arch.image_size), hw(cfg['patch_size'])
  vision = {'model_type': MODEL_TYPES[0], 'hidden_size': cfg['hidden_size'],
            'intermediate_size': cfg['mlp_dim'], 'num_hidden_layers': cfg['num_layers'],
            'num_attention_heads': cfg['num_heads'], 'num_channels': arch.channels,
            'image_size': size, 'patch_size': ph, 'hidden_act': vit_hf.hf_act(cfg),
            'layer_norm_eps': 1e-6, 'attention_dropout': 0.0, 'vision_use_head': use_head}
  if not headed:  # (SiglipForImageClassification without labels fails in transformers' init)
    config = {**vision, 'architectures': ['SiglipVisionModel'], 'dtype': 'float32'}
  else:
    config = {'architectures': ['SiglipForImageClassification'], 'model_type': MODEL_TYPES[1],
              'vision_config': vision, 'dtype': 'float32'}
  return {k: np.ascontiguousarray(v) for k, v in out.items()}, config


def from_hf(state: Mapping[str, np.ndarray], config: Mapping[str, Any]
            ) -> tuple[Flat, Architecture, list[str]]:
  """A SiglipVisionModel, SiglipForImageClassification or SiglipModel state dict and config.json ->
  (flat, architecture, notes)."""
  vision = config.get('vision_config') or {} if config['model_type'] == 'siglip' else config
  notes: list[str] = []
  sd: Flat = {}
  dropped = []
  for key, value in state.items():
    if key.startswith(('text_model.', 'logit_scale', 'logit_bias')):
      dropped.append(key)
      continue
    sd[key[len(V) + 1:] if key.startswith(f'{V}.') else key] = np.asarray(value)
  sd.pop('embeddings.position_ids', None)
  if dropped:
    notes.append(f'read the image tower of a SigLIP model: left out its text tower and logit '
                 f'scale/bias ({len(dropped)} arrays)')
  heads = int(vision.get('num_attention_heads', 12))
  pe = sd.pop('embeddings.position_embedding.weight')
  d = pe.shape[-1]
  hk = (heads, d // heads)
  out: Flat = {'embedding/kernel': conv_from_torch(sd.pop('embeddings.patch_embedding.weight')),
               'embedding/bias': sd.pop('embeddings.patch_embedding.bias'), POSEMB_KEY: pe[None]}
  depth = 1 + max((int(m.group(1)) for k in sd
                   if (m := re.match(r'encoder\.layers\.(\d+)\.', k))), default=-1)
  for i in range(depth):
    b, t = f'Transformer/encoderblock_{i}', f'encoder.layers.{i}'
    att = f'{b}/MultiHeadDotProductAttention_1'
    ln_from_torch(sd, f'{t}.layer_norm1', out, f'{b}/LayerNorm_0')
    for ours, theirs in _PROJ.items():
      shapes = ((*hk, d), None) if ours == 'out' else ((d, *hk), hk)
      dense_from_torch(sd, f'{t}.self_attn.{theirs}', out, f'{att}/{ours}', *shapes)
    ln_from_torch(sd, f'{t}.layer_norm2', out, f'{b}/LayerNorm_2')
    dense_from_torch(sd, f'{t}.mlp.fc1', out, f'{b}/MlpBlock_3/Dense_0')
    dense_from_torch(sd, f'{t}.mlp.fc2', out, f'{b}/MlpBlock_3/Dense_1')
  ln_from_torch(sd, 'post_layernorm', out, 'Transformer/encoder_norm')
  has_head = 'head.probe' in sd
  classifier = 'gap' if 'classifier.weight' in sd or not has_head else 'map'
  if has_head and classifier == 'gap':
    notes.append('left out the attention-pooling head: SiglipForImageClassification classifies the '
                 'mean of the tokens and never runs it')
    for k in [k for k in sd if k.startswith('head.')]:
      sd.pop(k)
  elif has_head:
    out[f'{_MAP}/probe'] = sd.pop('head.probe')
    sd['_in.weight'] = sd.pop('head.attention.in_proj_weight')
    sd['_in.bias'] = sd.pop('head.attention.in_proj_bias')
    split_from_torch(sd, '_in', ('query', 'key', 'value'), heads, out, _MAP_ATT)
    dense_from_torch(sd, 'head.attention.out_proj', out, f'{_MAP_ATT}/out', (*hk, d))
    ln_from_torch(sd, 'head.layernorm', out, f'{_MAP}/LayerNorm_0')
    dense_from_torch(sd, 'head.mlp.fc1', out, f'{_MAP}/MlpBlock_0/Dense_0')
    dense_from_torch(sd, 'head.mlp.fc2', out, f'{_MAP}/MlpBlock_0/Dense_1')
  if 'classifier.weight' in sd:
    dense_from_torch(sd, 'classifier', out, 'head')
  if sd:
    raise ValueError(f'Hugging Face SigLIP parameters this project\'s ViT cannot express: '
                     f'{sorted(sd)}')
  notes += vit_hf.eps_notes(vision, 1e-6)
  meta = dict((config.get('vit_jax') or {}).get('model_config') or {})
  act = vit_hf.act_from_hf(vision.get('hidden_act', 'gelu_pytorch_tanh'))  # SigLIP's default
  fields: dict[str, Any] = {**meta, 'posemb': 'learned', 'classifier': classifier, 'act': act}
  arch = vit_family.FAMILY.infer(out, model_config=fields, image_size=vision.get('image_size', 224))
  arch.channels = int(vision.get('num_channels', 3))
  arch.mean, arch.std = SIGNED_UNIT  # SigLIP's; a preprocessor_config.json next to it overrides
  return out, arch, notes
