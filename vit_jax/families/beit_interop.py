"""BEiT key maps (the `beit` family's timm and Hugging Face interop), numpy only.

timm 1.0's `Beit` names its blocks as timm's `Eva` does (`eva_interop.state_to_timm` /
`state_from_timm` serve both), with `blocks.{i}.attn.relative_position_bias_table` (same layout as
ours) and `relative_position_index` a non-persistent buffer.

Hugging Face's `BeitForImageClassification` (transformers 5.23; the names its `save_pretrained`
writes, which every BEiT on the Hub uses) has the same architecture:
  beit.embeddings.{cls_token, position_embeddings, patch_embeddings.projection}
  beit.encoder.layer.{i}.{layernorm_before, attention.attention.{query, key (no bias), value,
      relative_position_bias.relative_position_bias_table}, attention.output.dense, lambda_1,
      layernorm_after, intermediate.dense, output.dense, lambda_2}
  beit.layernorm (class-token models) | beit.pooler.layernorm (mean pooling), classifier
Its relative bias reshapes the offset table as (width, height) and its position embeddings
interpolate whenever height != width, so only square images are exchanged with it.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import numpy as np

from vit_jax.families import beit as beit_family
from vit_jax.families.base import IMAGENET, Architecture, Flat
from vit_jax.families.eva import TABLE
from vit_jax.families.eva_interop import (SIGNED, mlp_ratio, pretrained_cfg, state_from_timm,
                                          state_to_timm, uses_fc_norm)
from vit_jax.families.interop import Interop, timm_architecture, timm_model_args
from vit_jax.shapes import hw

_V1 = dict(patch_size=16, use_abs_pos_emb=False, use_rel_pos_bias=True)
# timm 1.0.31's registered arguments of its Beit architectures, and their normalisation.
TIMM_ARCHS: dict[str, tuple[dict[str, Any], tuple]] = {
    'beit_base_patch16_224': (dict(_V1, embed_dim=768, depth=12, num_heads=12, init_values=0.1),
                              SIGNED),
    'beit_base_patch16_384': (dict(_V1, img_size=384, embed_dim=768, depth=12, num_heads=12,
                                   init_values=0.1), SIGNED),
    'beit_large_patch16_224': (dict(_V1, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5),
                               SIGNED),
    'beit_large_patch16_384': (dict(_V1, img_size=384, embed_dim=1024, depth=24, num_heads=16,
                                    init_values=1e-5), SIGNED),
    'beit_large_patch16_512': (dict(_V1, img_size=512, embed_dim=1024, depth=24, num_heads=16,
                                    init_values=1e-5), SIGNED),
    'beitv2_base_patch16_224': (dict(_V1, embed_dim=768, depth=12, num_heads=12, init_values=1e-5),
                                IMAGENET),
    'beitv2_large_patch16_224': (dict(_V1, embed_dim=1024, depth=24, num_heads=16,
                                      init_values=1e-5), IMAGENET),
}
TIMM_NAMES = {'BEiTv2-B_16': 'beitv2_base_patch16_224'}


# ---------- timm ----------

def timm_args(fields: Mapping[str, Any], num_classes: Optional[int], image_size: Any,
              channels: int = 3) -> dict[str, Any]:
  """JSON-able `timm.create_model(<any Beit name>, **args)` arguments, every option explicit."""
  d, m = int(fields['hidden_size']), int(fields['mlp_dim'])
  ph, pw = hw(fields['patch_size'])
  h, w = hw(image_size)
  return dict(
      img_size=[h, w], patch_size=ph if ph == pw else [ph, pw], in_chans=channels,
      num_classes=num_classes or 0,
      global_pool={'gap': 'avg', 'token': 'token'}[fields.get('classifier', 'gap')],
      embed_dim=d, depth=int(fields['num_layers']), num_heads=int(fields['num_heads']),
      qkv_bias=bool(fields.get('qkv_bias', True)), mlp_ratio=mlp_ratio(d, m),
      use_abs_pos_emb=fields.get('posemb', 'none') == 'learned', use_rel_pos_bias=True,
      use_shared_rel_pos_bias=False, init_values=fields.get('layer_scale'),
      use_fc_norm=uses_fc_norm(fields))


def fields_from_args(args: Mapping[str, Any]) -> dict[str, Any]:
  """Our fields from timm `Beit` arguments (timm's defaults where absent); what this project does
  not implement is a ValueError naming it."""
  for key, wanted in (('use_rel_pos_bias', True), ('use_shared_rel_pos_bias', False),
                      ('swiglu_mlp', False), ('scale_mlp', False)):
    value = args.get(key, not wanted if key == 'use_rel_pos_bias' else wanted)
    if bool(value) != wanted:
      raise ValueError(f'timm Beit argument {key}={value!r}: this project\'s BEiT implements only '
                       f'{key}={wanted}')
  pool = args.get('global_pool', 'avg')
  if pool not in ('avg', 'token'):
    raise ValueError(f'timm Beit argument global_pool={pool!r}: only \'avg\' and \'token\' here')
  d = int(args.get('embed_dim', 768))
  fc = args.get('use_fc_norm')
  init = args.get('init_values')
  return dict(
      patch_size=args.get('patch_size', 16), hidden_size=d, num_layers=int(args.get('depth', 12)),
      num_heads=int(args.get('num_heads', 12)), mlp_dim=int(d * float(args.get('mlp_ratio', 4.0))),
      classifier='gap' if pool == 'avg' else 'token',
      fc_norm=None if fc is None or bool(fc) == (pool == 'avg') else bool(fc),
      posemb='learned' if args.get('use_abs_pos_emb', True) else 'none',
      qkv_bias=bool(args.get('qkv_bias', True)), layer_scale=init if init else None)


def to_timm(flat: Mapping[str, np.ndarray], arch: Architecture) -> tuple[Flat, dict[str, Any]]:
  """(timm `Beit` state dict, config.json) of a BEiT model."""
  cfg = arch.model_config
  num_classes = arch.num_classes or 0
  args = timm_args(cfg, num_classes, arch.image_size, arch.channels)
  config = dict(architecture=TIMM_NAMES.get(cfg.get('name', ''), 'beitv2_base_patch16_224'),
                num_classes=num_classes, num_features=int(cfg['hidden_size']),
                global_pool=args['global_pool'], model_args=args,
                pretrained_cfg=pretrained_cfg(arch, num_classes))
  return state_to_timm(flat), config


def from_timm(state: Mapping[str, Any], config: Mapping[str, Any]
              ) -> tuple[Flat, Architecture, list[str]]:
  """(flat, architecture, notes): config.json's `model_args` over the registered arguments of its
  `architecture` over timm's defaults."""
  args, norm = timm_model_args(config, TIMM_ARCHS)
  fields = fields_from_args(args)
  # The heads of a checkpoint this project wrote are in its vit_jax block too; timm's args win.
  heads = int({**(config.get('vit_jax') or {}).get('model_config', {}), **fields}['num_heads'])
  flat = state_from_timm(state, heads, 'Beit')
  arch = timm_architecture(beit_family.FAMILY, flat, config, args, fields, norm)
  return flat, arch, []


# ---------- Hugging Face ----------

_HF_IN_MEMORY = ((r'^beit\.layers\.(\d+)\.', r'beit.encoder.layer.\1.'),
                 (r'\.attention\.q_proj\.', '.attention.attention.query.'),
                 (r'\.attention\.k_proj\.', '.attention.attention.key.'),
                 (r'\.attention\.v_proj\.', '.attention.attention.value.'),
                 (r'\.attention\.o_proj\.', '.attention.output.dense.'),
                 (r'\.(\d+)\.relative_position_bias\.',
                  r'.\1.attention.attention.relative_position_bias.'),
                 (r'\.mlp\.fc1\.', '.intermediate.dense.'), (r'\.mlp\.fc2\.', '.output.dense.'))
# (our module in block i, Hugging Face's in layer i): weight and bias each
_HF_BLOCK = (('norm1', 'layernorm_before'), ('norm2', 'layernorm_after'),
             ('attn/proj', 'attention.output.dense'), ('mlp/fc1', 'intermediate.dense'),
             ('mlp/fc2', 'output.dense'))


def check_hf_expressible(fields: Mapping[str, Any], image_size: Any) -> None:
  h, w = hw(image_size)
  if h != w:
    raise ValueError(f'Hugging Face\'s BEiT reshapes a relative position table as (width, '
                     f'height) and interpolates position embeddings whenever height != width, so '
                     f'it does not reproduce this model at {h}x{w}; export with `--to timm`')
  fc, gap = uses_fc_norm(fields), fields.get('classifier', 'gap') == 'gap'
  if fc != gap:
    raise ValueError('Hugging Face\'s BEiT normalises after the mean pooling (use_mean_pooling) or '
                     f'before taking the class token, but this model has classifier='
                     f'{fields.get("classifier")!r} with fc_norm={fields.get("fc_norm")!r}; '
                     'export with `--to timm`')


def to_hf(flat: Mapping[str, np.ndarray], arch: Architecture) -> tuple[Flat, dict[str, Any]]:
  """(BeitForImageClassification state dict, its config.json without labels)."""
  cfg = arch.model_config
  check_hf_expressible(cfg, arch.image_size)
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  d, heads = int(cfg['hidden_size']), int(cfg['num_heads'])
  e = 'beit.embeddings'
  out: Flat = {f'{e}.cls_token': flat['cls'],
               f'{e}.patch_embeddings.projection.weight': np.ascontiguousarray(
                   flat['patch_embed/kernel'].transpose(3, 2, 0, 1)),
               f'{e}.patch_embeddings.projection.bias': flat['patch_embed/bias']}
  if 'pos_embed' in flat:
    out[f'{e}.position_embeddings'] = flat['pos_embed']
  timm_sd = state_to_timm(flat)
  for i in range(int(cfg['num_layers'])):
    b, t, a = f'block_{i}', f'beit.encoder.layer.{i}', f'beit.encoder.layer.{i}.attention.attention'
    for ours, theirs in _HF_BLOCK:
      for leaf in ('weight', 'bias'):
        out[f'{t}.{theirs}.{leaf}'] = timm_sd[f'blocks.{i}.{ours.replace("/", ".")}.{leaf}']
    qkv = timm_sd[f'blocks.{i}.attn.qkv.weight']
    for n, w in zip(('query', 'key', 'value'), np.split(qkv, 3)):
      out[f'{a}.{n}.weight'] = np.ascontiguousarray(w)
    zeros = np.zeros((d,), np.float32)  # no q/v bias here: HF's are zero
    out[f'{a}.query.bias'] = flat.get(f'{b}/attn/q_bias', zeros).reshape(-1)
    out[f'{a}.value.bias'] = flat.get(f'{b}/attn/v_bias', zeros).reshape(-1)
    out[f'{a}.relative_position_bias.{TABLE}'] = flat[f'{b}/attn/{TABLE}']
    if f'{b}/gamma_1' in flat:
      out[f'{t}.lambda_1'], out[f'{t}.lambda_2'] = flat[f'{b}/gamma_1'], flat[f'{b}/gamma_2']
  gap = cfg.get('classifier', 'gap') == 'gap'
  final = 'fc_norm' if gap else 'norm'
  out[f'beit.{"pooler." if gap else ""}layernorm.weight'] = flat[f'{final}/scale']
  out[f'beit.{"pooler." if gap else ""}layernorm.bias'] = flat[f'{final}/bias']
  if 'head/kernel' in flat:
    out['classifier.weight'] = np.ascontiguousarray(flat['head/kernel'].T)
    out['classifier.bias'] = flat['head/bias']
  ph, pw = hw(cfg['patch_size'])
  layer_scale = cfg.get('layer_scale')
  config = {
      'architectures': ['BeitForImageClassification'], 'model_type': 'beit',
      'hidden_size': d, 'num_hidden_layers': int(cfg['num_layers']), 'num_attention_heads': heads,
      'intermediate_size': int(cfg['mlp_dim']), 'hidden_act': 'gelu', 'layer_norm_eps': 1e-6,
      'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0, 'drop_path_rate': 0.0,
      'initializer_range': 0.02, 'image_size': arch.image_size[0],
      'patch_size': ph if ph == pw else [ph, pw], 'num_channels': arch.channels,
      'use_mask_token': False, 'use_absolute_position_embeddings': 'pos_embed' in flat,
      'use_relative_position_bias': True, 'use_shared_relative_position_bias': False,
      'layer_scale_init_value': float(layer_scale or 1e-5) if 'block_0/gamma_1' in flat else 0.0,
      'use_mean_pooling': gap, 'dtype': 'float32'}
  return {k: np.ascontiguousarray(v) for k, v in out.items()}, config


def from_hf(state: Mapping[str, np.ndarray], config: Mapping[str, Any]
            ) -> tuple[Flat, Architecture, list[str]]:
  """A Beit(ForImageClassification) state dict and config.json -> (flat, architecture, notes)."""
  notes: list[str] = []
  for key, wanted in (('use_relative_position_bias', True),
                      ('use_shared_relative_position_bias', False)):
    if bool(config.get(key, False)) != wanted:
      raise ValueError(f'Hugging Face BEiT with {key}={config.get(key)}: this project\'s BEiT has '
                       'a relative position table in every block and no shared one')
  if config.get('hidden_act', 'gelu') != 'gelu':
    raise ValueError(f'hidden_act={config.get("hidden_act")!r}: this project\'s BEiT uses the '
                     'exact GELU')
  sd: Flat = {}
  for key, value in state.items():
    k = key
    for pattern, repl in _HF_IN_MEMORY:
      k = re.sub(pattern, repl, k)
    if k.startswith(('beit.embeddings.mask_token', 'lm_head.')) or k.endswith(
        'relative_position_index'):
      notes.append(f'dropped {key} (not used by the classifier)')
      continue
    sd[k] = np.asarray(value)
  heads = int(config['num_attention_heads'])
  e = 'beit.embeddings'
  timm_sd: Flat = {'cls_token': sd.pop(f'{e}.cls_token'),
                   'patch_embed.proj.weight': sd.pop(f'{e}.patch_embeddings.projection.weight'),
                   'patch_embed.proj.bias': sd.pop(f'{e}.patch_embeddings.projection.bias')}
  if f'{e}.position_embeddings' in sd:
    timm_sd['pos_embed'] = sd.pop(f'{e}.position_embeddings')
  depth = 1 + max((int(m.group(1)) for k in sd
                   if (m := re.match(r'beit\.encoder\.layer\.(\d+)\.', k))), default=-1)
  for i in range(depth):
    t, tk = f'beit.encoder.layer.{i}', f'blocks.{i}'
    a = f'{t}.attention.attention'
    for ours, theirs in _HF_BLOCK:
      for leaf in ('weight', 'bias'):
        timm_sd[f'{tk}.{ours.replace("/", ".")}.{leaf}'] = sd.pop(f'{t}.{theirs}.{leaf}')
    timm_sd[f'{tk}.attn.qkv.weight'] = np.concatenate(
        [sd.pop(f'{a}.{n}.weight') for n in ('query', 'key', 'value')], axis=0)
    if f'{a}.key.bias' in sd:
      raise ValueError(f'{a}.key has a bias: BEiT attention has none on k')
    timm_sd[f'{tk}.attn.q_bias'] = sd.pop(f'{a}.query.bias')
    timm_sd[f'{tk}.attn.v_bias'] = sd.pop(f'{a}.value.bias')
    timm_sd[f'{tk}.attn.{TABLE}'] = sd.pop(f'{a}.relative_position_bias.{TABLE}')
    for n, g in (('lambda_1', 'gamma_1'), ('lambda_2', 'gamma_2')):
      if f'{t}.{n}' in sd:
        timm_sd[f'{tk}.{g}'] = sd.pop(f'{t}.{n}')
  mean_pooling = bool(config.get('use_mean_pooling', True))
  final = 'beit.pooler.layernorm' if mean_pooling else 'beit.layernorm'
  target = 'fc_norm' if mean_pooling else 'norm'
  for leaf in ('weight', 'bias'):
    timm_sd[f'{target}.{leaf}'] = sd.pop(f'{final}.{leaf}')
  if 'classifier.weight' in sd:
    timm_sd['head.weight'], timm_sd['head.bias'] = sd.pop('classifier.weight'), sd.pop(
        'classifier.bias')
  if sd:
    raise ValueError(f'Hugging Face BEiT parameters this project\'s BEiT cannot express: '
                     f'{sorted(sd)[:6]}')
  flat = state_from_timm(timm_sd, heads, 'Beit')
  eps = float(config.get('layer_norm_eps', 1e-12))
  if abs(eps - 1e-6) > 1e-12:
    notes.append(f'the source uses layer_norm_eps={eps}; this project uses 1e-6')
  fields: dict[str, Any] = {}
  if 'vit_jax' in config:
    fields = dict(config['vit_jax'].get('model_config', {}))
  init = config.get('layer_scale_init_value', 0.1)
  fields.update(classifier='gap' if mean_pooling else 'token', fc_norm=None,
                posemb='learned' if 'pos_embed' in flat else 'none',
                layer_scale=float(init) if init and 'block_0/gamma_1' in flat else None)
  arch = beit_family.FAMILY.infer(flat, model_config=fields,
                                  image_size=hw(config.get('image_size', 224)))
  arch.channels = int(config.get('num_channels', 3))
  return flat, arch, notes


class BeitInterop(Interop):
  """BEiT <-> timm 1.0's `Beit` and transformers' `BeitForImageClassification`."""
  timm_prefixes = ('beit_', 'beitv2_')
  hf_model_types = ('beit',)

  def reads_timm(self, architecture, keys) -> bool:
    if architecture:
      return architecture.startswith(self.timm_prefixes)
    return 'patch_embed.proj.weight' in keys and f'blocks.0.attn.{TABLE}' in keys

  def to_timm(self, flat, arch):
    return to_timm(flat, arch)

  def from_timm(self, state, config):
    return from_timm(state, config)

  def to_hf(self, flat, arch):
    return to_hf(flat, arch)

  def from_hf(self, state, config):
    return from_hf(state, config)


INTEROP = BeitInterop(beit_family.FAMILY)
