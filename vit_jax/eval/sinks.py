"""High-norm output tokens ("attention sinks") and the attention they draw, per image.

Darcet et al. (2024, "Vision Transformers Need Registers") found that large, long-trained ViTs
repurpose a few patch tokens of low information (background) as global stores: those tokens leave
the network with a norm several times the others' and the class token's last-layer attention
concentrates on them; register tokens take that role over, and the outliers vanish. This module
measures it on arrays, knowing no model:

  - `token_norms`: L2 norm of every output token (the last block's output, before the final norm:
    the norm would rescale the outliers away);
  - `outliers`: patch tokens whose norm exceeds `factor` times the median patch norm of their image;
  - `norm_stats`: per image, the fraction of outlier patches and the max/median norm ratio;
  - `reader_attention`: where the reader's (class token's, or the mean patch query's) last-layer
    attention goes: the class token, each register, the outlier patches, the other patches;
  - `summarize`: the per-image numbers averaged into one JSON-able dict.

`python -m vit_jax.inspect --sinks` (vit_jax/eval/inspection.py) runs a model over images and writes
the summary as sinks.json.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

# The paper's histogram of output-token norms (DINOv2 ViT-g, its Fig. 3) is bimodal, the outliers
# (~2% of tokens) well apart from the bulk; a multiple of the image's own median is a threshold that
# needs no model-specific scale. 3x flags nothing in a unimodal spread (max/median stays below ~1.6
# for norms within +-20%); `max_over_median` is reported too, so any other threshold can be read.
DEFAULT_FACTOR = 3.0
EPS = 1e-12


def token_norms(tokens: np.ndarray) -> np.ndarray:
  """[..., N, D] tokens -> [..., N] L2 norms (float64)."""
  return np.linalg.norm(np.asarray(tokens, np.float64), axis=-1)


def outliers(norms: np.ndarray, factor: float = DEFAULT_FACTOR) -> np.ndarray:
  """[B, N] patch-token norms -> bool [B, N]: norm > factor x the image's median patch norm."""
  norms = np.asarray(norms, np.float64)
  if norms.ndim != 2:
    raise ValueError(f'outliers needs patch-token norms [B, N], got {norms.shape}')
  if factor <= 1:
    raise ValueError(f'the outlier factor must exceed 1 (a multiple of the median), got {factor}')
  median = np.median(norms, axis=-1, keepdims=True)
  return norms > factor * median


def norm_stats(norms: np.ndarray, factor: float = DEFAULT_FACTOR) -> dict[str, np.ndarray]:
  """Per image of [B, N] patch-token norms: 'outlier_fraction' [B] (share of patches flagged by
  `outliers`), 'max_over_median' [B] and 'median' [B] (the norm unit of that image)."""
  norms = np.asarray(norms, np.float64)
  mask = outliers(norms, factor)
  median = np.median(norms, axis=-1)
  return {'outlier_fraction': mask.mean(axis=-1),
          'max_over_median': norms.max(axis=-1) / np.maximum(median, EPS),
          'median': median}


def reader_attention(attn: np.ndarray, prefix: int, num_registers: int, mask: np.ndarray,
                     class_token: bool) -> dict[str, np.ndarray]:
  """Where the reader's attention goes in one layer, per image (heads averaged).

  Args:
    attn: [B, heads, N, N] attention probabilities; the `prefix` tokens first (class/distillation
      tokens, then the `num_registers` registers last among them), then the patches.
    mask: bool [B, N - prefix]: the outlier patches (`outliers`).
    class_token: the reader is the class token's row (query 0); otherwise the patch queries'
      rows averaged (pooled models, whose classifier reads the patches).
  Returns:
    per image [B]: 'class' (the non-register prefix tokens together), 'registers' (all of them),
    'outlier_patches', 'other_patches' (they sum to 1), 'registers_each' [B, R], and 'top_patch'
    (the largest share one patch gets).
  """
  attn = np.asarray(attn, np.float64)
  if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
    raise ValueError(f'reader_attention needs attention [B, heads, N, N], got {attn.shape}')
  if not 0 <= num_registers <= prefix:
    raise ValueError(f'{num_registers} registers cannot be among {prefix} prefix tokens')
  mask = np.asarray(mask, bool)
  if mask.shape != (attn.shape[0], attn.shape[-1] - prefix):
    raise ValueError(f'the outlier mask {mask.shape} does not match {attn.shape[0]} images of '
                     f'{attn.shape[-1] - prefix} patches')
  if class_token and prefix - num_registers < 1:
    raise ValueError('a class-token reader needs a class token among the prefix tokens')
  rows = attn[:, :, 0, :] if class_token else attn[:, :, prefix:, :].mean(axis=-2)
  rows = rows.mean(axis=1)                             # [B, N]
  first = prefix - num_registers
  patches = rows[:, prefix:]
  return {'class': rows[:, :first].sum(axis=-1),
          'registers': rows[:, first:prefix].sum(axis=-1),
          'registers_each': rows[:, first:prefix],
          'outlier_patches': np.where(mask, patches, 0.0).sum(axis=-1),
          'other_patches': np.where(mask, 0.0, patches).sum(axis=-1),
          # Concentration regardless of norms (uniform attention gives 1/N to each patch).
          'top_patch': patches.max(axis=-1)}


def _mean(parts: Sequence[np.ndarray]) -> Any:
  value = np.concatenate([np.asarray(p, np.float64) for p in parts]).mean(axis=0)
  return round(float(value), 5) if value.ndim == 0 else [round(float(v), 5) for v in value]


def summarize(per_batch: Sequence[dict[str, np.ndarray]], factor: float,
              prefix_names: Sequence[str]) -> dict[str, Any]:
  """Averages `measure_batch` outputs over every image into one JSON-able dict."""
  get = lambda key: [b[key] for b in per_batch]
  ratio = np.concatenate(get('max_over_median'))
  frac = np.concatenate(get('outlier_fraction'))
  layer_ratio = np.concatenate(get('layer_max_over_median'), axis=0)      # [images, L]
  out = {
      'num_images': int(len(ratio)),
      'factor': factor,
      'definition': ('patch-token norms of the last block\'s output (before the final norm); an '
                     'outlier is a patch whose norm exceeds factor x its image\'s median patch '
                     'norm; attention shares are the reader\'s (class token, else the mean patch '
                     'query) last-layer attention, heads averaged'),
      'outlier_fraction_mean': round(float(frac.mean()), 5),
      'images_with_outliers': round(float((frac > 0).mean()), 5),
      'max_over_median_mean': round(float(ratio.mean()), 4),
      'max_over_median_max': round(float(ratio.max()), 4),
      'max_over_median_per_layer': [round(float(v), 4) for v in layer_ratio.mean(axis=0)],
      'prefix_tokens': list(prefix_names),
      'prefix_norm_over_patch_median': _mean(get('prefix_over_median')),
      'reader_attention': {k: _mean(get('attn_' + k)) for k in
                           ('class', 'registers', 'registers_each', 'outlier_patches',
                            'other_patches', 'top_patch')},
  }
  if all('normed_max_over_median' in b for b in per_batch):
    out['after_final_norm'] = {'outlier_fraction_mean': _mean(get('normed_outlier_fraction')),
                               'max_over_median_mean': _mean(get('normed_max_over_median'))}
  return out


def measure_batch(attn_last: np.ndarray, tokens: np.ndarray, layer_patches: Sequence[np.ndarray],
                  prefix: int, num_registers: int, class_token: bool,
                  factor: float = DEFAULT_FACTOR,
                  normed_patches: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
  """Per-image sink numbers of one batch.

  Args:
    attn_last: [B, heads, N, N] the last layer's attention.
    tokens: [B, N, D] the last block's output tokens (prefix first), before the final norm.
    layer_patches: per block, [B, ..., D] its output patch tokens (any spatial shape).
    normed_patches: optionally [B, ..., D] the last block's patch tokens after the final norm
      (the features a user reads): their outlier fraction and max/median ratio are added.
  """
  norms = token_norms(tokens)
  patch = norms[:, prefix:]
  stats = norm_stats(patch, factor)
  mask = outliers(patch, factor)
  shares = reader_attention(attn_last, prefix, num_registers, mask, class_token)
  per_layer = []
  for layer in layer_patches:
    n = token_norms(np.asarray(layer).reshape(len(layer), -1, np.shape(layer)[-1]))
    per_layer.append(n.max(axis=-1) / np.maximum(np.median(n, axis=-1), EPS))
  out = dict(stats)
  out['prefix_over_median'] = norms[:, :prefix] / np.maximum(stats['median'][:, None], EPS)
  out['layer_max_over_median'] = np.stack(per_layer, axis=-1)
  out.update({'attn_' + k: v for k, v in shares.items()})
  if normed_patches is not None:
    normed = token_norms(np.asarray(normed_patches).reshape(len(tokens), -1, tokens.shape[-1]))
    after = norm_stats(normed, factor)
    out['normed_outlier_fraction'] = after['outlier_fraction']
    out['normed_max_over_median'] = after['max_over_median']
  return out
