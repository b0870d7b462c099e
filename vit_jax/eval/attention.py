"""The analyses of the ViT paper's Fig. 7 and attention maps, as numpy functions of arrays.

Attention probabilities are float [..., N, N] with rows (queries) summing to 1 over the keys; the
sequence is `prefix` tokens (class, distillation) followed by the gh x gw patch tokens in row-major
order. Nothing here knows a model: the family descriptors say where the arrays come from
(`Family.attention_fn`, `token_layout`, `position_table`, `patch_filters`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

EPS = 1e-12


def rollout(attn: np.ndarray) -> np.ndarray:
  """Attention rollout (Abnar & Zuidema, 2020): how much each output token draws on each input token.

  Each layer's attention gets the identity added for the residual connection and its rows
  renormalised, heads are averaged, and the layers are multiplied, the last on the left:
  R = A_L ... A_1 with A_l = mean_h (W_lh + I) / 2. (Rows of W sum to 1, so renormalising before or
  after the head average is the same.)

  Args:
    attn: [L, B, heads, N, N] attention probabilities, layer 0 first.
  Returns:
    [B, N, N] float64; row i is output token i's share of every input token (rows sum to 1).
  """
  attn = np.asarray(attn, np.float64)
  if attn.ndim != 5 or attn.shape[-1] != attn.shape[-2]:
    raise ValueError(f'rollout needs attention [L, B, heads, N, N], got {attn.shape}')
  a = attn.mean(axis=2) + np.eye(attn.shape[-1])
  a /= a.sum(axis=-1, keepdims=True)
  out = a[0]
  for layer in a[1:]:
    out = layer @ out
  return out


def output_token_map(matrix: np.ndarray, prefix: int, grid: tuple[int, int],
                     class_token: Optional[bool] = None) -> np.ndarray:
  """What the classifier reads, over the patches: [..., N, N] -> [..., gh, gw] summing to 1.

  With a class token (`class_token`; default: any prefix token) the classifier reads row 0;
  otherwise (global average or MAP pooling) it reads the patch tokens alike, so their rows are
  averaged (prefix tokens such as registers are attended to, not read). Prefix columns are dropped
  and the patch columns renormalised.
  """
  matrix = np.asarray(matrix, np.float64)
  class_token = prefix > 0 if class_token is None else class_token
  rows = matrix[..., 0, :] if class_token else matrix[..., prefix:, :].mean(axis=-2)
  patches = rows[..., prefix:]
  if patches.shape[-1] != grid[0] * grid[1]:
    raise ValueError(f'{patches.shape[-1]} patch tokens do not make a {grid[0]}x{grid[1]} grid')
  patches = patches / np.maximum(patches.sum(axis=-1, keepdims=True), EPS)
  return patches.reshape(patches.shape[:-1] + tuple(grid))


def patch_distances(grid: tuple[int, int], patch_hw: tuple[int, int]) -> np.ndarray:
  """[P, P] distances in input pixels between the centres of the P = gh*gw patches (row-major)."""
  gh, gw = grid
  y, x = np.divmod(np.arange(gh * gw), gw)
  dy = (y[:, None] - y[None, :]) * float(patch_hw[0])
  dx = (x[:, None] - x[None, :]) * float(patch_hw[1])
  return np.sqrt(dy * dy + dx * dx)


def attention_distance(attn: np.ndarray, prefix: int, grid: tuple[int, int],
                       patch_hw: tuple[int, int]) -> np.ndarray:
  """Mean attention distance in pixels (the paper's Fig. 7 right), per leading index.

  For each patch query, the distance to each patch key weighted by the attention, with the weights
  renormalised over the patch keys (the mass a query puts on prefix tokens has no place in the
  image; `prefix_mass` reports it); then averaged over the patch queries.

  Args:
    attn: [..., N, N] attention probabilities (e.g. [L, B, heads, N, N]).
  Returns:
    [...] pixels (e.g. [L, B, heads]; average over B for the figure).
  """
  attn = np.asarray(attn, np.float64)
  w = attn[..., prefix:, prefix:]
  w = w / np.maximum(w.sum(axis=-1, keepdims=True), EPS)
  dist = patch_distances(grid, patch_hw)
  if w.shape[-1] != dist.shape[0]:
    raise ValueError(f'{w.shape[-1]} patch tokens do not make a {grid[0]}x{grid[1]} grid')
  return (w * dist).sum(axis=-1).mean(axis=-1)


def prefix_mass(attn: np.ndarray, prefix: int) -> np.ndarray:
  """[..., N, N] -> [...]: the share of attention patch queries give the prefix tokens, averaged."""
  attn = np.asarray(attn, np.float64)
  if not prefix:
    return np.zeros(attn.shape[:-2])
  return attn[..., prefix:, :prefix].sum(axis=-1).mean(axis=-1)


def uniform_distance(grid: tuple[int, int], patch_hw: tuple[int, int]) -> float:
  """Mean attention distance of uniform attention over the patches: the no-locality reference."""
  return float(patch_distances(grid, patch_hw).mean())


def posemb_similarity(table: np.ndarray) -> np.ndarray:
  """Cosine similarity of every patch's position embedding with every other's.

  Args:
    table: [gh, gw, D] position embeddings of the patch tokens.
  Returns:
    [gh, gw, gh, gw]: out[i, j] is the map of patch (i, j)'s similarity with each patch.
  """
  table = np.asarray(table, np.float64)
  gh, gw, d = table.shape
  flat = table.reshape(gh * gw, d)
  unit = flat / np.maximum(np.linalg.norm(flat, axis=-1, keepdims=True), EPS)
  return (unit @ unit.T).reshape(gh, gw, gh, gw)


def similarity_by_distance(sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(grid distances, mean similarity at each) from posemb_similarity's [gh, gw, gh, gw] output.

  Distances are Euclidean in patches, rounded to 0.01; a well-formed 2-D embedding falls with it.
  """
  gh, gw = sim.shape[:2]
  dist = np.round(patch_distances((gh, gw), (1, 1)), 2)
  values = sim.reshape(gh * gw, gh * gw)
  levels = np.unique(dist)
  return levels, np.array([values[dist == d].mean() for d in levels])


def patch_components(kernel: np.ndarray, k: int = 28) -> tuple[np.ndarray, np.ndarray]:
  """Top principal components of the patch-embedding filters (the paper's Fig. 7 left).

  The D filters (columns of the kernel, each a kh*kw*C pixel pattern) are centred and decomposed;
  the leading right-singular vectors are the patterns the embedding is most sensitive to.

  Args:
    kernel: [kh, kw, C, D] convolution kernel.
    k: components to return (at most min(D, kh*kw*C)).
  Returns:
    (components [k, kh, kw, C] with unit norm and arbitrary sign, explained variance fractions [k]).
  """
  kernel = np.asarray(kernel, np.float64)
  if kernel.ndim != 4:
    raise ValueError(f'patch filters need a conv kernel [kh, kw, C, D], got {kernel.shape}')
  kh, kw, c, d = kernel.shape
  filters = kernel.reshape(kh * kw * c, d).T
  filters = filters - filters.mean(axis=0, keepdims=True)
  _, s, vt = np.linalg.svd(filters, full_matrices=False)
  var = s * s
  k = min(k, len(s))
  return vt[:k].reshape(k, kh, kw, c), var[:k] / max(var.sum(), EPS)


def component_tiles(components: np.ndarray) -> np.ndarray:
  """[k, kh, kw, C] -> [k, kh, kw, 3 or 1] images in [0, 1]: each scaled symmetrically about 0.5 so
  that zero is mid-grey. More than 3 channels: the first 3 as RGB."""
  comps = np.asarray(components, np.float64)
  if comps.shape[-1] > 3:
    comps = comps[..., :3]
  elif comps.shape[-1] == 2:
    comps = comps.mean(axis=-1, keepdims=True)
  scale = np.abs(comps).reshape(len(comps), -1).max(axis=-1)
  return 0.5 + 0.5 * comps / np.maximum(scale, EPS)[:, None, None, None]


def summarize_distances(per_image: Sequence[np.ndarray]) -> np.ndarray:
  """Batches of [L, B, heads] distances -> [L, heads], the mean over every image."""
  stacked = np.concatenate([np.asarray(x, np.float64) for x in per_image], axis=1)
  return stacked.mean(axis=1)


def token_shares(attn: np.ndarray, prefix: int, class_token: bool) -> tuple[np.ndarray, np.ndarray]:
  """Where attention goes, per layer: the share each prefix token receives, and the patches' share.

  The queries are what the layer's output is read from: the class token's row when the classifier
  reads one (`class_token`), otherwise the patch queries' rows averaged (pooled models). Heads and
  images are averaged.

  Args:
    attn: [L, B, heads, N, N] attention probabilities with the `prefix` tokens first.
  Returns:
    (prefix shares [L, prefix], patch share [L]); each layer's shares sum to 1.
  """
  attn = np.asarray(attn, np.float64)
  if attn.ndim != 5 or attn.shape[-1] != attn.shape[-2]:
    raise ValueError(f'token_shares needs attention [L, B, heads, N, N], got {attn.shape}')
  if class_token and prefix < 1:
    raise ValueError('a class-token reader needs at least one prefix token')
  rows = attn[..., 0, :] if class_token else attn[..., prefix:, :].mean(axis=-2)
  rows = rows.mean(axis=(1, 2))                        # [L, N]
  return rows[:, :prefix], rows[:, prefix:].sum(axis=-1)
