"""The ViT family's DINOv2 interop with Hugging Face: `Dinov2Model` / `Dinov2ForImageClassification`
and their `...WithRegisters` twins <-> Google's names, numpy only (`vit_interop.VitInterop` calls it
for a class-token ViT with LayerScale, registers or a patch-only position table).

Hugging Face's on-disk names (what the Hub's checkpoints hold; transformers 5 renames the attention
on loading): [dinov2.|dinov2_with_registers.]embeddings.{cls_token, mask_token,
position_embeddings, register_tokens, patch_embeddings.projection}, encoder.layer.{i}.{norm1,
attention.attention.{query,key,value}, attention.output.dense, layer_scale1.lambda1, norm2,
mlp.fc1, mlp.fc2, layer_scale2.lambda1}, layernorm, and `classifier` (a Linear of 2D inputs).

What is exact, and why:
  - HF's table always has one row for the class token and none for registers. A model without a
    class row (no_embed_class: DeiT III, DINOv2 with registers) gets a zero row; rows a model has
    for its registers are added to the registers (constants plus constants: the same sums).
  - a model without LayerScale gets lambdas of 1 (x * 1 = x); reading drops lambdas that are all 1.
  - `Dinov2ForImageClassification` classifies concat(class token, mean of the patch tokens); this
    project's token classifier reads the class token alone, so the head is written with zero
    weights on the mean half, and a checkpoint whose mean half is not zero is refused on reading.
  - transformers' DINOv2 with registers runs at any input size, resampling its table bicubically
    with antialiasing: read here it gets dynamic_img_size with that method ('bicubic'), which
    gives its outputs at other sizes. Its DINOv2 without registers does not antialias: read here,
    it runs at its table's size (or is fine-tuned at another, the table resampled once).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from vit_jax.families import vit as vit_family
from vit_jax.families import vit_hf_interop as vit_hf
from vit_jax.families.base import IMAGENET, Architecture, Flat
from vit_jax.families.interop import (conv_from_torch, conv_to_torch, dense_from_torch,
                                      dense_to_torch, ln_from_torch, ln_to_torch)
from vit_jax.families.vit import DINO_LS, POSEMB_KEY
from vit_jax.shapes import hw

MODEL_TYPES = ('dinov2', 'dinov2_with_registers')
_QKV = ('query', 'key', 'value')
# transformers 5's in-memory spelling -> the Hub's.
_V5_RENAMES = ((r'\.attention\.q_proj\.', '.attention.attention.query.'),
               (r'\.attention\.k_proj\.', '.attention.attention.key.'),
               (r'\.attention\.v_proj\.', '.attention.attention.value.'),
               (r'\.attention\.o_proj\.', '.attention.output.dense.'))


def _class_name(registers: bool, headed: bool) -> str:
  return ('Dinov2WithRegisters' if registers else 'Dinov2') + (
      'ForImageClassification' if headed else 'Model')


def to_hf(flat: Mapping[str, np.ndarray], arch: Architecture) -> tuple[Flat, dict[str, Any]]:
  """(Dinov2[WithRegisters]{Model, ForImageClassification} state dict, its config.json without
  labels): the classification model when the ViT has a head, else the bare encoder (whose
  pooler_output, the normalised class token, is this model's pre-logits)."""
  cfg = arch.model_config
  what = 'Hugging Face\'s Dinov2Model'
  vit_hf.check_square(what, cfg, arch.image_size)
  d, m = cfg['hidden_size'], cfg['mlp_dim']
  if m % d:  # transformers 5 validates mlp_ratio as an int
    raise ValueError(f'{what} builds an MLP of hidden_size * mlp_ratio units with an integer '
                     f'mlp_ratio; mlp_dim={m} is not a multiple of hidden_size={d}: export with '
                     '`--to timm`')
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  regs = int(cfg.get('num_registers') or 0)
  headed = 'head/kernel' in flat
  model_type = MODEL_TYPES[1] if regs else MODEL_TYPES[0]
  p = f'{model_type}.' if headed else ''
  e = f'{p}embeddings'
  family = vit_family.FAMILY
  grid = family.grid(cfg, arch.image_size)
  rows = family.table_prefix(cfg)  # 0 (no_embed_class) or 1 + registers
  pe = flat.get(POSEMB_KEY)
  if pe is None:
    pe = vit_family.fixed_posemb(cfg, grid, rows)
  zeros = np.zeros((1, 1 + regs, d), np.float32)
  prefix_rows = pe[:, :rows] if rows else zeros
  out: Flat = {f'{e}.cls_token': flat['cls'], f'{e}.mask_token': np.zeros((1, d), np.float32),
               f'{e}.position_embeddings': np.concatenate([prefix_rows[:, :1], pe[:, rows:]], 1),
               f'{e}.patch_embeddings.projection.weight': conv_to_torch(flat['embedding/kernel']),
               f'{e}.patch_embeddings.projection.bias': flat['embedding/bias']}
  if regs:
    out[f'{e}.register_tokens'] = flat['registers'] + prefix_rows[:, 1:]
  ones = np.ones((d,), np.float32)
  for i in range(cfg['num_layers']):
    b, t = f'Transformer/encoderblock_{i}', f'{p}encoder.layer.{i}'
    att = f'{b}/MultiHeadDotProductAttention_1'
    ln_to_torch(flat, f'{b}/LayerNorm_0', out, f'{t}.norm1')
    for n in _QKV:
      dense_to_torch(flat, f'{att}/{n}', out, f'{t}.attention.attention.{n}')
    dense_to_torch(flat, f'{att}/out', out, f'{t}.attention.output.dense')
    ln_to_torch(flat, f'{b}/LayerNorm_2', out, f'{t}.norm2')
    dense_to_torch(flat, f'{b}/MlpBlock_3/Dense_0', out, f'{t}.mlp.fc1')
    dense_to_torch(flat, f'{b}/MlpBlock_3/Dense_1', out, f'{t}.mlp.fc2')
    for ours, theirs in (('LayerScale_1', 'layer_scale1'), ('LayerScale_3', 'layer_scale2')):
      out[f'{t}.{theirs}.lambda1'] = flat.get(f'{b}/{ours}/scale', ones)
  ln_to_torch(flat, 'Transformer/encoder_norm', out, f'{p}layernorm')
  if headed:
    dense_to_torch(flat, 'head', out, 'classifier')
    w = out['classifier.weight']  # [C, D] on the class token; the mean of the patches gets zeros
    out['classifier.weight'] = np.concatenate([w, np.zeros_like(w)], axis=1)
  (h, _), (ph, _) = hw(arch.image_size), hw(cfg['patch_size'])
  config = {
      'architectures': [_class_name(bool(regs), headed)], 'model_type': model_type,
      'hidden_size': d, 'num_hidden_layers': cfg['num_layers'],
      'num_attention_heads': cfg['num_heads'], 'mlp_ratio': m // d,
      'hidden_act': vit_hf.hf_act(cfg),
      'layer_norm_eps': 1e-6, 'layerscale_value': float(cfg.get('layer_scale') or 1.0),
      'use_swiglu_ffn': False, 'qkv_bias': True, 'hidden_dropout_prob': 0.0,
      'attention_probs_dropout_prob': 0.0, 'drop_path_rate': 0.0, 'initializer_range': 0.02,
      'num_channels': arch.channels, 'image_size': h, 'patch_size': ph, 'dtype': 'float32'}
  if regs:
    config['num_register_tokens'] = regs
  else:
    config['use_mask_token'] = True
  return {k: np.ascontiguousarray(v) for k, v in out.items()}, config


def _canonical(state: Mapping[str, np.ndarray], model_type: str) -> Flat:
  """The Hub's names without the classification model's prefix (`classifier.` kept)."""
  out: Flat = {}
  for key, value in state.items():
    k = key[len(model_type) + 1:] if key.startswith(f'{model_type}.') else key
    for pattern, repl in _V5_RENAMES:
      k = re.sub(pattern, repl, k)
    out[k] = np.asarray(value)
  return out


def from_hf(state: Mapping[str, np.ndarray], config: Mapping[str, Any]
            ) -> tuple[Flat, Architecture, list[str]]:
  """A Dinov2[WithRegisters] state dict (bare model or classifier) and config.json -> (flat,
  architecture, notes). Registers come back with a patch-only table (timm's layout of DINOv2 with
  registers: the class row added to the class token) unless this project wrote the file with
  rows."""
  model_type = config['model_type']
  if config.get('use_swiglu_ffn'):
    raise ValueError('the DINOv2 model uses a SwiGLU MLP (use_swiglu_ffn=True, the giant DINOv2); '
                     'this project\'s ViT has the GELU MLP only')
  heads = int(config['num_attention_heads'])
  sd = _canonical(state, model_type)
  sd.pop('embeddings.mask_token', None)
  meta = dict((config.get('vit_jax') or {}).get('model_config') or {})
  cls, pe = sd.pop('embeddings.cls_token'), sd.pop('embeddings.position_embeddings')
  d = cls.shape[-1]
  out: Flat = {'embedding/kernel': conv_from_torch(sd.pop('embeddings.patch_embeddings.projection.'
                                                          'weight')),
               'embedding/bias': sd.pop('embeddings.patch_embeddings.projection.bias')}
  regs = sd.pop('embeddings.register_tokens', None)
  # Written here: the model's own layout (its registers' rows, if any, folded into them); else
  # timm's (a patch-only table with registers, the class row kept without).
  no_embed = bool(meta.get('no_embed_class', False) if meta else regs is not None)
  if no_embed:  # the class row belongs to the class token (a constant either way)
    out['cls'], out[POSEMB_KEY] = cls + pe[:, :1], pe[:, 1:]
  else:
    out['cls'] = cls
    out[POSEMB_KEY] = pe if regs is None else np.concatenate(
        [pe[:, :1], np.zeros((1, regs.shape[1], d), pe.dtype), pe[:, 1:]], axis=1)
  if regs is not None:
    out['registers'] = regs
  hk = (heads, d // heads)
  depth = 1 + max((int(mt.group(1)) for k in sd
                   if (mt := re.match(r'encoder\.layer\.(\d+)\.', k))), default=-1)
  scales: list[str] = []
  for i in range(depth):
    b, t = f'Transformer/encoderblock_{i}', f'encoder.layer.{i}'
    att = f'{b}/MultiHeadDotProductAttention_1'
    ln_from_torch(sd, f'{t}.norm1', out, f'{b}/LayerNorm_0')
    for n in _QKV:
      dense_from_torch(sd, f'{t}.attention.attention.{n}', out, f'{att}/{n}', (d, *hk), hk)
    dense_from_torch(sd, f'{t}.attention.output.dense', out, f'{att}/out', (*hk, d))
    ln_from_torch(sd, f'{t}.norm2', out, f'{b}/LayerNorm_2')
    dense_from_torch(sd, f'{t}.mlp.fc1', out, f'{b}/MlpBlock_3/Dense_0')
    dense_from_torch(sd, f'{t}.mlp.fc2', out, f'{b}/MlpBlock_3/Dense_1')
    for ours, theirs in (('LayerScale_1', 'layer_scale1'), ('LayerScale_3', 'layer_scale2')):
      out[f'{b}/{ours}/scale'] = sd.pop(f'{t}.{theirs}.lambda1')
      scales.append(f'{b}/{ours}/scale')
  if all(np.all(out[k] == 1) for k in scales):  # written for a model without LayerScale
    for k in scales:
      out.pop(k)
  ln_from_torch(sd, 'layernorm', out, 'Transformer/encoder_norm')
  if 'classifier.weight' in sd:
    w = sd.pop('classifier.weight')
    if w.shape[1] != 2 * d or np.any(w[:, d:] != 0):
      raise ValueError(
          'Dinov2ForImageClassification\'s classifier reads concat(class token, mean of the patch '
          'tokens) and this one has non-zero weights on the mean; this project\'s ViT classifies '
          'the class token alone, so that head is not expressible (its encoder is: drop '
          '`classifier.*` from the file to read it as a feature extractor)')
    out['head/kernel'] = np.ascontiguousarray(w[:, :d].T)
    out['head/bias'] = sd.pop('classifier.bias')
  if sd:
    raise ValueError(f'Hugging Face {model_type} parameters this project\'s ViT cannot express: '
                     f'{sorted(sd)}')
  notes = vit_hf.eps_notes(config, 1e-6)
  fields: dict[str, Any] = {**meta, 'act': vit_hf.act_from_hf(config.get('hidden_act', 'gelu')),
                            'posemb': 'learned', 'classifier': 'token'}
  fields.pop('no_embed_class', None)
  if no_embed:
    fields['no_embed_class'] = True
  if regs is not None and not meta:
    # transformers resamples the table of DINOv2 with registers to any input (bicubic,
    # antialiased: the transfer's 'bicubic'), so this model does too. (Without registers it does
    # not antialias, which no method here reproduces: an input of another size is refused.)
    fields.update(dynamic_img_size=True, dynamic_resize='bicubic')
  if scales and scales[0] in out:
    fields['layer_scale'] = meta.get('layer_scale') or DINO_LS
  else:
    fields.pop('layer_scale', None)
  arch = vit_family.FAMILY.infer(out, model_config=fields, image_size=config.get('image_size', 224))
  arch.channels = int(config.get('num_channels', 3))
  arch.mean, arch.std = IMAGENET  # DINOv2's; a preprocessor_config.json next to it overrides
  return out, arch, notes
