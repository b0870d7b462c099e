"""Hugging Face `ViTForImageClassification` directories <-> this project's flat parameters.

Written with numpy and safetensors only: `config.json` (model_type "vit", hidden_act
"gelu_pytorch_tanh", layer_norm_eps 1e-6, image and patch size, id2label) and `model.safetensors`
in the names every released ViT on the Hub uses (and `save_pretrained` still writes):
  vit.embeddings.{cls_token, position_embeddings, patch_embeddings.projection.{weight, bias}},
  vit.encoder.layer.{i}.{layernorm_before, attention.attention.{query,key,value},
  attention.output.dense, layernorm_after, intermediate.dense, output.dense}, vit.layernorm,
  classifier.
Reading also takes transformers 5's in-memory names (`vit.layers.{i}.attention.q_proj`, `mlp.fc1`,
...) and bare `ViTModel` checkpoints (no `vit.` prefix; the pooler is dropped with a note).

Hugging Face's ViT classifier reads the class token after the final LayerNorm: it has no average
pool, no MAP head and no pre-logits layer, so such models are a clear error (timm can express the
first two: `--to timm`).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vit_jax.checkpoints.arch import POSEMB_KEY, Architecture

Flat = dict[str, np.ndarray]
WEIGHTS = 'model.safetensors'
INDEX = 'model.safetensors.index.json'
CONFIG = 'config.json'
PREPROCESSOR = 'preprocessor_config.json'
_TANH_GELUS = ('gelu_pytorch_tanh', 'gelu_new', 'gelu_fast', 'gelu_python_tanh')
# transformers 5 in-memory names -> the on-disk names above.
_V5_RENAMES = ((r'^vit\.layers\.(\d+)\.', r'vit.encoder.layer.\1.'),
               (r'\.attention\.([qkv])_proj\.', None),  # -> .attention.attention.{query,key,value}.
               (r'\.attention\.o_proj\.', '.attention.output.dense.'),
               (r'\.mlp\.fc1\.', '.intermediate.dense.'), (r'\.mlp\.fc2\.', '.output.dense.'))
_QKV = {'q': 'query', 'k': 'key', 'v': 'value'}


def check_expressible(arch: Architecture) -> None:
  """Raises a ValueError naming what ViTForImageClassification cannot express."""
  cfg = arch.model_config
  if cfg['classifier'] != 'token':
    what = 'average pool' if cfg['classifier'] == 'gap' else 'MAP (attention-pooling) head'
    raise ValueError(f'Hugging Face\'s ViTForImageClassification classifies the class token; it has '
                     f'no {what} (classifier={cfg["classifier"]!r}). Export with `--to timm`, which '
                     'can express it.')
  if cfg.get('representation_size'):
    raise ValueError(
        'Hugging Face\'s ViTForImageClassification has no pre-logits layer, but this model has one '
        f'(representation_size={cfg["representation_size"]}); neither has timm. Drop it when '
        'fine-tuning (`keep_pre_logits=False`) or export with `--to npz`.')


def _linear(flat: Flat, ours: str, out: Flat, theirs: str) -> None:
  k = flat[f'{ours}/kernel']
  k = k.reshape(-1, k.shape[-1]) if ours.endswith('/out') else k.reshape(k.shape[0], -1)
  out[f'{theirs}.weight'] = np.ascontiguousarray(k.T)
  out[f'{theirs}.bias'] = flat[f'{ours}/bias'].reshape(-1)


def _ln(flat: Flat, ours: str, out: Flat, theirs: str) -> None:
  out[f'{theirs}.weight'] = flat[f'{ours}/scale']
  out[f'{theirs}.bias'] = flat[f'{ours}/bias']


def to_hf(flat: Mapping[str, np.ndarray], arch: Architecture) -> Flat:
  """This project's flat parameters -> a ViTForImageClassification state dict (numpy float32)."""
  check_expressible(arch)
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  out: Flat = {}
  e = 'vit.embeddings'
  out[f'{e}.patch_embeddings.projection.weight'] = np.ascontiguousarray(
      flat['embedding/kernel'].transpose(3, 2, 0, 1))  # HWIO -> OIHW
  out[f'{e}.patch_embeddings.projection.bias'] = flat['embedding/bias']
  out[f'{e}.cls_token'] = flat['cls']
  # HF always adds position embeddings: fixed kinds are written as their values at this size.
  out[f'{e}.position_embeddings'] = flat.get(POSEMB_KEY, arch.fixed_posemb())
  for i in range(arch.model_config['num_layers']):
    b, t = f'Transformer/encoderblock_{i}', f'vit.encoder.layer.{i}'
    att = f'{b}/MultiHeadDotProductAttention_1'
    _ln(flat, f'{b}/LayerNorm_0', out, f'{t}.layernorm_before')
    for n in ('query', 'key', 'value'):
      _linear(flat, f'{att}/{n}', out, f'{t}.attention.attention.{n}')
    _linear(flat, f'{att}/out', out, f'{t}.attention.output.dense')
    _ln(flat, f'{b}/LayerNorm_2', out, f'{t}.layernorm_after')
    _linear(flat, f'{b}/MlpBlock_3/Dense_0', out, f'{t}.intermediate.dense')
    _linear(flat, f'{b}/MlpBlock_3/Dense_1', out, f'{t}.output.dense')
  _ln(flat, 'Transformer/encoder_norm', out, 'vit.layernorm')
  if 'head/kernel' in flat:
    _linear(flat, 'head', out, 'classifier')
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def hf_config(arch: Architecture, class_names: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """The `config.json` of a ViTForImageClassification that computes exactly this model."""
  check_expressible(arch)
  cfg = arch.model_config
  n = arch.num_classes or 0
  if class_names is not None and len(class_names) != n:
    raise ValueError(f'{len(class_names)} class names for a head of {n} classes')
  labels = list(class_names) if class_names is not None else [f'LABEL_{i}' for i in range(n)]
  ph, pw = arch.patch_hw
  h, w = arch.image_size
  return {
      'architectures': ['ViTForImageClassification'], 'model_type': 'vit',
      'hidden_size': cfg['hidden_size'], 'num_hidden_layers': cfg['num_layers'],
      'num_attention_heads': cfg['num_heads'], 'intermediate_size': cfg['mlp_dim'],
      'hidden_act': 'gelu_pytorch_tanh',  # Flax's default GELU is the tanh approximation.
      'layer_norm_eps': 1e-6, 'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0,
      'initializer_range': 0.02, 'qkv_bias': True, 'num_channels': arch.channels,
      'image_size': h if h == w else [h, w], 'patch_size': ph if ph == pw else [ph, pw],
      'encoder_stride': ph, 'id2label': {str(i): name for i, name in enumerate(labels)},
      'label2id': {name: i for i, name in enumerate(labels)}, 'dtype': 'float32',
      'vit_jax': arch.to_meta(),  # Ours (HF ignores it), so a round trip keeps the registry name.
  }


def write_hf(out_dir: str | os.PathLike, flat: Mapping[str, np.ndarray], arch: Architecture,
             class_names: Optional[Sequence[str]] = None) -> str:
  """Writes `config.json` and `model.safetensors` into out_dir; returns out_dir."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  config = hf_config(arch, class_names)
  state = to_hf(flat, arch)
  os.makedirs(out_dir, exist_ok=True)
  save_file(state, os.path.join(out_dir, WEIGHTS), metadata={'format': 'pt'})
  with open(os.path.join(out_dir, CONFIG), 'w') as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(out_dir, PREPROCESSOR), 'w') as f:
    json.dump(preprocessor_config(arch), f, indent=2)
  return os.fspath(out_dir)


def preprocessor_config(arch: Architecture) -> dict[str, Any]:
  """ViTImageProcessor settings that give this project's inputs: resize to the model's size,
  pixels / 255, then (x - 0.5) / 0.5, i.e. [-1, 1]."""
  h, w = arch.image_size
  return {'image_processor_type': 'ViTImageProcessor', 'do_resize': True,
          'size': {'height': h, 'width': w}, 'resample': 2, 'do_rescale': True,
          'rescale_factor': 1 / 255, 'do_normalize': True, 'image_mean': [0.5] * arch.channels,
          'image_std': [0.5] * arch.channels}


# ---------- Hugging Face -> ours ----------

def canonical_names(state: Mapping[str, np.ndarray]) -> tuple[Flat, list[str]]:
  """Any ViT state dict spelling -> the on-disk names with the `vit.` prefix; returns (sd, notes)."""
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


def _unlinear(sd: Flat, theirs: str, out: Flat, ours: str, shape: Optional[tuple] = None,
              bias_shape: Optional[tuple] = None) -> None:
  w = sd.pop(f'{theirs}.weight').T
  out[f'{ours}/kernel'] = np.ascontiguousarray(w.reshape(shape) if shape else w)
  b = sd.pop(f'{theirs}.bias')
  out[f'{ours}/bias'] = b.reshape(bias_shape) if bias_shape else b


def _unln(sd: Flat, theirs: str, out: Flat, ours: str) -> None:
  out[f'{ours}/scale'] = sd.pop(f'{theirs}.weight')
  out[f'{ours}/bias'] = sd.pop(f'{theirs}.bias')


def from_hf(state: Mapping[str, np.ndarray], num_heads: int) -> tuple[Flat, list[str]]:
  """A ViT(ForImageClassification) state dict -> this project's flat parameters and notes."""
  sd, notes = canonical_names(state)
  sd.pop('vit.embeddings.mask_token', None)
  out: Flat = {}
  e = 'vit.embeddings'
  out['embedding/kernel'] = np.ascontiguousarray(
      sd.pop(f'{e}.patch_embeddings.projection.weight').transpose(2, 3, 1, 0))  # OIHW -> HWIO
  out['embedding/bias'] = sd.pop(f'{e}.patch_embeddings.projection.bias')
  out['cls'] = sd.pop(f'{e}.cls_token')
  out[POSEMB_KEY] = sd.pop(f'{e}.position_embeddings')
  d = out['cls'].shape[-1]
  hk = (num_heads, d // num_heads)
  depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r'vit\.encoder\.layer\.(\d+)\.', k))),
                  default=-1)
  for i in range(depth):
    b, t = f'Transformer/encoderblock_{i}', f'vit.encoder.layer.{i}'
    att = f'{b}/MultiHeadDotProductAttention_1'
    _unln(sd, f'{t}.layernorm_before', out, f'{b}/LayerNorm_0')
    for n in ('query', 'key', 'value'):
      _unlinear(sd, f'{t}.attention.attention.{n}', out, f'{att}/{n}', (d, *hk), hk)
    _unlinear(sd, f'{t}.attention.output.dense', out, f'{att}/out', (*hk, d))
    _unln(sd, f'{t}.layernorm_after', out, f'{b}/LayerNorm_2')
    _unlinear(sd, f'{t}.intermediate.dense', out, f'{b}/MlpBlock_3/Dense_0')
    _unlinear(sd, f'{t}.output.dense', out, f'{b}/MlpBlock_3/Dense_1')
  _unln(sd, 'vit.layernorm', out, 'Transformer/encoder_norm')
  if 'classifier.weight' in sd:
    _unlinear(sd, 'classifier', out, 'head')
  if sd:
    raise ValueError(f'Hugging Face ViT parameters this project\'s ViT cannot express: {sorted(sd)}')
  return out, notes


def _load_weights(directory: str) -> Flat:
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  single = os.path.join(directory, WEIGHTS)
  if os.path.exists(single):
    return load_file(single)
  index = os.path.join(directory, INDEX)
  if os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    state: Flat = {}
    for shard in shards:
      state.update(load_file(os.path.join(directory, shard)))
    return state
  raise FileNotFoundError(
      f'{directory}: no {WEIGHTS} or {INDEX} (only safetensors weights are read; re-save a '
      'pytorch_model.bin with `save_pretrained(safe_serialization=True)`)')


def is_hf_dir(path: str) -> bool:
  cfg = os.path.join(path, CONFIG)
  if not (os.path.isdir(path) and os.path.exists(cfg)):
    return False
  with open(cfg) as f:
    return json.load(f).get('model_type') == 'vit'


def read_hf(path: str | os.PathLike) -> tuple[Flat, Architecture, dict[str, Any]]:
  """Reads a Hugging Face ViT directory. Returns (flat params, architecture, info) with info holding
  'class_names' (from id2label) and 'notes' (e.g. an exact-GELU source)."""
  path = os.fspath(path)
  with open(os.path.join(path, CONFIG)) as f:
    config = json.load(f)
  flat, notes = from_hf(_load_weights(path), int(config['num_attention_heads']))
  act, eps = config.get('hidden_act', 'gelu'), config.get('layer_norm_eps', 1e-12)
  if act not in _TANH_GELUS:
    notes.append(f'the source uses hidden_act={act!r}; this project uses the tanh approximation of '
                 'GELU: logits will differ slightly')
  if abs(eps - 1e-6) > 1e-12:
    notes.append(f'the source uses layer_norm_eps={eps}; this project uses 1e-6')
  if 'vit_jax' in config:
    arch = Architecture.from_meta(config['vit_jax'])
    if arch.model_config.get('posemb') != 'learned':
      notes.append(f'the exported {arch.model_config["posemb"]} position embeddings were written as '
                   'fixed values: read back as learned ones')
      arch.model_config['posemb'] = 'learned'
  else:
    p = config.get('patch_size', 16)
    size = config.get('image_size', 224)
    num_classes = int(flat['head/kernel'].shape[1]) if 'head/kernel' in flat else None
    arch = Architecture(
        dict(patch_size=p if isinstance(p, int) else tuple(p), hidden_size=config['hidden_size'],
             num_layers=config['num_hidden_layers'], num_heads=config['num_attention_heads'],
             mlp_dim=config['intermediate_size'], classifier='token', posemb='learned',
             representation_size=None),
        num_classes, (size, size) if isinstance(size, int) else tuple(size),
        int(config.get('num_channels', 3)))
  id2label = config.get('id2label') or {}
  names = [id2label[str(i)] for i in range(len(id2label))] if id2label else None
  if names and all(re.fullmatch(r'LABEL_\d+', n) for n in names):
    names = None  # transformers' placeholders carry no information.
  return flat, arch, {'class_names': names, 'notes': notes}
