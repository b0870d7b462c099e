"""timm `VisionTransformer` weights <-> this project's flat parameters (numpy and safetensors only).

timm names and layouts (PyTorch: Linear weights are [out, in], conv kernels OIHW):
  patch_embed.proj.{weight [D, C, ph, pw], bias}, cls_token [1, 1, D], pos_embed [1, N, D],
  blocks.{i}.norm1, blocks.{i}.attn.qkv.{weight [3D, D], bias [3D]} (q, k, v fused, heads-major),
  blocks.{i}.attn.proj, blocks.{i}.norm2, blocks.{i}.mlp.fc1, blocks.{i}.mlp.fc2, norm, head,
  and for `global_pool='map'` attn_pool.{latent, q, kv (k, v fused), proj, norm, mlp.fc1, mlp.fc2}.
The written `config.json` is timm's Hub format: `architecture`, `model_args` (the exact
`timm.create_model` arguments) and `pretrained_cfg`, so `timm.create_model('local-dir:OUT',
pretrained=True)` rebuilds the same network. timm's ViT has no pre-logits layer: exporting one is an
error rather than a silently different network.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vit_jax.checkpoints.arch import POSEMB_KEY, Architecture, infer_architecture

Flat = dict[str, np.ndarray]
WEIGHTS = 'model.safetensors'
CONFIG = 'config.json'
# timm's registry names for the paper's sizes; `architecture` only picks a registry entry (every
# size argument is overridden by model_args), so other sizes reuse vit_base_patch16_224.
_TIMM_SIZES = {(192, 12, 3): 'tiny', (384, 12, 6): 'small', (768, 12, 12): 'base',
               (1024, 24, 16): 'large', (1280, 32, 16): 'huge'}
_TIMM_REGISTERED = ('vit_tiny_patch16_224', 'vit_small_patch16_224', 'vit_small_patch32_224',
                    'vit_base_patch8_224', 'vit_base_patch16_224', 'vit_base_patch32_224',
                    'vit_large_patch16_224', 'vit_large_patch32_224', 'vit_huge_patch14_224')
_HEADS_BY_NAME = {'tiny': 3, 'small': 6, 'base': 12, 'large': 16, 'huge': 16}


def _dense_to_torch(flat: Flat, ours: str, out: Flat, theirs: str) -> None:
  """A Dense/DenseGeneral kernel [in..., out...] -> Linear weight [out, in] (and its bias)."""
  k = flat[f'{ours}/kernel']
  if k.ndim == 3 and ours.endswith('/out'):
    k = k.reshape(-1, k.shape[-1])          # [H, K, D] -> [H*K, D]
  elif k.ndim == 3:
    k = k.reshape(k.shape[0], -1)           # [D, H, K] -> [D, H*K]
  out[f'{theirs}.weight'] = np.ascontiguousarray(k.T)
  out[f'{theirs}.bias'] = flat[f'{ours}/bias'].reshape(-1)


def _ln_to_torch(flat: Flat, ours: str, out: Flat, theirs: str) -> None:
  out[f'{theirs}.weight'] = flat[f'{ours}/scale']
  out[f'{theirs}.bias'] = flat[f'{ours}/bias']


def _qkv_to_torch(flat: Flat, att: str, names: Sequence[str], out: Flat, theirs: str) -> None:
  ws = [flat[f'{att}/{n}/kernel'] for n in names]
  out[f'{theirs}.weight'] = np.concatenate([w.reshape(w.shape[0], -1).T for w in ws], axis=0)
  out[f'{theirs}.bias'] = np.concatenate([flat[f'{att}/{n}/bias'].reshape(-1) for n in names])


def check_expressible(arch: Architecture) -> None:
  """Raises a ValueError naming what timm's VisionTransformer cannot express."""
  cfg = arch.model_config
  if cfg.get('representation_size'):
    raise ValueError(
        f'timm\'s VisionTransformer has no pre-logits layer, but this model has one '
        f'(representation_size={cfg["representation_size"]}): fine-tune or load it with '
        '`keep_pre_logits=False` to drop it, or export with `--to npz`')
  d, m = cfg['hidden_size'], cfg['mlp_dim']
  if int(d * (m / d)) != m:
    raise ValueError(f'timm builds an MLP of int(D * mlp_ratio) units; mlp_dim={m} is not reachable '
                     f'from hidden_size={d}')


def to_timm(flat: Mapping[str, np.ndarray], arch: Architecture) -> Flat:
  """This project's flat parameters -> a timm state dict (numpy float32, contiguous)."""
  check_expressible(arch)
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  out: Flat = {}
  out['patch_embed.proj.weight'] = np.ascontiguousarray(
      flat['embedding/kernel'].transpose(3, 2, 0, 1))  # HWIO -> OIHW
  out['patch_embed.proj.bias'] = flat['embedding/bias']
  if 'cls' in flat:
    out['cls_token'] = flat['cls']
  pe = flat.get(POSEMB_KEY, arch.fixed_posemb())
  if pe is not None and arch.model_config.get('posemb') != 'none':
    out['pos_embed'] = pe
  for i in range(arch.model_config['num_layers']):
    b = f'Transformer/encoderblock_{i}'
    _ln_to_torch(flat, f'{b}/LayerNorm_0', out, f'blocks.{i}.norm1')
    _qkv_to_torch(flat, f'{b}/MultiHeadDotProductAttention_1', ('query', 'key', 'value'), out,
                  f'blocks.{i}.attn.qkv')
    _dense_to_torch(flat, f'{b}/MultiHeadDotProductAttention_1/out', out, f'blocks.{i}.attn.proj')
    _ln_to_torch(flat, f'{b}/LayerNorm_2', out, f'blocks.{i}.norm2')
    _dense_to_torch(flat, f'{b}/MlpBlock_3/Dense_0', out, f'blocks.{i}.mlp.fc1')
    _dense_to_torch(flat, f'{b}/MlpBlock_3/Dense_1', out, f'blocks.{i}.mlp.fc2')
  _ln_to_torch(flat, 'Transformer/encoder_norm', out, 'norm')
  if arch.model_config['classifier'] == 'map':
    att = 'MAPHead_0/MultiHeadDotProductAttention_0'
    out['attn_pool.latent'] = flat['MAPHead_0/probe']
    _qkv_to_torch(flat, att, ('query',), out, 'attn_pool.q')
    _qkv_to_torch(flat, att, ('key', 'value'), out, 'attn_pool.kv')
    _dense_to_torch(flat, f'{att}/out', out, 'attn_pool.proj')
    _ln_to_torch(flat, 'MAPHead_0/LayerNorm_0', out, 'attn_pool.norm')
    _dense_to_torch(flat, 'MAPHead_0/MlpBlock_0/Dense_0', out, 'attn_pool.mlp.fc1')
    _dense_to_torch(flat, 'MAPHead_0/MlpBlock_0/Dense_1', out, 'attn_pool.mlp.fc2')
  if 'head/kernel' in flat:
    _dense_to_torch(flat, 'head', out, 'head')
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def timm_model_args(arch: Architecture) -> dict[str, Any]:
  """`timm.create_model` keyword arguments that build exactly this network."""
  check_expressible(arch)
  cfg = arch.model_config
  ph, pw = arch.patch_hw
  pool = {'token': 'token', 'gap': 'avg', 'map': 'map'}[cfg['classifier']]
  return dict(
      img_size=list(arch.image_size), patch_size=ph if ph == pw else [ph, pw],
      in_chans=arch.channels, num_classes=arch.num_classes or 0, global_pool=pool,
      class_token=cfg['classifier'] == 'token',
      # Our `gap` normalises every token with encoder_norm and then averages: timm's `norm` before
      # the pool, not its default `fc_norm` after it.
      fc_norm=False, embed_dim=cfg['hidden_size'], depth=cfg['num_layers'],
      num_heads=cfg['num_heads'], mlp_ratio=cfg['mlp_dim'] / cfg['hidden_size'], qkv_bias=True,
      # The tanh approximation of GELU, as Flax's default and the released checkpoints.
      act_layer='gelu_tanh', pos_embed='none' if cfg.get('posemb') == 'none' else 'learn',
      no_embed_class=False, dynamic_img_size=False)  # timm's LayerNorm default eps is 1e-6.


def timm_architecture_name(arch: Architecture) -> str:
  cfg = arch.model_config
  size = _TIMM_SIZES.get((cfg['hidden_size'], cfg['num_layers'], cfg['num_heads']))
  name = f'vit_{size}_patch{arch.patch_hw[0]}_224'
  return name if name in _TIMM_REGISTERED else 'vit_base_patch16_224'


def timm_config(arch: Architecture, class_names: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """timm's Hub `config.json`; `architecture` only picks the registry entry (model_args override)."""
  args = timm_model_args(arch)
  pretrained_cfg = dict(num_classes=args['num_classes'], input_size=[arch.channels, *arch.image_size],
                        classifier='head', first_conv='patch_embed.proj', interpolation='bilinear',
                        crop_pct=1.0,
                        # Pixels in [-1, 1]: (x - 0.5) / 0.5 after scaling to [0, 1].
                        mean=[0.5] * arch.channels, std=[0.5] * arch.channels)
  config = dict(architecture=timm_architecture_name(arch), num_classes=args['num_classes'],
                num_features=arch.model_config['hidden_size'], global_pool=args['global_pool'],
                model_args=args, pretrained_cfg=pretrained_cfg,
                vit_jax=arch.to_meta())  # Ours, so a round trip keeps the registry name.
  if class_names:
    config['label_names'] = list(class_names)
  return config


def write_timm(out_dir: str | os.PathLike, flat: Mapping[str, np.ndarray], arch: Architecture,
               class_names: Optional[Sequence[str]] = None) -> str:
  """Writes `model.safetensors` and `config.json` into out_dir; returns the weights' path."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  state = to_timm(flat, arch)
  config = timm_config(arch, class_names)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, WEIGHTS)
  save_file(state, path)
  with open(os.path.join(out_dir, CONFIG), 'w') as f:
    json.dump(config, f, indent=2)
  return path


# ---------- timm -> ours ----------

def _dense_from_torch(sd: Flat, theirs: str, out: Flat, ours: str,
                      kernel_shape: Optional[tuple[int, ...]] = None) -> None:
  """A Linear weight [out, in] -> a Dense kernel [in, out] (reshaped to kernel_shape), and its bias."""
  w = sd.pop(f'{theirs}.weight').T
  out[f'{ours}/kernel'] = np.ascontiguousarray(w.reshape(kernel_shape) if kernel_shape else w)
  out[f'{ours}/bias'] = sd.pop(f'{theirs}.bias')


def _ln_from_torch(sd: Flat, theirs: str, out: Flat, ours: str) -> None:
  out[f'{ours}/scale'] = sd.pop(f'{theirs}.weight')
  out[f'{ours}/bias'] = sd.pop(f'{theirs}.bias')


def _split_from_torch(sd: Flat, theirs: str, names: Sequence[str], heads: int, out: Flat,
                      att: str) -> None:
  w, b = sd.pop(f'{theirs}.weight'), sd.pop(f'{theirs}.bias')
  d = w.shape[1]
  for n, wn, bn in zip(names, np.split(w, len(names)), np.split(b, len(names))):
    out[f'{att}/{n}/kernel'] = np.ascontiguousarray(wn.T.reshape(d, heads, -1))
    out[f'{att}/{n}/bias'] = bn.reshape(heads, -1)


def from_timm(state: Mapping[str, np.ndarray], num_heads: int) -> Flat:
  """A timm VisionTransformer state dict -> this project's flat parameters.

  Raises a ValueError listing keys this project's ViT cannot express (register tokens, fc_norm,
  layer scale, pre-norm, qk-norm, ...).
  """
  sd = {k: np.asarray(v) for k, v in state.items()}
  out: Flat = {}
  w = sd.pop('patch_embed.proj.weight')
  out['embedding/kernel'] = np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # OIHW -> HWIO
  out['embedding/bias'] = sd.pop('patch_embed.proj.bias')
  if 'cls_token' in sd:
    out['cls'] = sd.pop('cls_token')
  if 'pos_embed' in sd:
    out[POSEMB_KEY] = sd.pop('pos_embed')
  d = out['embedding/kernel'].shape[-1]
  depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r'blocks\.(\d+)\.', k))), default=-1)
  for i in range(depth):
    b, t = f'Transformer/encoderblock_{i}', f'blocks.{i}'
    att = f'{b}/MultiHeadDotProductAttention_1'
    _ln_from_torch(sd, f'{t}.norm1', out, f'{b}/LayerNorm_0')
    _split_from_torch(sd, f'{t}.attn.qkv', ('query', 'key', 'value'), num_heads, out, att)
    _dense_from_torch(sd, f'{t}.attn.proj', out, f'{att}/out', (num_heads, d // num_heads, d))
    _ln_from_torch(sd, f'{t}.norm2', out, f'{b}/LayerNorm_2')
    _dense_from_torch(sd, f'{t}.mlp.fc1', out, f'{b}/MlpBlock_3/Dense_0')
    _dense_from_torch(sd, f'{t}.mlp.fc2', out, f'{b}/MlpBlock_3/Dense_1')
  if 'norm.weight' not in sd:
    raise ValueError('the timm model has no final `norm` before pooling (fc_norm or final_norm='
                     'False): not expressible by this project\'s ViT, whose gap pools after '
                     'encoder_norm')
  _ln_from_torch(sd, 'norm', out, 'Transformer/encoder_norm')
  if 'attn_pool.latent' in sd:
    att = 'MAPHead_0/MultiHeadDotProductAttention_0'
    out['MAPHead_0/probe'] = sd.pop('attn_pool.latent')
    _split_from_torch(sd, 'attn_pool.q', ('query',), num_heads, out, att)
    _split_from_torch(sd, 'attn_pool.kv', ('key', 'value'), num_heads, out, att)
    _dense_from_torch(sd, 'attn_pool.proj', out, f'{att}/out', (num_heads, d // num_heads, d))
    _ln_from_torch(sd, 'attn_pool.norm', out, 'MAPHead_0/LayerNorm_0')
    _dense_from_torch(sd, 'attn_pool.mlp.fc1', out, 'MAPHead_0/MlpBlock_0/Dense_0')
    _dense_from_torch(sd, 'attn_pool.mlp.fc2', out, 'MAPHead_0/MlpBlock_0/Dense_1')
  if 'head.weight' in sd:
    _dense_from_torch(sd, 'head', out, 'head')
  if sd:
    raise ValueError(f'timm parameters this project\'s ViT cannot express: {sorted(sd)}')
  return out


def _load_safetensors(path: str) -> Flat:
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  return load_file(path)


def _lacks_class_row(rows: int, args: Mapping[str, Any], patch: Sequence[int]) -> bool:
  """Whether a class-token model's pos_embed has only grid rows (timm's no_embed_class)."""
  if 'no_embed_class' in args:
    return bool(args['no_embed_class'])
  if args.get('img_size') is not None:
    size = args['img_size']
    h, w = (size, size) if isinstance(size, int) else size
    return rows == (h // patch[0]) * (w // patch[1])
  # No config: only a square grid can be recognised (and a grid of s*s - 1 patches is ambiguous).
  return math.isqrt(rows) ** 2 == rows and math.isqrt(rows - 1) ** 2 != rows - 1


def is_timm_state(keys: Sequence[str]) -> bool:
  return 'patch_embed.proj.weight' in keys


def read_timm(path: str | os.PathLike, *, num_heads: Optional[int] = None
              ) -> tuple[Flat, Optional[Architecture], dict[str, Any]]:
  """Reads a timm `model.safetensors` (a file, or a directory with it and `config.json`).

  Returns (flat params, the architecture when config.json or num_heads allows, info with
  'class_names' and 'notes'). The head count comes from config.json's model_args, num_heads,
  or a standard timm name (vit_base_... -> 12).
  """
  path = os.fspath(path)
  weights = os.path.join(path, WEIGHTS) if os.path.isdir(path) else path
  cfg_path = os.path.join(os.path.dirname(weights), CONFIG)
  config = {}
  if os.path.exists(cfg_path):
    with open(cfg_path) as f:
      config = json.load(f)
  args = dict(config.get('model_args') or {})
  notes: list[str] = []
  # The file's own config first: a caller's guess (e.g. the target model's) must not override it.
  m = re.match(r'vit_([a-z]+)_', config.get('architecture', ''))
  num_heads = (args.get('num_heads') or num_heads or
               (_HEADS_BY_NAME.get(m.group(1)) if m and 'embed_dim' not in args else None))
  if num_heads is None:
    raise ValueError(f'{weights}: timm fuses q/k/v, so the head count is not in the weights; '
                     'give it (`--model NAME` or a config.json with model_args.num_heads)')
  state = _load_safetensors(weights)
  if any(k.startswith('fc_norm.') for k in state):
    raise ValueError('the timm model normalises after pooling (`fc_norm`); this project\'s gap '
                     'normalises every token before averaging (timm fc_norm=False): not expressible')
  flat = from_timm(state, int(num_heads))
  patch = flat['embedding/kernel'].shape[:2]
  if 'cls' in flat and POSEMB_KEY in flat and _lacks_class_row(flat[POSEMB_KEY].shape[1], args, patch):
    # timm's no_embed_class: the class token gets no position embedding, i.e. a zero row here.
    pe = flat[POSEMB_KEY]
    flat[POSEMB_KEY] = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
    notes.append('added a zero class-token row to pos_embed (timm no_embed_class)')
  if args.get('act_layer') not in ('gelu_tanh', 'gelu_pytorch_tanh'):
    notes.append(f'the timm model uses act_layer={args.get("act_layer", "gelu (exact)")!r}; this '
                 'project uses the tanh approximation of GELU: logits will differ slightly')
  arch = None
  if 'vit_jax' in config:
    arch = Architecture.from_meta(config['vit_jax'])
    if POSEMB_KEY in flat and arch.model_config.get('posemb') != 'learned':
      notes.append(f'the exported {arch.model_config["posemb"]} position embeddings were written as '
                   'fixed values of pos_embed: read back as learned ones')
      arch.model_config['posemb'] = 'learned'
  elif args.get('img_size') is not None or 'pos_embed' in state:
    posemb = 'none' if args.get('pos_embed') == 'none' else None
    arch = infer_architecture(flat, image_size=args.get('img_size'), posemb=posemb)
  class_names = config.get('label_names') or config.get('pretrained_cfg', {}).get('label_names')
  return flat, arch, {'class_names': class_names, 'notes': notes}
