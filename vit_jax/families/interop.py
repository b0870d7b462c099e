"""What a family's interop is (`Interop`), and the PyTorch layout conversions every interop uses.

A family's interop module (`<family>_interop.py`) defines `INTEROP`, an instance of its `Interop`
subclass built on the family's descriptor: how the family's parameters travel to and from other
libraries' formats (timm and Hugging Face state dicts and their config.json, Google's `.npz`
layout), and which of those checkpoints it reads. It imports its descriptor (for `infer`, grids,
fields); the descriptor never imports it (tests/test_layering.py). `registry` pairs the two:

    registry.interop('vit').to_timm(flat, arch)          -> (timm state dict, config.json)
    registry.interop_for_timm(architecture, keys)        -> the interop that reads a timm checkpoint
    registry.interop_for_hf(model_type)                  -> the one that reads a Hugging Face model

`vit_jax.formats` (the files) and `vit_jax.convert` (the `--to npz` writer) call these; nothing else
needs to. Everything here is numpy: torch is never imported (a torch tensor is read through
`to_numpy`).

Layouts: ours are Flax's (Dense kernels [in, out], DenseGeneral attention kernels with the heads
explicit, [D, heads, K] and [heads, K, D], convs HWIO, LayerNorm `scale`); PyTorch's Linear weights
are [out, in], conv weights OIHW, LayerNorm `weight`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vit_jax.families.base import Architecture, Family, Flat


class Interop:
  """A family's counterparts in other libraries; subclass it once per family (`INTEROP`).

  Declarations (class attributes a subclass sets):
    timm_prefixes: timm architecture-name prefixes this family reads (empty: no timm counterpart).
    hf_model_types: Hugging Face `model_type`s this family reads (empty: none).
    writes_npz: whether `--to npz` (Google's released layout) is meaningful for this family.
  The defaults refuse every format with a message naming the family.
  """
  timm_prefixes: tuple[str, ...] = ()
  hf_model_types: tuple[str, ...] = ()
  writes_npz: bool = False

  def __init__(self, family: Family):
    self.family = family

  @property
  def name(self) -> str:
    """The family's registry name."""
    return self.family.name

  # ---- timm ----
  def reads_timm(self, architecture: str, keys: set[str]) -> bool:
    """Whether a timm checkpoint (config.json `architecture`, may be '', and its state-dict keys) is
    of this family."""
    del keys
    return any(architecture.startswith(p) for p in self.timm_prefixes)

  def to_timm(self, flat: Flat, arch: Architecture) -> tuple[Flat, dict[str, Any]]:
    """(timm state dict, timm `config.json`) of this architecture; ValueError if not expressible."""
    del flat, arch
    raise ValueError(f'the {self.name} family has no timm counterpart')

  def from_timm(self, state: Mapping[str, np.ndarray], config: Mapping[str, Any]
                ) -> tuple[Flat, Architecture, list[str]]:
    """(flat, architecture, notes) from a timm state dict and its config.json."""
    del state, config
    raise ValueError(f'the {self.name} family reads no timm checkpoints')

  # ---- Hugging Face ----
  def to_hf(self, flat: Flat, arch: Architecture) -> tuple[Flat, dict[str, Any]]:
    """(transformers state dict, its config.json without labels); ValueError if not expressible."""
    del flat, arch
    raise ValueError(f'the {self.name} family has no Hugging Face counterpart that this project '
                     'writes; export with `--to timm`')

  def from_hf(self, state: Mapping[str, np.ndarray], config: Mapping[str, Any]
              ) -> tuple[Flat, Architecture, list[str]]:
    """(flat, architecture, notes) from a transformers state dict and its config.json."""
    del state, config
    raise ValueError(f'the {self.name} family reads no Hugging Face checkpoints')

  # ---- Google's .npz ----
  def npz_keys_ok(self, flat: Mapping[str, Any]) -> list[str]:
    """Keys of `flat` that are not in Google's npz layout (empty: writable)."""
    del flat
    return []

  def __repr__(self) -> str:
    return f'<interop {self.name}>'


# ---------- PyTorch layouts (numpy only) ----------

def to_numpy(value: Any) -> np.ndarray:
  """A numpy view of an array or a (CPU) torch tensor."""
  return np.asarray(value.detach().cpu().numpy() if hasattr(value, 'detach') else value)


def conv_to_torch(kernel: np.ndarray) -> np.ndarray:
  """A conv kernel HWIO -> PyTorch's OIHW (contiguous)."""
  return np.ascontiguousarray(np.asarray(kernel).transpose(3, 2, 0, 1))


def conv_from_torch(weight: np.ndarray) -> np.ndarray:
  """A PyTorch conv weight OIHW -> HWIO (contiguous)."""
  return np.ascontiguousarray(np.asarray(weight).transpose(2, 3, 1, 0))


def dense_to_torch(flat: Mapping[str, np.ndarray], ours: str, out: Flat, theirs: str) -> None:
  """A Dense/DenseGeneral kernel [in..., out...] -> Linear weight [out, in] (and its bias).

  A 3-d kernel of a module named `.../out` is an attention output [heads, K, D]; any other is an
  attention input [D, heads, K].
  """
  k = flat[f'{ours}/kernel']
  if k.ndim == 3 and ours.endswith('/out'):
    k = k.reshape(-1, k.shape[-1])          # [H, K, D] -> [H*K, D]
  elif k.ndim == 3:
    k = k.reshape(k.shape[0], -1)           # [D, H, K] -> [D, H*K]
  out[f'{theirs}.weight'] = np.ascontiguousarray(k.T)
  if f'{ours}/bias' in flat:
    out[f'{theirs}.bias'] = flat[f'{ours}/bias'].reshape(-1)


def dense_from_torch(sd: Flat, theirs: str, out: Flat, ours: str,
                     kernel_shape: Optional[tuple[int, ...]] = None,
                     bias_shape: Optional[tuple[int, ...]] = None) -> None:
  """A Linear weight [out, in] -> a Dense kernel [in, out] (reshaped), and its bias (popped)."""
  w = sd.pop(f'{theirs}.weight').T
  out[f'{ours}/kernel'] = np.ascontiguousarray(w.reshape(kernel_shape) if kernel_shape else w)
  if f'{theirs}.bias' in sd:
    b = sd.pop(f'{theirs}.bias')
    out[f'{ours}/bias'] = b.reshape(bias_shape) if bias_shape else b


def ln_to_torch(flat: Mapping[str, np.ndarray], ours: str, out: Flat, theirs: str) -> None:
  """A LayerNorm's scale and bias -> PyTorch's weight and bias."""
  out[f'{theirs}.weight'] = flat[f'{ours}/scale']
  out[f'{theirs}.bias'] = flat[f'{ours}/bias']


def ln_from_torch(sd: Flat, theirs: str, out: Flat, ours: str) -> None:
  """A PyTorch LayerNorm's weight and bias (popped) -> scale and bias."""
  out[f'{ours}/scale'] = sd.pop(f'{theirs}.weight')
  out[f'{ours}/bias'] = sd.pop(f'{theirs}.bias')


def fused_to_torch(flat: Mapping[str, np.ndarray], att: str, names: Sequence[str], out: Flat,
                   theirs: str) -> None:
  """Attention inputs `{att}/{name}` [D, heads, K] (e.g. query, key, value) -> one fused Linear
  (timm's `qkv`): weights stacked [len(names) * heads * K, D] in `names` order, biases too."""
  ws = [flat[f'{att}/{n}/kernel'] for n in names]
  out[f'{theirs}.weight'] = np.concatenate([w.reshape(w.shape[0], -1).T for w in ws], axis=0)
  out[f'{theirs}.bias'] = np.concatenate([flat[f'{att}/{n}/bias'].reshape(-1) for n in names])


def split_from_torch(sd: Flat, theirs: str, names: Sequence[str], heads: int, out: Flat,
                     att: str) -> None:
  """The inverse of `fused_to_torch` (popping the fused weight and bias): `heads` is needed
  because the fused weight does not say it."""
  w, b = sd.pop(f'{theirs}.weight'), sd.pop(f'{theirs}.bias')
  d = w.shape[1]
  for n, wn, bn in zip(names, np.split(w, len(names)), np.split(b, len(names))):
    out[f'{att}/{n}/kernel'] = np.ascontiguousarray(wn.T.reshape(d, heads, -1))
    out[f'{att}/{n}/bias'] = bn.reshape(heads, -1)


def timm_model_args(config: Mapping[str, Any], known_archs: Mapping[str, tuple[dict, Any]]
                    ) -> tuple[dict, Any]:
  """(args, norm) of a timm config.json: its `model_args` over the registered arguments of its
  `architecture` in `known_archs` ({name: (args, (mean, std) or None)}); a ValueError naming the
  known architectures when neither says how many heads the model has."""
  name = str(config.get('architecture', '')).split('.')[0]
  known, norm = known_archs.get(name, ({}, None))
  given = dict(config.get('model_args') or {})
  if not known and 'num_heads' not in given:
    raise ValueError(f'timm architecture {name or "(none)"!r} is not one whose options this '
                     f'project knows ({", ".join(sorted(known_archs))}) and config.json has no '
                     'model_args: save it with timm\'s save_for_hf(model_args=...)')
  return {**known, **given}, norm


def timm_architecture(family: Family, flat: Flat, config: Mapping[str, Any],
                      args: Mapping[str, Any], fields: Mapping[str, Any], norm: Any
                      ) -> Architecture:
  """The Architecture of a timm checkpoint read into `flat`: `fields` (over what this project wrote
  in config.json's `vit_jax` block), the image size of `args` or `pretrained_cfg`, and the
  normalisation the checkpoint states (else `norm`, the architecture's registered one)."""
  if 'vit_jax' in config:  # written here: keep the registry name and training options
    fields = {**config['vit_jax'].get('model_config', {}), **fields}
  pcfg = config.get('pretrained_cfg') or {}
  size = args.get('img_size') or (pcfg.get('input_size') or [0, 224, 224])[1:]
  size = (int(size), int(size)) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))
  arch = family.infer(flat, model_config=dict(fields), image_size=size)
  if pcfg.get('mean') and pcfg.get('std'):
    arch.mean, arch.std = tuple(pcfg['mean']), tuple(pcfg['std'])
  elif norm is not None:
    arch.mean, arch.std = norm
  return arch


def timm_pretrained_cfg(arch: Architecture, num_classes: int, first_conv: str = 'patch_embed.proj',
                        classifier: Any = 'head') -> dict[str, Any]:
  """timm's `pretrained_cfg` of a config.json: input size, normalisation, head and first conv."""
  return dict(num_classes=num_classes, input_size=[arch.channels, *arch.image_size],
              classifier=classifier, first_conv=first_conv, interpolation='bilinear', crop_pct=1.0,
              mean=list(arch.mean), std=list(arch.std))
