"""The registry of named ViT architectures, spelled as in Google's vision_transformer repository.

`get_model_config(name)` returns a fresh `ml_collections.ConfigDict` whose fields are the
`VisionTransformer` attributes (`vit_jax.models.create_model` builds the module from it). Names follow
`ViT-<size>_<patch>`; the paper's Table 1 sizes are Ti/S/B/L/H. The `*_4`/`*_7` models and `testing`
are small architectures for 28x28 inputs on a CPU.
"""
from __future__ import annotations

import ml_collections

# size: (hidden_size D, num_layers L, num_heads, mlp_dim)
_SIZES = {
    'Ti': (192, 12, 3, 768),
    'S': (384, 12, 6, 1536),
    'B': (768, 12, 12, 3072),
    'L': (1024, 24, 16, 4096),
    'H': (1280, 32, 16, 5120),
    # Small models for CPU work on 28x28 images (Fashion-MNIST, digits).
    'Mini': (128, 6, 4, 256),
    'Micro': (96, 4, 3, 192),
}
_PAPER_MODELS = ('Ti_16', 'S_16', 'S_32', 'B_16', 'B_32', 'B_8', 'L_16', 'L_32', 'H_14')
_SMALL_MODELS = ('Mini_4', 'Mini_7', 'Micro_4', 'Micro_7')


def _vit(size: str, patch: int) -> ml_collections.ConfigDict:
  hidden, layers, heads, mlp = _SIZES[size]
  return ml_collections.ConfigDict(dict(
      name=f'ViT-{size}_{patch}', patch_size=patch, hidden_size=hidden, num_layers=layers,
      num_heads=heads, mlp_dim=mlp, classifier='token', posemb='learned', representation_size=None))


def _testing() -> ml_collections.ConfigDict:
  """A 2-layer width-32 model for unit tests (Google's `testing` config, at patch 4)."""
  return ml_collections.ConfigDict(dict(
      name='ViT-testing', patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
      classifier='token', posemb='learned', representation_size=None))


MODELS = {f'ViT-{m}': (lambda m=m: _vit(*m.split('_')[0:1], int(m.split('_')[1])))
          for m in _PAPER_MODELS + _SMALL_MODELS}
MODELS['ViT-testing'] = _testing


def names() -> list[str]:
  """Every registered model name."""
  return sorted(MODELS)


def get_model_config(name: str) -> ml_collections.ConfigDict:
  """A fresh config for the named model; raises KeyError listing the valid names."""
  if name not in MODELS:
    raise KeyError(f'unknown model {name!r}; registered models: {", ".join(names())}')
  return MODELS[name]()


def get_config(name: str = 'ViT-B_16') -> ml_collections.ConfigDict:
  """ml_collections entry point: `--config=configs/models.py:ViT-B_16`."""
  return get_model_config(name)
