"""Training augmentation: named presets, random crop geometry, RandAugment, Mixup / CutMix.

All randomness comes from a `np.random.Generator` the caller derives from (seed, epoch, index) or
(seed, step), and every function draws a fixed amount from it whatever the outcome, so a batch
depends only on those numbers, never on which thread or process made it.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

CROPS = ('inception', 'resize', 'pad_crop')

DEFAULTS: dict[str, Any] = {
    'crop': 'inception',          # one of CROPS
    'area_range': (0.05, 1.0),    # Inception crop: fraction of the image area kept (vit_jax: 5%-100%)
    'aspect_range': (3 / 4, 4 / 3),
    'pad': None,                  # pad_crop: zero padding each side, px; None: size/8 in [2, 4]
    'flip': True,                 # random horizontal flip
    'randaugment': None,          # None or {'num_layers': 2, 'magnitude': 9}, magnitude out of 10
    'mixup': 0.0,                 # Beta(alpha, alpha) for Mixup; 0 disables it
    'cutmix': 0.0,                # Beta(alpha, alpha) for CutMix; 0 disables it
    'mix_prob': 1.0,              # probability that a batch is mixed at all
    'switch_prob': 0.5,           # with both enabled: probability of CutMix instead of Mixup
}

PRESETS: dict[str, dict[str, Any]] = {
    # vit_jax / big_vision's default for ImageNet-scale training and fine-tuning.
    'inception_crop': {'crop': 'inception', 'flip': True},
    'none': {'crop': 'resize', 'flip': False},
    'resize': {'crop': 'resize', 'flip': False},
    'resize_flip': {'crop': 'resize', 'flip': True},
    # Small images (Fashion-MNIST, CIFAR): a 5% Inception crop of 28x28 would be 6x6 pixels.
    'pad_crop_flip': {'crop': 'pad_crop', 'flip': True},
    'randaugment': {'crop': 'inception', 'flip': True,
                    'randaugment': {'num_layers': 2, 'magnitude': 10}},
    # DeiT (Touvron et al., 2021): RandAugment(2, 9), Mixup 0.8, CutMix 1.0, switch 0.5.
    'deit': {'crop': 'inception', 'area_range': (0.08, 1.0), 'flip': True,
             'randaugment': {'num_layers': 2, 'magnitude': 9},
             'mixup': 0.8, 'cutmix': 1.0, 'switch_prob': 0.5},
}


def augment_config(spec: str | Mapping[str, Any] | None) -> dict[str, Any]:
  """A complete augmentation dict from a preset name, or a dict / ConfigDict of overrides.

  A mapping may name its starting point with `preset` (default `inception_crop`), e.g.
  `{'preset': 'pad_crop_flip', 'mixup': 0.2}`. Unknown keys raise, so a typo cannot go unnoticed.
  """
  if spec is None:
    spec = 'inception_crop'
  if isinstance(spec, str):
    spec = {'preset': spec}
  spec = dict(spec.to_dict() if hasattr(spec, 'to_dict') else spec)
  preset = spec.pop('preset', None) or 'inception_crop'
  if preset not in PRESETS:
    raise ValueError(f'unknown augmentation preset {preset!r}; choose one of {sorted(PRESETS)}')
  cfg = copy.deepcopy(DEFAULTS)
  cfg.update(copy.deepcopy(PRESETS[preset]))
  unknown = set(spec) - set(DEFAULTS)
  if unknown:
    raise ValueError(f'unknown augmentation settings {sorted(unknown)}; known: {sorted(DEFAULTS)}')
  cfg.update(spec)
  if cfg['crop'] not in CROPS:
    raise ValueError(f"augment crop {cfg['crop']!r} is not one of {CROPS}")
  ra = cfg['randaugment']
  if ra is not None and not isinstance(ra, Mapping):
    ra = ra.to_dict() if hasattr(ra, 'to_dict') else None
  if ra:
    cfg['randaugment'] = {'num_layers': int(ra.get('num_layers', 2)),
                          'magnitude': float(ra.get('magnitude', 9))}
  else:
    cfg['randaugment'] = None
  return cfg


# ---------------------------------------------------------------------------------------- geometry

def inception_boxes(rng: np.random.Generator, n: int, h, w, area_range=(0.05, 1.0),
                    aspect_range=(3 / 4, 4 / 3), attempts: int = 10) -> np.ndarray:
  """Inception-style random crops: float [n, 4] boxes (left, top, right, bottom) in pixels.

  Area (a fraction of h*w) and log-aspect are uniform; the first of `attempts` candidates that fits
  wins, else the whole image (TF's `sample_distorted_bounding_box` fallback). `h`, `w` are scalars
  or [n] arrays.
  """
  h = np.broadcast_to(np.asarray(h, np.float64), (n,))[:, None]
  w = np.broadcast_to(np.asarray(w, np.float64), (n,))[:, None]
  area = rng.uniform(*area_range, size=(n, attempts)) * h * w
  ratio = np.exp(rng.uniform(np.log(aspect_range[0]), np.log(aspect_range[1]), size=(n, attempts)))
  cw, ch = np.sqrt(area * ratio), np.sqrt(area / ratio)
  ok = (cw <= w) & (ch <= h)
  first = np.argmax(ok, axis=1)
  rows = np.arange(n)
  found = ok[rows, first]
  cw = np.where(found, cw[rows, first], w[:, 0])
  ch = np.where(found, ch[rows, first], h[:, 0])
  u = rng.random((n, 2))
  x0 = u[:, 0] * (w[:, 0] - cw)
  y0 = u[:, 1] * (h[:, 0] - ch)
  return np.stack([x0, y0, x0 + cw, y0 + ch], axis=1)


def central_box(h: int, w: int, out_hw: tuple[int, int], fraction: float = 0.875) -> tuple:
  """The box that 'resize the short side to out/fraction, then take the central out' keeps."""
  scale = min(h / (out_hw[0] / fraction), w / (out_hw[1] / fraction))
  ch, cw = min(h, out_hw[0] * scale), min(w, out_hw[1] * scale)
  y0, x0 = (h - ch) / 2, (w - cw) / 2
  return (x0, y0, x0 + cw, y0 + ch)


def default_pad(size: int) -> int:
  return int(min(4, max(2, round(size / 8))))


def pad_crop(images: np.ndarray, offsets: np.ndarray, pad: int) -> np.ndarray:
  """Zero-pads uint8 [n, H, W, C] by `pad` and takes the [H, W] window at `offsets` [n, 2] (y, x)."""
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows = offsets[:, 0, None] + np.arange(h)
  cols = offsets[:, 1, None] + np.arange(w)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


# ------------------------------------------------------------------------------------- RandAugment

_FILL = (128, 128, 128)


def _signed(rng: np.random.Generator, v: float) -> float:
  return v if rng.random() < 0.5 else -v


def _affine(img: Image.Image, matrix) -> Image.Image:
  fill = _FILL[0] if img.mode == 'L' else _FILL
  return img.transform(img.size, Image.AFFINE, matrix, Image.NEAREST, fillcolor=fill)


def _enhance(cls):
  return lambda img, m, rng: cls(img).enhance(1.0 + _signed(rng, 0.9 * m))


# Each op takes (image, level in [0, 1] for magnitude/10, rng); the TF / timm definitions.
_OPS = {
    'AutoContrast': lambda img, m, rng: ImageOps.autocontrast(img),
    'Equalize': lambda img, m, rng: ImageOps.equalize(img),
    'Invert': lambda img, m, rng: ImageOps.invert(img),
    'Rotate': lambda img, m, rng: img.rotate(_signed(rng, 30.0 * m), Image.NEAREST,
                                             fillcolor=_FILL[0] if img.mode == 'L' else _FILL),
    'Posterize': lambda img, m, rng: ImageOps.posterize(img, max(1, 8 - int(4 * min(m, 1.0)))),
    'Solarize': lambda img, m, rng: ImageOps.solarize(img, int(256 - 256 * min(m, 1.0))),
    'SolarizeAdd': lambda img, m, rng: _solarize_add(img, int(110 * m)),
    'Color': _enhance(ImageEnhance.Color),
    'Contrast': _enhance(ImageEnhance.Contrast),
    'Brightness': _enhance(ImageEnhance.Brightness),
    'Sharpness': _enhance(ImageEnhance.Sharpness),
    'ShearX': lambda img, m, rng: _affine(img, (1, _signed(rng, 0.3 * m), 0, 0, 1, 0)),
    'ShearY': lambda img, m, rng: _affine(img, (1, 0, 0, _signed(rng, 0.3 * m), 1, 0)),
    # TF translates by up to 100 px at 224 px; scale that to the image so small images survive.
    'TranslateX': lambda img, m, rng: _affine(img, (1, 0, _signed(rng, 0.45 * m * img.size[0]),
                                                    0, 1, 0)),
    'TranslateY': lambda img, m, rng: _affine(img, (1, 0, 0, 0, 1,
                                                    _signed(rng, 0.45 * m * img.size[1]))),
}
RANDAUGMENT_OPS = tuple(_OPS)


def _solarize_add(img: Image.Image, add: int) -> Image.Image:
  arr = np.asarray(img).astype(np.int16)
  out = np.where(arr < 128, np.clip(arr + add, 0, 255), arr).astype(np.uint8)
  return Image.fromarray(out, img.mode)


def randaugment(img: Image.Image, rng: np.random.Generator, num_layers: int = 2,
                magnitude: float = 9) -> Image.Image:
  """RandAugment (Cubuk et al., 2020): `num_layers` ops drawn uniformly, each at `magnitude`/10."""
  level = magnitude / 10.0
  for k in rng.integers(len(RANDAUGMENT_OPS), size=num_layers):
    # A fixed draw per op (the sign) keeps the stream's length independent of the op chosen.
    sub = np.random.default_rng(rng.integers(2**63))
    img = _OPS[RANDAUGMENT_OPS[k]](img, level, sub)
  return img


# ----------------------------------------------------------------------------------- Mixup / CutMix

def mix_batch(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray,
              cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """Mixup / CutMix of a float batch [B, H, W, C] and its soft labels [B, K] with the batch reversed.

  One lambda per batch, as in timm / DeiT. CutMix's lambda is corrected to the pasted box's actual
  area after clipping at the border. Returns new arrays; the inputs are not modified.
  """
  mixup, cutmix = float(cfg.get('mixup') or 0.0), float(cfg.get('cutmix') or 0.0)
  u = rng.random(4)  # [apply?, switch?, box centre y, box centre x]
  lam_mixup = rng.beta(mixup, mixup) if mixup > 0 else 1.0
  lam_cutmix = rng.beta(cutmix, cutmix) if cutmix > 0 else 1.0
  if (mixup <= 0 and cutmix <= 0) or u[0] >= cfg.get('mix_prob', 1.0):
    return images, labels
  use_cutmix = cutmix > 0 and (mixup <= 0 or u[1] < cfg.get('switch_prob', 0.5))
  other, other_labels = images[::-1], labels[::-1]
  if not use_cutmix:
    lam = np.float32(lam_mixup)
    return lam * images + (1 - lam) * other, lam * labels + (1 - lam) * other_labels
  _, h, w, _ = images.shape
  cut = np.sqrt(1.0 - lam_cutmix)
  cy, cx = int(u[2] * h), int(u[3] * w)
  y0, y1 = np.clip([cy - int(h * cut) // 2, cy + int(h * cut) // 2], 0, h)
  x0, x1 = np.clip([cx - int(w * cut) // 2, cx + int(w * cut) // 2], 0, w)
  out = images.copy()
  out[:, y0:y1, x0:x1] = other[:, y0:y1, x0:x1]
  lam = np.float32(1.0 - (y1 - y0) * (x1 - x0) / (h * w))
  return out, lam * labels + (1 - lam) * other_labels

