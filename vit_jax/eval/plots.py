"""Figures of `vit_jax.eval.attention`'s analyses, written as PNG files.

matplotlib is imported on first use, with the non-interactive Agg backend, so that importing this
module costs nothing and works without a display. Every figure has a title, axis labels where the
axes mean something (pixels, layers, patch indices) and a colour bar where colour is a value.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

DPI = 100


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _save(fig, path: str) -> str:
  fig.savefig(path, dpi=DPI, bbox_inches='tight')
  _pyplot().close(fig)
  return path


def _show_image(ax, image: np.ndarray, gray: bool = False):
  """uint8 [H, W, C] with its pixel extent, so that overlays of any grid line up with it; `gray`
  shows colour images as luma, under a heat map whose colours must stay readable."""
  h, w = image.shape[:2]
  if image.shape[-1] == 1 or gray:
    luma = image[..., 0] if image.shape[-1] == 1 else image[..., :3] @ np.array([.299, .587, .114])
    ax.imshow(luma, cmap='gray', vmin=0, vmax=255, extent=(0, w, h, 0))
  else:
    ax.imshow(image[..., :3], extent=(0, w, h, 0))
  ax.set_xlabel('x (pixels)')
  ax.set_ylabel('y (pixels)')


def attention_overlays(path: str, image: np.ndarray, maps: Sequence[tuple[str, np.ndarray]],
                       title: str) -> str:
  """One image and heat maps over it: the image, then one panel per (panel title, [gh, gw] map).

  Maps are shown patch by patch (no interpolation) at half opacity, each with its colour bar.
  """
  plt = _pyplot()
  h, w = image.shape[:2]
  fig, axes = plt.subplots(1, 1 + len(maps), figsize=(3.7 * (1 + len(maps)), 3.5),
                           layout='constrained')
  _show_image(axes[0], image)
  axes[0].set_title('input')
  for ax, (name, heat) in zip(axes[1:], maps):
    _show_image(ax, image, gray=True)
    ax.set_ylabel('')
    im = ax.imshow(heat, cmap='inferno', alpha=0.6, extent=(0, w, h, 0), interpolation='nearest',
                   vmin=0.0, vmax=float(np.max(heat)))
    ax.set_title(name, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label='share of attention')
  fig.suptitle(title, fontsize=10)
  return _save(fig, path)


def image_grid(path: str, columns: Sequence[tuple[str, np.ndarray]], names: Sequence[str],
               title: str) -> str:
  """Rows of images side by side: one column per (column title, float [n, H, W, C] in [0, 1]), one
  row per image (named on the left)."""
  plt = _pyplot()
  n = len(columns[0][1])
  fig, axes = plt.subplots(n, len(columns), figsize=(2.2 * len(columns), 2.2 * n + 0.4),
                           squeeze=False, layout='constrained')
  for j, (heading, images) in enumerate(columns):
    for i in range(n):
      ax = axes[i][j]
      image = np.clip(np.asarray(images[i], np.float32), 0.0, 1.0)
      if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap='gray', vmin=0.0, vmax=1.0, interpolation='nearest')
      else:
        ax.imshow(image[..., :3], interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(heading, fontsize=9)
      if j == 0:
        ax.set_ylabel(os.path.basename(names[i])[:18], fontsize=8)
  fig.suptitle(title, fontsize=10)
  return _save(fig, path)


def distance_scatter(path: str, distances: np.ndarray, uniform: float, title: str) -> str:
  """Mean attention distance [L, heads] in pixels: one dot per head at each depth (paper Fig. 7)."""
  plt = _pyplot()
  layers, heads = distances.shape
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  colors = plt.get_cmap('tab10' if heads <= 10 else 'tab20')
  jitter = (np.arange(heads) - (heads - 1) / 2) * min(0.08, 0.6 / max(heads, 1))
  for h in range(heads):
    ax.scatter(np.arange(1, layers + 1) + jitter[h], distances[:, h], s=22, color=colors(h % 20),
               label=f'head {h + 1}', zorder=3)
  ax.plot(np.arange(1, layers + 1), distances.mean(axis=1), color='0.3', lw=1, zorder=2,
          label='mean over heads')
  ax.axhline(uniform, color='0.5', ls='--', lw=1, label=f'uniform attention ({uniform:.1f} px)')
  ax.set_xlabel('network depth (layer)')
  ax.set_ylabel('mean attention distance (pixels)')
  ax.set_xticks(np.arange(1, layers + 1))
  ax.set_ylim(0, 1.08 * max(float(distances.max()), uniform))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2 if heads > 6 else 1, loc='lower right')
  ax.set_title(title, fontsize=10)
  return _save(fig, path)


def similarity_mosaic(sim: np.ndarray) -> np.ndarray:
  """[gh, gw, gh, gw] -> one 2-D array of gh x gw small maps separated by NaN lines."""
  gh, gw = sim.shape[:2]
  out = np.full((gh * (gh + 1) - 1, gw * (gw + 1) - 1), np.nan)
  for i in range(gh):
    for j in range(gw):
      out[i * (gh + 1):i * (gh + 1) + gh, j * (gw + 1):j * (gw + 1) + gw] = sim[i, j]
  return out


def posemb_grid(path: str, sim: np.ndarray, title: str) -> str:
  """Position-embedding similarity (paper Fig. 7 centre): the small map at (row i, column j) is the
  cosine similarity of patch (i, j)'s embedding with every patch's. Colours span [min, 1] rounded
  out to 0.1 (not [-1, 1]): a sincos2d table's similarities all lie near 1 and would look flat."""
  plt = _pyplot()
  gh, gw = sim.shape[:2]
  mosaic = similarity_mosaic(sim)
  size = float(np.clip(0.45 * max(gh, gw), 4.0, 9.0))
  fig, ax = plt.subplots(figsize=(size + 1.2, size))
  cmap = plt.get_cmap('viridis').with_extremes(bad='white')
  low = float(np.floor(np.nanmin(mosaic) * 10) / 10)
  im = ax.imshow(np.ma.masked_invalid(mosaic), cmap=cmap, vmin=min(low, 0.9), vmax=1,
                 interpolation='nearest')
  step_r, step_c = max(1, gh // 8), max(1, gw // 8)
  ax.set_xticks([j * (gw + 1) + (gw - 1) / 2 for j in range(0, gw, step_c)])
  ax.set_xticklabels([str(j + 1) for j in range(0, gw, step_c)])
  ax.set_yticks([i * (gh + 1) + (gh - 1) / 2 for i in range(0, gh, step_r)])
  ax.set_yticklabels([str(i + 1) for i in range(0, gh, step_r)])
  ax.set_xlabel('input patch column')
  ax.set_ylabel('input patch row')
  ax.tick_params(length=0)
  for s in ax.spines.values():
    s.set_visible(False)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label='cosine similarity')
  ax.set_title(title, fontsize=10)
  return _save(fig, path)


def tile_mosaic(tiles: np.ndarray, cols: int) -> np.ndarray:
  """[k, kh, kw, C] in [0, 1] -> one RGB image [rows*(kh+1)-1, cols*(kw+1)-1, 3], white gaps."""
  k, kh, kw, c = tiles.shape
  rows = -(-k // cols)
  out = np.ones((rows * (kh + 1) - 1, cols * (kw + 1) - 1, 3))
  for idx in range(k):
    r, q = divmod(idx, cols)
    out[r * (kh + 1):r * (kh + 1) + kh, q * (kw + 1):q * (kw + 1) + kw] = np.clip(
        tiles[idx] if c == 3 else np.repeat(tiles[idx][..., :1], 3, axis=-1), 0, 1)
  return out


def filter_tiles(path: str, tiles: np.ndarray, explained: np.ndarray, title: str,
                 cols: Optional[int] = None) -> str:
  """Principal components of the patch filters as tiles (paper Fig. 7 left), [k, kh, kw, 1 or 3]
  in [0, 1] (mid-grey = 0), each labelled with its share of the filters' variance."""
  plt = _pyplot()
  k, kh, kw, _ = tiles.shape
  cols = cols or min(7, k)
  rows = -(-k // cols)
  fig, ax = plt.subplots(figsize=(1.2 * cols, 1.3 * rows + 0.6))
  ax.imshow(tile_mosaic(tiles, cols), interpolation='nearest')
  for idx in range(k):
    r, q = divmod(idx, cols)
    ax.text(q * (kw + 1) + (kw - 1) / 2, r * (kh + 1) - 0.6, f'PC{idx + 1} {explained[idx]:.0%}',
            ha='center', va='bottom', fontsize=7)
  ax.axis('off')
  ax.set_title(title, fontsize=9, pad=14)
  return _save(fig, path)


def token_shares(path: str, shares: np.ndarray, names: Sequence[str], title: str) -> str:
  """Stacked bars, one per layer: [L, T] shares of attention (rows sum to 1) over T named token
  groups (prefix tokens one by one, then all patches), with the values of the last layer listed."""
  plt = _pyplot()
  layers, groups = shares.shape
  fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * layers + 3.0), 3.8))
  colors = plt.get_cmap('tab10' if groups <= 10 else 'tab20')
  bottom = np.zeros(layers)
  x = np.arange(1, layers + 1)
  for g in range(groups):
    ax.bar(x, shares[:, g], bottom=bottom, color='0.8' if names[g] == 'patches' else colors(g % 20),
           label=f'{names[g]} (last layer {shares[-1, g]:.1%})', edgecolor='white', lw=0.5)
    bottom += shares[:, g]
  ax.set_xlabel('network depth (layer)')
  ax.set_ylabel('share of attention')
  ax.set_xticks(x)
  ax.set_ylim(0, 1)
  ax.legend(fontsize=7, loc='center left', bbox_to_anchor=(1.01, 0.5))
  ax.set_title(title, fontsize=10)
  return _save(fig, path)


def norm_histogram(path: str, ratios: np.ndarray, factor: float, title: str) -> str:
  """Histogram (log counts) of patch-token norms divided by their image's median, with the outlier
  threshold `factor` marked: high-norm tokens form a separate mode to its right."""
  plt = _pyplot()
  ratios = np.asarray(ratios, np.float64).ravel()
  fig, ax = plt.subplots(figsize=(6.4, 3.8))
  top = max(float(ratios.max()), factor) * 1.05
  ax.hist(ratios, bins=np.linspace(0.0, top, 60), color='tab:blue', log=True)
  ax.axvline(factor, color='tab:red', ls='--', lw=1,
             label=f'{factor:g}x median: {np.mean(ratios > factor):.2%} of patches above')
  ax.set_xlabel("patch-token norm / its image's median")
  ax.set_ylabel('patch tokens (log)')
  ax.legend(fontsize=8)
  ax.set_title(title, fontsize=10)
  return _save(fig, path)
